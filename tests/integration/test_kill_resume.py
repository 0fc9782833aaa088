"""Kill and resume: a SIGKILLed `minima distill`, `minima sft` and `minima run` each resume to
bitwise the weights of an uninterrupted run, leave no final output while killed, and a resumed
pipeline does not redo its finished stages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from conftest import distill_args, kill_at_checkpoint, run_args, run_cli, sft_args, statuses
from safetensors.torch import load_file

from minima_cli.cli.app import main


def test_killed_distill_resumes_to_the_same_weights(tiny_world, pruned, tmp_path):
    reference = tmp_path / "reference"
    assert main(distill_args(tiny_world, pruned, reference, steps=10)) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "minima_cli.cli", *distill_args(tiny_world, pruned, out,
                                                                      steps=10)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed.run" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-00000004")) and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "killed before the end: no final output"
    assert main([*distill_args(tiny_world, pruned, out, steps=10), "--resume"]) == 0
    expected = load_file(reference / "model.safetensors")
    actual = load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_killed_on_policy_distill_resumes_to_the_same_weights(tiny_world, pruned, tmp_path,
                                                              capsys):
    """lambda 0.5, sampled at temperature 1: which steps generate and what they sample are
    functions of (seed, step, rank, micro-batch), so a resume from the checkpoint's step
    samples exactly what the uninterrupted run did."""
    on_policy = ["--on-policy", "0.5", "--gen-temperature", "1", "--gen-tokens", "8"]
    reference = tmp_path / "reference"
    assert run_cli([*distill_args(tiny_world, pruned, reference, steps=10), *on_policy],
                   capsys)[0] == 0
    records = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert 0 < sum(r["on_policy"] for r in records) < 10  # both kinds of step, both sides
    out = tmp_path / "killed"
    kill_at_checkpoint([*distill_args(tiny_world, pruned, out, steps=10), *on_policy],
                       tmp_path / "killed.run" / "checkpoints", 4)
    assert not out.exists(), "killed before the end: no final output"
    assert run_cli([*distill_args(tiny_world, pruned, out, steps=10), *on_policy, "--resume"],
                   capsys)[0] == 0
    expected = load_file(reference / "model.safetensors")
    actual = load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["on_policy"], r["generated_tokens"], r["loss"]) for r in resumed] == [
        (r["on_policy"], r["generated_tokens"], r["loss"]) for r in records]
    totals = [json.loads((d / "minima.json").read_text())["metrics"] for d in (reference, out)]
    assert totals[0]["generated_tokens"] == totals[1]["generated_tokens"] > 0


def test_killed_sft_resumes_to_the_same_weights(chat_world, tmp_path, capsys):
    steps = ["--max-steps", "30"]
    reference = tmp_path / "reference"
    assert run_cli(sft_args(chat_world, reference, *steps), capsys)[0] == 0
    out = tmp_path / "killed"
    kill_at_checkpoint(sft_args(chat_world, out, *steps),
                       tmp_path / "killed.run" / "checkpoints", 4)
    assert not out.exists(), "killed before the end: no final output"
    assert run_cli([*sft_args(chat_world, out, *steps), "--resume"], capsys)[0] == 0
    expected, actual = load_file(reference / "model.safetensors"), load_file(
        out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 31))


def test_killed_pipeline_resumes_and_finished_stages_are_not_redone(finished, tmp_path, capsys):
    reference, _ = finished
    workdir = tmp_path / "moved"  # a copy elsewhere: hashes use contents, not paths
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("distill", "sft", "export",
                                                                      "eval", "report"))
    kept = {s: (workdir / s / "minima.json").read_text() for s in ("tiny", "score", "prune")}
    checkpoints = workdir / "distill.run" / "checkpoints"
    kill_at_checkpoint(run_args(workdir, "--until", "distill"), checkpoints, 4, timeout=240)
    assert (checkpoints / "step-00000004").is_dir() and not (workdir / "distill").exists(), \
        "killed mid-distill"

    code, out, err = run_cli(run_args(workdir, "--until", "distill"), capsys)
    assert code == 0, err
    assert statuses(out) == {"tiny": "up to date", "score": "up to date",
                             "prune": "up to date", "distill": "resumed", "sft": "not selected",
                             "eval": "not selected"}
    assert kept == {s: (workdir / s / "minima.json").read_text() for s in kept}
    expected = load_file(reference / "distill" / "model.safetensors")
    actual = load_file(workdir / "distill" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    # A changed setting re-runs what it makes stale, and only that.
    code, out, err = run_cli(run_args(workdir, "--until", "prune", "--set", "prune.ratio=0.6"),
                             capsys)
    assert code == 0, err
    assert statuses(out) == {"tiny": "up to date", "score": "up to date", "prune": "ran",
                             "distill": "done earlier", "sft": "not selected",
                             "eval": "not selected"}
