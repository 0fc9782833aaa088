"""`minima run RECIPE`: every stage of a recipe into `workdir/<stage>/`, redoing only what is stale.

A stage is up to date when its `minima.json` carries the hash this run would give it: the hash of
the stage's options (with `${STAGE}` references, not absolute paths, so a workdir can move) and of
its inputs' contents (model fingerprints, data and file hashes). A finished stage is stamped with
that hash (`"recipe"` in its manifest); anything else is stale and runs again, replacing its output
atomically. A training stage killed mid-way resumes from `workdir/<stage>.run/` when the hash it
started under (`recipe-hash` there) is the current one; otherwise its leftovers are discarded.

`--dry-run` prints the plan instead: each stage's status, the teacher and student shapes with
their parameter counts, per-GPU memory estimates for ZeRO-2 and ZeRO-3 and the token budget.

Memory per GPU (N GPUs, student P and teacher T parameters; bf16: 2-byte weights and grads and
12 bytes of fp32 master weights + Adam moments; fp32: 4 + 4 + 8):
- ZeRO-2: weights replicated, grads and optimizer states partitioned: `2P + (2 + 12)P / N`;
  the teacher's bf16 weights replicated: `2T`.
- ZeRO-3: everything partitioned: `16P / N`, teacher `2T / N`.
- Activations of one micro-batch of b x s tokens (2 bytes a value), per layer and token
  `4h + 3q + 3kv + 4f` values (norm inputs/outputs, q/k/v before and after RoPE, the attention
  context, gate/up/act/product; q = heads x head_dim, kv = kv_heads x head_dim): all layers
  without gradient checkpointing; with it, each layer's input (h) plus one layer recomputed.
  Plus the logits: student logits, their gradient and the teacher's, `3 b s V`.
Not counted: the CUDA context and allocator fragmentation (~1-3 GB), communication buckets, the
teacher's transient activations (no grad, freed layer by layer).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import MANIFEST, file_sha256, read_manifest
from minima_cli.pipeline.recipe import INPUTS, TRAINING, Recipe


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
        from minima_cli.stages.evaluate import parse_task

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
    from minima_cli.training.config import UNHASHED_FIELDS

    kept = {k: v for k, v in options.items() if k not in INPUTS[stage] or k in ("tasks",)}
    if stage == "eval":
        kept["models"] = [m.partition("=")[0] for m in options["models"]]
    if stage in TRAINING:
        kept = {k: v for k, v in kept.items() if k not in UNHASHED_FIELDS}
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
                    for key, kind in INPUTS[stage].items()}
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
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST)
