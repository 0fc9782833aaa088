"""MFU as a reported figure: distill's log and manifest, score's and eval's manifests, the peak
(given, listed, measured and cached) and --peak-tflops' bounds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import distill_args, run_cli

from minima_cli.cli.app import main
from minima_cli.model.arch import ModelShape, shape_from_config
from minima_cli.model.checkpoint import load_config, resolve_model
from minima_cli.training.flops import (
    Throughput,
    distill_flops_per_token,
    matmul_parameters,
    resolve_peak,
    score_flops_per_token,
)

PEAK = 0.001  # TFLOP/s: --peak-tflops


def shape_of(path) -> ModelShape:
    return shape_from_config(load_config(resolve_model(str(path))))


def test_distill_logs_and_records_mfu_against_the_given_peak(tiny_world, pruned, tmp_path):
    out = tmp_path / "student"
    assert main([*distill_args(tiny_world, pruned, out, steps=2),
                 "--peak-tflops", str(PEAK)]) == 0
    flops = distill_flops_per_token(shape_of(pruned), shape_of(tiny_world / "teacher"), 32)
    tokens_per_step = 4 * 32
    for record in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        assert record["flops_per_token"] == flops
        per_s = tokens_per_step / record["step_s"]
        assert record["tflops"] == pytest.approx(flops * per_s / 1e12)
        assert record["mfu"] == pytest.approx(flops * per_s / (PEAK * 1e12))
    metrics = json.loads((out / "minima.json").read_text())["metrics"]
    assert metrics["flops_per_token"] == flops and metrics["peak_source"] == "given"
    assert metrics["peak_tflops"] == pytest.approx(PEAK)
    assert metrics["mfu"] == pytest.approx(flops * metrics["tokens_per_s"] / (PEAK * 1e12))
    assert metrics["tflops"] == pytest.approx(flops * metrics["tokens_per_s"] / 1e12)


def test_the_peak_option_must_be_positive(tiny_world, pruned, tmp_path, capsys):
    code, _, err = run_cli([*distill_args(tiny_world, pruned, tmp_path / "s", steps=1),
                            "--peak-tflops", "0"], capsys)
    assert code == 2 and "--peak-tflops must be positive" in err
    code, _, err = run_cli(["eval", "-m", str(tiny_world / "teacher"), "-t", "ppl:x.txt",
                            "--peak-tflops", "-1"], capsys)
    assert code == 2 and err.startswith("error:")


def test_score_and_eval_manifests_carry_model_flops(tiny_world, tmp_path):
    teacher = tiny_world / "teacher"
    shape = shape_of(teacher)
    out = tmp_path / "scores"
    assert main(["score", "-m", str(teacher), "-d", str(tiny_world / "data" / "train.txt"),
                 "-o", str(out), "--seq-len", "32", "--batches", "1", "-q",
                 "--peak-tflops", str(PEAK)]) == 0
    metrics = json.loads((out / "minima.json").read_text())["metrics"]
    assert metrics["flops_per_token"] == score_flops_per_token(shape, 32, "grad") == \
        2 * distill_flops_per_token(shape, None, 32) // 3
    assert metrics["mfu"] == pytest.approx(
        metrics["flops_per_token"] * metrics["tokens_per_second"] / (PEAK * 1e12))

    out = tmp_path / "eval"
    assert main(["eval", "-m", str(teacher), "-t", f"ppl:{tiny_world / 'data' / 'valid.txt'}",
                 "--limit", "2", "-o", str(out), "-q", "--peak-tflops", str(PEAK)]) == 0
    manifest = json.loads((out / "minima.json").read_text())
    results = json.loads((out / "results.json").read_text())["models"][0]
    figures = manifest["throughput"][results["name"]]
    assert figures == results["throughput"] and figures["peak_source"] == "given"
    assert figures["flops_per_token"] == 2 * matmul_parameters(shape)
    assert figures["mfu"] == pytest.approx(
        figures["flops_per_token"] * results["tokens_per_second"] / (PEAK * 1e12))


def test_the_peak_is_given_else_measured_once_at_the_models_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMA_PEAK_CACHE", str(tmp_path / "peaks.json"))
    shape = ModelShape(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, ffn=64, vocab=50)
    assert resolve_peak(2.0, "cpu", "fp32", [shape], 64) == (2e12, "given")
    peak, source = resolve_peak(None, "cpu", "fp32", [shape], 64)
    assert peak > 0 and source == "measured"
    cached = json.loads((tmp_path / "peaks.json").read_text())
    assert list(cached.values()) == [peak]
    assert resolve_peak(None, "cpu", "fp32", [shape], 64) == (peak, "measured")  # from the cache
    assert Throughput(100.0, 1e3, "given").figures(5.0) == {
        "flops_per_token": 100.0, "tflops": 500.0 / 1e12, "mfu": 0.5}
    if torch.cuda.is_available():  # a listed GPU reports its data-sheet peak
        assert resolve_peak(None, "cuda", "bf16", [shape], 64)[1] in ("listed", "measured")
