"""`minima run RECIPE`: every stage of a recipe into `workdir/<stage>/`, redoing only what is stale.

A stage is up to date when its `minima.json` carries the hash this run would give it: the hash of
the stage's options (with `${STAGE}` references, not absolute paths, so a workdir can move) and of
its inputs' contents (model fingerprints, data and file hashes). A finished stage is stamped with
that hash (`"recipe"` in its manifest); anything else is stale and runs again, replacing its output
atomically. A training stage killed mid-way resumes from `workdir/<stage>.run/` when the hash it
started under (`recipe-hash` there) is the current one; otherwise its leftovers are discarded.

`--dry-run` prints the plan instead (pipeline/dryrun.py: each stage's status, the shapes, the
per-GPU memory of pipeline/memory.py and the token budget). Stage contracts: docs/stages.md.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from minima_cli.errors import MinimaError
from minima_cli.fsutil import MANIFEST, atomic_write_text, output_lock
from minima_cli.pipeline.guard import guarded, stale_run_dir
from minima_cli.pipeline.recipe import STAGES, Recipe, stage_config, stage_inputs
from minima_cli.pipeline.stamps import current_hash, read_stamp, write_stamp
from minima_cli.pipeline.values import references
from minima_cli.runtime import rank_and_world
from minima_cli.stages import DISTRIBUTED, TRAINING, RunControl, run_stage

HASH_FILE = "recipe-hash"


@dataclass
class StageRun:
    stage: str
    status: str  # ran, resumed, up to date, not selected
    seconds: float | None = None


def run_stage_of(recipe: Recipe, stage: str, output: Path, resume: bool, progress: bool) -> None:
    """One stage of a recipe through the registry: its section (references resolved) and the
    recipe's hardware as the stage's config, written to workdir/<stage>."""
    config = stage_config(stage, recipe.resolve(recipe.stages[stage]), recipe.hardware,
                          str(output))
    with guarded(config, training=stage in TRAINING):
        run_stage(stage, config, RunControl(force=True, resume=resume, progress=progress))


def select_stages(recipe: Recipe, start: str | None, stop: str | None) -> list[str]:
    """The recipe's stages from `start` to `stop` (inclusive), in run order."""
    enabled = list(recipe.stages)
    for flag, name in (("--from", start), ("--until", stop)):
        if name is not None and name not in enabled:
            known = ", ".join(enabled)
            raise MinimaError(f"{flag} {name}: not a stage of this recipe ({known})"
                              if name in STAGES else f"{flag} {name}: no such stage ({known})")
    first = enabled.index(start) if start else 0
    last = enabled.index(stop) if stop else len(enabled) - 1
    if first > last:
        raise MinimaError(f"--from {start} comes after --until {stop}")
    return enabled[first:last + 1]


def preflight(recipe: Recipe, selected: list[str], *, plan_only: bool = False) -> None:
    """Before any work: what the selected stages read from outside the pipeline must be on disk
    (models locally: minima loads no model from the hub; task files; chat data of a chat type),
    and the outputs of stages before --from must exist. `plan_only` (the dry run, which may
    plan from `teacher_config` on a machine without the models and data) lets those be absent;
    task files and the type of chat data are still checked."""
    from minima_cli.data.read import looks_like_hub_name
    from minima_cli.data.sources import parse_sources
    from minima_cli.model.checkpoint import resolve_model
    from minima_cli.pipeline.recipe import stage_schema

    for stage in selected:
        options, schema = recipe.stages[stage], stage_schema(stage)
        for key in stage_inputs(stage):
            value = options.get(key)
            if value is None:
                continue
            kind = schema[key][0].kind
            items = [m.partition("=")[2] for m in value] if kind == "models" else \
                [s.path_or_name for s in parse_sources(value)] if kind == "data" else \
                list(value) if kind == "tasks" else [value]
            for item in items:
                made_by = [r for r in references(item) if r in STAGES]
                for name in made_by:
                    if name not in selected and not (recipe.stage_dir(name) / MANIFEST).is_file():
                        raise MinimaError(f"{stage}.{key}: {recipe.stage_dir(name)} does not "
                                          f"exist yet: run the {name} stage first (it is "
                                          "before --from)")
                if kind == "chat":
                    path = recipe.resolve(item)
                    check_chat_path(recipe, stage, key, path, exists=not made_by and not (
                        plan_only and not Path(path).expanduser().exists()))
                    continue
                if made_by:
                    continue
                path = recipe.resolve(item)
                if kind == "tasks":
                    from minima_cli.evaluation.tasks import parse_task

                    try:  # the task's files (and dev shots) must be there, as the stage checks
                        parse_task(path, backend=options.get("backend") or "minima")
                    except MinimaError as error:
                        raise MinimaError(f"{recipe.path}: {stage}.{key}: {error}") from None
                    continue
                if plan_only and not Path(path).expanduser().exists():
                    continue  # planned on a machine without the models and data: not an error
                if kind in ("model", "models"):
                    try:
                        resolve_model(path)
                    except MinimaError as error:
                        hint = " (a hub name? download the model and --set teacher=DIR; dry " \
                            "runs read teacher_config)" if not Path(path).exists() and \
                            "hub name?" not in str(error) else ""
                        raise MinimaError(f"{recipe.path}: {stage}.{key}: {error}{hint}") \
                            from None
                elif not Path(path).expanduser().exists() and not (
                        kind == "data" and looks_like_hub_name(path)):
                    raise MinimaError(f"{recipe.path}: {stage}.{key}: not found: {path}")


def check_chat_path(recipe: Recipe, stage: str, key: str, path: str, *, exists: bool) -> None:
    """Chat data is .jsonl/.json/.parquet or a directory of them: a wrong type is refused now,
    not after the stages before it ran (a path made by an earlier stage: by its suffix only)."""
    from minima_cli.data.chat import CHAT_SUFFIXES, chat_files

    where = f"{recipe.path}: {stage}.{key}"
    if not exists:
        suffix = Path(path).suffix
        if suffix and suffix not in CHAT_SUFFIXES:
            raise MinimaError(f"{where}: {path}: chat data must be {', '.join(CHAT_SUFFIXES)} "
                              "(or a directory of them)")
        return
    try:
        chat_files(path)
    except MinimaError as error:
        raise MinimaError(f"{where}: {error}") from None


def stage_run_dir(recipe: Recipe, stage: str) -> Path:
    return recipe.workdir / f"{stage}.run"


def resume_decision(recipe: Recipe, stage: str, digest: str, is_main: bool) -> bool:
    """Resume a training stage killed under the same hash; otherwise start clean. Every rank
    decides from the same files before the main rank writes anything."""
    from minima_cli.training.state import list_checkpoints

    if stage not in TRAINING:
        return False
    run_dir = stage_run_dir(recipe, stage)
    marker = run_dir / HASH_FILE
    started = marker.read_text().strip() if marker.is_file() else None
    has_checkpoints = bool(list_checkpoints(run_dir / "checkpoints"))
    if has_checkpoints and started == digest:
        return True
    if has_checkpoints:
        _, world = rank_and_world()
        if world > 1:
            raise MinimaError(f"{run_dir} holds checkpoints of another configuration: delete "
                              "it before launching")
        if is_main:
            shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest + "\n")
    return False


def run_recipe(recipe: Recipe, *, start: str | None = None, stop: str | None = None,
               force: bool = False, progress: bool = True,
               console: Console | None = None) -> list[StageRun]:
    """Run the selected stages; returns what happened to each stage of the recipe."""
    console = console or Console()
    selected = select_stages(recipe, start, stop)
    is_main = rank_and_world()[0] == 0
    preflight(recipe, selected)
    # one `minima run` per workdir at a time (main rank; the other ranks are its own launch)
    with output_lock(recipe.workdir) if is_main else contextlib.nullcontext():
        return run_selected(recipe, selected, force=force, progress=progress, console=console)


def run_selected(recipe: Recipe, selected: list[str], *, force: bool, progress: bool,
                 console: Console) -> list[StageRun]:
    rank, world = rank_and_world()
    is_main = rank == 0
    if recipe.hardware["threads"]:
        import torch

        torch.set_num_threads(recipe.hardware["threads"])
    if is_main:
        save_recipe_copy(recipe)
    runs = {stage: StageRun(stage, "not selected") for stage in recipe.stages}
    for stage in selected:
        output = recipe.stage_dir(stage)
        digest = current_hash(recipe, stage)
        stamp = read_stamp(output)
        if stamp and stamp.get("hash") == digest and not force:
            runs[stage] = StageRun(stage, "up to date", stamp.get("seconds"))
            if is_main:
                console.print(f"[dim]{stage}: up to date ({output})[/dim]")
            continue
        if world > 1 and stage not in DISTRIBUTED:
            raise MinimaError(f"{stage} runs in one process: run `minima run {recipe.path} "
                              f"--until {stage}` before launching {world} processes")
        if is_main and stage in TRAINING and world != recipe.world_size:
            console.print(f"[yellow]warning: the recipe declares {recipe.world_size} GPU(s) "
                          f"(hardware.nodes x gpus_per_node), this launch has {world} "
                          "process(es): each step sees a different batch[/yellow]")
        run_dir = stage_run_dir(recipe, stage)
        if is_main and world == 1 and stage in TRAINING and stale_run_dir(output):
            shutil.rmtree(run_dir)  # the run finished (output written) but was killed before
        had_run_dir = run_dir.exists()
        resume = resume_decision(recipe, stage, digest, is_main)
        reason = "resuming a killed run" if resume else (
            "forced" if force and stamp else "stale" if stamp else "no output yet")
        if is_main:
            console.print(Rule(f"{stage} ({reason}) -> {output}"))
        started = time.perf_counter()
        try:
            run_stage_of(recipe, stage, output, resume, progress)
        except MinimaError:
            if is_main and not had_run_dir:
                remove_unstarted_run_dir(run_dir)
            raise
        seconds = time.perf_counter() - started
        if is_main:
            write_stamp(output, {"hash": digest, "recipe": str(recipe.path),
                                 "seconds": round(seconds, 2), "resumed": resume,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        runs[stage] = StageRun(stage, "resumed" if resume else "ran", seconds)
    return list(runs.values())


def remove_unstarted_run_dir(run_dir: Path) -> None:
    """A stage that failed on bad input before its first checkpoint leaves no run dir."""
    from minima_cli.training.state import list_checkpoints

    if run_dir.is_dir() and not list_checkpoints(run_dir / "checkpoints"):
        shutil.rmtree(run_dir, ignore_errors=True)


def save_recipe_copy(recipe: Recipe) -> None:
    """The recipe as run (overrides applied) in workdir/recipe.yaml, for the record."""
    import yaml

    atomic_write_text(recipe.workdir / "recipe.yaml", f"# {recipe.path} as run by minima\n" +
                      yaml.safe_dump(recipe.raw, sort_keys=False))


def summary_table(recipe: Recipe, runs: list[StageRun]) -> Table:
    """The closing table of `minima run`: per stage its status and time, per model its size and
    the eval metrics (report.py reads the same numbers from the workdir)."""
    from minima_cli.pipeline.report import collect, summary_rows

    header, rows = summary_rows(collect(recipe.workdir),
                                {r.stage: r for r in runs})
    table = Table(title=f"minima run {recipe.path} -> {recipe.workdir}")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index < 4 else "right")
    for row in rows:
        table.add_row(*row)
    return table
