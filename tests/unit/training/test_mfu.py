"""MFU as a reported figure: distill's log and manifest (a resumed run's speed from its own
steps), score's and eval's manifests, the peak (given, listed, measured and cached) and
--peak-tflops' bounds; --compile reaching the models with their parameter names unchanged
(compiled-vs-eager numerics: tests/integration/test_compile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import distill_args, run_cli

from minima_cli.cli.app import main
from minima_cli.errors import MinimaError
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


def stop_before_the_model_is_written(monkeypatch) -> None:
    """The next distill trains every step, checkpoints and then fails where the model would be
    written: OUTPUT.run keeps the last checkpoint, as after a kill."""
    def stop(*args, **kwargs):
        raise MinimaError("stopped before writing the model")

    monkeypatch.setattr("minima_cli.stages.distill.save_final_model", stop)


def test_a_resumed_run_reports_the_speed_of_its_own_steps(tiny_world, pruned, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "student"
    args = [*distill_args(tiny_world, pruned, out, steps=4), "--peak-tflops", str(PEAK)]
    with monkeypatch.context() as patch:
        stop_before_the_model_is_written(patch)
        assert main(args) == 2
    assert main([*args, "--resume"]) == 0  # from step 2's checkpoint: steps 3 and 4 run here
    manifest = json.loads((out / "minima.json").read_text())
    metrics, tokens_per_step = manifest["metrics"], 4 * 32
    assert metrics["tokens"] == 4 * tokens_per_step  # the model saw the whole run's tokens
    # ...but this process trained 2 steps in wall_time_s: not 4 steps' tokens over 2 steps' time
    assert metrics["tokens_per_s"] * manifest["wall_time_s"] == pytest.approx(2 * tokens_per_step)
    assert metrics["mfu"] == pytest.approx(
        metrics["flops_per_token"] * metrics["tokens_per_s"] / (PEAK * 1e12))


def fake_compile(calls: list):
    """torch.compile without compiling: records what it is given and returns what it returns,
    a module wrapped in an OptimizedModule (names `_orig_mod.*`), a function as it is."""
    from torch._dynamo.eval_frame import OptimizedModule

    def compile(target, *args, **kwargs):
        calls.append(target)
        return OptimizedModule(target, lambda f: f) if isinstance(target, torch.nn.Module) \
            else target

    return compile


def test_compile_reaches_student_and_teacher_and_keeps_parameter_names(tiny_world, pruned,
                                                                        tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from minima_cli.model.checkpoint import load_model

    calls: list = []
    monkeypatch.setattr(torch, "compile", fake_compile(calls))
    out = tmp_path / "student"
    args = [*distill_args(tiny_world, pruned, out, steps=4), "--compile"]
    with monkeypatch.context() as patch:
        stop_before_the_model_is_written(patch)
        assert main(args) == 2
    # each model's own forward, compiled in place (nn.Module.compile), not the model wrapped
    modules = [getattr(call, "__self__", call) for call in calls]
    assert sorted(m.config.num_hidden_layers for m in modules) == sorted(
        [load_model(resolve_model(str(path))).config.num_hidden_layers
         for path in (pruned, tiny_world / "teacher")])  # the student and the teacher
    names = set(load_model(resolve_model(str(pruned))).state_dict())
    checkpoint = sorted((out.parent / "student.run" / "checkpoints").glob("step-*"))[-1]
    assert set(load_file(checkpoint / "model.safetensors")) <= names  # no `_orig_mod.`
    assert main([*args, "--resume"]) == 0  # a compiled run resumes from its checkpoint
    saved = set(load_file(out / "model.safetensors"))
    assert saved and saved <= names
    assert json.loads((out / "minima.json").read_text())["config"]["compile"] is True


def test_compile_is_refused_where_it_would_not_run(tiny_world, pruned, tmp_path, capsys,
                                                   monkeypatch):
    from minima_cli.training.config import TrainConfig
    from minima_cli.training.loop import open_session

    zero2 = Path(__file__).resolve().parents[3] / "recipes" / "deepspeed" / "zero2.json"
    code, _, err = run_cli([*distill_args(tiny_world, pruned, tmp_path / "s", steps=1),
                            "--compile", "--deepspeed", zero2], capsys)
    assert code == 2 and err.strip() == "error: --compile runs in one process without " \
        "DeepSpeed: drop --compile or --deepspeed"
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.run").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    with pytest.raises(MinimaError, match="--compile runs in one process"):
        open_session(TrainConfig(compile=True))
