"""Model FLOPs and utilisation (MFU): what a step costs by the model's shape, and the peak it is
measured against.

Convention (PaLM's, as most MFU figures are quoted): a token's forward costs 2 FLOPs per
parameter that takes part in a matmul (every projection of every layer and the lm_head; the
embedding lookup is free) plus the attention scores and their weighted sum, 4 * layers * context
* heads * head_dim, counted for the whole context (no causal halving). Forward + backward is 3x
the forward. A distillation step per token: the student's 3x plus the teacher's forward.

The peak is measured, not looked up, on CPUs: a few matmuls at the model's own shapes in the
run's precision, cached per machine (docs/stages.md).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minima_cli.model.arch import ModelShape

# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs, from their vendors' data sheets.
KNOWN_GPU_PEAKS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
}


def matmul_parameters(shape: ModelShape, head_columns: int | None = None) -> int:
    """Parameters used in matmuls per token: attention and MLP projections of every layer, and
    the lm_head (tied or not: the matmul is done either way), or only `head_columns` of its
    rows when a loss computes just those logits (top-k renorm without CE: k dot products)."""
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    attention = shape.hidden * q + 2 * shape.hidden * kv + q * shape.hidden
    mlp = 3 * shape.hidden * shape.ffn
    head = shape.vocab if head_columns is None else head_columns
    return shape.layers * (attention + mlp) + head * shape.hidden


def forward_flops_per_token(shape: ModelShape, context: int,
                            head_columns: int | None = None) -> int:
    """FLOPs of one token's forward pass with `context` tokens attended to."""
    attention = 4 * shape.layers * context * shape.heads * shape.head_dim
    return 2 * matmul_parameters(shape, head_columns) + attention


def score_flops_per_token(shape: ModelShape, context: int, method: str) -> int:
    """`minima score`: activation scores are a forward; gradient scores add a backward to the
    activations only (the weights are frozen: one matmul per forward matmul), 2x the forward."""
    return (2 if method == "grad" else 1) * forward_flops_per_token(shape, context)


def train_flops_per_token(shape: ModelShape, context: int,
                          head_columns: int | None = None) -> int:
    """Forward + backward (the backward costs twice the forward)."""
    return 3 * forward_flops_per_token(shape, context, head_columns)


def distill_flops_per_token(student: ModelShape, teacher: ModelShape | None,
                            context: int, head_columns: int | None = None) -> int:
    """A distillation step per token: the student trains (its lm_head reduced to
    `head_columns` rows when the loss needs only those logits), the teacher (if run) only
    forwards."""
    teacher_part = forward_flops_per_token(teacher, context) if teacher is not None else 0
    return train_flops_per_token(student, context, head_columns) + teacher_part


def utilisation(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """MFU: the model FLOPs achieved as a fraction of the peak."""
    if peak_flops <= 0:
        raise ValueError("the peak must be positive")
    return flops_per_token * tokens_per_second / peak_flops


def known_gpu_peak(device_name: str) -> float | None:
    """The listed bf16 peak of a GPU by (part of) its name, in FLOP/s, or None."""
    for name in sorted(KNOWN_GPU_PEAKS, key=len, reverse=True):
        if name.lower() in device_name.lower():
            return KNOWN_GPU_PEAKS[name] * 1e12
    return None


def matmul_shapes(shape: ModelShape, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's projections for `tokens` rows: what the peak is measured on."""
    q = shape.heads * shape.head_dim
    return [(tokens, shape.hidden, q), (tokens, shape.hidden, shape.ffn),
            (tokens, shape.ffn, shape.hidden), (tokens, shape.hidden, shape.vocab)]


def measure_matmul_peak(shapes: list[tuple[int, int, int]], dtype: Any, device: Any = "cpu",
                        repeats: int = 5) -> float:
    """The best FLOP/s over the shapes: each matmul timed `repeats` times after a warm-up, the
    fastest round counted (the peak a step at these shapes could reach)."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b  # warm-up: kernels chosen, caches filled
        fastest = float("inf")
        for _ in range(repeats):
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - start)
        best = max(best, 2 * m * k * n / fastest)
    return best


def peak_cache_key(device: str, dtype_name: str, threads: int, shapes: list) -> str:
    return json.dumps([platform.machine(), platform.processor() or cpu_model(), device,
                       dtype_name, threads, shapes])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cached_peak(key: str, measure: Any, cache: Path | None = None) -> float:
    """The peak for `key` from the per-machine cache ($MINIMA_PEAK_CACHE, else
    ~/.cache/minima/matmul_peaks.json), else `measure()` stored there."""
    if cache is None and os.environ.get("MINIMA_PEAK_CACHE"):
        cache = Path(os.environ["MINIMA_PEAK_CACHE"])
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "minima" / "matmul_peaks.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    value = measure()
    known[key] = value
    try:
        from minima_cli.fsutil import atomic_write_text

        atomic_write_text(cache, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return value


# Rows a peak is measured at: enough to fill the matmul units, few enough that the lm_head's
# matmul of a large vocabulary takes a fraction of a second (the measurement runs once per
# machine, precision and shape, before the first step).
PEAK_ROWS = 1024


def resolve_peak(peak_tflops: float | None, device: Any, precision: str,
                 shapes: list[ModelShape], tokens: int) -> tuple[float, str]:
    """The peak FLOP/s of one device that MFU is measured against, and where it came from:
    `given` (--peak-tflops), `listed` (a known GPU, KNOWN_GPU_PEAKS), or `measured` (matmuls at
    the models' shapes, `tokens` rows, in `precision`: "bf16"/"bfloat16", "fp16"/"float16",
    else fp32; cached per machine by cached_peak)."""
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12, "given"
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        listed = known_gpu_peak(torch.cuda.get_device_name(device))
        if listed is not None:
            return listed, "listed"
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16}.get(precision, torch.float32)
    rows = max(1, min(tokens, PEAK_ROWS))
    wanted = sorted({mkn for shape in shapes for mkn in matmul_shapes(shape, rows)})
    key = peak_cache_key(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads(),
                         [list(mkn) for mkn in wanted])
    return cached_peak(key, lambda: measure_matmul_peak(wanted, dtype, device)), "measured"


@dataclass(frozen=True)
class Throughput:
    """What a run's model FLOPs are measured by: FLOPs per token and the peak (FLOP/s)."""

    flops_per_token: float
    peak: float
    peak_source: str

    def figures(self, tokens_per_second: float) -> dict[str, float]:
        """flops_per_token, the achieved TFLOP/s and the MFU at `tokens_per_second`."""
        achieved = self.flops_per_token * tokens_per_second
        return {"flops_per_token": self.flops_per_token, "tflops": achieved / 1e12,
                "mfu": utilisation(self.flops_per_token, tokens_per_second, self.peak)}

    def summary(self, tokens_per_second: float) -> dict[str, Any]:
        """The manifest's figures: those of `figures` plus the peak and its source."""
        return {**self.figures(tokens_per_second), "peak_tflops": self.peak / 1e12,
                "peak_source": self.peak_source}
