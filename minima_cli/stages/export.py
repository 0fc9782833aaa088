"""`minima export`: a model as one GGUF file that llama.cpp-family runtimes load.

Checks first (output path, model, architecture, tokenizer, tensor list: `model.gguf_export.
plan_export`), then the tensors are streamed into the file (`write_gguf`). Two output forms:
- `--output FILE.gguf`: the file alone, written atomically (`fsutil.atomic_file`); the source's
  fingerprint, the encoding and minima's version are in its `minima.*` metadata;
- `--output DIR` (any path not ending in .gguf, what `minima run` gives the stage): DIR/model.gguf
  and DIR/minima.json, written atomically as every stage directory (`fsutil.atomic_output_dir`).
  `minima eval -m DIR` finds the one .gguf in it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_file, atomic_output_dir, check_output, write_manifest
from minima_cli.stages import RunControl
from minima_cli.stages.configs import ExportConfig

GGUF_NAME = "model.gguf"


def check_export_output(output: Path, force: bool) -> bool:
    """One-line errors for an output that cannot be written; True when it is a directory."""
    as_dir = output.suffix != ".gguf"
    parent = output.parent
    if not parent.is_dir():
        raise MinimaError(f"output directory {parent} does not exist")
    if as_dir:
        check_output(output, force)
    elif output.exists():
        if output.is_dir():
            raise MinimaError(f"output {output} is a directory")
        if not force:
            raise MinimaError(f"output {output} exists (pass --force to overwrite)")
    return as_dir


def run_export(*, model_path: str, output: Path, encoding: str, force: bool = False,
               progress: bool = True) -> dict[str, Any]:
    from minima_cli.model.checkpoint import model_fingerprint, resolve_model
    from minima_cli.model.gguf_export import ENCODINGS, plan_export, write_gguf

    if encoding not in ENCODINGS:
        raise MinimaError(f"--type: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    as_dir = check_export_output(output, force)
    source = resolve_model(model_path)
    if not as_dir and source.is_gguf and \
            (source.directory / source.gguf_file).resolve() == output.resolve():
        raise MinimaError(f"output {output} is the model being exported")
    plan = plan_export(source, encoding)
    start = time.perf_counter()
    parameters = sum(_numel(t.shape) for t in plan.tensors if t.hf_name)
    fields: dict[str, Any] = {
        "inputs": {"model": {"path": str(source), "fingerprint": model_fingerprint(source)}},
        "config": {"type": encoding},
    }
    if as_dir:
        with atomic_output_dir(output, force=force) as tmp:
            stats = write_gguf(plan, source, tmp / GGUF_NAME, progress)
            fields["metrics"] = metrics(stats, parameters)
            fields["file"] = GGUF_NAME
            fields["wall_time_s"] = time.perf_counter() - start
            return write_manifest(tmp, "export", **fields)
    with atomic_file(output) as tmp:
        stats = write_gguf(plan, source, tmp, progress)
        readable(tmp)
    fields["metrics"] = metrics(stats, parameters)
    fields["file"] = str(output)
    fields["wall_time_s"] = time.perf_counter() - start
    return {"stage": "export", **fields}


def readable(path: Path) -> None:
    """The permissions of a plain new file (0666 less the umask), not the temp file's 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def metrics(stats: dict[str, Any], parameters: int) -> dict[str, Any]:
    return {**stats, "parameters": parameters,
            "bits_per_weight": 8 * stats["file_bytes"] / max(parameters, 1)}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def run(config: ExportConfig, control: RunControl) -> dict[str, Any]:
    return run_export(model_path=config.model, output=Path(config.output), encoding=config.type,
                      force=control.force, progress=control.progress)
