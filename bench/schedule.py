"""Does MiniDisc's one sandwich run pick the assistant that brute force would? On the tiny world:
`minima schedule --exhaustive` distils every nested candidate and then its student, and the
sandwich's ranking (P + lambda * s) is compared with the exhaustive one (the final students' P).

Printed: the candidate table, Spearman and Kendall rank correlations, the chosen vs the best
final student against the seed noise of the student's distillation (the chains of the chosen and
of the best candidate rerun with other data-order seeds), and runs and wall time of both searches.
All P are measured on the tiny world's held-out valid.txt. Writes the report as JSON (--json).

Run from the repository root (builds the tiny world unless --world points at one):

    .venv/bin/python bench/schedule.py
    .venv/bin/python bench/schedule.py --world demo/world --json schedule-bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from minima_cli.minidisc import choose_assistant, dev_metric, spearman
from minima_cli.model.arch import shape_from_config
from minima_cli.model.checkpoint import load_config, load_tokenizer, resolve_model
from minima_cli.model.scores import load_scores
from minima_cli.stages.configs import DistillConfig
from minima_cli.stages.schedule import (
    build_candidates,
    dev_blocks,
    distil_chain,
    resolve_student,
    run_schedule,
    stage_config,
)
from minima_cli.stages.score import run_score
from minima_cli.stages.tiny import build_tiny_world
from minima_cli.units import format_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="an existing `minima tiny` output")
    parser.add_argument("--student-ratio", type=float, default=0.25)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.2)
    parser.add_argument("--sandwich-steps", type=int, default=150)
    parser.add_argument("--sandwich-widths", type=int, default=0)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--noise-seeds", type=int, default=2, help="extra seeds per rerun chain")
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices; on a shared 2-core machine threads only spin
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world
        if world is None:
            world = Path(tmp) / "world"
            world.mkdir()
            build_tiny_world(world)
        report = bench(world, Path(tmp), args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


def bench(world: Path, tmp: Path, args: argparse.Namespace) -> dict:
    teacher, train, valid = world / "teacher", world / "data" / "train.txt", world / "data" / \
        "valid.txt"
    run_score(model_path=str(teacher), data=str(train), output=tmp / "scores", batches=16,
              seq_len=64, batch_size=4, progress=False)
    config = DistillConfig(seq_len=64, batch_size=8, lr=3e-3, max_steps=args.distill_steps,
                           warmup_ratio=0.05)
    started = time.perf_counter()
    report = run_schedule(teacher_path=str(teacher), scores_path=str(tmp / "scores"),
                          data=str(train), output=tmp / "schedule",
                          student_ratio=args.student_ratio, lam=args.lam,
                          sandwich_steps=args.sandwich_steps,
                          widths_per_step=args.sandwich_widths, config=config,
                          dev_data=str(valid), exhaustive=True, progress=False)
    total_seconds = time.perf_counter() - started
    found = report["exhaustive"]
    chosen, best = report["chosen"], found["best"]

    # Seed noise of the final student: rerun the chosen and the best chains with other seeds.
    source = resolve_model(teacher)
    shape = shape_from_config(load_config(source))
    candidates, student_plan = build_candidates(
        load_scores(tmp / "scores")[0], shape, resolve_student(shape, args.student_ratio, None),
        [row["asked_sparsity"] for row in report["candidates"]])
    tokenizer = load_tokenizer(source)
    dev = dev_blocks(str(valid), None, tokenizer, 64, "text")
    noise = {}
    for index in sorted({chosen, best}):
        values = [found["rows"][index]["student_P"]]
        for seed in range(1, args.noise_seeds + 1):
            chain = distil_chain(source, candidates[index], student_plan, str(train),
                                 stage_config(replace(config, seed=seed)),
                                 tmp / f"noise-{index}-{seed}", dev, progress=False,
                                 text_field="text")
            values.append(dev_metric(chain["student_dev_loss"]))
        noise[index] = values

    student = report["student"]
    print(f"tiny world: teacher {format_count(report['teacher']['params'])} params, student "
          f"{format_count(student['params'])} (s={100 * student['sparsity']:.1f}%), lambda "
          f"{args.lam}, sandwich {args.sandwich_steps} steps x "
          f"{report['sandwich']['widths_per_step']} widths, each distillation "
          f"{args.distill_steps} steps; P = 1 / valid perplexity")
    print(f"{'sparsity':>9}{'params':>9}{'P sandwich':>12}{'P+lam*s':>9}{'P assistant':>13}"
          f"{'P student':>11}")
    for i, (row, ex) in enumerate(zip(report["candidates"], found["rows"], strict=True)):
        mark = (" <- chosen" if i == chosen else "") + (" <- best" if i == best else "")
        print(f"{100 * row['sparsity']:>8.1f}%{format_count(row['params']):>9}{row['P']:>12.4f}"
              f"{row['tradeoff']:>9.4f}{ex['assistant_P']:>13.4f}{ex['student_P']:>11.4f}{mark}")
    for name, key in (("P + lambda*s vs final student P", "tradeoff_vs_student"),
                      ("sandwich P vs distilled assistant P", "sandwich_P_vs_assistant_P")):
        print(f"rank correlation, {name}: Spearman {found[key]['spearman']}, "
              f"Kendall {found[key]['kendall']}")
    for index, values in noise.items():
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"candidate {index} ({100 * candidates[index].sparsity:.1f}%): final student P over "
              f"{len(values)} seeds {', '.join(f'{v:.4f}' for v in values)} (sd {spread:.4f})")
    # The same sandwich P under other lambdas: which candidate each would pick, and how its
    # ranking agrees with the exhaustive one (no new runs: lambda only enters the choice).
    sparsities = [row["sparsity"] for row in report["candidates"]]
    metrics = [row["P"] for row in report["candidates"]]
    students = [row["student_P"] for row in found["rows"]]
    by_lambda = {}
    for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0):
        pick, values = choose_assistant(sparsities, metrics, lam, student["sparsity"])
        by_lambda[lam] = {"chosen": pick, "student_P": students[pick],
                          "spearman": spearman(values, students)}
        print(f"lambda {lam:<4g}: picks candidate {pick} ({100 * sparsities[pick]:.1f}%), final "
              f"student P {students[pick]:.4f}; Spearman {by_lambda[lam]['spearman']:.3f}")
    gap = found["best_student_P"] - found["chosen_student_P"]
    print(f"chosen student P {found['chosen_student_P']:.4f}, exhaustive best "
          f"{found['best_student_P']:.4f}: gap {gap:.4f}")
    print(f"sandwich search: 1 run, {report['sandwich']['seconds']:.0f}s (+ the chosen chain: "
          f"{found['rows'][chosen]['runs']} runs, {found['rows'][chosen]['seconds']:.0f}s); "
          f"exhaustive search: {found['runs']} runs, {found['seconds']:.0f}s; "
          f"whole bench {total_seconds:.0f}s")
    return {**report, "noise": noise, "by_lambda": by_lambda, "bench_seconds": total_seconds}


if __name__ == "__main__":
    main()
