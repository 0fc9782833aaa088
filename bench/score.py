"""Benchmark `minima score`: how much slower scoring is than plain training compute.

Measured, on a random LLaMA model (LlamaConfig, random weights) and random token batches:

- grad: `gradient_scores` (masks require grad, parameters frozen) against a baseline of the same
  model with its parameters requiring grad doing `model(input_ids=b, labels=b).loss.backward()`
  per batch, grads zeroed, no optimizer step. Goal: score / baseline <= 1.15x.
- activation (informational): `activation_scores` against a plain no-grad forward with labels.

Each side is warmed up once, then the sides are interleaved (baseline, score, baseline, score,
...) for --repeats rounds and the medians are reported, which cancels most machine noise.

Run from the repository root:

    .venv/bin/python bench/score.py
    .venv/bin/python bench/score.py --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from minima_cli.model.arch import shape_from_config
from minima_cli.stages.score import activation_scores, gradient_scores

GOAL = 1.15
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=-(-(8 * args.hidden // 3) // 32) * 32,  # 512 -> 1376
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=args.hidden // heads,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DTYPES[args.dtype]).eval()


def random_batches(args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(args.vocab, (args.batch_size, args.seq_len), generator=generator)
            for _ in range(args.batches)]


def train_step_baseline(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)


def forward_baseline(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, labels=batch).loss.item()


def interleaved(sides: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Warm each side up once, then time them in turn `repeats` times: median seconds."""
    for run in sides.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, baseline: str, scorer: str, medians: dict[str, float],
           args: argparse.Namespace, goal: float | None) -> None:
    tokens = args.batches * args.batch_size * args.seq_len
    print(f"\n{title}")
    print(f"{'':<34}{'s/batch':>10}{'tokens/s':>12}")
    for name in (baseline, scorer):
        seconds = medians[name]
        print(f"{name:<34}{seconds / args.batches:>10.3f}{tokens / seconds:>12.0f}")
    ratio = medians[scorer] / medians[baseline]
    if goal is None:
        print(f"ratio {ratio:.3f}x (informational)")
    else:
        print(f"ratio {ratio:.3f}x (goal <= {goal:.2f}x): {'PASS' if ratio <= goal else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--method", choices=("grad", "activation", "both"), default="both")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args)
    shape = shape_from_config(model.config)
    batches = random_batches(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / "
          f"{shape.kv_heads} kv, ffn {shape.ffn}, vocab {shape.vocab}, "
          f"{n_params / 1e6:.1f}M params, {args.dtype}")
    print(f"data: {args.batches} batches x {args.batch_size} x {args.seq_len} tokens; "
          f"{args.repeats} interleaved repeats (medians); {torch.get_num_threads()} threads")

    if args.method in ("grad", "both"):
        medians = interleaved({
            "baseline: forward+backward": lambda: train_step_baseline(model, batches),
            "gradient_scores": lambda: gradient_scores(model, shape, batches),
        }, args.repeats)
        report("grad scoring vs training step (no optimizer)", "baseline: forward+backward",
               "gradient_scores", medians, args, GOAL)
    if args.method in ("activation", "both"):
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            medians = interleaved({
                "baseline: no-grad forward": lambda: forward_baseline(model, batches),
                "activation_scores": lambda: activation_scores(model, shape, batches),
            }, args.repeats)
        except RuntimeError as error:  # report a broken scorer instead of a traceback
            print(f"\nactivation scoring FAILED: {error}")
            return
        report("activation scoring vs no-grad forward", "baseline: no-grad forward",
               "activation_scores", medians, args, None)


if __name__ == "__main__":
    main()
