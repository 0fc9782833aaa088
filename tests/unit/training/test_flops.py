"""Model FLOPs by hand on a tiny config, and the peak's measurement and cache."""

from __future__ import annotations

import pytest
import torch

from minima_cli.model.arch import ModelShape
from minima_cli.training.flops import (
    cached_peak,
    distill_flops_per_token,
    forward_flops_per_token,
    known_gpu_peak,
    matmul_parameters,
    measure_matmul_peak,
    train_flops_per_token,
    utilisation,
)

# 2 layers, hidden 8, 4 query heads over 2 kv heads of dim 2, ffn 16, vocab 10
SHAPE = ModelShape(layers=2, hidden=8, heads=4, kv_heads=2, head_dim=2, ffn=16, vocab=10)


def test_flops_equal_a_hand_count():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8 = 192; gate, up, down 3 x 8x16 = 384
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    assert matmul_parameters(SHAPE) == 2 * per_layer + 10 * 8
    # attention: QK^T and AV, 2 FLOPs a multiply-add, 2 layers x 4 heads x dim 2, context 5
    attention = 2 * 2 * (2 * 4 * 2) * 5
    assert forward_flops_per_token(SHAPE, 5) == 2 * (2 * per_layer + 80) + attention
    assert train_flops_per_token(SHAPE, 5) == 3 * forward_flops_per_token(SHAPE, 5)
    teacher = SHAPE.replace(layers=4)
    assert distill_flops_per_token(SHAPE, teacher, 5) == \
        train_flops_per_token(SHAPE, 5) + forward_flops_per_token(teacher, 5)
    assert distill_flops_per_token(SHAPE, None, 5) == train_flops_per_token(SHAPE, 5)


def test_a_loss_on_k_logits_counts_k_rows_of_the_lm_head():
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    assert matmul_parameters(SHAPE, head_columns=3) == 2 * per_layer + 3 * 8
    assert distill_flops_per_token(SHAPE, SHAPE, 5, head_columns=3) == \
        train_flops_per_token(SHAPE, 5, head_columns=3) + forward_flops_per_token(SHAPE, 5)
    assert train_flops_per_token(SHAPE, 5) - train_flops_per_token(SHAPE, 5, 3) == 6 * 7 * 8


def test_the_lm_head_counts_whether_tied_or_not():
    assert matmul_parameters(SHAPE.replace(tied=False)) == matmul_parameters(SHAPE)


def test_utilisation_and_known_peaks():
    assert utilisation(1e9, 100.0, 1e12) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        utilisation(1e9, 100.0, 0)
    assert known_gpu_peak("NVIDIA H100 80GB HBM3 (H100 SXM)") == 989e12
    assert known_gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert known_gpu_peak("some CPU") is None


def test_the_peak_is_measured_once_and_cached(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return 123.0

    cache = tmp_path / "peaks.json"
    assert cached_peak("k", measure, cache) == 123.0
    assert cached_peak("k", measure, cache) == 123.0
    assert len(calls) == 1
    assert cached_peak("other", measure, cache) == 123.0 and len(calls) == 2


def test_measured_peak_is_a_positive_rate():
    assert measure_matmul_peak([(16, 16, 16)], torch.float32, repeats=2) > 0
