"""`minima report WORKDIR`: the summary of a `minima run` as markdown with PNG plots.

Everything is read back from the workdir (each stage's `minima.json`, `eval/results.json`, the
training logs and the scores), so a report can be rebuilt at any time, on another machine:
- the summary table: per stage its time, per model its parameters and eval metrics,
- `loss.png`: training loss (and its LM cross-entropy part) and validation loss per step of the
  distill and sft stages,
- `scores.png`: per-layer normalised scores of attention heads and FFN neurons (heatmaps) and
  of the layers,
- `params_ppl.png`: parameters vs perplexity of teacher / pruned / distilled / sft.
Written atomically to `WORKDIR/report/` (report.md beside its images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import MANIFEST, read_manifest
from minima_cli.pipeline.recipe import MODEL_NAMES, MODEL_STAGES, STAGES
from minima_cli.units import format_seconds

REPORT_DIR = "report"


def collect(workdir: str | Path) -> dict[str, Any]:
    """The manifests of the stages found in `workdir`, the eval results and the training logs."""
    workdir = Path(workdir)
    manifests = {stage: read_manifest(workdir / stage) for stage in STAGES
                 if (workdir / stage / MANIFEST).is_file()}
    results_file = workdir / "eval" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    logs = {}
    for stage in ("distill", "sft"):
        log = workdir / stage / "log.jsonl"
        if log.is_file():
            logs[stage] = read_log(log)
    return {"workdir": str(workdir), "manifests": manifests, "results": results, "logs": logs}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a training log.jsonl. A last line cut short (the run was killed while
    writing it) is skipped: the report shows the steps before it. A bad line anywhere else, or
    bytes that are not text, is one error line naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise MinimaError(f"{path}: not UTF-8 text (a damaged training log)") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the torn end of a killed run
                break
            raise MinimaError(f"{path}:{number}: malformed log line ({error.msg})") from None
        if not isinstance(record, dict) or "step" not in record or "loss" not in record:
            raise MinimaError(f"{path}:{number}: not a training log record")
        records.append(record)
    return records


def task_metric(task: dict[str, Any], metrics: dict[str, Any]) -> str | None:
    """The headline metric of a task: ppl, acc, the generation match, else the first number."""
    from minima_cli.stages.evaluate import flat_metrics

    preferred = {"ppl": "ppl", "mc": "acc"}.get(task["kind"])
    flat = flat_metrics(metrics)
    if preferred in flat:
        return preferred
    matches = [k for k in flat if k.endswith("_match")]
    return matches[0] if matches else next(iter(flat), None)


def eval_columns(results: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(task name, metric, column header) of each evaluated task."""
    if not results or not results.get("models"):
        return []
    first = results["models"][0]["tasks"]
    columns = []
    for task in results["tasks"]:
        metric = task_metric(task, first.get(task["name"], {}))
        if metric:
            short = task["name"].partition(":")[2] or task["name"]
            columns.append((task["name"], metric, f"{metric.removesuffix('_match')} {short}"))
    return columns


def model_parameters(stage: str, manifests: dict[str, Any]) -> int | None:
    """A model's parameter count from the manifests, for when there is no eval stage."""
    from minima_cli.model.arch import ModelShape, count_parameters

    if stage == "teacher":
        if "prune" in manifests:
            return manifests["prune"]["metrics"]["teacher_parameters"]
        return manifests.get("tiny", {}).get("metrics", {}).get("parameters")
    if stage == "prune":
        return manifests["prune"]["metrics"]["student_parameters"]
    if stage == "export":
        return manifests["export"]["metrics"]["parameters"]
    shape = manifests[stage].get("student_shape")
    return count_parameters(ModelShape(**shape)) if shape else None


def stage_seconds(manifest: dict[str, Any]) -> float | None:
    stamp = manifest.get("recipe") or {}
    if stamp.get("seconds") is not None:
        return stamp["seconds"]
    return manifest.get("wall_time_s")


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if metric == "ppl" else f"{value:.3f}"


def summary_rows(collected: dict[str, Any], runs: dict[str, Any] | None = None
                 ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary: one row per stage (status, time), the model it made (or
    the teacher, on the first row) with its parameters and eval metrics."""
    manifests, results = collected["manifests"], collected["results"]
    columns = eval_columns(results)
    by_name = {m["name"]: m for m in (results or {}).get("models", [])}
    header = ["stage", "status", "time", "model", "parameters", *(c[2] for c in columns)]

    def model_cells(name: str, stage: str) -> list[str]:
        entry = by_name.pop(name, None)
        params = entry["parameters"] if entry else (
            model_parameters(stage, manifests) if stage == "teacher" or stage in manifests
            else None)
        cells = [name, f"{params:,}" if params else "-"]
        if stage == "export" and stage in manifests:  # the GGUF file: its size and encoding
            exported = manifests[stage]
            cells[1] += (f" ({exported['metrics']['file_bytes'] / 1e6:.2f} MB "
                         f"{exported['config']['type']})")
        for task, metric, _ in columns:
            value = None
            if entry and task in entry["tasks"]:
                from minima_cli.stages.evaluate import flat_metrics

                value = flat_metrics(entry["tasks"][task]).get(metric)
            cells.append(format_metric(metric, value))
        return cells

    def stage_cells(stage: str) -> list[str]:
        run = (runs or {}).get(stage)
        manifest = manifests.get(stage)
        status = run.status if run else ("done" if manifest else "not run")
        if status == "not selected" and manifest:
            status = "done earlier"
        seconds = run.seconds if run and run.seconds is not None else (
            stage_seconds(manifest) if manifest else None)
        return [stage, status, format_seconds(seconds)]

    rows = []
    stages = [s for s in STAGES if s in manifests or (runs and s in runs)]
    teacher_known = "teacher" in by_name or model_parameters("teacher", manifests)
    if "tiny" not in stages and teacher_known:
        rows.append(["-", "input", "-", *model_cells("teacher", "teacher")])
    for stage in stages:
        if stage == "tiny":
            rows.append([*stage_cells(stage), *model_cells("teacher", "teacher")])
        elif stage in MODEL_STAGES:
            rows.append([*stage_cells(stage), *model_cells(MODEL_NAMES[stage], stage)])
        else:
            rows.append([*stage_cells(stage), *([""] * (len(header) - 3))])
    for name in list(by_name):  # models given to eval as NAME=PATH
        rows.append(["-", "input", "-", *model_cells(name, name)])
    return header, rows


def perplexity_points(collected: dict[str, Any]) -> tuple[str, list[tuple[str, int, float]]]:
    """The first perplexity task, and (model, parameters, its perplexity) per evaluated model."""
    results = collected["results"]
    ppl_tasks = [t["name"] for t in (results or {}).get("tasks", []) if t["kind"] == "ppl"]
    if not ppl_tasks:
        return "", []
    task = ppl_tasks[0]
    return task, [(m["name"], m["parameters"], m["tasks"][task]["ppl"])
                  for m in results["models"] if task in m["tasks"]]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


LOSS_TITLES = {"distill": "distill: alpha CE + (1 - alpha) KD; validation: held-out LM loss",
               "sft": "sft: loss on assistant tokens (held-out conversations)"}


def plot_losses(logs: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Training loss (and its CE part) and validation loss per step, one panel per stage."""
    runs = {stage: records for stage, records in logs.items() if records}
    if not runs:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (stage, records) in zip(axes[0], runs.items(), strict=True):
        # log.jsonl is strict JSON: a non-finite loss was written as null
        records = [{k: math.nan if v is None else v for k, v in r.items()} for r in records]
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], lw=1, alpha=0.8, label="training loss")
        if all("ce" in r for r in records) and any(
                abs(r["ce"] - r["loss"]) > 1e-6 for r in records):  # KD mixed in
            ax.plot(steps, [r["ce"] for r in records], lw=1, alpha=0.6, label="training CE")
        valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
        if valid:
            ax.plot(*zip(*valid, strict=True), "o-", label="validation loss")
        ax.set_title(LOSS_TITLES.get(stage, stage), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_scores(scores: dict[str, Any], path: Path) -> bool:
    """Heatmaps of the per-layer normalised head and FFN-neuron scores, and the layer scores."""
    panels = [axis for axis in ("heads", "ffn", "layers") if axis in scores]
    if not panels:
        return False
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, axis in zip(axes[0], panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        values = scores[axis].float().numpy()
        if values.ndim == 2:
            image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
            fig.colorbar(image, ax=ax)
            ax.set_xlabel("head" if axis == "heads" else "FFN neuron")
            ax.set_ylabel("layer")
        else:
            ax.bar(range(len(values)), values)
            ax.set_xlabel("layer")
            ax.yaxis.set_major_locator(MaxNLocator())
        ax.set_title(f"{axis} scores (per-layer L2-normalised)" if values.ndim == 2
                     else "layer scores (L2-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_params_ppl(points: list[tuple[str, int, float]], path: Path, task: str = "") -> bool:
    """Parameters vs perplexity of each model, labelled."""
    if not points:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, params, ppl in points:
        ax.scatter(params, ppl, s=50)
        ax.annotate(name, (params, ppl), textcoords="offset points", xytext=(6, 4))
    from matplotlib.ticker import FuncFormatter

    from minima_cli.units import format_count

    sizes = [p for _, p, _ in points]
    if max(sizes) > 10 * min(sizes):
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_count(x)))
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"perplexity ({task})" if task else "perplexity")
    ax.set_title("size vs perplexity (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_lines(manifests: dict[str, Any]) -> list[str]:
    """One line per stage: its configuration as recorded in its manifest."""
    lines = []
    for stage, manifest in manifests.items():
        config = manifest.get("config") or {}
        shown = ", ".join(f"{k}={v}" for k, v in config.items()
                          if v not in (None, "") and not isinstance(v, dict | list))
        lines.append(f"- **{stage}**: {shown or '(defaults)'}")
    return lines


def render_markdown(collected: dict[str, Any], plots: dict[str, str]) -> str:
    header, rows = summary_rows(collected)
    parts = [f"# minima report: `{collected['workdir']}`", "",
             markdown_table(header, rows), ""]
    captions = {"loss": "Training and validation loss", "scores": "Per-layer scores of the "
                "teacher", "params_ppl": "Parameters vs perplexity"}
    for key, caption in captions.items():
        if key in plots:
            parts += [f"## {caption}", "", f"![{caption}]({plots[key]})", ""]
    parts += ["## Stages", "", *settings_lines(collected["manifests"]), ""]
    return "\n".join(parts)


def write_report(workdir: str | Path) -> Path:
    """Write WORKDIR/report/ (report.md and the PNGs) atomically; returns report.md's path."""
    from minima_cli.fsutil import atomic_output_dir

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise MinimaError(f"workdir not found: {workdir}")
    collected = collect(workdir)
    if not collected["manifests"]:
        raise MinimaError(f"{workdir}: no stage outputs (run `minima run RECIPE` first)")
    output = workdir / REPORT_DIR
    with atomic_output_dir(output, force=True) as tmp:
        plots = {}
        if plot_losses(collected["logs"], tmp / "loss.png"):
            plots["loss"] = "loss.png"
        scores_file = workdir / "score" / "scores.safetensors"
        if scores_file.is_file():
            from safetensors.torch import load_file

            if plot_scores(load_file(scores_file), tmp / "scores.png"):
                plots["scores"] = "scores.png"
        task, points = perplexity_points(collected)
        if plot_params_ppl(points, tmp / "params_ppl.png", task):
            plots["params_ppl"] = "params_ppl.png"
        (tmp / "report.md").write_text(render_markdown(collected, plots))
    return output / "report.md"
