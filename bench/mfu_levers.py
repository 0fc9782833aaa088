"""The levers of issue 16, each against minima's step as it is, on the SmolLM2 pair of
bench/mfu.py (batch 2 x 256, bf16 autocast by default): every variant's models built once and
warmed up, then rounds of one step of each variant in a rotated order on the same batch; the
median over rounds of each variant's step time over minima's in the same round.

Why steps and not whole runs are interleaved, and why 1 thread by default: on a CPU shared with
other processes, torch at all cores (OpenMP spinning barriers wait on descheduled threads) gave
step times several times apart from one step to the next, so variants run one after the other,
minutes apart, compared the load of other processes, not the variants (README, "MFU").

Variants of one distillation step (teacher forward, student forward, forward-KL loss, backward,
clip, fused AdamW):
- `minima`: as `minima distill` runs it: bf16 teacher weights under no_grad, student fp32
  weights under bf16 autocast, the chunked loss on the student's logits.
- `teacher-fp32`: the teacher's weights left fp32 under autocast (re-cast every micro-batch):
  what casting the teacher to bf16 once gives.
- `inference-mode`: the teacher under torch.inference_mode instead of no_grad.
- `fused-linear`: the student's final hidden states and lm_head weight to
  `losses.fused_linear_distillation_loss` (the `[tokens, vocab]` student logits never built).
- `compiled`: `minima distill --compile`: the student's and the teacher's forward compiled in
  place by torch.compile (inductor, `training.loop.compile_in_place`); compile time is reported
  apart (the warm-up column), steps after the first --warmup-steps.
- `bf16-master`: the student's weights in bf16 (no autocast re-cast of each weight a
  micro-batch), fp32 master copies in the fused AdamW: gradients copied up after backward, the
  updated masters copied down after the step (DeepSpeed's bf16 mode does the same).
- `eager-attention`: both models with transformers' "eager" attention (matmul, fp32 softmax,
  matmul) instead of SDPA's CPU flash kernel; it keeps the `[heads, seq, seq]` weights for
  backward, so it can only be a choice for short sequences.

    .venv/bin/python bench/mfu_levers.py --rounds 8
    .venv/bin/python bench/mfu_levers.py --variants minima compiled --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill as base  # noqa: E402
from mfu import build_smollm2  # noqa: E402

from minima_cli.losses import (  # noqa: E402
    distillation_loss,
    fused_linear_distillation_loss,
    next_token_labels,
)
from minima_cli.training.loop import compile_in_place, cpu_has_bf16  # noqa: E402
from minima_cli.training.state import adamw, clip_gradients  # noqa: E402

VARIANTS = ("minima", "teacher-fp32", "inference-mode", "fused-linear", "compiled",
            "bf16-master", "eager-attention")


class Variant:
    """One variant's models, optimizer and step; `step(batch)` returns its seconds."""

    def __init__(self, name: str, paths, teachers: dict, args) -> None:
        self.name = name
        bf16 = args.precision == "bf16"
        # the frozen teacher is shared by the variants that run it alike (memory); compiling
        # is in place, so the compiled variant has its own
        key = ("fp32" if name == "teacher-fp32" or not bf16 else "bf16") + \
            ("-" + name if name in ("compiled", "eager-attention") else "")
        if key not in teachers:
            teacher, _ = base.load_pair(paths)
            if key.startswith("bf16"):
                teacher = teacher.to(torch.bfloat16)
            if name == "eager-attention":  # HF's matmul-softmax-matmul attention
                teacher.set_attn_implementation("eager")
            teachers[key] = compile_in_place(teacher, name == "compiled")
        teacher = teachers[key]
        student = base.load_pair(paths)[1]
        if name == "eager-attention":
            student.set_attn_implementation("eager")
        self.master = None
        if name == "bf16-master":  # bf16 weights, fp32 master copies in the optimizer
            self.master = [p.detach().float() for p in student.parameters()]
            student.to(torch.bfloat16)
        self.params = list(student.parameters())
        self.vocab = student.config.vocab_size
        self.head = student.lm_head.weight
        self.student, self.body, self.teacher = student, student.model, teacher
        if name == "compiled":
            self.student = compile_in_place(student)
        self.optimizer = adamw([{"params": self.master or self.params}], base.LR)
        self.no_grad = torch.inference_mode if name == "inference-mode" else torch.no_grad
        self.amp = base.autocast(args.precision)

    def step(self, batch: torch.Tensor) -> float:
        start = time.perf_counter()
        with self.amp:
            labels = next_token_labels(batch)
            with self.no_grad():
                target = self.teacher(input_ids=batch, use_cache=False).logits
            if self.name == "inference-mode":
                target = target.clone()  # an inference tensor cannot be saved for backward
            if self.name == "fused-linear":
                hidden = self.body(input_ids=batch, use_cache=False).last_hidden_state
                loss, _ = fused_linear_distillation_loss(
                    hidden, self.head, target, labels, alpha=0.0, vocab_size=self.vocab)
            else:
                logits = self.student(input_ids=batch, use_cache=False).logits
                loss, _ = distillation_loss(logits, target, labels, alpha=0.0,
                                            vocab_size=self.vocab)
        loss.backward()
        if self.master is not None:
            for master, param in zip(self.master, self.params, strict=True):
                master.grad, param.grad = param.grad.float(), None
        clip_gradients(self.master or self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        return time.perf_counter() - start


def step_rounds(variants: list[Variant], blocks: torch.Tensor, args
                ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every variant up (its first steps: compilation, oneDNN kernel creation), then
    --rounds rounds of one step of each variant in a rotated order, on the same batch: a load
    change on a shared machine hits every variant within seconds of each other. Returns each
    variant's per-round step seconds and its warm-up seconds."""
    stream = base.batches(blocks, argparse.Namespace(
        steps=args.warmup_steps + args.rounds, batch_size=args.batch_size))
    batches = list(stream)
    warmup = {}
    for variant in variants:
        warmup[variant.name] = sum(variant.step(b) for b in batches[:args.warmup_steps])
        print(f"  {variant.name}: warm-up {warmup[variant.name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for index, batch in enumerate(batches[args.warmup_steps:]):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times[variant.name].append(variant.step(batch))
    return times, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps of each variant")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: all cores on a shared CPU make "
                        "OpenMP's spinning barriers wait on descheduled threads)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        default="bf16" if cpu_has_bf16() else "fp32")
    parser.add_argument("--text-chars", type=int, default=50_000)
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=["minima", "teacher-fp32", "inference-mode", "fused-linear"])
    args = parser.parse_args()
    names = ["minima"] + [n for n in args.variants if n != "minima"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        paths = build_smollm2(Path(tmp), args)
        blocks = base.train_blocks(paths, args)
        teachers: dict = {}
        variants = [Variant(name, paths, teachers, args) for name in names]
        print(f"SmolLM2 pair, batch {args.batch_size} x {args.seq_len}, {args.precision}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
              f"attention: {variants[0].student.config._attn_implementation}", flush=True)
        times, warmup = step_rounds(variants, blocks, args)
    baseline = times["minima"]
    print(f"\n{'variant':<16}{'s/step':>8}{'vs minima':>11}{'warm-up s':>11}   steps (s)")
    for name, steps in times.items():
        print(f"{name:<16}{statistics.median(steps):>8.3f}"
              f"{base.paired(steps, baseline):>10.3f}x{warmup[name]:>11.1f}   "
              + " ".join(f"{s:.2f}" for s in steps))
    print(f"(vs minima: median over rounds of the variant's step time / minima's in the same "
          f"round; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
