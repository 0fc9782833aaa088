"""Recipes: schema validation (errors name the file or --set and the key), overrides, stage
references, the shipped recipes, the dry run's shapes and memory estimates, and the pure math
behind them (memory per GPU, token budget, stage hashes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape
from minima_cli.pipeline.memory import (
    activation_bytes,
    layer_activation_values,
    token_budget,
    zero_memory,
)
from minima_cli.pipeline.recipe import load_recipe, validate
from minima_cli.pipeline.stamps import hashed_options, stage_hash

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture
def base(tmp_path) -> dict:
    """A valid recipe whose teacher is a hub name (validation never downloads) over local data."""
    data = tmp_path / "train.txt"
    data.write_text("some text\nmore text\n")
    return {"workdir": str(tmp_path / "work"), "teacher": "org/teacher",
            "teacher_config": str(RECIPES / "configs" / "llama2-7b.json"), "data": str(data),
            "score": {"seq_len": 64}, "prune": {"ratio": 0.5},
            "distill": {"max_steps": 10, "seq_len": 64}}


def problem(raw: dict, tmp_path: Path, name: str = "recipe.yaml") -> str:
    with pytest.raises(MinimaError) as caught:
        validate(raw, tmp_path / name)
    return str(caught.value)


def test_valid_recipe_fills_the_chain(base, tmp_path):
    recipe = validate(base, tmp_path / "r.yaml")
    assert list(recipe.stages) == ["score", "prune", "distill"]
    assert recipe.stages["score"]["model"] == "org/teacher"
    assert recipe.stages["prune"]["scores"] == "${score}"
    assert recipe.stages["distill"]["student"] == "${prune}"
    assert recipe.stages["distill"]["seed"] == 0 and recipe.stages["distill"]["lr"] == 3e-4
    assert recipe.resolve("${prune}") == str(tmp_path / "work" / "prune")


@pytest.mark.parametrize("change, message", [
    ({"distill": {"max_step": 3}}, "r.yaml: distill.max_step: unknown key (did you mean "
                                   "'max_steps'?)"),
    ({"prune": {"shape": {"ffn": -8}}}, "r.yaml: prune.shape.ffn: must be a positive integer"),
    ({"prune": {"shape": {"fnn": 8}}}, "r.yaml: prune.shape.fnn: unknown axis (did you mean "
                                       "'ffn'?)"),
    ({"seed": "zero"}, "r.yaml: seed: must be an integer >= 0"),
    ({"distill": {"lr": "fast"}}, "r.yaml: distill.lr: must be a number >= 0"),
    ({"distill": {"loss": "mse", "max_steps": 1}},
     "r.yaml: distill.loss: must be one of fkl, rkl, jsd, topk"),
    ({"distill": {"precision": "bf16"}}, "distill.precision: set it under hardware:"),
    ({"prune": {"ratio": 1.5}}, "r.yaml: prune.ratio: must be a number in (0, 1)"),
    ({"prune": {"priority": "globl"}}, "prune.priority: must be one of local, global "
                                       "(did you mean 'global'?)"),
    ({"prune": {"layer_selection": "middle"}}, "prune: missing target"),
    ({"stages": {}}, "r.yaml: stages: unknown key"),
    ({"distill": {"student": "${sft}", "max_steps": 1}},
     "distill.student: ${sft} is never written: this recipe has no sft stage"),
    ({"sft": {"data": "${eval}/chat.jsonl"}, "eval": {"tasks": ["ppl:${score}/x.txt"]}},
     "sft.data: ${eval} is written by eval, which runs after sft"),
    ({"distill": {"data": "${distill}/x.txt", "max_steps": 1}},
     "distill.data: ${distill} is this stage's own output"),
    ({"prune": {"scores": "${score}", "ratio": 0.5}, "score": False},
     "prune.scores: ${score} is never written"),
    ({"teacher": "${prune}"}, "r.yaml: teacher: ${prune} is written by prune, which runs after "
                              "score (read by score)"),
    ({"teacher": "${package:no_such_package}"}, "r.yaml: teacher: ${package:no_such_package} "
                                                "is not an installed Python package"),
    ({"data": "missing/train.txt"}, "r.yaml: data: data source not found: missing/train.txt"),
    ({"teacher_config": "nope.json"}, "r.yaml: teacher_config: file not found: nope.json"),
    ({"hardware": {"deepspeed": "nope.json"}}, "r.yaml: hardware.deepspeed: file not found"),
    ({"hardware": {"gpu_memory": "lots"}}, "hardware.gpu_memory: must be a size like 80GB"),
    ({"eval": {"tasks": ["pp:x.txt"]}}, "eval.tasks[0]: unknown task"),
    ({"eval": {"tasks": ["mc:${score}/x.jsonl:shotz=2"]}}, "eval.tasks[0]: task "),
    ({"sft": {"data": "no/such/chat.jsonl"}}, "sft.data: not found: no/such/chat.jsonl"),
])
def test_bad_recipes_name_the_key(base, tmp_path, change, message):
    assert message in problem({**base, **change}, tmp_path, "r.yaml")


def test_a_bad_deepspeed_config_names_its_key(base, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 3, "overlap_comms": true}}')
    assert "hardware.deepspeed: DeepSpeed config: zero_optimization.overlap_comms" in problem(
        {**base, "hardware": {"deepspeed": str(config)}}, tmp_path)
    config.write_text('{"optimizer": {"type": "Adam"}}')
    assert "hardware.deepspeed: remove the 'optimizer' section" in problem(
        {**base, "hardware": {"deepspeed": str(config)}}, tmp_path)


def test_overrides_win_and_their_errors_name_set(base, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    recipe = load_recipe(path, ["distill.max_steps=7", "prune.shape.layers=24", "sft=false",
                                "distill.lr=1e-3"], workdir=tmp_path / "other")
    assert recipe.stages["distill"]["max_steps"] == 7 and recipe.stages["distill"]["lr"] == 1e-3
    assert recipe.stages["prune"]["shape"] == {"layers": 24}
    assert recipe.workdir == tmp_path / "other" and "sft" not in recipe.stages
    with pytest.raises(MinimaError, match=r"^--set: distill.max_stepz: unknown key \(did you "):
        load_recipe(path, ["distill.max_stepz=7"])
    with pytest.raises(MinimaError, match=r"^--set: eval.tasks\[0\]: unknown task kind 'pp'"):
        load_recipe(path, ['eval.tasks=["pp:x.txt"]'])
    with pytest.raises(MinimaError, match="expected KEY=VALUE"):
        load_recipe(path, ["distill.max_steps"])


def test_every_shipped_recipe_validates():
    found = sorted(RECIPES.glob("*.yaml"))
    assert {p.name for p in found} >= {"tiny.yaml", "smollm2.yaml", "minima-3b.yaml"}
    for path in found:
        recipe = load_recipe(path)
        assert recipe.stages, path


def test_minima_3b_dry_run_prints_3b_and_memory(capsys):
    code, out, err = run_cli(["run", RECIPES / "minima-3b.yaml", "--dry-run"], capsys)
    assert code == 0, err
    assert "6.738B" in out and "2.915B" in out  # LLaMA2-7B -> the MiniMA shape (vocab 32000)
    assert "126B tokens = 30,041 steps x 4,194,304 tokens" in out
    lines = [line for line in out.splitlines() if line.startswith(("│    2", "│    3"))]
    assert len(lines) == 2 and all("GB" in line and "yes" in line for line in lines)


def test_bad_recipe_on_the_command_line_exits_2_with_one_line(base, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, "distill": {"max_step": 3}}))
    code, out, err = run_cli(["run", path, "--dry-run"], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith(f"error: {path}: distill.max_step: unknown key")
    path.write_text("workdir: [unclosed")
    code, _, err = run_cli(["run", path], capsys)
    assert code == 2 and "not valid YAML" in err
    code, _, err = run_cli(["run", tmp_path / "missing.yaml"], capsys)
    assert code == 2 and "recipe not found" in err


def test_run_refuses_a_hub_teacher_and_a_bad_stage_range(base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    code, _, err = run_cli(["run", path], capsys)
    assert code == 2 and "score.model: model not found: org/teacher (a hub name?" in err
    code, _, err = run_cli(["run", path, "--from", "sft"], capsys)
    assert code == 2 and "--from sft: not a stage of this recipe" in err
    code, _, err = run_cli(["run", path, "--from", "distill", "--until", "score"], capsys)
    assert code == 2 and "comes after --until" in err
    assert not (tmp_path / "work" / "score").exists()


# --- pure math ------------------------------------------------------------------------------------


def test_zero_memory_matches_hand_numbers():
    # 1B student, 2B teacher, 8 GPUs, bf16: 2 + 2 + 12 bytes per student parameter
    z2 = zero_memory(student_params=10**9, teacher_params=2 * 10**9, world=8, zero_stage=2,
                     precision="bf16", activations=5)
    assert z2["states"] == 2e9 + 14e9 / 8 and z2["teacher"] == 4e9
    assert z2["total"] == 2e9 + 1.75e9 + 4e9 + 5
    z3 = zero_memory(student_params=10**9, teacher_params=2 * 10**9, world=8, zero_stage=3,
                     precision="bf16", activations=0)
    assert z3["states"] == 2e9 and z3["teacher"] == 0.5e9
    fp32 = zero_memory(student_params=10**9, teacher_params=2 * 10**9, world=8, zero_stage=3,
                       precision="fp32", activations=0)
    assert fp32["states"] == 16e9 / 8 and fp32["teacher"] == 1e9
    with pytest.raises(ValueError):
        zero_memory(student_params=1, teacher_params=1, world=1, zero_stage=1, precision="bf16",
                    activations=0)


def test_activation_bytes_match_hand_numbers():
    shape = ModelShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
    # 4h + 3q + 3kv + 4f = 32 + 24 + 12 + 64
    assert layer_activation_values(shape) == 132
    logits = 3 * 3 * 10 * 2
    full = activation_bytes(shape, micro_batch=1, seq_len=3, checkpointing=False)
    assert full == 3 * 2 * 132 * 2 + logits
    kept = activation_bytes(shape, micro_batch=1, seq_len=3, checkpointing=True)
    assert kept == 3 * (2 * 8 * 2 + 132 * 2) + logits
    assert activation_bytes(shape, micro_batch=2, seq_len=3, checkpointing=False,
                            value_bytes=4) == 4 * full


def test_token_budget():
    from minima_cli.stages.configs import DistillConfig

    config = DistillConfig(seq_len=4096, batch_size=8, grad_accum=8, max_tokens=126 * 10**9)
    assert token_budget(config, 16) == {"steps": 30041, "tokens_per_step": 4194304,
                                        "tokens": 30041 * 4194304}
    assert token_budget(DistillConfig(seq_len=64, batch_size=8, max_steps=200), 1)["tokens"] \
        == 102400


def test_stage_hash_ignores_bookkeeping_and_input_paths():
    options = {"teacher": "/a/teacher", "student": "${prune}", "data": "x.txt", "lr": 1e-3,
               "save_every": 10, "eval_every": 5, "max_steps": 20}
    inputs = {"teacher": "fp1", "student": "fp2", "data": [["h", 1.0, "text"]]}
    digest = stage_hash("distill", hashed_options("distill", options), inputs)
    moved = {**options, "teacher": "/b/teacher", "save_every": 3, "eval_every": 7}
    assert stage_hash("distill", hashed_options("distill", moved), inputs) == digest
    other_lr = {**options, "lr": 2e-3}
    assert stage_hash("distill", hashed_options("distill", other_lr), inputs) != digest
    assert stage_hash("distill", hashed_options("distill", options),
                      {**inputs, "teacher": "fp3"}) != digest
