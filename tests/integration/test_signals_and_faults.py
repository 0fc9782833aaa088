"""Signals and faults on real runs (issue 17, classes B, C, D): Ctrl-C exits 130 with one line and
the run resumes; a `--force` replacement killed between its renames is finished by the next run;
two writers of one output: one wins whole, the other exits 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import distill_args

from minima_cli.cli.app import main
from minima_cli.fsutil import FAULT_ENV, output_lock
from minima_cli.training.state import list_checkpoints

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_exits_130_with_one_line_and_resume_completes(tiny_world, pruned, tmp_path):
    out = tmp_path / "student"
    args = distill_args(tiny_world, pruned, out, steps=400)
    # Ctrl-C's default action in the child, however pytest was started: a shell without job
    # control starts background jobs with SIGINT ignored, which children inherit (and Python
    # then installs no KeyboardInterrupt handler): the run would ignore the interrupt
    process = subprocess.Popen([sys.executable, "-m", "minima_cli.cli", *map(str, args)],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_sigint)
    checkpoints = out.with_name("student.run") / "checkpoints"
    started = time.time()
    # Ctrl-C once the run has a complete checkpoint (any: the first is rotated away a few steps
    # later); never during start-up, where the interrupt would land in library imports
    while not list_checkpoints(checkpoints) and process.poll() is None \
            and time.time() < started + 300:
        time.sleep(0.02)
    seen = [p.name for p in list_checkpoints(checkpoints)]
    waited, ended = time.time() - started, process.poll()
    early = process.communicate()[1] if ended is not None else ""
    assert ended is None and seen, (f"nothing to interrupt after {waited:.1f} s: exit code "
                                    f"{ended}, checkpoints {seen}, stderr: {early}")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, (
        f"interrupted after {waited:.1f} s at checkpoints {seen}, exit code "
        f"{process.returncode}, stderr: {err}")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0], err
    assert not out.exists()
    # finish from the checkpoint with fewer steps than were asked (the run_id covers max_steps,
    # so resume with the same options): just check it completes
    resumed = subprocess.run([sys.executable, "-m", "minima_cli.cli", *map(str, args),
                              "--resume", "--max-steps", "400"], env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "minima.json").is_file() and not out.with_name("student.run").exists()


def test_replacement_killed_between_renames_is_finished_by_the_next_run(tiny_world, pruned,
                                                                        tmp_path):
    out = tmp_path / "student"
    args = [*map(str, distill_args(tiny_world, pruned, out, steps=2)), "--no-tensorboard"]
    assert main(args) == 0
    first = (out / "minima.json").read_text()
    # rename 1: tmp -> .complete, 2: OUTPUT -> .old-PID, 3: .complete -> OUTPUT: die before 3
    killed = subprocess.run([sys.executable, "-m", "minima_cli.cli", *args, "--force",
                             "--seed", "1"], env={**ENV, FAULT_ENV: "rename:3:kill"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("student."))
    assert any(n.endswith(".complete") for n in leftovers), leftovers
    assert any(".old-" in n for n in leftovers), leftovers
    # the next run of that output finishes the replacement first (this one then refuses to
    # overwrite it without --force): the new complete output is in place, no leftovers
    assert main(args) == 2
    assert (out / "minima.json").is_file() and (out / "minima.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("student")) == \
        ["student"]


def test_second_writer_of_an_output_exits_2_and_the_first_wins_whole(tiny_world, pruned,
                                                                     tmp_path, capsys):
    out = tmp_path / "student"
    with output_lock(out, "minima distill (the first writer)"):
        code = main([*map(str, distill_args(tiny_world, pruned, out, steps=2))])
        err = capsys.readouterr().err
        assert code == 2 and "being written by" in err and "first writer" in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists() and not out.with_name("student.run").exists()
    assert main([*map(str, distill_args(tiny_world, pruned, out, steps=2))]) == 0
    assert (out / "minima.json").is_file() and not out.with_name("student.lock").exists()
