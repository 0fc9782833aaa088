"""The command line end to end on the tiny world: score -> prune -> plain transformers reload and
generation, and every bad input: exit 2, one `error:` line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reload_and_generate, save_model, tiny_random_model
from conftest import run_cli as run
from transformers import AutoModelForCausalLM, AutoTokenizer

from minima_cli.cli.app import main


@pytest.fixture(scope="module")
def scored(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "scores"
    code = main(["score", "-m", str(tiny_world / "teacher"), "-d",
                 str(tiny_world / "data" / "train.txt"), "-o", str(out), "--seq-len", "64",
                 "--batches", "4", "--quiet"])
    assert code == 0
    return out


def test_score_writes_scores_and_manifest(scored, tiny_world):
    manifest = json.loads((scored / "minima.json").read_text())
    assert manifest["stage"] == "score"
    assert manifest["inputs"]["model"]["fingerprint"]
    assert manifest["config"]["batches"] == 4 and manifest["metrics"]["tokens"] == 4 * 4 * 64
    assert (scored / "scores.safetensors").is_file()


def test_score_then_prune_gives_a_plain_hf_model_that_generates(scored, tiny_world, tmp_path,
                                                               capsys):
    out = tmp_path / "student"
    code, stdout, _ = run(["prune", "-m", tiny_world / "teacher", "-s", scored, "-o", out,
                           "--shape", "layers=3", "--ratio", "0.5", "--quiet"], capsys)
    assert code == 0, stdout
    assert "parameters" in stdout
    manifest = json.loads((out / "minima.json").read_text())
    assert set(manifest["kept"]) >= {"layers", "hidden", "heads", "kv_groups", "ffn"}
    assert len(manifest["kept"]["layers"]) == 3
    assert 0.4 < manifest["metrics"]["kept_fraction"] < 0.6
    params, _ = reload_and_generate(out, "the colour of")
    assert params == manifest["metrics"]["student_parameters"]
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_dry_run_prints_the_plan_and_writes_nothing(scored, tiny_world, tmp_path, capsys):
    out = tmp_path / "student"
    code, stdout, _ = run(["prune", "-m", tiny_world / "teacher", "-s", scored, "-o", out,
                           "--params", "100K", "--dry-run"], capsys)
    assert code == 0
    assert "prune plan" in stdout and "layers kept" in stdout
    assert not out.exists()
    code, stdout, _ = run(["prune", "-m", tiny_world / "teacher", "--ratio", "0.3",
                           "--dry-run"], capsys)  # no scores needed to see the shape
    assert code == 0 and "parameters" in stdout
    for selection in ("auto", "middle", "score", "units"):
        code, stdout, _ = run(["prune", "-m", tiny_world / "teacher", "-s", scored, "--shape",
                               "layers=2", "--priority", "global", "--layer-selection",
                               selection, "--dry-run"], capsys)
        assert code == 0 and "layers kept" in stdout
        if selection == "middle":
            assert "layers kept: [1, 2]" in stdout


def test_force_replaces_an_existing_output(scored, tiny_world, tmp_path, capsys):
    out = tmp_path / "student"
    args = ["prune", "-m", tiny_world / "teacher", "-s", scored, "-o", out, "--ratio", "0.5",
            "-q"]
    assert run(args, capsys)[0] == 0
    assert run([*args, "--force"], capsys)[0] == 0
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("student.*"))  # no temp or old dirs left behind


def test_help_and_version(capsys):
    assert run(["--version"], capsys)[1].startswith("minima ")
    for command in ("score", "prune", "tiny"):
        code, stdout, _ = run([command, "--help"], capsys)
        assert code == 0 and "--output" in stdout and "default" in stdout.lower()


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    gpt2.save_pretrained(root / "gpt2")
    save_model(tiny_random_model("llama"), root / "other_llama")
    return {"missing": root / "nope", "no_config": root / "no_config", "pickled": pickled,
            "gpt2": root / "gpt2", "other_llama": root / "other_llama"}


def assert_user_error(code: int, stderr: str, message: str, output: Path) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]
    assert not output.exists() and not list(output.parent.glob(f"{output.name}.tmp-*"))


@pytest.mark.parametrize(
    ("model", "message"),
    [("missing", "model not found"), ("no_config", "no config.json"),
     ("pickled", "only pickle weights"), ("gpt2", "unsupported architecture 'gpt2'")],
)
def test_bad_models_for_score_and_prune(bad_models, tiny_world, scored, tmp_path, capsys, model,
                                        message):
    out = tmp_path / "out"
    data = tiny_world / "data" / "train.txt"
    code, _, err = run(["score", "-m", bad_models[model], "-d", data, "-o", out], capsys)
    assert_user_error(code, err, message, out)
    code, _, err = run(["prune", "-m", bad_models[model], "-s", scored, "-o", out, "--ratio",
                        "0.5"], capsys)
    assert_user_error(code, err, message, out)


@pytest.mark.parametrize(
    ("target", "message"),
    [(["--shape", "ffn=100000"], "larger than the model"),
     (["--shape", "hidden=0"], "must be positive"),
     (["--shape", "layers=-1"], "must be positive"),
     (["--params", "1T"], "not smaller than the model"),
     (["--params", "-5M"], "not a size"),
     (["--ratio", "0"], "must be in (0, 1)"),
     (["--shape", "heads=3"], "not divisible into kept kv groups"),
     (["--shape", "heads=3,kv-heads=2"], "cannot be split"),
     (["--shape", "width=10"], "unknown shape key"),
     (["--shape", "ffn=big"], "not an integer"),
     ([], "give a target")],
)
def test_bad_prune_targets(tiny_world, scored, tmp_path, capsys, target, message):
    out = tmp_path / "out"
    code, _, err = run(["prune", "-m", tiny_world / "teacher", "-s", scored, "-o", out, *target],
                       capsys)
    assert_user_error(code, err, message, out)


def test_scores_of_another_model_are_refused(bad_models, scored, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", "-m", bad_models["other_llama"], "-s", scored, "-o", out,
                        "--ratio", "0.5"], capsys)
    assert_user_error(code, err, "scores belong to another model", out)


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [("missing.txt", ["--seq-len", "64"], "not found"),
     ("empty.txt", ["--seq-len", "64"], "no documents"),
     ("train.txt", ["--seq-len", "4096"], "exceeds the model's 256 positions"),
     ("train.txt", ["--batch-size", "0"], "--batch-size must be positive")],
)
def test_bad_score_inputs(tiny_world, tmp_path, capsys, data, extra, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    source = tiny_world / "data" / data if data == "train.txt" else tmp_path / data
    out = tmp_path / "out"
    code, _, err = run(["score", "-m", tiny_world / "teacher", "-d", source, "-o", out, *extra],
                       capsys)
    assert_user_error(code, err, message, out)


def test_existing_output_needs_force(tiny_world, scored, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["score", "-m", tiny_world / "teacher", "-d",
                        tiny_world / "data" / "train.txt", "-o", out], capsys)
    assert code == 2 and "exists (pass --force" in err
    code, _, err = run(["prune", "-m", tiny_world / "teacher", "-s", scored, "-o", out,
                        "--ratio", "0.5"], capsys)
    assert code == 2 and "exists (pass --force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_option_is_one_line(capsys):
    code, _, err = run(["prune", "--bogus"], capsys)
    assert code == 2 and err.strip() == "error: No such option: --bogus"


def test_failure_mid_write_leaves_nothing(tiny_world, scored, tmp_path, capsys, monkeypatch):
    import minima_cli.model.slicing as prune

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prune, "copy_tokenizer_files", explode)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["prune", "-m", str(tiny_world / "teacher"), "-s", str(scored), "-o", str(out),
              "--ratio", "0.5", "-q"])
    assert not out.exists() and not list(tmp_path.iterdir())
    torch.manual_seed(0)


