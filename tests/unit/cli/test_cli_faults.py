"""Issue 17 through the command line, in-process: an output overlapping an input is refused even
with --force (inputs untouched), environment faults (disk full, read-only, a parent that is a
file) are one line and exit 1, Ctrl-C is exit 130 with how to resume, --config and recipe
messages, the dry run checks what the real run checks, a changed tensor of equal size changes
the model fingerprint, leftovers of failed runs are removed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import distill_args, run_cli

from minima_cli import fsutil
from minima_cli.errors import MinimaError
from minima_cli.fsutil import FAULT_ENV
from minima_cli.model.checkpoint import model_fingerprint, resolve_model
from minima_cli.pipeline.guard import guarded
from minima_cli.stages.configs import DistillConfig

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fsutil.HASH_CACHE_ENV, str(tmp_path / "hash-cache"))
    monkeypatch.delenv(FAULT_ENV, raising=False)
    fsutil.reset_faults()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def prune_args(tiny_world, pruned, out, *extra):
    return ["prune", "-m", tiny_world / "teacher", "-s", pruned.parent / "scores", "-o", out,
            "--ratio", "0.5", "-q", *extra]


def test_output_equal_to_or_holding_an_input_is_refused_even_with_force(tiny_world, pruned,
                                                                        tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_world / "teacher", teacher)
    before = snapshot(teacher)
    code, _, err = run_cli(["prune", "-m", teacher, "-s", pruned.parent / "scores", "-o",
                            teacher, "--ratio", "0.5", "--force", "-q"], capsys)
    assert code == 2 and "is the input --model" in one_line(err)
    assert snapshot(teacher) == before
    data = tmp_path / "data"
    shutil.copytree(tiny_world / "data", data)
    code, _, err = run_cli(["score", "-m", teacher, "-d", data / "train.txt", "-o", data,
                            "--force", "--seq-len", "32", "--batches", "1", "-q"], capsys)
    assert code == 2 and "contains the input --data" in one_line(err)
    assert (data / "train.txt").is_file() and snapshot(teacher) == before


def test_disk_full_is_one_line_exit_1_and_writes_nothing(tiny_world, pruned, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "write:1:enospc")  # the manifest write fails
    out = tmp_path / "out"
    code, _, err = run_cli(prune_args(tiny_world, pruned, out), capsys)
    assert code == 1 and "No space left on device" in one_line(err)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("fault", ["rename:1:erofs", "rename:1:eacces"])
def test_read_only_output_is_one_line_exit_1(tiny_world, pruned, tmp_path, capsys, monkeypatch,
                                             fault):
    monkeypatch.setenv(FAULT_ENV, fault)
    out = tmp_path / "out"
    code, _, err = run_cli(prune_args(tiny_world, pruned, out), capsys)
    assert code == 1 and one_line(err).startswith("error: ")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_one_line_exit_1(tiny_world, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(["eval", "-m", tiny_world / "teacher", "-t",
                                f"ppl:{tiny_world / 'data' / 'valid.txt'}", "--limit", "2",
                                "-o", locked / "out"], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 1 and "not writable" in one_line(err)


def test_unwritable_directory_is_one_line_exit_1_even_as_root(tiny_world, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(fsutil.os, "access", lambda path, mode: False)  # root ignores chmod
    code, _, err = run_cli(["eval", "-m", tiny_world / "teacher", "-t",
                            f"ppl:{tiny_world / 'data' / 'valid.txt'}", "-o", tmp_path / "out"],
                           capsys)
    assert code == 1 and "not writable" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_output_under_a_file_is_one_line_exit_1(tiny_world, pruned, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args in (prune_args(tiny_world, pruned, tmp_path / "file" / "out"),
                 distill_args(tiny_world, pruned, tmp_path / "file" / "out", steps=2),
                 ["eval", "-m", tiny_world / "teacher", "-t",
                  f"ppl:{tiny_world / 'data' / 'valid.txt'}", "-o", tmp_path / "file" / "o"]):
        code, _, err = run_cli(args, capsys)
        assert code == 1 and "not a directory" in one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_ctrl_c_is_exit_130_with_how_to_resume(tiny_world, pruned, tmp_path, capsys,
                                               monkeypatch):
    import minima_cli.stages.distill as distill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "run", interrupted)
    code, _, err = run_cli(distill_args(tiny_world, pruned, tmp_path / "out", steps=2), capsys)
    assert code == 130 and "--resume" in one_line(err)
    assert not (tmp_path / "out.lock").exists()


def test_config_with_a_run_switch_says_it_is_a_command_line_switch(tiny_world, pruned, tmp_path,
                                                                   capsys):
    config = tmp_path / "c.yaml"
    config.write_text("resume: true\n")
    code, _, err = run_cli([*distill_args(tiny_world, pruned, tmp_path / "out"), "-c", config],
                           capsys)
    assert code == 2 and "--resume is a command-line switch, not a config key" in one_line(err)
    config.write_text("lr: 0.1\nseed: 1\nlr: 0.2\n")
    code, _, err = run_cli([*distill_args(tiny_world, pruned, tmp_path / "out"), "-c", config],
                           capsys)
    assert code == 2 and "duplicate key 'lr' on line 3 (first on line 1)" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_recipe_with_a_duplicate_key_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workdir: w\nteacher: t\nworkdir: v\n")
    code, _, err = run_cli(["run", recipe, "--dry-run"], capsys)
    assert code == 2 and "duplicate key 'workdir' on line 3" in one_line(err)


def test_dry_run_refuses_a_missing_task_file_and_text_as_chat_data(tiny_world, tmp_path,
                                                                   capsys):
    raw = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    raw["workdir"] = str(tmp_path / "work")
    raw["eval"]["tasks"] = [f"mc:{tmp_path / 'missing.jsonl'}"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(["run", tmp_path / "r.yaml", "--dry-run"], capsys)
    assert code == 2 and "file not found" in one_line(err)
    raw["eval"]["tasks"] = [f"ppl:{tiny_world / 'data' / 'valid.txt'}"]
    raw.setdefault("sft", {})["data"] = str(tiny_world / "data" / "train.txt")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(["run", tmp_path / "r.yaml", "--dry-run"], capsys)
    assert code == 2 and "sft.data" in one_line(err) and "chat data" in err
    assert not (tmp_path / "work").exists()


def test_a_changed_tensor_of_equal_size_changes_the_fingerprint(tiny_world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_world / "teacher", model)
    before = model_fingerprint(resolve_model(model))
    weights = next(model.glob("*.safetensors"))
    size = weights.stat().st_size
    with weights.open("r+b") as handle:  # one float of one tensor, far from the samples
        handle.seek(size * 3 // 64 + 4)
        value = handle.read(1)
        handle.seek(size * 3 // 64 + 4)
        handle.write(bytes([value[0] ^ 1]))
    assert weights.stat().st_size == size
    assert model_fingerprint(resolve_model(model)) != before
    assert not any(p.name.startswith("file-hashes") for p in model.iterdir())


def test_offline_hub_name_fails_fast_in_one_line(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["score", "-m", tiny_world / "teacher", "-d", "someorg/somedata",
                            "-o", tmp_path / "out"], capsys)
    assert code == 2 and "HF_HUB_OFFLINE is set" in one_line(err)
    code, _, err = run_cli(["score", "-m", "someorg/somemodel", "-d", "x.txt", "-o",
                            tmp_path / "out"], capsys)
    assert code == 2 and "a hub name?" in one_line(err)
    assert not (tmp_path / "out").exists()


def distill_config(tmp_path: Path, tiny_world: Path) -> DistillConfig:
    return DistillConfig(teacher=str(tiny_world / "teacher"), student=str(tiny_world / "teacher"),
                         data=str(tiny_world / "data" / "train.txt"), output=str(tmp_path / "o"))


def test_a_user_error_leaves_no_side_dirs_but_keeps_checkpoints(tiny_world, tmp_path):
    config = distill_config(tmp_path, tiny_world)
    with pytest.raises(MinimaError), guarded(config, training=True):
        (tmp_path / "o.run" / "token-cache").mkdir(parents=True)
        (tmp_path / "o.token-cache").mkdir()
        raise MinimaError("bad input")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    step = tmp_path / "o.run" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    with pytest.raises(MinimaError), guarded(config, training=True):
        raise MinimaError("bad input")
    assert step.is_dir()


def test_a_run_dir_left_after_the_final_rename_is_stale(tiny_world, tmp_path):
    config = distill_config(tmp_path, tiny_world)
    step = tmp_path / "o.run" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "minima.json").write_text("{}")  # finished after the checkpoint
    with guarded(config, training=True):
        assert not (tmp_path / "o.run").exists()
