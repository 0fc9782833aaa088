"""The levers of issue 16, each against minima's step as it is, on the SmolLM2 pair of
bench/mfu.py (batch 2 x 256, bf16 autocast by default), interleaved rounds, median per-round
ratios.

Variants of one distillation step (teacher forward, student forward, forward-KL loss, backward,
clip, fused AdamW):
- `minima`: as `minima distill` runs it: bf16 teacher weights under no_grad, student fp32
  weights under bf16 autocast, the chunked loss on the student's logits.
- `teacher-fp32`: the teacher's weights left fp32 under autocast (re-cast every micro-batch):
  what casting the teacher to bf16 once gives.
- `inference-mode`: the teacher under torch.inference_mode instead of no_grad.
- `fused-linear`: the student's final hidden states and lm_head weight to
  `losses.fused_linear_distillation_loss` (the `[tokens, vocab]` student logits never built).
- `compiled`: the student (and teacher) through torch.compile (inductor); compile time is
  reported apart, steps after the first --warmup-steps.

    .venv/bin/python bench/mfu_levers.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
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
from minima_cli.training.loop import cpu_has_bf16  # noqa: E402
from minima_cli.training.state import adamw, clip_gradients  # noqa: E402


def run_variant(name: str, paths, blocks, args) -> tuple[float, float]:
    """(seconds per step after warm-up, seconds of the warm-up steps) of one variant."""
    teacher, student = base.load_pair(paths)
    bf16 = args.precision == "bf16"
    if bf16 and name != "teacher-fp32":
        teacher = teacher.to(torch.bfloat16)
    if name == "compiled":
        student = torch.compile(student)
        teacher = torch.compile(teacher)
    optimizer = adamw([{"params": list(student.parameters())}], base.LR)
    no_grad = torch.inference_mode if name == "inference-mode" else torch.no_grad
    vocab = student.config.vocab_size
    times = []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with amp:
        for batch in base.batches(blocks, args):
            start = time.perf_counter()
            labels = next_token_labels(batch)
            with no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits
            if name == "fused-linear":
                hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state
                loss, _ = fused_linear_distillation_loss(
                    hidden, student.lm_head.weight, target, labels, alpha=0.0, vocab_size=vocab)
            else:
                logits = student(input_ids=batch, use_cache=False).logits
                loss, _ = distillation_loss(logits, target.clone() if name == "inference-mode"
                                            else target, labels, alpha=0.0, vocab_size=vocab)
            loss.backward()
            clip_gradients(list(student.parameters()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    skip = args.warmup_steps
    return statistics.mean(times[skip:]), sum(times[:skip])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        default="bf16" if cpu_has_bf16() else "fp32")
    parser.add_argument("--text-chars", type=int, default=50_000)
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--variants", nargs="+",
                        default=["minima", "teacher-fp32", "inference-mode", "fused-linear",
                                 "compiled"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        paths = build_smollm2(Path(tmp), args)
        blocks = base.train_blocks(paths, args)
        print(f"SmolLM2 pair, batch {args.batch_size} x {args.seq_len}, {args.precision}, "
              f"{torch.get_num_threads()} threads; attention: "
              f"{base.load_pair(paths)[1].config._attn_implementation}", flush=True)
        sides = {name: (lambda name=name: run_variant(name, paths, blocks, args))
                 for name in args.variants}
        results = base.interleaved(sides, args.repeats)
    baseline = [s for s, _ in results["minima"]]
    print(f"\n{'variant':<16}{'s/step':>8}{'vs minima':>11}{'warm-up s':>11}   rounds")
    for name, rounds in results.items():
        steps = [s for s, _ in rounds]
        print(f"{name:<16}{statistics.median(steps):>8.3f}"
              f"{base.paired(steps, baseline):>10.3f}x"
              f"{statistics.median(w for _, w in rounds):>11.1f}   "
              + " ".join(f"{s:.3f}" for s in steps))


if __name__ == "__main__":
    main()
