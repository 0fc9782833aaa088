"""Files and directories: the sha256 of a file, atomic output directories (`atomic_output_dir`:
built beside the target, fsynced, renamed into place; temp dirs of dead processes removed) and
the `minima.json` manifest every stage writes. Protocol and manifest fields: docs/formats.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minima_cli import __version__
from minima_cli.errors import MinimaError

MANIFEST = "minima.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(path: Path, force: bool) -> None:
    """Fail early (before any work) when the output exists and --force was not given."""
    if path.exists() and not force:
        raise MinimaError(f"output {path} exists (pass --force to overwrite)")
    if path.exists() and not path.is_dir():
        raise MinimaError(f"output {path} exists and is not a directory")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `path`; on success fsync it and rename it to `path`.

    On any failure (or a kill) the temp dir is removed or left as `path.tmp-*`, never a
    half-written `path`. With `force`, an existing `path` is replaced only after the new one is
    complete."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(path: Path) -> None:
    """Delete temp dirs left by killed runs for the same output (their pid is gone)."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        pid = stale.name[len(path.name) + 5 :].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write; on success it is fsynced and renamed over `path` (a
    reader sees the old file or the whole new one), on any failure removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_manifest(directory: Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Write `minima.json`: stage, inputs (with hashes), config, metrics, versions, wall time."""
    import transformers

    manifest = {
        "stage": stage,
        "minima_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MinimaError(f"{directory}: no {MANIFEST}, not a minima output")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MinimaError(f"{path}: corrupt manifest ({error})") from error
