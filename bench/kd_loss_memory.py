"""Benchmark the chunked KD loss: peak memory and time of forward + backward against the naive
full-vocabulary loss. Goal: chunked / naive peak <= 0.3x at vocab 32k and 128k.

What is measured: each (variant, vocab) runs in a fresh subprocess (this script with --child).
The child allocates its inputs first (student logits `[tokens, vocab]` as a leaf that requires
grad, teacher logits of the same shape, random, in --dtype), reads its RSS (VmRSS), then runs the
loss forward and backward once and reads its peak RSS (VmHWM). The peak minus the RSS before is
the loss's own working memory, the student's `.grad` included (both variants produce it).
Time is that first forward + backward, then the best of it and --repeats - 1 more runs.

- naive:   `naive_kd_loss` (log_softmax of both sides, forward KL, mean; plain autograd),
- chunked: `kd_loss` (token chunks inside an autograd.Function that keeps only the gradient),
- fused:   `fused_linear_kd_loss` (informational): inputs are the student's final hidden states
           `[tokens, --hidden]` and lm_head weight `[vocab, --hidden]` plus the teacher logits;
           the student's logits are never built, so its working memory is far below the others'.

Run from the repository root (about a minute on a 2-core CPU):

    .venv/bin/python bench/kd_loss_memory.py
    .venv/bin/python bench/kd_loss_memory.py --tokens 4096 --vocabs 32768 131072 --kind jsd
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference_losses import naive_kd_loss  # noqa: E402  (tests/reference_losses.py)

from minima_cli.losses import fused_linear_kd_loss, kd_loss  # noqa: E402

GOAL = 0.3
MB = 1024 * 1024
VARIANTS = ("naive", "chunked", "fused")


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS now, VmHWM peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    teacher = torch.rand(args.tokens, args.vocab, generator=generator).mul_(12).to(dtype)
    if args.variant == "fused":
        hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(dtype)
        weight = torch.randn(args.vocab, args.hidden, generator=generator).mul_(0.05).to(dtype)
        inputs = [hidden.requires_grad_(True), weight.requires_grad_(True)]

        def loss_fn():
            return fused_linear_kd_loss(hidden, weight, teacher, kind=args.kind)
    else:
        student = torch.rand(args.tokens, args.vocab, generator=generator).mul_(12).to(dtype)
        inputs = [student.requires_grad_(True)]
        fn = naive_kd_loss if args.variant == "naive" else kd_loss

        def loss_fn():
            return fn(student, teacher, kind=args.kind)

    times = []
    for repeat in range(args.repeats):
        for x in inputs:
            x.grad = None
        if repeat == 0:
            before = status_kib("VmRSS")
        start = time.perf_counter()
        loss_fn().backward()
        times.append(time.perf_counter() - start)
        if repeat == 0:
            peak = status_kib("VmHWM") - before
    print(json.dumps({"peak_mib": peak / 1024, "seconds": min(times)}))


def run_child(variant: str, vocab: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(vocab),
               "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--dtype", args.dtype,
               "--kind", args.kind, "--repeats", str(args.repeats)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--hidden", type=int, default=256, help="hidden size, fused variant")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kind", default="fkl", choices=["fkl", "rkl", "jsd"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    one = args.tokens * max(args.vocabs) * itemsize
    print(f"KD loss ({args.kind}) forward + backward, {args.tokens} tokens, {args.dtype} logits, "
          f"{torch.get_num_threads()} threads; peak = VmHWM - VmRSS before the loss "
          f"(one [tokens, vocab] {args.dtype} tensor at the largest vocab = {one / MB:.0f} MiB)")
    header = (f"{'vocab':>7} | {'naive MiB':>9} {'chunked MiB':>11} {'mem ratio':>9} | "
              f"{'naive s':>7} {'chunked s':>9} {'time ratio':>10} | {'fused MiB':>9} "
              f"{'fused s':>7} | goal <= {GOAL}x")
    print(header)
    print("-" * len(header))
    verdicts = []
    for vocab in args.vocabs:
        r = {variant: run_child(variant, vocab, args) for variant in VARIANTS}
        ratio = r["chunked"]["peak_mib"] / r["naive"]["peak_mib"]
        verdict = "PASS" if ratio <= GOAL else "MISS"
        verdicts.append(verdict)
        print(f"{vocab:>7} | {r['naive']['peak_mib']:>9.0f} {r['chunked']['peak_mib']:>11.0f} "
              f"{ratio:>8.3f}x | {r['naive']['seconds']:>7.2f} {r['chunked']['seconds']:>9.2f} "
              f"{r['chunked']['seconds'] / r['naive']['seconds']:>9.2f}x | "
              f"{r['fused']['peak_mib']:>9.0f} {r['fused']['seconds']:>7.2f} | {verdict}")
    print("PASS" if all(v == "PASS" for v in verdicts) else "MISS",
          f"(chunked / naive peak memory <= {GOAL}x at every vocab)")


if __name__ == "__main__":
    main()
