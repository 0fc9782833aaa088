"""What every stage run goes through, from the CLI and from `minima run` alike: the output is kept
apart from the inputs (never equal to, inside or holding one, --force or not), it is locked
against a second writer for the whole run (`OUTPUT.lock`, main rank only), a training stage's
`OUTPUT.run/` left by a run that finished is discarded, and a run that fails on bad input leaves
none of the side directories it created (`OUTPUT.run/`, `OUTPUT.token-cache/`).
Which fields are inputs and which is the output comes from the config's option metadata
(options.py: `input=`, `source="output"`), so a new stage is covered without code here.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import MANIFEST, check_apart, output_lock, recover_replacement
from minima_cli.options import long_flag, options_of
from minima_cli.runtime import rank_and_world

# the directories beside OUTPUT a stage may create before its output exists
SIDE_DIRS = (".run", ".token-cache")


def output_of(config: Any) -> str | None:
    for field, spec in options_of(type(config)):
        if spec.source == "output":
            return getattr(config, field.name)
    return None


def paths_of(kind: str, value: Any) -> list[str]:
    """The local paths in one input value of `kind` (hub names and harness task names are not
    paths and are left out by the existence check of the caller)."""
    if value is None:
        return []
    if kind == "data":
        from minima_cli.data.sources import parse_sources

        try:
            return [s.path_or_name for s in parse_sources(value)]
        except MinimaError:
            return []  # the stage says what is wrong with the spec
    if kind == "models":
        return [m.partition("=")[2] if "=" in m and not Path(m).exists() else m for m in value]
    if kind == "tasks":
        found = []
        for task in value:
            parts = str(task).split(":")
            # KIND:TARGET[:options] or a bare file; keep every piece that names a path
            found.extend(p for p in [str(task), *parts[1:2]] if p)
        return found
    return [str(value)]


def input_paths(config: Any) -> list[tuple[str, str]]:
    """(flag, path) of every input of the config that exists on disk."""
    found = []
    for field, spec in options_of(type(config)):
        if spec.input is None:
            continue
        for path in paths_of(spec.input, getattr(config, field.name)):
            if Path(path).expanduser().exists():
                found.append((long_flag(field.name, spec), path))
    return found


def check_hub_inputs(config: Any) -> None:
    """A data input that is neither on disk nor reachable on the hub fails now, in one line
    (reading it would retry the hub for half a minute first)."""
    from minima_cli.data.read import looks_like_hub_name
    from minima_cli.runtime import hub_unreachable

    for field, spec in options_of(type(config)):
        if spec.input != "data":
            continue
        names = [p for p in paths_of("data", getattr(config, field.name))
                 if not Path(p).expanduser().exists() and looks_like_hub_name(p)]
        if names:
            why = hub_unreachable()
            if why is not None:
                raise MinimaError(f"{long_flag(field.name, spec)} {names[0]}: no such file or "
                                  f"directory, and the hub is unreachable to load it as a "
                                  f"dataset ({why})")


def check_inputs_apart(config: Any) -> None:
    output = output_of(config)
    if output is not None:
        check_apart(output, input_paths(config))


def stale_run_dir(output: Path) -> bool:
    """A training run dir left by a run that finished: OUTPUT is complete and no checkpoint in
    OUTPUT.run is newer than it (the kill came after the final rename, before the cleanup)."""
    from minima_cli.training.state import list_checkpoints

    run_dir = output.with_name(f"{output.name}.run")
    manifest = output / MANIFEST
    if not run_dir.is_dir() or not manifest.is_file():
        return False
    finished = manifest.stat().st_mtime_ns
    return all(c.stat().st_mtime_ns <= finished
               for c in list_checkpoints(run_dir / "checkpoints"))


def remove_new_side_dirs(output: Path, existed: set[Path]) -> None:
    """After a user error: delete the side dirs this run created, unless they hold a checkpoint
    (a resumable run is never thrown away)."""
    from minima_cli.training.state import list_checkpoints

    for suffix in SIDE_DIRS:
        side = output.with_name(f"{output.name}{suffix}")
        if side in existed or not side.is_dir():
            continue
        if not list_checkpoints(side / "checkpoints"):
            shutil.rmtree(side, ignore_errors=True)


@contextlib.contextmanager
def guarded(config: Any, *, training: bool = False, command: str = "") -> Iterator[None]:
    """Run a stage inside this: inputs apart, the output locked, leftovers handled."""
    check_inputs_apart(config)
    check_hub_inputs(config)
    output = output_of(config)
    if output is None or getattr(config, "dry_run", False) or rank_and_world()[0] != 0:
        yield  # nothing written here, or another rank writes it (rank 0 holds the lock)
        return
    output = Path(output).expanduser()
    with output_lock(output, command):
        recover_replacement(output)  # a replacement a kill left half-done: finish or roll back
        if training and rank_and_world()[1] == 1 and stale_run_dir(output):
            shutil.rmtree(output.with_name(f"{output.name}.run"))
        existed = {p for p in (output.with_name(f"{output.name}{s}") for s in SIDE_DIRS)
                   if p.exists()}
        try:
            yield
        except MinimaError:
            remove_new_side_dirs(output, existed)
            raise
