"""Does distillation beat training on the data alone? The tiny world, end to end: a teacher,
the teacher pruned (grad scores, `run_prune`), and that pruned student trained for the same
tokens with the LM loss alone (alpha 1) and with KD (alpha < 1), same seeds, same data order.

Every model is scored on the world's held-out documents (`data/valid.txt`, never trained on),
packed into blocks of --seq-len, as validation perplexity. Rows are teachers (pre-training steps
and shape); columns are the teacher itself, the student right after pruning, CE only and each
(alpha, T) of KD, each the mean over --seeds (the spread is printed below the table).

Run from the repository root (the defaults take ~15 minutes on a 2-core CPU):

    .venv/bin/python bench/distill_quality.py
    .venv/bin/python bench/distill_quality.py --teachers 200 2000 --alphas 1 0.5 0 --seeds 0 1 2
    .venv/bin/python bench/distill_quality.py --teachers 2000 2000:128x4 --student-params 112560

A teacher is `STEPS` (the tiny world's own teacher, `build_tiny_world(steps=STEPS)`) or
`STEPS:HIDDENxLAYERS` (a wider/deeper teacher pre-trained the same way on the same corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaForCausalLM  # noqa: E402

from minima_cli.data.pack import pack_documents  # noqa: E402
from minima_cli.data.read import read_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.model.checkpoint import (
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)  # noqa: E402,E501
from minima_cli.stages.configs import DistillConfig  # noqa: E402
from minima_cli.stages.distill import run_distill
from minima_cli.stages.prune import run_prune  # noqa: E402
from minima_cli.stages.score import run_score  # noqa: E402
from minima_cli.stages.tiny import build_tiny_world, pretrain, tiny_llama_config  # noqa: E402
from minima_cli.training.state import evaluate_loss  # noqa: E402


def parse_teacher(spec: str) -> tuple[int, tuple[int, int] | None]:
    """`STEPS` or `STEPS:HIDDENxLAYERS` -> (steps, None or (hidden, layers))."""
    steps, _, shape = spec.partition(":")
    if not shape:
        return int(steps), None
    hidden, layers = shape.lower().split("x")
    return int(steps), (int(hidden), int(layers))


def held_out_perplexity(model_dir: Path, valid: torch.Tensor) -> float:
    model = load_model(resolve_model(model_dir))
    return math.exp(evaluate_loss(model, valid))


def build_teacher(world: Path, steps: int, shape: tuple[int, int] | None, documents: int
                  ) -> None:
    """The tiny world (`documents` documents) with its teacher pre-trained `steps` steps; with a
    shape, the world's teacher is replaced by a model of that hidden size and depth, pre-trained
    identically."""
    build_tiny_world(world, steps=0 if shape else steps, n_documents=documents)
    if shape is None:
        return
    hidden, layers = shape
    teacher_dir = world / "teacher"
    tokenizer = load_tokenizer(resolve_model(teacher_dir))
    blocks = pack_documents(tokenize_documents(tokenizer, read_documents(world / "data" /
                                                                         "train.txt")),
                            64, tokenizer.eos_token_id)
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden, num_layers=layers,
                               num_heads=max(2, hidden // 16), ffn_size=hidden * 11 // 4,
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, blocks, steps=steps, seed=0)
    fresh = world / "teacher.new"
    with quiet_transformers():
        model.save_pretrained(fresh)
    tokenizer.save_pretrained(fresh)
    shutil.copy2(teacher_dir / "generation_config.json", fresh / "generation_config.json")
    shutil.rmtree(teacher_dir)
    os.replace(fresh, teacher_dir)


def prune_student(world: Path, args: argparse.Namespace) -> Path:
    teacher, train = str(world / "teacher"), str(world / "data" / "train.txt")
    run_score(model_path=teacher, data=train, output=world / "scores", batches=16,
              seq_len=args.seq_len, progress=False)
    target = ({"params": str(args.student_params)} if args.student_params
              else {"ratio": args.ratio})
    run_prune(model_path=teacher, output=world / "pruned", scores_path=str(world / "scores"),
              progress=False, **target)
    return world / "pruned"


def distil(world: Path, student: Path, out: Path, alpha: float, temperature: float, seed: int,
           args: argparse.Namespace) -> Path:
    config = DistillConfig(loss="fkl", alpha=alpha, temperature=temperature,
                           seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                           max_steps=args.steps, save_every=10 * args.steps,
                           eval_every=10 * args.steps, seed=seed, tensorboard=False)
    run_distill(teacher_path=str(world / "teacher"), student_path=str(student),
                data=str(world / "data" / "train.txt"), output=out, config=config, force=True,
                progress=False)
    return out


def run_label(alpha: float, temperature: float) -> str:
    if alpha == 1:
        return "CE only"
    return f"KD a={alpha:g} T={temperature:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=["200", "2000"],
                        help="STEPS or STEPS:HIDDENxLAYERS per teacher")
    parser.add_argument("--documents", type=int, default=2000,
                        help="documents in the tiny world's corpus (its default: 2000)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.0],
                        help="CE weights; 1 = CE only (the no-teacher baseline)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200, help="student training steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of params kept")
    parser.add_argument("--student-params", type=int,
                        help="prune every teacher to this parameter count instead of --ratio")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (tiny matrices gain nothing from more)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    runs = [(a, t) for a in args.alphas for t in (args.temperatures if a < 1 else [1.0])]
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"tiny world of {args.documents} documents; student training: {args.steps} steps x "
          f"{args.batch_size} x {args.seq_len} = {tokens:,} tokens, lr {args.lr:g}, seeds "
          f"{args.seeds}; perplexity on the world's held-out documents", flush=True)

    table: list[tuple[str, float, float, int, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kdq-") as tmp:
        for spec in args.teachers:
            steps, shape = parse_teacher(spec)
            world = Path(tmp) / spec.replace(":", "_")
            world.mkdir()
            start = time.perf_counter()
            build_teacher(world, steps, shape, args.documents)
            tokenizer = load_tokenizer(resolve_model(world / "teacher"))
            valid = pack_documents(tokenize_documents(tokenizer, read_documents(
                world / "data" / "valid.txt")), args.seq_len, tokenizer.eos_token_id)
            student = prune_student(world, args)
            n_student = sum(p.numel() for p in load_model(resolve_model(student)).parameters())
            teacher_ppl = held_out_perplexity(world / "teacher", valid)
            pruned_ppl = held_out_perplexity(student, valid)
            print(f"teacher {spec}: ppl {teacher_ppl:.3f}; pruned ({n_student:,} params) ppl "
                  f"{pruned_ppl:.2f} [{time.perf_counter() - start:.0f} s]", flush=True)
            results: dict[str, list[float]] = {}
            for seed in args.seeds:
                for alpha, temperature in runs:
                    start = time.perf_counter()
                    out = distil(world, student, Path(tmp) / "run", alpha, temperature, seed,
                                 args)
                    ppl = held_out_perplexity(out, valid)
                    results.setdefault(run_label(alpha, temperature), []).append(ppl)
                    print(f"  seed {seed} {run_label(alpha, temperature):<18} ppl {ppl:.3f} "
                          f"[{time.perf_counter() - start:.0f} s]", flush=True)
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(out)
            table.append((spec, teacher_ppl, pruned_ppl, n_student, results))
            shutil.rmtree(world)

    labels = [run_label(a, t) for a, t in runs]
    print(f"\nheld-out perplexity, mean over seeds {args.seeds} ({tokens:,} training tokens each)")
    header = f"{'teacher':<14}{'teacher':>9}{'pruned':>9}" + "".join(f"{x:>20}" for x in labels)
    print(header)
    print("-" * len(header))
    for spec, teacher_ppl, pruned_ppl, _, results in table:
        means = [statistics.mean(results[x]) for x in labels]
        print(f"{spec:<14}{teacher_ppl:>9.3f}{pruned_ppl:>9.2f}"
              + "".join(f"{m:>20.3f}" for m in means))
    print("\nper seed:")
    for spec, _, _, n_student, results in table:
        print(f"  {spec} (student {n_student:,} params): " + "; ".join(
            f"{x} " + "/".join(f"{v:.3f}" for v in results[x]) for x in labels))
    for spec, _, pruned_ppl, _, results in table:
        if "CE only" not in results:
            continue
        ce = statistics.mean(results["CE only"])
        best = min((statistics.mean(v), k) for k, v in results.items() if k != "CE only")
        verdict = "KD WINS" if best[0] < ce and best[0] < pruned_ppl else "KD does not win"
        print(f"{spec}: best KD {best[1]} {best[0]:.3f} vs CE only {ce:.3f} vs pruned "
              f"{pruned_ppl:.2f}: {verdict}")


if __name__ == "__main__":
    main()
