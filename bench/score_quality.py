"""Do the scores mean something? Validation perplexity of the tiny-world teacher pruned to the
same shapes with grad scores (MiniMA), activation scores (Minitron) and random scores.

A better score keeps the units that matter, so at equal shape its pruned model (before any
distillation) has the lower perplexity. Random scores are the floor every method must beat.

Run from the repository root (builds the tiny world unless --world points at one):

    .venv/bin/python bench/score_quality.py
    .venv/bin/python bench/score_quality.py --world demo/world
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from minima_cli.data.pack import pack_documents
from minima_cli.data.read import read_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.model.arch import shape_from_config
from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model
from minima_cli.model.masks import masked
from minima_cli.model.scores import normalize_scores, random_scores
from minima_cli.model.selection import plan_masks, plan_prune
from minima_cli.model.shapes import resolve_target
from minima_cli.stages.score import activation_scores, gradient_scores, score_blocks
from minima_cli.stages.tiny import build_tiny_world
from minima_cli.training.state import evaluate_loss

TARGETS = {"ratio 0.75": {"ratio": 0.75}, "ratio 0.5": {"ratio": 0.5},
           "ffn only 50%": {"shape": {"ffn": 88}}, "hidden only 75%": {"shape": {"hidden": 48}},
           "drop 1 of 4 layers": {"shape": {"layers": 3}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="an existing `minima tiny` output")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--random-seeds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            world = Path(tmp)
            build_tiny_world(world)
        evaluate(world, args)


def evaluate(world: Path, args: argparse.Namespace) -> None:
    source = resolve_model(world / "teacher")
    model = load_model(source)
    shape = shape_from_config(model.config)
    tokenizer = load_tokenizer(source)
    blocks = score_blocks(tokenizer, read_documents(world / "data" / "train.txt"), 64,
                          args.batches * 4, seed=0)
    valid = pack_documents(tokenize_documents(tokenizer, read_documents(world / "data" /
                                                                        "valid.txt")),
                           64, tokenizer.eos_token_id)
    methods = {
        "grad": normalize_scores(gradient_scores(model, shape, blocks.split(4))[0]),
        "activation": normalize_scores(activation_scores(model, shape, blocks.split(4))[0]),
    }
    print(f"teacher valid perplexity {math.exp(evaluate_loss(model, valid)):.2f} "
          f"({sum(p.numel() for p in model.parameters()):,} params)")
    random_label = f"random (mean of {args.random_seeds})"
    print(f"{'target':<22}{'grad':>10}{'activation':>12}{random_label:>22}")
    for label, target_args in TARGETS.items():
        target = resolve_target(shape, **target_args)
        row = [perplexity(model, shape, valid, plan_prune(scores, shape, target))
               for scores in methods.values()]
        randoms = [perplexity(model, shape, valid, plan_prune(random_scores(shape, seed), shape,
                                                              target))
                   for seed in range(args.random_seeds)]
        print(f"{label:<22}{row[0]:>10.2f}{row[1]:>12.2f}{sum(randoms) / len(randoms):>22.2f}")


def perplexity(model, shape, valid, plan) -> float:
    """The pruned model's perplexity, computed exactly as the teacher under the plan's masks."""
    with masked(model, plan_masks(plan, shape), shape):
        return math.exp(evaluate_loss(model, valid))



if __name__ == "__main__":
    main()
