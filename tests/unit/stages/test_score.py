"""Scores: gradient scores against central finite differences of the masked loss, activation
scores against a direct computation, normalisation, and the files `score` writes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_random_model

from minima_cli.model.arch import shape_from_config
from minima_cli.model.masks import Masks, masked
from minima_cli.model.scores import normalize_scores
from minima_cli.stages.score import activation_scores, gradient_scores, lm_loss


def batches_for(vocab: int, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 10), generator=generator) for _ in range(n)]


def masked_loss(model, shape, batch, axis, index, value) -> float:
    masks = Masks(**{a: t.double() for a, t in Masks.ones(shape).as_dict().items()})
    masks.as_dict()[axis].view(-1)[index] = value
    with torch.no_grad(), masked(model, masks, shape):
        return lm_loss(model(input_ids=batch).logits, batch).item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gradient_scores_match_finite_differences(kind):
    model = tiny_random_model(kind, dtype=torch.float64)
    shape = shape_from_config(model.config)
    batches = batches_for(shape.vocab, n=2)
    scores, mean_loss = gradient_scores(model, shape, batches)
    eps = 1e-2  # HF's RMSNorm computes in fp32: a larger step keeps its rounding out
    for axis, mask in Masks.ones(shape).as_dict().items():
        assert scores[axis].shape == mask.shape
        for index in (0, mask.numel() // 2, mask.numel() - 1):
            per_batch = [
                (masked_loss(model, shape, b, axis, index, 1 + eps)
                 - masked_loss(model, shape, b, axis, index, 1 - eps)) / (2 * eps)
                for b in batches
            ]
            reference = sum(abs(g) for g in per_batch) / len(batches)
            assert scores[axis].view(-1)[index].item() == pytest.approx(reference, rel=2e-3,
                                                                       abs=2e-5)
    plain = [model(input_ids=b, labels=b).loss.item() for b in batches]
    assert mean_loss == pytest.approx(sum(plain) / len(plain))
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_kv_group_score_is_not_the_sum_of_absolute_head_scores():
    # A separate group mask: |sum of head gradients|, per batch, which is <= the sum of |.|.
    model = tiny_random_model("llama", dtype=torch.float64)
    shape = shape_from_config(model.config)
    scores, _ = gradient_scores(model, shape, batches_for(shape.vocab, n=1))
    per_group = scores["heads"].view(shape.layers, shape.kv_heads, shape.group_size).sum(-1)
    assert torch.all(scores["kv_groups"] <= per_group + 1e-12)


def test_activation_scores_match_direct_computation():
    model = tiny_random_model("llama")
    shape = shape_from_config(model.config)
    batches = batches_for(shape.vocab, n=2)
    scores, _ = activation_scores(model, shape, batches)
    # Recompute FFN neuron magnitudes and Block Influence by hand from hidden states.
    ffn = torch.zeros(shape.layers, shape.ffn)
    influence = torch.zeros(shape.layers)
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            states = model(input_ids=batch, output_hidden_states=True).hidden_states
            tokens += batch.numel()
            for i, layer in enumerate(model.model.layers):
                h_in = states[i]
                h_mid = h_in + layer.self_attn(
                    layer.input_layernorm(h_in),
                    position_embeddings=model.model.rotary_emb(h_in, torch.arange(10)[None]),
                    attention_mask=None,
                )[0]
                x = layer.post_attention_layernorm(h_mid)
                neurons = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
                ffn[i] += neurons.abs().sum((0, 1))
                h_out = h_mid + layer.mlp.down_proj(neurons)
                influence[i] += (1 - torch.cosine_similarity(h_in, h_out, dim=-1)).sum()
    torch.testing.assert_close(scores["ffn"], ffn / tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores["layers"], influence / tokens, atol=1e-5, rtol=1e-4)
    grouped = scores["heads"].view(shape.layers, shape.kv_heads, shape.group_size).sum(-1)
    torch.testing.assert_close(scores["kv_groups"], grouped)
    assert all((s >= 0).all() for s in scores.values())


def test_normalize_scores_per_layer_l2():
    raw = {"ffn": torch.tensor([[3.0, 4.0], [0.0, 2.0]]), "hidden": torch.tensor([6.0, 8.0])}
    normalised = normalize_scores(raw)
    torch.testing.assert_close(normalised["ffn"], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(normalised["hidden"], torch.tensor([0.6, 0.8]))
