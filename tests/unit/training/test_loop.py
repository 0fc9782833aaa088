"""Pure pieces of the shared training loop and of distill's set-up: DeepSpeed config resolution,
the token budget, log truncation on resume, and the hidden-state layer mapping."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_random_model

from minima_cli.errors import MinimaError
from minima_cli.stages.configs import DistillConfig
from minima_cli.stages.distill import hidden_map, parse_layer_pairs, uniform_layer_pairs
from minima_cli.training.config import TrainConfig
from minima_cli.training.loop import (
    LocalSession,
    optimizer_step,
    resolve_deepspeed_config,
    resolve_precision,
    truncate_log,
)
from minima_cli.training.state import adamw, parameter_groups

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
    config = DistillConfig(seq_len=32, batch_size=4, grad_accum=2, max_steps=7)
    assert config.total_steps() == 7
    budget = DistillConfig(seq_len=32, batch_size=4, grad_accum=2, max_tokens=1000)
    assert budget.tokens_per_step(world_size=2) == 512
    assert budget.total_steps(world_size=2) == 2 and budget.total_steps() == 4
    for bad in ({"max_tokens": -1}, {"batch_size": 0}, {"lr": 0.0}, {"precision": "fp8"},
                {"schedule": "step"}, {"keep_last": 0}):
        with pytest.raises(MinimaError):
            DistillConfig(**bad).check()


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


# --- the optimizer step every training stage takes ------------------------------------------------


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss, {"tokens": batch.numel()}


def sgd_step(clip: float, micro: int = 2):
    """(weight change, stats) of one optimizer_step with plain SGD at lr 1, whose weight change
    is exactly what is left of the gradient after clipping."""
    model = tiny_random_model(layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    session = LocalSession("fp32", "cpu")
    batches = torch.randint(0, 96, (micro, 2, 8), generator=torch.Generator().manual_seed(0))
    stats = optimizer_step(session, model, torch.optim.SGD(model.parameters(), lr=0.1), lm_loss,
                           batches, grad_accum=micro, lr=1.0, clip=clip)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], stats


def norm(tensors):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t)
                                                       for t in tensors])))


def test_optimizer_step_clip_0_is_no_clipping():
    unclipped, stats = sgd_step(0.0)
    never_reached, _ = sgd_step(1e9)
    clipped, _ = sgd_step(stats.grad_norm / 10)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, never_reached, strict=True))
    assert norm(unclipped) == pytest.approx(stats.grad_norm, rel=1e-4)  # the whole gradient
    assert norm(clipped) == pytest.approx(stats.grad_norm / 10, rel=1e-4)
    assert len(stats.losses) == 2 and stats.means["tokens"] == 16
    assert stats.means["loss"] == pytest.approx(sum(stats.losses) / 2)
    with pytest.raises(MinimaError, match="--clip must be >= 0"):
        sgd_step(-1.0)


def test_optimizer_step_reads_only_its_micro_batches():
    """Lazily: distill's teacher cache looks up the stream's last batch inside the loss."""
    model = tiny_random_model(layers=2)
    stream = iter(torch.randint(0, 96, (3, 2, 8)))
    optimizer_step(LocalSession("fp32", "cpu"), model, torch.optim.SGD(model.parameters()),
                   lm_loss, stream, grad_accum=2, lr=0.1, clip=1.0)
    assert len(list(stream)) == 1


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32),
                                                  ("bf16", torch.bfloat16)])
def test_optimizer_step_runs_on_the_sessions_device_and_precision(precision, dtype):
    """bf16 is autocast (on the CPU here): bf16 activations, fp32 weights and gradients."""
    device = torch.device("cpu")
    session = LocalSession(precision, device)
    assert (session.device, session.precision) == (device, precision)
    model = tiny_random_model(layers=2)
    model, optimizer = session.prepare(model, adamw(parameter_groups(model, 0.1), 1e-3))
    seen = []
    model.model.layers[0].mlp.register_forward_hook(
        lambda module, args, output: seen.append((args[0].device, output.dtype)))
    stats = optimizer_step(session, model, optimizer, lm_loss, torch.randint(0, 96, (1, 2, 8)),
                           grad_accum=1, lr=1e-3, clip=1.0)
    assert seen == [(device, dtype)] and math.isfinite(stats.grad_norm)
    assert all(p.device == device and p.dtype == torch.float32 for p in model.parameters())


def test_precision_names_are_checked():
    assert LocalSession("auto", "cpu").precision in ("fp32", "bf16")
    with pytest.raises(MinimaError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
