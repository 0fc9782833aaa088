"""Training-state pieces: schedule values, AdamW groups, and checkpoints that resume exactly."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_random_model

from minima_cli.errors import MinimaError
from minima_cli.training.state import (
    clip_gradients,
    learning_rate,
    list_checkpoints,
    load_training_checkpoint,
    lr_factor,
    parameter_groups,
    save_training_checkpoint,
)


def test_learning_rate_warmup_then_cosine_or_linear():
    kw = {"peak": 1.0, "total_steps": 110, "warmup_steps": 10}
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(9, **kw) == pytest.approx(1.0)
    assert learning_rate(10, **kw) == pytest.approx(1.0)
    assert learning_rate(60, **kw) == pytest.approx(0.5)  # half way down the cosine
    assert learning_rate(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(35, **kw, schedule="linear") == pytest.approx(0.75)
    assert learning_rate(110, **kw, min_ratio=0.1) == pytest.approx(0.1)
    assert learning_rate(50, **kw, schedule="constant") == 1.0
    assert learning_rate(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    with pytest.raises(MinimaError, match="unknown schedule"):
        learning_rate(0, **kw, schedule="step")


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_random_model("llama_bias")
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def train(model, optimizer, steps: int, start: int = 0) -> None:
    """Steps that use every RNG a loop may touch (dropout-like noise, data sampling)."""
    for step in range(start, start + steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak=1e-2, total_steps=10, warmup_steps=2)
        ids = torch.randint(0, 96, (2, 8))
        noise = random.random() + float(np.random.rand())
        loss = model(input_ids=ids, labels=ids).loss * (1 + 0.01 * noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fresh(seed: int = 0):
    model = tiny_random_model("llama", seed=seed).train()
    return model, torch.optim.AdamW(parameter_groups(model, 0.1), betas=(0.9, 0.95))


def test_resumed_training_ends_bitwise_equal(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, optimizer = fresh()
    train(model, optimizer, 6)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, optimizer = fresh()
    train(model, optimizer, 3)
    save_training_checkpoint(tmp_path / "run", model, optimizer, step=3, extra={"data": [7]})
    train(model, optimizer, 2, start=3)  # work lost to a "kill" after the checkpoint

    model, optimizer = fresh(seed=5)  # a new process: different init, RNGs elsewhere
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load_training_checkpoint(tmp_path / "run", model, optimizer)
    assert state["step"] == 3 and state["data"] == [7]
    train(model, optimizer, 3, start=state["step"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_keep_last_and_refusal_of_a_foreign_checkpoint(tmp_path):
    model, optimizer = fresh()
    for step in (1, 2, 3, 4):
        save_training_checkpoint(tmp_path, model, optimizer, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    (tmp_path / "step-00000009.tmp-1-x").mkdir()  # a killed write is never picked up
    # nor the previous copy a replacement killed midway left beside the new one
    shutil.copytree(tmp_path / "step-00000004", tmp_path / "step-00000004.old-12345")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    other = tiny_random_model("llama", layers=2)
    with pytest.raises(MinimaError, match="do not match this model"):
        load_training_checkpoint(tmp_path, other,
                                 torch.optim.AdamW(parameter_groups(other, 0.1)))
    with pytest.raises(MinimaError, match="no training checkpoint"):
        load_training_checkpoint(tmp_path / "empty", model, optimizer)


def test_clip_gradients_scales_only_over_the_limit():
    from minima_cli.training.state import clip_gradients

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    under = [p.grad.clone() for p in params]
    assert clip_gradients(params, 10.0) == pytest.approx(5.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, under, strict=True))
    reference = [p.detach().clone().requires_grad_() for p in params]
    for r, g in zip(reference, under, strict=True):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert clip_gradients(params, 1.0) == pytest.approx(5.0)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-7)
    assert clip_gradients(params, 0.0) == pytest.approx(1.0, abs=1e-5)  # 0: not clipped


def test_one_schedule_shape_for_every_stage():
    """learning_rate is peak x lr_factor; in warmup it keeps the rounding distill always had
    ((peak * k) / warmup), while the tiny world's pre-training multiplies by the factor (as
    torch's LambdaLR, which built its pinned teacher, did)."""
    kw = {"total_steps": 200, "warmup_steps": 20, "min_ratio": 0.1}
    for step in range(200):
        lr = learning_rate(step, peak=3e-3, **kw)
        assert lr == pytest.approx(3e-3 * lr_factor(step, **kw), rel=1e-15)
        if step >= 20:
            assert lr == 3e-3 * lr_factor(step, **kw)
    assert learning_rate(2, peak=3e-3, total_steps=6, warmup_steps=3) == 3e-3 * 3 / 3
    assert 3e-3 * lr_factor(2, total_steps=6, warmup_steps=3) == 3e-3  # != 3e-3 * 3 / 3
    with pytest.raises(MinimaError, match="unknown schedule"):
        lr_factor(0, total_steps=10, warmup_steps=0, schedule="step")


def test_clip_0_is_no_clipping_and_a_negative_clip_an_error():
    params = [torch.nn.Parameter(torch.zeros(2))]
    params[0].grad = torch.tensor([30.0, 40.0])
    assert clip_gradients(params, 0.0) == pytest.approx(50.0)
    assert torch.equal(params[0].grad, torch.tensor([30.0, 40.0]))
    for bad in (-1.0, float("nan")):
        with pytest.raises(MinimaError, match="--clip must be >= 0"):
            clip_gradients(params, bad)
