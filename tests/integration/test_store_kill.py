"""A SIGKILLed `minima tokenize` continues from its last complete shard and ends with a store
byte-for-byte equal to an uninterrupted build; distill trains from a store (`--data STORE`) with a
bounded validation set (`--valid-tokens`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli

from minima_cli.data.store import TokenStore
from minima_cli.data.tiny_corpus import make_corpus
from minima_cli.stages.tiny import train_tokenizer


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "minima.json"}


def test_sigkilled_tokenize_resumes_to_the_same_bytes(tmp_path: Path, capsys) -> None:
    docs = make_corpus(3000, seed=3)
    tok = tmp_path / "tok"
    train_tokenizer(docs[:300], vocab_size=300).save_pretrained(tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = ["tokenize", "--data", corpus, "--tokenizer", tok, "--shard-tokens", "3000",
            "--workers", "2"]
    code, _, err = run_cli([*args, "-o", tmp_path / "whole"], capsys)
    assert code == 0, err
    killed = tmp_path / "killed"
    progress = tmp_path / "killed.tmp-build" / "progress.json"
    command = [sys.executable, "-m", "minima_cli.cli", *map(str, args), "-o", str(killed), "-q"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline, shards = time.time() + 120, 0
    while time.time() < deadline and process.poll() is None:
        try:
            shards = len(json.loads(progress.read_text())["shards"])
        except (OSError, ValueError):
            shards = 0
        if shards >= 3:
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the build and its worker processes
    process.wait()
    assert shards >= 3 and not killed.exists(), "the build finished before it could be killed"
    code, _, err = run_cli([*args, "-o", killed], capsys)
    assert code == 0, err
    assert files_of(killed) == files_of(tmp_path / "whole")
    assert TokenStore(killed).n_documents == len(docs)


def test_distill_from_a_store_with_bounded_validation(tiny_world: Path, pruned: Path,
                                                      tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    code, _, err = run_cli(["tokenize", "--data", tiny_world / "data" / "train.txt",
                            "--tokenizer", tiny_world / "teacher", "-o", store, "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "student"
    code, _, err = run_cli(["distill", "-t", tiny_world / "teacher", "-s", pruned, "-d", store,
                            "-o", out, "--seq-len", "32", "--batch-size", "4", "--max-steps",
                            "2", "--eval-every", "2", "--valid-tokens", "320", "--precision",
                            "fp32", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "minima.json").read_text())
    assert manifest["inputs"]["data"]["valid_blocks"] == 10
