"""Several processes under torchrun on CPU (gloo): `minima distill` with 2 ranks and DeepSpeed
ZeRO-2 / ZeRO-3 (DS_ACCELERATOR=cpu) gives the same weights as one process with the same global
batch, resumes exactly after SIGKILL and writes a directory plain transformers loads; data-parallel
`minima score` equals one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from minima_cli.cli.app import main
from minima_cli.training.loop import free_port

pytest.importorskip("deepspeed")
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
STEPS = 24


def distill_args(world: Path, student: Path, out: Path, batch_size: int) -> list[str]:
    return ["distill", "-t", str(world / "teacher"), "-s", str(student), "-d",
            str(world / "data" / "train.txt"), "-o", str(out), "--seq-len", "32",
            "--batch-size", str(batch_size), "--max-steps", str(STEPS), "--save-every", "3",
            "--eval-every", "12", "--lr", "3e-3", "--precision", "fp32", "-q"]


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get(
               "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "minima-torch-extensions"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "minima_cli.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (elastic starts each worker in its own session)."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def reference(tiny_world, pruned, tmp_path_factory) -> dict[str, torch.Tensor]:  # noqa: F811
    """One process, batch 4: the global batch of 2 ranks x 2."""
    out = tmp_path_factory.mktemp("ds") / "single"
    assert main(distill_args(tiny_world, pruned, out, batch_size=4)) == 0
    return load_file(out / "model.safetensors")


def assert_close(expected: dict[str, torch.Tensor], directory: Path, atol: float) -> None:
    actual = load_file(directory / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        difference = (actual[name].float() - expected[name].float()).abs().max().item()
        assert difference <= atol, (name, difference)


def test_zero2_matches_one_process_and_resumes_exactly(tiny_world, pruned, reference,  # noqa: F811
                                                       tmp_path):
    deepspeed = ["--deepspeed", str(RECIPES / "zero2.json")]
    uninterrupted = tmp_path / "uninterrupted"
    finish(torchrun([*distill_args(tiny_world, pruned, uninterrupted, batch_size=2), *deepspeed]))
    assert_close(reference, uninterrupted, atol=1e-4)  # same global batch, other reduce order

    out = tmp_path / "zero2"
    args = [*distill_args(tiny_world, pruned, out, batch_size=2), *deepspeed]
    process = torchrun(args)
    checkpoints = tmp_path / "zero2.run" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-00000003").is_dir() and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    kill_tree(process.pid)
    process.communicate()
    assert not out.exists(), "killed before the end: no final output"
    finish(torchrun([*args, "--resume"]))
    assert_close(load_file(uninterrupted / "model.safetensors"), out, atol=1e-6)
    records = (out / "log.jsonl").read_text().splitlines()
    assert len(records) == STEPS  # the killed run's steps after its checkpoint are not repeated


def test_zero3_writes_a_loadable_consolidated_student(tiny_world, pruned, reference,  # noqa: F811
                                                      tmp_path):
    out = tmp_path / "zero3"
    finish(torchrun([*distill_args(tiny_world, pruned, out, batch_size=2), "--deepspeed",
                     str(RECIPES / "zero3.json")]))
    # ZeRO-3 reduces in another order; Adam turns the rounding noise on the near-zero gradients
    # of rare tokens into updates of up to ~lr, so the weights agree to ~lr, the model closely
    assert_close(reference, out, atol=3e-3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for t in reference.values())
    import json

    manifest = json.loads((out / "minima.json").read_text())
    assert manifest["metrics"]["world_size"] == 2


def test_two_ranks_without_deepspeed_average_gradients(tiny_world, pruned, reference,  # noqa: F811
                                                      tmp_path):
    """Plain DDP over gloo: the same weights as one process with the same global batch."""
    out = tmp_path / "ddp"
    finish(torchrun(distill_args(tiny_world, pruned, out, batch_size=2)))
    assert_close(reference, out, atol=1e-4)


def test_data_parallel_score_equals_single_process(tiny_world, tmp_path, capsys):
    """Under torchrun each rank scores its own sequences; the all-reduced scores equal a single
    process's (batch size 1, so both see the same per-sequence gradients)."""
    from safetensors.torch import load_file

    common = ["score", "-m", tiny_world / "teacher", "-d", tiny_world / "data" / "train.txt",
              "--seq-len", "32", "--batches", "6", "--batch-size", "1", "-q"]
    assert run_cli([*common, "-o", tmp_path / "single"], capsys)[0] == 0
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29517", "-m", "minima_cli.cli",
         *map(str, common), "-o", str(tmp_path / "dp")],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    single = load_file(tmp_path / "single" / "scores.safetensors")
    parallel = load_file(tmp_path / "dp" / "scores.safetensors")
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, rtol=1e-5, atol=1e-8)
    manifest = json.loads((tmp_path / "dp" / "minima.json").read_text())
    assert manifest["metrics"]["tokens"] == 6 * 32


def test_on_policy_under_zero3_generates_as_plain_data_parallel(tiny_world, pruned, tmp_path):
    """On-policy steps under ZeRO-3 (every rank runs all --gen-tokens forwards, since each
    gathers the partitioned weights) give the same generations and losses as 2 plain DDP ranks,
    which stop generating once their rows have ended."""
    on_policy = ["--on-policy", "1", "--gen-temperature", "0", "--gen-tokens", "8",
                 "--max-steps", "4"]
    logs = {}
    for name, extra in (("ddp", []), ("zero3", ["--deepspeed", str(RECIPES / "zero3.json")])):
        out = tmp_path / name
        finish(torchrun([*distill_args(tiny_world, pruned, out, batch_size=2), *on_policy,
                         *extra]))
        logs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in logs["zero3"]] == [1, 1, 1, 1]
    # both ranks' tokens, counted once each: 2 ranks x 2 rows x at most 8
    assert all(0 < r["generated_tokens"] <= 32 for r in logs["zero3"])
    assert ([r["generated_tokens"] for r in logs["zero3"]]
            == [r["generated_tokens"] for r in logs["ddp"]])
    # the same weights at step 1; later ZeRO-3's other reduce order moves them by up to ~lr
    # (test_zero3_writes_a_loadable_consolidated_student)
    assert logs["zero3"][0]["loss"] == pytest.approx(logs["ddp"][0]["loss"], rel=1e-4)
    for ddp, zero3 in zip(logs["ddp"], logs["zero3"], strict=True):
        assert zero3["loss"] == pytest.approx(ddp["loss"], rel=2e-2)


def test_sparse_head_under_ddp_zero2_and_zero3_matches_one_process(tiny_world, pruned,  # noqa: F811
                                                                   tmp_path):
    """--loss topk --alpha 0 computes only the teacher's k logits from the lm_head's rows: under
    DDP and ZeRO-2 the weight is whole on every rank and its gradient is reduced like any other;
    ZeRO-3 partitions it, so there the student runs its full head (the same loss)."""
    sparse = ["--loss", "topk", "--topk", "16", "--alpha", "0", "--max-steps", "6"]
    single = tmp_path / "single"
    assert main([*distill_args(tiny_world, pruned, single, batch_size=4), *sparse]) == 0
    expected = load_file(single / "model.safetensors")
    for name, extra, atol in (("ddp", [], 1e-4),
                              ("zero2", ["--deepspeed", str(RECIPES / "zero2.json")], 1e-4),
                              ("zero3", ["--deepspeed", str(RECIPES / "zero3.json")], 3e-3)):
        out = tmp_path / name
        finish(torchrun([*distill_args(tiny_world, pruned, out, batch_size=2), *sparse, *extra]))
        assert_close(expected, out, atol=atol)
