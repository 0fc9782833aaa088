"""Files and directories: the sha256 of a file, atomic output directories (`atomic_output_dir`:
built beside the target, fsynced, renamed into place; a replacement a kill left half-done is
finished or rolled back by the next run), exclusive output locks (`output_lock`), the checks that
keep an output apart from the inputs (`check_apart`), fault injection for tests (`fault_point`)
and the `minima.json` manifest every stage writes. Protocol and manifest fields: docs/formats.md.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from minima_cli import __version__
from minima_cli.errors import MinimaError

MANIFEST = "minima.json"

# --- fault injection (tests) ------------------------------------------------------------------
# MINIMA_FAULT="rename:2:kill,write:1:enospc": at the 2nd rename of an output replacement this
# process SIGKILLs itself; the 1st manifest/atomic-file write fails with ENOSPC. Actions: kill,
# enospc, erofs, eio. Deterministic windows for the kill/fault tests instead of sleeps.
FAULT_ENV = "MINIMA_FAULT"
FAULT_ERRNOS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO,
                "eacces": errno.EACCES}
_fault_counts: dict[str, int] = {}


def reset_faults() -> None:
    _fault_counts.clear()


def fault_point(kind: str, path: Path | str) -> None:
    """A place a test may make fail (see FAULT_ENV); free when the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_counts[kind] = count = _fault_counts.get(kind, 0) + 1
    for item in spec.split(","):
        what, _, rest = item.strip().partition(":")
        nth, _, action = rest.partition(":")
        if what != kind or not nth.isdigit() or int(nth) != count:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        code = FAULT_ERRNOS.get(action, errno.EIO)
        raise OSError(code, os.strerror(code), str(path))


# --- JSON without NaN -----------------------------------------------------------------------


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-inf) as None: JSON has no NaN, and a reader
    other than Python's json module rejects `NaN`/`Infinity`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """json.dumps of `value` with non-finite floats as null (strict JSON)."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


HASH_CACHE_ENV = "MINIMA_CACHE_DIR"
HASH_CACHE_ENTRIES = 4096


def hash_cache_file() -> Path:
    """Where full-file hashes are remembered: $MINIMA_CACHE_DIR, else $XDG_CACHE_HOME/minima,
    else ~/.cache/minima; never beside a model (an input minima must not modify)."""
    root = os.environ.get(HASH_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "minima")
    return Path(root) / "file-hashes.json"


def file_identity(stat: os.stat_result) -> list[int]:
    """What must not change for a remembered hash to stand: size, mtime (ns), inode, device."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def cached_file_sha256(path: Path) -> str:
    """The sha256 of the whole file, remembered by (real path, size, mtime_ns, inode, device)
    so an unchanged multi-GB checkpoint is hashed once. Any rewrite of the file changes its
    mtime (or inode), so a content change is always seen. The cache is best effort: unreadable
    or unwritable, the file is simply hashed."""
    path = Path(path)
    key = str(real(path))
    identity = file_identity(path.stat())
    cache_file = hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("identity") == identity and \
            isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    if file_identity(path.stat()) != identity:
        return digest  # changed while being read: do not remember it
    cache.pop(key, None)
    cache[key] = {"identity": identity, "sha256": digest}
    while len(cache) > HASH_CACHE_ENTRIES:  # oldest entries first (dicts keep insertion order)
        cache.pop(next(iter(cache)))
    with contextlib.suppress(OSError):
        atomic_write_text(cache_file, json.dumps(cache), fault="cache")
    return digest


def check_output(path: Path, force: bool) -> None:
    """Fail early (before any work) when the output exists and --force was not given, or when
    it cannot be written at all (a parent that is a file, a read-only directory: environment
    faults, OSError, exit 1)."""
    path = Path(path)
    recover_replacement(path)
    if path.exists() and not force:
        raise MinimaError(f"output {path} exists (pass --force to overwrite)")
    if path.exists() and not path.is_dir():
        raise MinimaError(f"output {path} exists and is not a directory")
    check_writable_parent(path)


def check_writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a writable directory (where its temp dir,
    lock and parents are created)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail with a confusing error
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OSError(errno.ENOTDIR, "is a file, not a directory: cannot create the output "
                      f"{path} under it", str(parent))
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"directory not writable: cannot create the output {path}",
                      str(parent))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `path`; on success fsync it and rename it to `path`.

    On any failure (or a kill) the temp dir is removed or left as `path.tmp-*`, never a
    half-written `path`. With `force`, an existing `path` is replaced only after the new one is
    complete: tmp -> `path.tmp-PID.complete`, `path` -> `path.old-PID`, the complete one ->
    `path`, delete `path.old-PID`. A kill anywhere in that sequence is finished or rolled back
    by the next run (`recover_replacement`); a complete output is never deleted."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    # mkdtemp makes 0700; the output is for colleagues too, so it follows the umask like mkdir
    os.chmod(tmp, 0o777 & ~current_umask())
    new = complete_name(path, os.getpid())
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        fsync_tree(tmp)
        fault_point("rename", new)
        tmp.rename(new)  # complete from here on: a kill after this point is rolled forward
        tmp = new
        if path.exists():
            fault_point("rename", old)
            path.rename(old)
            fault_point("rename", path)
            new.rename(path)
            fsync_dir(path.parent)
            remove_old(old)
        else:
            fault_point("rename", path)
            new.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        if old.exists() and not path.exists():  # failed between the renames: roll back
            with contextlib.suppress(OSError):
                old.rename(path)
        if path.exists() or tmp != new:  # else the complete new one is all there is: keep it
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_old(old: Path) -> None:
    """Delete the replaced output; a failure here does not fail the complete write (the next
    run removes `.old-*` leftovers whose pid is gone)."""
    try:
        fault_point("remove", old)
        shutil.rmtree(old)
    except OSError as error:
        print(f"warning: could not remove the replaced output {old} ({error.strerror}); "
              "the next run removes it", file=sys.stderr)


def complete_name(path: Path, pid: int) -> Path:
    """Where a complete new output waits for its rename; `.tmp-` in the name keeps readers that
    skip temp dirs (training checkpoints) from taking it for an output."""
    return path.with_name(f"{path.name}.tmp-{pid}.complete")


def leftover_pid(name: str, prefix: str, suffix: str = "") -> int | None:
    """The pid in `<prefix><pid>[-...]<suffix>`, or None when the name is not of that form."""
    if not name.startswith(prefix) or not name.endswith(suffix):
        return None
    pid = name[len(prefix):len(name) - len(suffix)].split("-")[0]
    return int(pid) if pid.isdigit() else None


def recover_replacement(path: Path) -> None:
    """Finish or roll back a replacement of `path` that a killed process left half-done:
    `path.tmp-PID.complete` with `path` missing is renamed into place (finish); with `path`
    present it is deleted (roll back: `path` is the previous complete output). `path.old-PID`
    with `path` present is deleted; with `path` missing it is renamed back (roll back). Only
    leftovers of dead processes are touched; a complete output is never deleted."""
    parent = path.parent
    if not parent.is_dir():
        return
    for prefix, suffix in ((f"{path.name}.tmp-", ".complete"), (f"{path.name}.old-", "")):
        for leftover in sorted(parent.glob(f"{glob_escape(prefix)}*{suffix}")):
            pid = leftover_pid(leftover.name, prefix, suffix)
            if pid is None or pid_alive(pid) or not leftover.is_dir():
                continue
            if path.exists():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.rename(path)
                fsync_dir(parent)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def remove_stale_temps(path: Path) -> None:
    """Delete temp dirs left by killed runs for the same output (their pid is gone)."""
    recover_replacement(path)
    prefix = f"{path.name}.tmp-"
    for stale in path.parent.glob(f"{glob_escape(prefix)}*"):
        pid = leftover_pid(stale.name, prefix)
        if pid is not None and not pid_alive(pid):
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
def atomic_file(path: Path, fault: str = "write") -> Iterator[Path]:
    """A temp path beside `path` to write; on success it is fsynced and renamed over `path` (a
    reader sees the old file or the whole new one), on any failure removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fault_point(fault, path)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, fault: str = "write") -> None:
    with atomic_file(path, fault) as tmp:
        tmp.write_text(text)


def write_manifest(directory: Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Write `minima.json`: stage, inputs (with hashes), config, metrics, versions, wall time."""
    import torch  # here, not at the top: reading a store or a manifest needs no torch
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
    fault_point("write", directory / MANIFEST)
    (directory / MANIFEST).write_text(dumps_json(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MinimaError(f"{directory}: no {MANIFEST}, not a minima output")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MinimaError(f"{path}: corrupt manifest ({error})") from error


# --- outputs apart from inputs -----------------------------------------------------------------


def real(path: str | Path) -> Path:
    """The absolute path with every symlink resolved (also of a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(output: str | Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """Refuse (always, --force or not) an output that is an input, lies inside one or holds
    one: writing it would delete or change what is being read. `inputs` are (what, path)."""
    out = real(output)
    for what, path in inputs:
        source = real(path)
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents:
            relation = "contains"
        else:
            continue
        raise MinimaError(f"output {output} {relation} the input {what} {path}: writing it would "
                          "destroy the input; choose another --output")


# --- exclusive output locks --------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | Path, command: str = "") -> Iterator[Path | None]:
    """Hold `PATH.lock` (beside PATH) exclusively for the block: a second writer of the same
    output fails at once with one line naming the holder (pid, host, command). The lock is an
    fcntl.flock on the file, so the kernel drops it when the holder dies and a stale lock file
    of a dead process is simply taken over. Parents created for the lock and the lock file are
    removed when the block ends (parents only if left empty)."""
    import fcntl

    path = Path(path)
    check_writable_parent(path)
    created = [p for p in reversed(Path(os.path.abspath(path)).parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            remove_created(created)
            raise MinimaError(f"output {path} is being written by {holder} (lock {lock}); "
                              "wait for it or choose another --output") from None
        # the holder before us may have unlinked the file after we opened it: lock the live one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        what = command or " ".join(Path(sys.argv[0]).name if i == 0 else a
                                   for i, a in enumerate(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({what})".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        remove_created(created)


def remove_created(created: list[Path]) -> None:
    """Remove the directories a lock created, deepest first, if they are (still) empty."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()
