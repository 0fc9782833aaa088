"""fsutil (issue 17): recoverable replacement of an output (deterministic fault injection, no
sleeps), outputs apart from inputs, exclusive output locks, umask, strict JSON, the cached full
file hash."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minima_cli import fsutil
from minima_cli.errors import MinimaError
from minima_cli.fsutil import (
    FAULT_ENV,
    atomic_output_dir,
    cached_file_sha256,
    check_apart,
    check_output,
    complete_name,
    dumps_json,
    output_lock,
    recover_replacement,
)


@pytest.fixture(autouse=True)
def no_faults(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fsutil.reset_faults()
    yield
    fsutil.reset_faults()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_output(path: Path, text: str, **kwargs) -> None:
    with atomic_output_dir(path, **kwargs) as tmp:
        (tmp / "file.txt").write_text(text)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_killed_between_the_renames_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    # what a SIGKILL before the last rename leaves: the complete new one, the old one aside
    pid = dead_pid()
    new = complete_name(out, pid)
    new.mkdir()
    (new / "file.txt").write_text("new")
    out.rename(out.with_name(f"out.old-{pid}"))
    recover_replacement(out)
    assert (out / "file.txt").read_text() == "new" and names(tmp_path) == ["out"]


def test_killed_before_the_old_one_moved_is_rolled_back(tmp_path):
    out = tmp_path / "out"
    write_output(out, "old")
    new = complete_name(out, dead_pid())
    new.mkdir()
    (new / "file.txt").write_text("new")
    check_output(out, force=True)  # every writer of `out` recovers first
    assert (out / "file.txt").read_text() == "old" and names(tmp_path) == ["out"]


def test_an_old_one_alone_is_put_back_and_a_stale_temp_removed(tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    old = tmp_path / f"out.old-{pid}"
    old.mkdir()
    (old / "file.txt").write_text("old")
    (tmp_path / f"out.tmp-{pid}-abcd1234").mkdir()
    write_output(out, "newer", force=True)
    assert (out / "file.txt").read_text() == "newer" and names(tmp_path) == ["out"]


def test_leftovers_of_a_live_process_are_not_touched(tmp_path):
    out = tmp_path / "out"
    mine = complete_name(out, os.getpid())
    mine.mkdir()
    recover_replacement(out)
    assert mine.is_dir() and not out.exists()


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_failed_rename_leaves_the_previous_output_whole(tmp_path, monkeypatch, nth):
    out = tmp_path / "out"
    write_output(out, "old")
    monkeypatch.setenv(FAULT_ENV, f"rename:{nth}:eio")
    fsutil.reset_faults()
    with pytest.raises(OSError):
        write_output(out, "new", force=True)
    assert (out / "file.txt").read_text() == "old" and names(tmp_path) == ["out"]


def test_a_failed_delete_of_the_old_output_does_not_fail_the_write(tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "out"
    write_output(out, "old")
    monkeypatch.setenv(FAULT_ENV, "remove:1:eacces")
    fsutil.reset_faults()
    write_output(out, "new", force=True)
    assert (out / "file.txt").read_text() == "new"
    assert f"out.old-{os.getpid()}" in names(tmp_path) and "warning" in capsys.readouterr().err


def test_write_fault_is_an_oserror_with_its_errno(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "write:1:enospc")
    with pytest.raises(OSError) as raised:
        fsutil.write_manifest(tmp_path, "test")
    assert raised.value.errno == errno.ENOSPC


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_output(tmp_path / "out", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("output, relation", [("model", "is"), ("model/sub", "is inside"),
                                              (".", "contains"), ("link", "is")])
def test_an_output_overlapping_an_input_is_refused(tmp_path, monkeypatch, output, relation):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(MinimaError, match=f"output {output} {relation} the input --model"):
        check_apart(output, [("--model", "model")])
    check_apart("other", [("--model", "model")])
    check_apart("model2", [("--model", "model")])  # a shared prefix is not containment


def test_a_held_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    out = tmp_path / "new" / "out"
    with output_lock(out, "the first writer"):
        assert "the first writer" in (tmp_path / "new" / "out.lock").read_text()
        with pytest.raises(MinimaError, match="being written by pid .*the first writer"), \
                output_lock(out):
            pass
    assert not (tmp_path / "new").exists()  # the lock and the parent it made are gone


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.lock").write_text(f"pid {dead_pid()} on host (killed)")
    with output_lock(out, "me") as lock:
        assert "me" in lock.read_text()


def test_manifests_and_json_have_no_nan(tmp_path):
    assert json.loads(dumps_json({"a": [math.nan, math.inf, 1.5]})) == {"a": [None, None, 1.5]}
    fsutil.write_manifest(tmp_path, "test", metrics={"loss": math.nan})
    assert json.loads((tmp_path / "minima.json").read_text())["metrics"]["loss"] is None


def test_cached_hash_sees_an_equal_size_change(tmp_path, monkeypatch):
    monkeypatch.setenv(fsutil.HASH_CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 100_000)
    first = cached_file_sha256(weights)
    assert cached_file_sha256(weights) == first  # from the cache
    assert (tmp_path / "cache" / "file-hashes.json").is_file()
    with weights.open("r+b") as handle:  # one byte in the middle, same size
        handle.seek(50_001)
        handle.write(b"b")
    assert cached_file_sha256(weights) != first


def test_parent_that_is_a_file_is_an_environment_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as raised:
        check_output(tmp_path / "file" / "out", force=False)
    assert raised.value.errno == errno.ENOTDIR
