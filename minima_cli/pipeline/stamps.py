"""Recipe stamps: the hash a stage gets in `minima run` (its hashed options with `${STAGE}`
references, not absolute paths, so a workdir can move; its inputs' content fingerprints; for
training stages precision, gradient checkpointing and world size) and the `recipe` stamp in its
`minima.json` that marks it up to date (docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import (
    MANIFEST,
    atomic_write_text,
    dumps_json,
    file_sha256,
    read_manifest,
)
from minima_cli.pipeline.recipe import Recipe, stage_inputs, unhashed_keys
from minima_cli.stages import TRAINING


def directory_fingerprint(path: Path) -> str:
    """Every file's relative path and sha256, the manifest (it holds a timestamp) left out."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def input_fingerprint(kind: str, value: Any) -> Any:
    """Content identity of one resolved input (None stays None)."""
    from minima_cli.data.sources import parse_sources, source_fingerprint
    from minima_cli.model.checkpoint import model_fingerprint, resolve_model

    if value is None:
        return None
    if kind == "model":
        return model_fingerprint(resolve_model(value))
    if kind == "dir":
        return directory_fingerprint(Path(value))
    if kind == "data":
        return [[source_fingerprint(s), s.weight, s.text_field] for s in parse_sources(value)]
    if kind == "models":
        return {name: input_fingerprint("model", path)
                for name, _, path in (m.partition("=") for m in value)}
    if kind == "tasks":
        from minima_cli.evaluation.tasks import parse_task

        found = []
        for task in value:
            target = Path(parse_task(task).target)
            found.append(file_sha256(target) if target.is_file() else
                         directory_fingerprint(target) if target.is_dir() else None)
        return found
    raise AssertionError(kind)


def hashed_options(stage: str, options: dict[str, Any]) -> dict[str, Any]:
    """What of a stage's options decides its output: not the input paths (their contents count),
    not training's bookkeeping (checkpoint and eval intervals, logs, the DeepSpeed file)."""
    kept = {k: v for k, v in options.items() if k not in unhashed_keys(stage)}
    if stage == "eval":
        kept["models"] = [m.partition("=")[0] for m in options["models"]]
    return kept


def stage_hash(stage: str, options: dict[str, Any], fingerprints: dict[str, Any]) -> str:
    text = json.dumps({"stage": stage, "options": options, "inputs": fingerprints},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_options(recipe: Recipe, stage: str) -> dict[str, Any]:
    """A stage's options plus the hardware settings that change its result."""
    options = dict(recipe.stages[stage])
    if stage in TRAINING:
        options["precision"] = recipe.hardware["precision"]
        options["gradient_checkpointing"] = recipe.hardware["gradient_checkpointing"]
        options["world_size"] = recipe.world_size  # the batch per step depends on it
    return options


def current_hash(recipe: Recipe, stage: str) -> str:
    options = stage_options(recipe, stage)
    fingerprints = {key: input_fingerprint(kind, recipe.resolve(options.get(key)))
                    for key, kind in stage_inputs(stage).items()}
    return stage_hash(stage, hashed_options(stage, options), fingerprints)


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The pipeline's stamp in a stage output's manifest, or None (no output, or not stamped)."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        return read_manifest(directory).get("recipe")
    except MinimaError:
        return None


def write_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    """Add the stamp to the stage's manifest, atomically (temp file + rename)."""
    manifest = read_manifest(directory)
    manifest["recipe"] = stamp
    atomic_write_text(directory / MANIFEST, dumps_json(manifest, indent=2) + "\n")
