"""`minima prune`: structured pruning of a LLaMA-family model on five axes into a standard HF model.

Two pure steps, then I/O:
1. `model.shapes.resolve_target(teacher shape, --shape/--params/--ratio) -> student shape`
2. `model.selection.plan_prune(scores, teacher shape, student shape, priority) -> PrunePlan`
   (kept indices per axis)
3. `model.slicing.prune_checkpoint(source, plan, out)`: stream every tensor through the plan into
   new safetensors shards, write the shrunk config, copy the tokenizer.

The pruned model equals the teacher run with the plan's masks at 0 (docs/masks.md), which
tests/test_prune.py checks on every axis. Outputs and manifest: docs/stages.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_output_dir, check_output, write_manifest
from minima_cli.model.arch import count_parameters, shape_from_config
from minima_cli.model.checkpoint import load_config, model_fingerprint, resolve_model
from minima_cli.model.scores import load_scores
from minima_cli.model.selection import check_scores_match, plan_prune
from minima_cli.model.shapes import parameter_table, parse_shape, resolve_target
from minima_cli.model.slicing import prune_checkpoint
from minima_cli.stages import RunControl
from minima_cli.stages.configs import PruneConfig
from minima_cli.units import parse_size


def run_prune(
    *,
    model_path: str,
    output: Path | None,
    scores_path: str | None,
    shape: str | None = None,
    params: str | None = None,
    ratio: float | None = None,
    priority: str = "local",
    layer_selection: str = "auto",
    multiple_of: int = 8,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Resolve the target, plan from the scores and (unless dry_run) write the pruned model."""
    if shape is None and params is None and ratio is None:
        raise MinimaError("give a target: --shape, --params or --ratio")
    if multiple_of <= 0:
        raise MinimaError(f"--multiple-of must be positive, got {multiple_of}")
    if not dry_run:
        if output is None:
            raise MinimaError("--output is required (or pass --dry-run)")
        if scores_path is None:
            raise MinimaError("--scores is required (run `minima score` first)")
        check_output(output, force)
    source = resolve_model(model_path)
    scored = load_scores(scores_path) if scores_path is not None else None  # before slow loads
    config = load_config(source)
    teacher = shape_from_config(config)
    target = resolve_target(teacher, parse_shape(shape) if shape else None,
                            parse_size(params) if params is not None else None, ratio, multiple_of)
    result: dict[str, Any] = {"teacher_shape": teacher.as_dict(), "student_shape": target.as_dict(),
                              "table": parameter_table(teacher, target)}
    if scored is None:
        return result  # a dry run without scores: the shape alone
    scores, score_manifest = scored
    check_scores_match(scores, score_manifest, source, teacher)
    plan = plan_prune(scores, teacher, target, priority, layer_selection)
    result["plan"] = plan.as_dict()
    if dry_run:
        return result
    start = time.perf_counter()
    with atomic_output_dir(output, force=force) as tmp:
        stats = prune_checkpoint(source, config, plan, teacher, tmp, progress)
        seconds = time.perf_counter() - start
        write_manifest(
            tmp, "prune",
            inputs={"model": {"path": str(source), "fingerprint": model_fingerprint(source)},
                    "scores": {"path": str(scores_path),
                               "method": score_manifest.get("config", {}).get("method")}},
            config={"shape": shape, "params": params, "ratio": ratio, "priority": priority,
                    "layer_selection": plan.notes["layer_selection"], "multiple_of": multiple_of},
            teacher_shape=teacher.as_dict(), student_shape=target.as_dict(),
            metrics={"teacher_parameters": count_parameters(teacher),
                     "student_parameters": count_parameters(target),
                     "kept_fraction": count_parameters(target) / count_parameters(teacher),
                     **stats},
            kept=plan.as_dict(), wall_time_s=seconds,
        )
    result["wall_time_s"] = seconds
    return result


def run(config: PruneConfig, control: RunControl) -> dict[str, Any]:
    return run_prune(model_path=config.model, output=Path(config.output) if config.output else None,
                     scores_path=config.scores, shape=config.shape, params=config.params,
                     ratio=config.ratio, priority=config.priority,
                     layer_selection=config.layer_selection, multiple_of=config.multiple_of,
                     dry_run=config.dry_run, force=control.force, progress=control.progress)
