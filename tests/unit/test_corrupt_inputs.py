"""Issue 17, class D: corrupt or malformed inputs are one `error:` line and exit 2, never a
traceback, and nothing is written. The bad files are built in tmp_path from the tiny world."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_random_model
from safetensors.torch import load_file, save_file

from minima_cli.errors import MinimaError


def assert_refused(code: int, err: str, out: Path | None = None, *needles: str) -> None:
    """Exit 2, exactly one stderr line `error: ...` holding every needle, nothing at or beside
    OUTPUT (no OUTPUT.run/, OUTPUT.tmp-*, OUTPUT.token-cache/)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]


def model_copy(tiny_world: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(tiny_world / "teacher", target)
    return target


def corrupt_weights(directory: Path, kind: str) -> None:
    path = directory / "model.safetensors"
    if kind == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(64 * 1024))


def stage_args(command: str, tiny_world: Path, model: Path, out: Path) -> list:
    data = tiny_world / "data"
    return {
        "score": ["score", "-m", model, "-d", data / "train.txt", "-o", out, "--seq-len", 32,
                  "--batches", 1, "-q"],
        "distill": ["distill", "-t", tiny_world / "teacher", "-s", model, "-d",
                    data / "train.txt", "-o", out, "--seq-len", 32, "--batch-size", 4,
                    "--max-steps", 2, "--precision", "fp32", "-q"],
        "sft": ["sft", "-m", model, "-d", data / "chat_train.jsonl", "-o", out, "--seq-len", 64,
                "--max-steps", 1, "--precision", "fp32", "-q"],
        "eval": ["eval", "-m", model, "-t", f"ppl:{data / 'valid.txt'}", "-o", out, "-q"],
        "cache-teacher": ["cache-teacher", "-t", model, "-d", data / "train.txt", "-o", out,
                          "--seq-len", 32, "-q"],
        "prune": ["prune", "-m", model, "-s", out.parent / "scores", "-o", out, "--ratio", 0.5,
                  "-q"],
    }[command]


@pytest.mark.parametrize("command", ["score", "distill", "sft", "eval", "cache-teacher"])
@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "random"])
def test_corrupt_safetensors_is_one_line(tiny_world, tmp_path, capsys, command, kind):
    model = model_copy(tiny_world, tmp_path)
    corrupt_weights(model, kind)
    before = (model / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args(command, tiny_world, model, out), capsys)
    assert_refused(code, err, out, "model.safetensors")
    assert (model / "model.safetensors").read_bytes() == before  # input untouched


@pytest.mark.parametrize("edit, needle", [
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "not a multiple of"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
    ({"hidden_size": None}, "no hidden_size"),
    ({"vocab_size": 10}, "does not match the weights"),
    ({"num_hidden_layers": 100000}, "100000 layers"),
])
def test_bad_config_json_is_one_line(tiny_world, tmp_path, capsys, edit, needle):
    model = model_copy(tiny_world, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update({k: v for k, v in edit.items() if v is not None})
    for key in [k for k, v in edit.items() if v is None]:
        del config[key]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args("score", tiny_world, model, out), capsys)
    assert_refused(code, err, out, needle)
    assert "Traceback" not in err and "load report" not in err.lower()


def test_vocab_smaller_than_tokenizer_with_matching_weights(tiny_world, tmp_path, capsys):
    """A model whose embeddings really were cut below the tokenizer: the tokenizer check."""
    model = model_copy(tiny_world, tmp_path)
    config = json.loads((model / "config.json").read_text())
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:100].clone()
    save_file(weights, model / "model.safetensors", {"format": "pt"})
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    code, _, err = run_cli(stage_args("score", tiny_world, model, tmp_path / "out"), capsys)
    assert_refused(code, err, tmp_path / "out", "tokenizer has", "vocab_size is 100")


def test_model_too_large_for_memory_is_refused_with_an_estimate(tiny_world, tmp_path, capsys,
                                                              monkeypatch):
    import psutil

    class Small:
        available = 10_000  # bytes: the tiny teacher needs ~870 KB in float32

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small())
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args("score", tiny_world, tiny_world / "teacher", out), capsys)
    assert_refused(code, err, out, "GB of memory", "available")


def test_memory_estimate_of_100000_layers():
    from transformers import LlamaConfig

    from minima_cli.model.checkpoint import load_memory_bytes

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=100_000,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64  # q, o; k, v; mlp; norms
    want = (512 * 64 * 2 + 100_000 * per_layer + 64) * 4  # untied embeddings, fp32
    assert load_memory_bytes(config, torch.float32) == want
    assert load_memory_bytes(config, torch.bfloat16) == want // 2


def nan_model(tiny_world: Path, tmp_path: Path, value: float, tensor: str) -> Path:
    model = model_copy(tiny_world, tmp_path, "nan_model")
    weights = load_file(model / "model.safetensors")
    weights[tensor][3, 5] = value
    save_file(weights, model / "model.safetensors", {"format": "pt"})
    return model


@pytest.mark.parametrize("command", ["score", "prune", "distill", "sft", "eval"])
def test_non_finite_weights_are_refused(tiny_world, tmp_path, capsys, command):
    # prune streams the weights and checks the rows it keeps (a NaN in a dropped row cannot
    # reach the student): every embedding row is kept
    tensor = ("model.embed_tokens.weight" if command == "prune"
              else "model.layers.1.mlp.up_proj.weight")
    model = nan_model(tiny_world, tmp_path, float("inf") if command == "eval" else float("nan"),
                      tensor)
    if command == "prune":  # scores made for this very model (score itself refuses it)
        from minima_cli.fsutil import write_manifest
        from minima_cli.model.arch import shape_from_config
        from minima_cli.model.checkpoint import load_config, model_fingerprint, resolve_model
        from minima_cli.model.scores import random_scores, save_scores

        source = resolve_model(model)
        scores = tmp_path / "scores"
        scores.mkdir()
        save_scores(scores, random_scores(shape_from_config(load_config(source))), {})
        write_manifest(scores, "score", inputs={"model": {
            "path": str(model), "fingerprint": model_fingerprint(source)}})
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args(command, tiny_world, model, out), capsys)
    assert_refused(code, err, out, tensor, "NaN or infinite")


def test_all_finite_matches_isfinite():
    from minima_cli.model.checkpoint import all_finite

    assert all_finite(torch.tensor([1.0, -2.0]))
    assert all_finite(torch.tensor([3e38, 3e38]))  # the fast sum overflows: the exact check
    assert all_finite(torch.full((10_000,), 60_000.0, dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")], dtype=torch.bfloat16))


@pytest.mark.parametrize("name, content, needle", [
    ("bin.txt", b"hello world\n" * 3 + bytes(range(128, 256)), "bin.txt:4: not UTF-8"),
    ("nul.txt", b"hello\n\x00\x00binary\n", "nul.txt:2: binary data"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "bad.jsonl:2: not UTF-8"),
    ("bad.json", b'[{"text": "ok"},\n {"text": "\xff"}]', "bad.json:2: not UTF-8"),
])
@pytest.mark.parametrize("command", ["score", "distill"])
def test_binary_or_invalid_utf8_data(tiny_world, tmp_path, capsys, command, name, content,
                                     needle):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    args = stage_args(command, tiny_world, tiny_world / "teacher", out)
    args[args.index("-d") + 1] = data
    code, _, err = run_cli(args, capsys)
    assert_refused(code, err, out, needle)


@pytest.fixture
def scores(tiny_world, tmp_path, capsys) -> Path:
    out = tmp_path / "scores"
    code, _, err = run_cli(stage_args("score", tiny_world, tiny_world / "teacher", out), capsys)
    assert code == 0, err
    return out


def test_truncated_scores_file(tiny_world, tmp_path, capsys, scores):
    path = scores / "scores.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args("prune", tiny_world, tiny_world / "teacher", out), capsys)
    assert_refused(code, err, out, "scores.safetensors", "truncated")


def test_nan_scores_are_refused(tiny_world, tmp_path, capsys, scores):
    path = scores / "scores.safetensors"
    tensors = load_file(path)
    tensors["heads"][0, 0] = float("nan")
    save_file(tensors, path)
    out = tmp_path / "out"
    code, _, err = run_cli(stage_args("prune", tiny_world, tiny_world / "teacher", out), capsys)
    assert_refused(code, err, out, "score heads", "NaN")


def test_truncated_teacher_cache_shard(tiny_world, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, _, err = run_cli(["cache-teacher", "-t", tiny_world / "teacher", "-d",
                            tiny_world / "data" / "train.txt", "-o", cache, "--seq-len", 32,
                            "--k", 8, "--blocks-per-shard", 64, "-q"], capsys)
    assert code == 0, err
    shard = sorted(cache.glob("source-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    out = tmp_path / "out"
    args = stage_args("distill", tiny_world, tiny_world / "teacher", out)
    args[args.index("-t"):args.index("-t") + 2] = ["--teacher-cache", cache]
    code, _, err = run_cli([*args, "--loss", "topk", "--topk", 8], capsys)
    assert_refused(code, err, out, shard.name, "truncated")


def test_truncated_newest_checkpoint_falls_back(tmp_path, capsys):
    from minima_cli.training.state import (
        adamw,
        load_training_checkpoint,
        parameter_groups,
        save_training_checkpoint,
    )

    model = tiny_random_model()
    optimizer = adamw(parameter_groups(model, 0.1), 1e-3, fused=False)
    for step in (2, 4):
        save_training_checkpoint(tmp_path, model, optimizer, step, {"extra": step})
    newest = tmp_path / "step-00000004" / "model.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)
    state = load_training_checkpoint(tmp_path, model, optimizer)
    assert state["step"] == 2
    err = capsys.readouterr().err
    assert "warning: skipping damaged checkpoint step-00000004" in err and "truncated" in err
    (tmp_path / "step-00000002" / "state.json").write_text('{"step": 2, "opt')
    with pytest.raises(MinimaError, match="every training checkpoint .* is damaged"):
        load_training_checkpoint(tmp_path, model, optimizer)
    with pytest.raises(MinimaError, match="damaged training checkpoint"):
        load_training_checkpoint(tmp_path / "step-00000004", model, optimizer)


@pytest.mark.parametrize("command, extra, needle", [
    ("distill", ["--valid-fraction", 0], "--valid-fraction 0 leaves no validation set"),
    ("sft", ["--valid-fraction", 0], "--valid-fraction 0 leaves no validation set"),
    ("distill", ["--valid-fraction", 1], "--valid-fraction must be in [0, 1)"),
    ("cache-teacher", ["--valid-fraction", 0], "--valid-fraction 0 leaves no validation set"),
    ("distill", ["--loss", "topk", "--topk", 100000], "--topk 100000 exceeds the vocabulary"),
    ("sft", ["--max-steps", 0, "--epochs", "inf"], "--epochs must be a finite number"),
])
def test_bad_training_options(tiny_world, tmp_path, capsys, command, extra, needle):
    out = tmp_path / "out"
    model = tiny_world / "teacher"
    code, _, err = run_cli([*stage_args(command, tiny_world, model, out), *extra], capsys)
    assert_refused(code, err, out, needle)


def test_prune_manifest_with_out_of_range_indices(tiny_world, pruned, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(pruned, student)
    manifest = json.loads((student / "minima.json").read_text())
    manifest["kept"]["hidden"][-1] = 9999
    (student / "minima.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    args = stage_args("distill", tiny_world, student, out)
    code, _, err = run_cli([*args, "--hidden-weight", 1], capsys)
    assert_refused(code, err, out, "corrupt prune manifest", "kept hidden")


def test_kept_problem():
    from minima_cli.model.arch import ModelShape
    from minima_cli.model.selection import kept_problem

    shape = ModelShape(layers=4, hidden=8, heads=4, kv_heads=2, head_dim=2, ffn=12, vocab=16)
    good = {"layers": [0, 2], "hidden": [1, 2, 7], "heads": [[0, 1], [2, 3]],
            "kv_groups": [[0], [1]], "ffn": [[0, 11], [3, 4]]}
    assert kept_problem(good, shape) is None
    for axis, value in (("layers", [0, 4]), ("layers", [2, 1]), ("hidden", [-1, 2]),
                        ("hidden", []), ("hidden", [1, 1]), ("ffn", [[0, 12], [3, 4]]),
                        ("heads", [[0, 1]]), ("layers", "0,1")):
        assert kept_problem({**good, axis: value}, shape), (axis, value)


def write_gguf(path: Path) -> None:
    """A small valid GGUF (metadata + two float32 tensors) written with the gguf package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"t{i}" for i in range(50)])  # an array of strings to walk over
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("keep", [20, 200, -4])
def test_truncated_gguf_says_truncated(tmp_path, capsys, keep):
    from minima_cli.model.tensors import check_gguf

    whole = tmp_path / "whole.gguf"
    write_gguf(whole)
    check_gguf(whole)  # the intact file passes
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(MinimaError, match="truncated GGUF"):
        check_gguf(cut)
    out = tmp_path / "out"
    code, _, err = run_cli(["prune", "-m", cut, "--ratio", 0.5, "--dry-run"], capsys)
    assert_refused(code, err, None, "cut.gguf", "truncated")
    assert not out.exists()


def test_not_a_gguf(tmp_path):
    from minima_cli.model.tensors import check_gguf

    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + struct.pack("<I", 3) + bytes(40))
    with pytest.raises(MinimaError, match="not a GGUF file"):
        check_gguf(path)


@pytest.mark.parametrize("laws, needle", [
    (["--loss-law", "a=0,alpha=0,b=0,beta=0", "--perf-law", "c=0.8,gamma=-3,l=2.5,d=0.1"],
     "--loss-law: a must be positive"),
    (["--loss-law", "a=406.4,alpha=0.34,b=410.7,beta=0.28", "--perf-law", "c=0,gamma=0,l=0,d=0"],
     "--perf-law: c must be non-zero"),
    (["--loss-law", "a=406.4,alpha=0.34,b=410.7,beta=0.28",
      "--perf-law", "c=0.8,gamma=0,l=2.5,d=0.1"], "--perf-law: gamma must be non-zero"),
])
def test_density_with_zero_laws(capsys, laws, needle):
    code, _, err = run_cli(["density", "--teacher", "7B:0.46", "--student", "3B:0.28", *laws],
                           capsys)
    assert_refused(code, err, None, needle)


def test_report_log_with_partial_last_line(tmp_path):
    from minima_cli.pipeline.report import collect, read_log

    log = tmp_path / "distill" / "log.jsonl"
    log.parent.mkdir()
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert [r["step"] for r in collect(tmp_path)["logs"]["distill"]] == [1, 2]
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(MinimaError, match=r"log.jsonl:2: malformed log line"):
        read_log(log)
    log.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\n')
    with pytest.raises(MinimaError, match="not UTF-8"):
        read_log(log)
