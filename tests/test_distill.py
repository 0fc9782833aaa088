"""`minima distill` (single process): a run improves the pruned student, a SIGKILLed run resumed
with --resume ends bitwise equal to an uninterrupted one, and bad inputs fail in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_model, tiny_random_model
from safetensors.torch import load_file

from minima_cli.cli import main


@pytest.fixture(scope="module")
def pruned(tiny_world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    teacher, data = tiny_world / "teacher", tiny_world / "data" / "train.txt"
    assert main(["score", "-m", str(teacher), "-d", str(data), "-o", str(root / "scores"),
                 "--seq-len", "64", "--batches", "2", "-q"]) == 0
    assert main(["prune", "-m", str(teacher), "-s", str(root / "scores"), "-o",
                 str(root / "pruned"), "--ratio", "0.5", "-q"]) == 0
    return root / "pruned"


def distill_args(tiny_world, student, out, steps=8):
    return ["distill", "-t", str(tiny_world / "teacher"), "-s", str(student), "-d",
            str(tiny_world / "data" / "train.txt"), "-o", str(out), "--seq-len", "32",
            "--batch-size", "4", "--max-steps", str(steps), "--save-every", "2",
            "--eval-every", "4", "--lr", "3e-3", "--precision", "fp32", "-q"]


def test_distill_improves_the_pruned_student(tiny_world, pruned, tmp_path):
    out = tmp_path / "student"
    assert main(distill_args(tiny_world, pruned, out, steps=12)) == 0
    import json

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    assert not (tmp_path / "student.run").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48


def test_killed_run_resumes_to_the_same_weights(tiny_world, pruned, tmp_path):
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


def test_bad_distill_inputs(tiny_world, pruned, tmp_path, capsys):
    other = tmp_path / "other"
    save_model(tiny_random_model("llama"), other)
    from minima_cli.tiny import make_corpus, train_tokenizer

    train_tokenizer(make_corpus(50, seed=7), vocab_size=300).save_pretrained(other)
    broken = tmp_path / "broken"
    save_model(tiny_random_model("llama"), broken)
    (broken / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    capsys.readouterr()  # drop the set-up's output
    cases = [
        (["-s", other], "tokenizers differ"),
        (["-s", broken], "cannot load tokenizer"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--lr", "-1"], "must be positive"),
        (["--seq-len", "4096"], "exceeds the student's 256 positions"),
        (["--alpha", "2"], "must be in [0, 1]"),
        (["--loss", "mse"], "unknown loss"),
        (["--resume"], "no training checkpoint"),
    ]
    for extra, message in cases:
        args = distill_args(tiny_world, pruned, out)
        if extra[0] == "-s":
            args[args.index("-s") + 1] = str(extra[1])
            extra = []
        code = main([*args, *map(str, extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert not out.exists()
