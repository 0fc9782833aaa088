"""The capacity-gap sweep in miniature (MiniMA's pilot study) on the tiny world: does a student
learn best from a teacher about 2.5x its size, or simply from the biggest one?

Teachers of k times a fixed student's parameter count (k = 1, 1.5, 2, 2.5, 3, 4, 6, 8) are
pre-trained on the same tiny-world corpus with the same recipe and steps, then each is distilled
into the same student with the same budget (`minima distill`'s loop: 0.5 CE + 0.5 forward KL).
"The same student" is measured two ways:
- pruned: each teacher pruned to the fixed student shape (gradient scores, global priority) and
  then distilled, as in MiniMA's pilot (so a larger teacher also means a deeper cut);
- random: one fixed random initialisation of the student shape, distilled from each teacher (the
  teacher's effect as a KD target alone).
All models share head_dim 16 and the tokenizer, so each teacher prunes to exactly the student's
shape. Student quality is the perplexity on the tiny world's held-out valid.txt (never trained
on), averaged over seeds (teacher init, data order, distillation). Each series' valid loss gets a
parabola in ln k through all points (global) and one through the best point and its neighbours
(local, where the minimum lies when the curve is not one parabola); the vertex inside the swept
ratios is the best teacher ratio k*, and [student params, k* x student params] is the
`law_point` that `minima plan --law-points` accepts (sweeps at several student sizes fit the law).

Writes OUTPUT/sweep.json and OUTPUT/sweep.png (one atomic directory). Run from the repository
root (about 18 minutes on 2 busy CPU cores with the defaults; `--reanalyse sweep/sweep.json`
fits and plots a finished sweep again in seconds):

    .venv/bin/python bench/capacity_gap_sweep.py --output sweep
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from minima_cli.data.pack import pack_documents
from minima_cli.data.read import read_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.fsutil import atomic_output_dir, check_output
from minima_cli.laws import CapacityCurve, fit_capacity_curve
from minima_cli.model.arch import ModelShape, count_parameters
from minima_cli.model.checkpoint import load_tokenizer, quiet_transformers, resolve_model
from minima_cli.model.scores import normalize_scores
from minima_cli.model.selection import plan_prune
from minima_cli.stages.configs import DistillConfig
from minima_cli.stages.distill import run_distill
from minima_cli.stages.schedule import materialise, model_dev_loss, stage_config
from minima_cli.stages.score import gradient_scores
from minima_cli.stages.tiny import build_tiny_world, pretrain, tiny_llama_config
from minima_cli.training.state import evaluate_loss

KS = (1, 1.5, 2, 2.5, 3, 4, 6, 8)
HEAD_DIM = 16
STUDENT = (32, 2, 88)  # hidden, layers, FFN
SEQ_LEN = 64
SERIES = ("pruned", "random")


def model_shape(hidden: int, layers: int, ffn: int, vocab: int) -> ModelShape:
    """Plain multi-head attention, head_dim 16, tied embeddings: the family of this sweep."""
    heads = hidden // HEAD_DIM
    return ModelShape(layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
                      head_dim=HEAD_DIM, ffn=ffn, vocab=vocab)


def teacher_shape(k: float, student: ModelShape) -> ModelShape:
    """The shape of about k x the student's parameters, growing width and depth together: the
    closest count, with small penalties for leaving depth/width and FFN/hidden proportions."""
    target = k * count_parameters(student)
    options = [model_shape(h, n, f, student.vocab)
               for h in range(student.hidden, 8 * student.hidden + 1, HEAD_DIM)
               for n in range(student.layers, 5 * student.layers + 1)
               for f in range(max(student.ffn, 2 * h), 4 * h + 1, 8)]

    def cost(shape: ModelShape) -> float:
        aspect = (shape.layers / student.layers) / (shape.hidden / student.hidden)
        return (abs(math.log(count_parameters(shape) / target)) + 0.05 * abs(math.log(aspect))
                + 0.05 * abs(math.log(shape.ffn / (2.75 * shape.hidden))))

    return min(options, key=cost)


def build(shape: ModelShape, tokenizer, seed: int) -> LlamaForCausalLM:
    config = tiny_llama_config(len(tokenizer), gqa=False, tied=True, hidden_size=shape.hidden,
                               num_layers=shape.layers, num_heads=shape.heads,
                               ffn_size=shape.ffn, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save(model: torch.nn.Module, tokenizer, directory: Path) -> Path:
    with quiet_transformers():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def blocks(tokenizer, path: Path) -> torch.Tensor:
    ids = tokenize_documents(tokenizer, read_documents(path))
    return pack_documents(ids, SEQ_LEN, tokenizer.eos_token_id)


def sweep(args: argparse.Namespace, work: Path) -> dict:
    world = args.world
    if world is None:  # the tiny world's corpus and tokenizer; its own teacher is not used
        world = work / "world"
        world.mkdir()
        build_tiny_world(world, seed=0, steps=0)
    train_path, valid_path = world / "data" / "train.txt", world / "data" / "valid.txt"
    tokenizer = load_tokenizer(resolve_model(world / "teacher"))
    train, valid = blocks(tokenizer, train_path), blocks(tokenizer, valid_path)
    student = model_shape(*args.student, len(tokenizer))
    student_params = count_parameters(student)
    rows = []
    for k in args.ks:
        started = time.perf_counter()
        shape = teacher_shape(k, student)
        runs = [one_teacher(shape, student, seed, tokenizer, train, valid, train_path, args,
                            work / f"k{k:g}-seed{seed}") for seed in args.seeds]
        row = {"k": k, "teacher": {"shape": shape.as_dict(), "params": count_parameters(shape),
                                   "ratio": count_parameters(shape) / student_params,
                                   **spread([r["teacher_valid_loss"] for r in runs])}}
        for series in args.series:
            row[series] = {**spread([r[series]["valid_loss"] for r in runs]),
                           "init_valid_loss": statistics.fmean(
                               r[series]["init_valid_loss"] for r in runs)}
        row["seeds"] = runs
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(summary_line(row), flush=True)

    return {
        "student": {"shape": student.as_dict(), "params": student_params},
        "config": {"ks": args.ks, "teacher_steps": args.teacher_steps,
                   "distill_steps": args.distill_steps, "seeds": args.seeds,
                   "teacher_recipe": "pretrain: AdamW lr 3e-3, batch 16 x 64 tokens",
                   "distill": "0.5 CE + 0.5 forward KL, lr 3e-3, batch 8 x 64 tokens"},
        "rows": rows,
    }


def curve_summary(points: list[tuple[float, float]]) -> dict:
    curve = fit_capacity_curve(points)
    return {"a": curve.a, "b": curve.b, "c": curve.c, "r2": curve.r2, "k_range": curve.k_range,
            "optimum_k": curve.optimum, "verdict": curve.verdict()}


def analyse(report: dict) -> dict:
    """Fit each series: a parabola in ln k through all points (global) and through the measured
    best point and its two neighbours (local: where the minimum lies when the curve is not one
    parabola). The law point comes from the local fit, else the global one, of the pruned series
    (MiniMA's setting)."""
    rows = sorted(report["rows"], key=lambda r: r["teacher"]["ratio"])
    fits = {}
    for series in (s for s in SERIES if s in rows[0]):
        points = [(r["teacher"]["ratio"], r[series]["valid_loss"]) for r in rows]
        best = min(range(len(points)), key=lambda i: points[i][1])
        fits[series] = {
            "global": curve_summary(points),
            "local": curve_summary(points[best - 1:best + 2])
            if 0 < best < len(points) - 1 else None,
            "best_measured_k": points[best][0],
            "best_k_per_seed": [min(rows, key=lambda r, i=i: r["seeds"][i][series]["valid_loss"])
                                ["teacher"]["ratio"] for i in range(len(rows[0]["seeds"]))],
        }
    main = fits.get("pruned") or next(iter(fits.values()))
    optimum = (main["local"] or main["global"])["optimum_k"]
    measured = {key: value for key, value in report.items()
                if key not in ("fits", "optimum_k", "law_point", "verdict")}
    return {**measured, "fits": fits, "optimum_k": optimum,
            "law_point": [report["student"]["params"], optimum * report["student"]["params"]]
            if optimum else None}


def describe_fit(fit: dict) -> str:
    local = f"local parabola k* = {fit['local']['optimum_k']:.2f}; " if fit["local"] else ""
    return (f"best measured k {fit['best_measured_k']:.2f}; {local}global parabola (R^2 "
            f"{fit['global']['r2']:.2f}): {fit['global']['verdict']}")


def one_teacher(shape: ModelShape, student: ModelShape, seed: int, tokenizer, train, valid,
                train_path: Path, args: argparse.Namespace, work: Path) -> dict:
    """Pre-train one teacher, then distil it into the student of each series; valid losses."""
    model = build(shape, tokenizer, seed)
    losses = pretrain(model, train, steps=args.teacher_steps, batch_size=16, lr=3e-3, seed=seed)
    teacher_dir = save(model, tokenizer, work / "teacher")
    result = {"seed": seed, "teacher_train_loss": statistics.fmean(losses[-10:]),
              "teacher_valid_loss": evaluate_loss(model, valid)}
    # MiniMA's pilot: prune the teacher to the student's shape by its own gradient scores.
    generator = torch.Generator().manual_seed(seed)
    batches = train[torch.randperm(len(train), generator=generator)[:32]].split(4)
    scores = normalize_scores(gradient_scores(model, shape, batches)[0])
    plan = plan_prune(scores, shape, student, priority="global")
    inits = {"pruned": lambda: materialise(resolve_model(teacher_dir), plan, work / "pruned"),
             # one random initialisation per seed, the same for every teacher
             "random": lambda: save(build(student, tokenizer, 1000 + seed), tokenizer,
                                    work / "random")}
    config = stage_config(DistillConfig(seq_len=SEQ_LEN, batch_size=8, lr=3e-3,
                                        max_steps=args.distill_steps, warmup_ratio=0.05,
                                        seed=seed))
    for series in args.series:
        init = inits[series]()
        run_distill(teacher_path=str(teacher_dir), student_path=str(init), data=str(train_path),
                    output=work / f"{series}-student", config=config, progress=False)
        result[series] = {"init_valid_loss": model_dev_loss(init, valid),
                          "valid_loss": model_dev_loss(work / f"{series}-student", valid)}
    shutil.rmtree(work)
    return result


def spread(values: list[float]) -> dict[str, float | None]:
    return {"valid_loss": statistics.fmean(values),
            "valid_loss_sd": statistics.stdev(values) if len(values) > 1 else None}


def summary_line(row: dict) -> str:
    def ppl(part: dict) -> str:
        sd = part["valid_loss_sd"]  # the sd of ppl = exp(loss) is about ppl * sd(loss)
        return f"{math.exp(part['valid_loss']):.3f}" + (
            f" +- {math.exp(part['valid_loss']) * sd:.3f}" if sd is not None else "")

    parts = [f"k={row['k']:<4g} teacher {row['teacher']['params']:>7,} params "
             f"(x{row['teacher']['ratio']:.2f}) ppl {ppl(row['teacher'])}"]
    for series in SERIES:
        if series in row:
            parts.append(f"{series}: init ppl {math.exp(row[series]['init_valid_loss']):.4g} -> "
                         f"student ppl {ppl(row[series])}")
    return " | ".join(parts) + f" ({row['seconds']:.0f}s)"


def plot(report: dict, path: Path) -> None:
    """One panel per series: student valid perplexity (mean +- sd over seeds) against k on a log
    axis, the fitted parabola and its optimum, and the teachers' perplexity on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    rows = sorted(report["rows"], key=lambda r: r["teacher"]["ratio"])
    ratios = np.array([r["teacher"]["ratio"] for r in rows])
    series_list = [s for s in SERIES if s in report["fits"]]
    figure, axes = plt.subplots(1, len(series_list), figsize=(6.5 * len(series_list), 5.5),
                                squeeze=False)
    for axis, series, colour in zip(axes[0], series_list, ("tab:blue", "tab:orange"),
                                    strict=False):
        fit = report["fits"][series]
        ppl = np.array([math.exp(r[series]["valid_loss"]) for r in rows])
        sd = np.array([r[series]["valid_loss_sd"] or 0.0 for r in rows]) * ppl
        axis.errorbar(ratios, ppl, yerr=sd, fmt="o", color=colour, capsize=3,
                      label=f"student ({series} init), mean +- sd over seeds")
        for name, style in (("global", "-"), ("local", "--")):
            part = fit[name]
            if part is None:
                continue
            curve = CapacityCurve(part["a"], part["b"], part["c"], part["r2"],
                                  tuple(part["k_range"]))
            span = np.geomspace(*part["k_range"], 100)
            axis.plot(span, np.exp(curve.loss(span)), style, color=colour, alpha=0.6,
                      label=f"{name} parabola in ln k (R^2 {part['r2']:.2f})"
                      + (f", k* = {part['optimum_k']:.2f}" if part["optimum_k"] else ""))
            if part["optimum_k"]:
                axis.axvline(part["optimum_k"], color=colour, linestyle=":", alpha=0.8)
        axis.set_xscale("log")
        axis.set_xticks(ratios, [f"{r:.2g}" for r in ratios])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("teacher size / student size (k)")
        axis.set_ylabel("student valid perplexity")
        axis.set_title(f"{series} init: best measured k {fit['best_measured_k']:.2f}", fontsize=10)
        teachers = axis.twinx()
        teachers.plot(ratios, [math.exp(r["teacher"]["valid_loss"]) for r in rows], "s--",
                      color="grey", label="teacher valid perplexity")
        teachers.set_ylabel("teacher valid perplexity", color="grey")
        handles = [h for a in (axis, teachers) for h in a.get_legend_handles_labels()[0]]
        axis.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper center",
                    bbox_to_anchor=(0.5, -0.13), frameon=False)
    figure.suptitle(f"capacity gap on the tiny world: student of "
                    f"{report['student']['params']:,} parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--world", type=Path, help="an existing `minima tiny` output (its corpus "
                        "and tokenizer)")
    parser.add_argument("--student", type=lambda text: tuple(int(v) for v in text.split(",")),
                        default=STUDENT, help="HIDDEN,LAYERS,FFN of the fixed student (hidden a "
                        "multiple of 16); sweeps at several sizes fit the capacity-gap law")
    parser.add_argument("--ks", type=lambda text: [float(k) for k in text.split(",")],
                        default=list(KS))
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--series", type=lambda text: text.split(","), default=list(SERIES))
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")],
                        default=[0, 1], help="teacher init, data order and distillation seeds; "
                        "each point is their mean")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--reanalyse", type=Path, help="a sweep.json to fit and plot again, "
                        "without running anything")
    args = parser.parse_args()
    if unknown := set(args.series) - set(SERIES):
        parser.error(f"unknown series {sorted(unknown)}: choose from {', '.join(SERIES)}")
    if len(args.student) != 3 or args.student[0] % HEAD_DIM or min(args.student) <= 0:
        parser.error(f"--student: HIDDEN,LAYERS,FFN, positive, hidden a multiple of {HEAD_DIM}")
    if len(args.ks) < 3:
        parser.error("--ks: a curve needs at least three teacher sizes")
    check_output(args.output, args.force)
    if args.reanalyse:  # fits and plot again from a finished sweep's measurements
        report = json.loads(args.reanalyse.read_text())
    else:
        torch.set_num_threads(1)  # tiny matrices; on a shared 2-core machine threads only spin
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = sweep(args, Path(tmp))
        report["seconds"] = time.perf_counter() - started
    report = analyse(report)
    with atomic_output_dir(args.output, force=args.force) as out:
        (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, out / "sweep.png")
    for series, fit in report["fits"].items():
        print(f"{series}: {describe_fit(fit)}")
    print(f"law point: {report['law_point']}; sweep {report['seconds']:.0f}s -> {args.output}")


if __name__ == "__main__":
    main()
