"""Pure pieces of the shared training loop and of distill's set-up: DeepSpeed config resolution,
the token budget, log truncation on resume, and the hidden-state layer mapping."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from minima_cli.errors import MinimaError
from minima_cli.stages.distill import hidden_map, parse_layer_pairs, uniform_layer_pairs
from minima_cli.training.config import TrainConfig
from minima_cli.training.loop import resolve_deepspeed_config, truncate_log

SETTINGS = {"batch_size": 4, "grad_accum": 2, "clip": 1.0, "world_size": 2, "bf16": False}


def test_deepspeed_auto_values_come_from_minima_settings():
    raw = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}
    config = resolve_deepspeed_config(raw, **SETTINGS)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 16  # 4 x 2 accumulation x 2 ranks
    assert config["gradient_clipping"] == 1.0 and config["bf16"]["enabled"] is False
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert raw["zero_optimization"] == {"stage": 3}  # the caller's dict is not modified
    explicit = resolve_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, **SETTINGS)
    assert explicit["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 5}}, "stage must be 0-3"),
    ({"zero_optimization": {"stage": 2, "overlap_comn": True}}, "zero_optimization.overlap_comn"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8"),
    ({"gradient_accumulation_steps": 1}, "set it to \"auto\""),
])
def test_deepspeed_configs_that_contradict_minima_are_refused(raw, message):
    with pytest.raises(MinimaError, match=message.replace("(", r"\(")):
        resolve_deepspeed_config(raw, **SETTINGS)


def test_token_budget_rounds_steps_up():
    config = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=7)
    assert config.total_steps() == 7
    budget = TrainConfig(seq_len=32, batch_size=4, grad_accum=2, max_tokens=1000)
    assert budget.tokens_per_step(world_size=2) == 512
    assert budget.total_steps(world_size=2) == 2 and budget.total_steps() == 4
    for bad in ({"max_tokens": -1}, {"batch_size": 0}, {"lr": 0.0}, {"precision": "fp8"},
                {"schedule": "step"}, {"keep_last": 0}):
        with pytest.raises(MinimaError):
            TrainConfig(**bad).check()


def test_fingerprint_ignores_what_changes_no_weights():
    base = TrainConfig()
    assert base.fingerprint() == TrainConfig(save_every=7, keep_last=5, eval_every=3,
                                             tensorboard=False).fingerprint()
    assert base.fingerprint() != TrainConfig(lr=1e-3).fingerprint()


def test_resume_drops_log_records_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_log(tmp_path / "missing.jsonl", 3)  # nothing to do


def test_layer_pairs():
    assert uniform_layer_pairs(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_layer_pairs("0:1,1:3", 2, 4) == [(0, 1), (1, 3)]
    with pytest.raises(MinimaError, match="out of range"):
        parse_layer_pairs("0:4", 2, 4)
    with pytest.raises(MinimaError, match="STUDENT:TEACHER"):
        parse_layer_pairs("0-1", 2, 4)


def test_hidden_map_uses_the_prune_manifest_or_needs_equal_widths():
    teacher = SimpleNamespace(num_hidden_layers=4, hidden_size=8)
    pruned = SimpleNamespace(num_hidden_layers=2, hidden_size=4)
    kept = {"layers": [1, 3], "hidden": [0, 2, 5, 7]}
    found = hidden_map("auto", pruned, teacher, kept)
    assert found.pairs == [(0, 1), (1, 3)] and found.kept_hidden == [0, 2, 5, 7]
    narrow_only = hidden_map("auto", SimpleNamespace(num_hidden_layers=2, hidden_size=8), teacher,
                             {"layers": [0, 2], "hidden": list(range(8))})
    assert narrow_only.kept_hidden is None  # every dim kept: compare as is
    same_width = hidden_map("auto", SimpleNamespace(num_hidden_layers=2, hidden_size=8), teacher,
                            None)
    assert same_width.pairs == [(0, 1), (1, 3)] and same_width.kept_hidden is None
    with pytest.raises(MinimaError, match="cannot be mapped"):
        hidden_map("auto", pruned, teacher, None)
    with pytest.raises(MinimaError, match="does not match its config"):
        hidden_map("auto", pruned, teacher, {"layers": [1], "hidden": [0, 2, 5, 7]})
