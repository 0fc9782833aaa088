"""AdamW step time: PyTorch's fused kernel (what minima's `train_state.adamw` picks) against the
multi-tensor (`foreach`) and per-tensor loops, on the parameter shapes of bench/distill.py's
student (11.5M parameters: 16k x 256 embedding and lm_head, 4 layers of 256-wide matrices and
norms). Prints ms per step and the ratio to the fused kernel for each thread count.

    .venv/bin/python bench/adamw.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(16384, 256)] * 2 + [(256, 1024)] * 12 + [(256,)] * 9


def step_ms(kind: str, steps: int) -> float:
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    options = {"fused": {"fused": True}, "foreach": {"foreach": True},
               "per-tensor": {"foreach": False}}[kind]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **options)
    for _ in range(3):  # state allocation and warm-up
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"AdamW, {sum(torch.Size(s).numel() for s in SHAPES):,} parameters, median of "
          f"{args.steps} steps")
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        fused = step_ms("fused", args.steps)
        for kind in ("fused", "foreach", "per-tensor"):
            ms = fused if kind == "fused" else step_ms(kind, args.steps)
            print(f"  {threads} thread(s)  {kind:<11}{ms:>8.1f} ms  {ms / fused:>6.2f}x fused")


if __name__ == "__main__":
    main()
