"""Distillation losses: the chunked autograd Functions against unchunked plain-autograd
references (value and gradient), chunk-size independence, masking, temperature, JSD's bounds,
vocab padding, top-k teachers, the CE mix, the fused-linear variant and the hidden-state MSE."""

from __future__ import annotations

import math

import pytest
import torch
from reference_losses import naive_distillation_loss, naive_kd_loss, naive_topk_kd_loss

from minima_cli import losses
from minima_cli.losses import (
    TeacherHead,
    TopK,
    distillation_loss,
    fused_linear_distillation_loss,
    fused_linear_kd_loss,
    hidden_state_mse,
    kd_loss,
    topk_kd_loss,
)

N, V = 23, 37  # 23 tokens: prime, so most chunk sizes leave a ragged last chunk
TOL = {"atol": 1e-5, "rtol": 1e-5}
DIVERGENCES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
               ("jsd", 0.0), ("jsd", 1.0)]


def logits(*shape, seed: int, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def value_and_grad(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_same(a, b, **tol) -> None:
    (va, ga), (vb, gb) = a, b
    tol = tol or TOL
    torch.testing.assert_close(va, vb, **tol)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, **tol)


def topk_of(teacher: torch.Tensor, k: int) -> TopK:
    values, indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    return TopK(values, indices)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_matches_naive_in_value_and_gradient(kind, beta, temperature):
    s, t = logits(2, N, V, seed=0), logits(2, N, V, seed=1)
    opts = {"kind": kind, "beta": beta, "temperature": temperature}
    assert_same(value_and_grad(lambda x: kd_loss(x, t, chunk_tokens=5, **opts), s),
                value_and_grad(lambda x: naive_kd_loss(x, t, **opts), s))


@pytest.mark.parametrize("mode,k,temperature", [
    ("renorm", 5, 1.0), ("renorm", 1, 1.0), ("renorm", 5, 2.0), ("tail", 5, 1.0), ("tail", 1, 1.0),
])
def test_topk_matches_naive_in_value_and_gradient(mode, k, temperature):
    s, teacher = logits(N, V, seed=2), topk_of(logits(N, V, seed=3), k)
    opts = {"mode": mode, "temperature": temperature}
    assert_same(value_and_grad(lambda x: topk_kd_loss(x, *teacher, chunk_tokens=4, **opts), s),
                value_and_grad(lambda x: naive_topk_kd_loss(x, *teacher, **opts), s))


def test_tail_mode_rejects_temperature():
    teacher = topk_of(logits(N, V, seed=3), 4)
    with pytest.raises(ValueError, match="tail"):
        topk_kd_loss(logits(N, V, seed=2), *teacher, mode="tail", temperature=2.0)


@pytest.mark.parametrize("mode,temperature", [("renorm", 1.0), ("renorm", 3.0), ("tail", 1.0)])
def test_topk_with_k_equal_vocab_is_full_forward_kl(mode, temperature):
    s, t = logits(N, V, seed=4), logits(N, V, seed=5)
    assert_same(value_and_grad(lambda x: topk_kd_loss(x, *topk_of(t, V), mode=mode,
                                                      temperature=temperature), s),
                value_and_grad(lambda x: kd_loss(x, t, temperature=temperature), s))


def test_tail_bucket_is_exact_when_the_teacher_puts_no_mass_outside_the_top_k():
    # a teacher with -inf logits outside 6 tokens: tail mode is then exactly the full KL
    s, t = logits(N, V, seed=6), logits(N, V, seed=7)
    t[:, 6:] = -math.inf
    full = (torch.softmax(t, -1) * (torch.log_softmax(t, -1).clamp(min=-1e30)
                                    - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(topk_kd_loss(s, *topk_of(t, 6), mode="tail"), full, **TOL)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "topk"])
def test_chunked_equals_unchunked_for_any_chunk_size(kind):
    s, t = logits(N, V, seed=8), logits(N, V, seed=9)

    def loss(x, chunk):
        if kind == "topk":
            return topk_kd_loss(x, *topk_of(t, 7), mode="tail", chunk_tokens=chunk)
        return kd_loss(x, t, kind=kind, temperature=1.7, chunk_tokens=chunk)

    whole = value_and_grad(lambda x: loss(x, N), s)
    for chunk in (1, 2, 3, 7, 22, 64, None):
        assert_same(value_and_grad(lambda x, c=chunk: loss(x, c), s), whole,
                    atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "topk"])
def test_masked_tokens_contribute_nothing(kind):
    s, t = logits(N, V, seed=10), logits(N, V, seed=11)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(0)) > 0.4
    changed = s.clone()
    changed[~mask] = logits(int((~mask).sum()), V, seed=12, scale=50.0)

    def loss(x):
        if kind == "topk":
            return topk_kd_loss(x, *topk_of(t, 5), mask=mask, chunk_tokens=4)
        return kd_loss(x, t, kind=kind, mask=mask, chunk_tokens=4)

    value, (grad,) = value_and_grad(loss, s)
    assert_same((value, [grad]), value_and_grad(loss, changed), atol=1e-12, rtol=1e-12)
    assert torch.all(grad[~mask] == 0)
    # and the mean is over the counted tokens only
    if kind != "topk":
        torch.testing.assert_close(value, kd_loss(s[mask], t[mask], kind=kind), **TOL)
        assert_same((value, [grad]), value_and_grad(lambda x: naive_kd_loss(
            x, t, kind=kind, mask=mask), s))


def test_all_masked_gives_zero_and_zero_gradients():
    s, t = logits(N, V, seed=13), logits(N, V, seed=14)
    labels = torch.full((N,), -100)
    for fn in (lambda x: kd_loss(x, t, mask=torch.zeros(N, dtype=torch.bool)),
               lambda x: distillation_loss(x, t, labels)[0],
               lambda x: topk_kd_loss(x, *topk_of(t, 3), mode="tail",
                                      mask=torch.zeros(N, dtype=torch.bool))):
        value, (grad,) = value_and_grad(fn, s)
        assert value.item() == 0 and not torch.isnan(value)
        assert torch.all(grad == 0)


def test_temperature_scaling_and_identical_distributions():
    s, t = logits(N, V, seed=15), logits(N, V, seed=16)
    T = 2.0
    p, log_q = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    formula = T**2 * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, temperature=T), formula, **TOL)
    reverse = T**2 * (log_q.exp() * (log_q - p.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, kind="rkl", temperature=T), reverse, **TOL)
    # a constant shift of the logits is the same distribution
    for kind in ("fkl", "rkl", "jsd"):
        assert abs(kd_loss(t + 4.0, t, kind=kind, temperature=T).item()) < 1e-12


def test_jsd_bounds_and_symmetry():
    s, t = logits(N, V, seed=17), logits(N, V, seed=18)
    disjoint_s = torch.full((1, V), -1e4, dtype=torch.float64)
    disjoint_t = disjoint_s.clone()
    disjoint_s[0, 0], disjoint_t[0, 1] = 0, 0
    for beta in (0.1, 0.5, 0.9):
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # <= ln 2
        value = kd_loss(s, t, kind="jsd", beta=beta).item()
        assert 0 < value < bound <= math.log(2) + 1e-12
        # distributions with disjoint support reach the bound
        extreme = kd_loss(disjoint_s, disjoint_t, kind="jsd", beta=beta).item()
        assert extreme == pytest.approx(bound, abs=1e-9)
    torch.testing.assert_close(kd_loss(s, t, kind="jsd", beta=0.5),
                               kd_loss(t, s, kind="jsd", beta=0.5), **TOL)
    # beta 0 / 1 are forward / reverse KL, as in TRL
    torch.testing.assert_close(kd_loss(s, t, kind="jsd", beta=0.0), kd_loss(s, t), **TOL)
    torch.testing.assert_close(kd_loss(s, t, kind="jsd", beta=1.0), kd_loss(s, t, kind="rkl"),
                               **TOL)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "topk"])
def test_vocab_padding_rows_are_ignored(kind):
    real = 30
    s, t = logits(N, real, seed=19), logits(N, real, seed=20)
    # student padded to 37, teacher to 40, with large garbage in the padding
    s_pad = torch.cat([s, logits(N, 7, seed=21, scale=40.0)], -1)
    t_pad = torch.cat([t, logits(N, 10, seed=22, scale=40.0)], -1)

    def loss(x, teacher, vocab_size=None):
        if kind == "topk":
            return topk_kd_loss(x, *topk_of(teacher[:, :real], 6), mode="tail",
                                vocab_size=vocab_size, chunk_tokens=5)
        return kd_loss(x, teacher, kind=kind, vocab_size=vocab_size, chunk_tokens=5)

    value, (grad,) = value_and_grad(lambda x: loss(x, t_pad, real), s_pad)
    ref_value, (ref_grad,) = value_and_grad(lambda x: loss(x, t), s)
    torch.testing.assert_close(value, ref_value, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad[:, :real], ref_grad, atol=1e-12, rtol=1e-12)
    assert torch.all(grad[:, real:] == 0)
    if kind != "topk":
        with pytest.raises(ValueError, match="vocab_size"):
            kd_loss(s_pad, t_pad, kind=kind)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_kind", ["jsd", "topk"])
def test_distillation_loss_mixes_ce_and_kd(alpha, teacher_kind):
    s, t = logits(2, N, V, seed=23), logits(2, N, V, seed=24)
    labels = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(1))
    labels[0, :4] = -100  # e.g. prompt tokens
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, -3:] = False  # e.g. padding
    teacher = topk_of(t, 6) if teacher_kind == "topk" else t
    temperature = 1.0 if alpha else 1.5  # MiniMA's T = 1, and one tempered case
    opts = {"alpha": alpha, "kind": teacher_kind, "temperature": temperature, "mask": mask,
            "topk_mode": "tail" if temperature == 1 else "renorm"}
    chunked = value_and_grad(lambda x: distillation_loss(x, teacher, labels, chunk_tokens=6,
                                                         **opts)[0], s)
    naive = value_and_grad(lambda x: naive_distillation_loss(x, teacher, labels, **opts)[0], s)
    assert_same(chunked, naive)
    _, parts = distillation_loss(s, teacher, labels, **opts)
    _, naive_parts = naive_distillation_loss(s, teacher, labels, **opts)
    for name in ("ce", "kd"):
        torch.testing.assert_close(parts[name], naive_parts[name], **TOL)
        assert not parts[name].requires_grad
    valid = (labels != -100) & mask
    ce = torch.nn.functional.cross_entropy(s[valid], labels[valid])
    torch.testing.assert_close(parts["ce"], ce, **TOL)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "topk"])
@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 1.0), (0.5, 2.0)])
def test_row_range_and_gathered_chunks_agree_and_skip_bad_uncounted_rows(
        kind, alpha, temperature, monkeypatch):
    # Most tokens count (a causal LM drops the last label of each sequence): chunks are row
    # ranges whose uncounted rows are computed, then excluded. Their inf/NaN logits must not
    # leak, and both chunkings must agree with the naive loss.
    s, t = logits(2, N, V, seed=40), logits(2, N, V, seed=41)
    labels = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(4))
    labels[:, -1] = -100
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 5] = False
    bad = s.clone()
    bad[0, 5, 3], bad[1, -1, :] = math.inf, math.nan
    teacher = topk_of(t, 6) if kind == "topk" else t
    opts = {"alpha": alpha, "kind": kind, "temperature": temperature, "mask": mask,
            "topk_mode": "tail" if temperature == 1 else "renorm"}
    reference = value_and_grad(
        lambda x: naive_distillation_loss(x, teacher, labels, **opts)[0], s)
    for dense_fraction in (0.0, 2.0):  # every chunk a row range / every chunk gathered
        monkeypatch.setattr(losses, "DENSE_FRACTION", dense_fraction)
        chunked = value_and_grad(lambda x: distillation_loss(
            x, teacher, labels, chunk_tokens=6, **opts)[0], bad)
        assert_same(chunked, reference)


def test_minima_recipe_soft_ce_has_forward_kl_gradient():
    # MiniMA: 0.5 CE + 0.5 softCE(student, teacher) at T = 1; softCE = fkl + teacher entropy
    s, t = logits(N, V, seed=25), logits(N, V, seed=26)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))

    def minima(x):
        soft_ce = -(torch.softmax(t, -1) * torch.log_softmax(x, -1)).sum(-1).mean()
        return 0.5 * torch.nn.functional.cross_entropy(x, labels) + 0.5 * soft_ce

    ours, theirs = (value_and_grad(lambda x: distillation_loss(x, t, labels)[0], s),
                    value_and_grad(minima, s))
    torch.testing.assert_close(ours[1][0], theirs[1][0], **TOL)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("teacher_form", ["logits", "head"])
def test_fused_linear_matches_naive_on_hidden_and_weight(kind, beta, teacher_form):
    H, Ht, Vs, Vt, real = 8, 12, 40, 44, V
    h, w = logits(2, N, H, seed=27, scale=1.0), logits(Vs, H, seed=28, scale=1.0)
    th, tw = logits(2, N, Ht, seed=29, scale=1.0), logits(Vt, Ht, seed=30, scale=1.0)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 3:9] = False
    teacher = TeacherHead(th, tw) if teacher_form == "head" else th @ tw.T
    opts = {"kind": kind, "beta": beta, "temperature": 1.3, "mask": mask, "vocab_size": real}
    fused = value_and_grad(
        lambda x, y: fused_linear_kd_loss(x, y, teacher, chunk_tokens=7, **opts), h, w)
    naive = value_and_grad(lambda x, y: naive_kd_loss(x @ y.T, th @ tw.T, **opts), h, w)
    assert_same(fused, naive)
    assert torch.all(fused[1][1][real:] == 0)  # the student's padding rows of lm_head


def test_fused_linear_distillation_with_topk_teacher_and_ce():
    H = 8
    h, w = logits(N, H, seed=31, scale=1.0), logits(V, H, seed=32, scale=1.0)
    teacher = topk_of(logits(N, V, seed=33), 5)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    labels[:5] = -100
    opts = {"alpha": 0.3, "kind": "topk", "topk_mode": "renorm", "temperature": 2.0}
    fused = value_and_grad(lambda x, y: fused_linear_distillation_loss(
        x, y, teacher, labels, chunk_tokens=4, **opts)[0], h, w)
    naive = value_and_grad(
        lambda x, y: naive_distillation_loss(x @ y.T, teacher, labels, **opts)[0], h, w)
    assert_same(fused, naive)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_smoke(dtype, tol):
    s64, t64 = logits(N, V, seed=34), logits(N, V, seed=35)
    s, t = s64.to(dtype), t64.to(dtype)
    for kind in ("fkl", "rkl", "jsd"):
        value, (grad,) = value_and_grad(lambda x, k=kind: kd_loss(x, t, kind=k, chunk_tokens=6), s)
        ref_value, (ref_grad,) = value_and_grad(lambda x, k=kind: naive_kd_loss(
            x.double(), t.double(), kind=k), s)
        assert value.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(value.double(), ref_value, atol=tol, rtol=tol)
        torch.testing.assert_close(grad.double(), ref_grad.double(), atol=tol / 10, rtol=tol)
    h, w = logits(N, 8, seed=36, scale=1.0).to(dtype), logits(V, 8, seed=37, scale=1.0).to(dtype)
    value, (gh, gw) = value_and_grad(lambda x, y: fused_linear_kd_loss(x, y, t), h, w)
    ref_value, (rh, rw) = value_and_grad(
        lambda x, y: naive_kd_loss(x.double() @ y.double().T, t.double()), h, w)
    assert gh.dtype == gw.dtype == dtype
    torch.testing.assert_close(value.double(), ref_value, atol=tol, rtol=tol)
    torch.testing.assert_close(gw.double(), rw.double(), atol=tol / 10, rtol=tol)


BF16_TOL = 2e-2  # bf16 keeps 8 bits of mantissa: values within 2 %, gradients within 2e-3


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "topk"])
@pytest.mark.parametrize("dense", [True, False], ids=["row-ranges", "gathered"])
def test_bf16_student_under_autocast_matches_the_fp64_reference(kind, dense):
    # training under --precision bf16: the student's logits are bf16 (autocast), a cached
    # teacher's log-probs float16; with prompt masking (sft) the counted rows are gathered
    s = logits(2, N, V, seed=50).to(torch.bfloat16)
    t = logits(2, N, V, seed=51).to(torch.bfloat16)
    labels = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(5))
    labels[:, -1] = -100
    if not dense:
        labels[:, :15] = -100  # a third of the tokens count: below DENSE_FRACTION
    if kind == "topk":
        top = topk_of(t.double(), 6)
        teacher, reference = TopK(top.logprobs.half(), top.indices), TopK(
            top.logprobs.half().double(), top.indices)
    else:
        teacher, reference = t, t.double()
    opts = {"alpha": 0.5, "kind": kind, "temperature": 1.0}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, (grad,) = value_and_grad(lambda x: distillation_loss(
            x, teacher, labels, chunk_tokens=5, **opts)[0], s)
    ref_value, (ref_grad,) = value_and_grad(lambda x: naive_distillation_loss(
        x.double(), reference, labels, **opts)[0], s)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert math.isfinite(value.item()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(value.double(), ref_value, atol=BF16_TOL, rtol=BF16_TOL)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=BF16_TOL / 10,
                               rtol=BF16_TOL)


@pytest.mark.parametrize("kind,beta", DIVERGENCES + [("topk", 0.5)])
def test_autocast_leaves_the_loss_math_in_float32(kind, beta):
    # bf16 logits under autocast must give what they give outside it, bit for bit: autocast
    # would run the per-token sums (batched matmuls) in bf16
    s = logits(2, N, V, seed=52).to(torch.bfloat16)
    t = logits(2, N, V, seed=53).to(torch.bfloat16)
    teacher = topk_of(t.float(), 6) if kind == "topk" else t
    opts = {"kind": kind, "beta": beta, "alpha": 0.0, "temperature": 1.5 if kind != "topk" else 1.0}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = value_and_grad(lambda x: distillation_loss(
            x, teacher, None, chunk_tokens=5, **opts)[0], s)
    outside = value_and_grad(lambda x: distillation_loss(
        x, teacher, None, chunk_tokens=5, **opts)[0], s)
    assert_same(inside, outside, atol=0, rtol=0)


def test_fused_linear_under_autocast_rounds_only_the_logits():
    # the logits matmul takes autocast's dtype, as the model's lm_head would; the rest is fp32
    h, w = logits(N, 8, seed=54, scale=1.0).float(), logits(V, 8, seed=55, scale=1.0).float()
    t = logits(N, V, seed=56)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fused_linear_kd_loss(h, w, t, kind="jsd", beta=0.3)
    expected = kd_loss((h.bfloat16() @ w.bfloat16().T).float(), t.float(), kind="jsd", beta=0.3)
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dense", [True, False], ids=["row-ranges", "gathered"])
def test_sparse_head_topk_equals_full_logits(temperature, dense):
    # top-k renorm without CE reads k logits a token: the fused loss builds only those, from
    # gathered lm_head rows, and must equal the loss on the full logits (vocab padding too)
    H, Vs, real = 8, 40, V
    h, w = logits(2, N, H, seed=57, scale=1.0), logits(Vs, H, seed=58, scale=1.0)
    teacher = topk_of(logits(2, N, V, seed=59), 5)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[:, -1] = False
    if not dense:
        mask[:, :15] = False
    opts = {"mode": "renorm", "temperature": temperature, "mask": mask, "vocab_size": real}
    assert losses.topk_logits_suffice("topk", "renorm", 0.0)
    sparse = value_and_grad(lambda x, y: fused_linear_kd_loss(
        x, y, teacher, kind="topk", topk_mode="renorm", temperature=temperature, mask=mask,
        vocab_size=real, chunk_tokens=3), h, w)
    naive = value_and_grad(lambda x, y: naive_topk_kd_loss(x @ y.T, *teacher, **opts), h, w)
    assert_same(sparse, naive)
    untouched = torch.ones(Vs, dtype=torch.bool)
    untouched[teacher.indices[mask].unique()] = False
    assert torch.all(sparse[1][1][untouched] == 0)  # only the teacher's tokens' rows move


@pytest.mark.parametrize("alpha,mode", [(0.3, "renorm"), (0.0, "tail")])
def test_sparse_head_is_not_used_when_the_loss_needs_all_logits(alpha, mode):
    assert not losses.topk_logits_suffice("topk", mode, alpha)
    assert not losses.topk_logits_suffice("fkl", "renorm", 0.0)


def test_sparse_head_in_bf16_autocast_matches_full_logits():
    h = logits(2, N, 16, seed=60, scale=1.0).float()
    w = logits(V, 16, seed=61, scale=1.0).float()
    teacher = topk_of(logits(2, N, V, seed=62), 6)
    teacher = TopK(teacher.logprobs.half(), teacher.indices)  # a cache stores float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, (gh, gw) = value_and_grad(lambda x, y: fused_linear_kd_loss(
            x, y, teacher, kind="topk"), h, w)
    ref_value, (rh, rw) = value_and_grad(lambda x, y: naive_topk_kd_loss(
        x.double() @ y.double().T, teacher.logprobs.double(), teacher.indices), h, w)
    assert value.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    # the k logits are float32 dot products: close to the float64 reference, not bf16-close
    torch.testing.assert_close(value.double(), ref_value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-6, rtol=1e-5)


def test_no_grad_and_grad_output_scaling():
    s, t = logits(N, V, seed=38), logits(N, V, seed=39)
    with torch.no_grad():
        torch.testing.assert_close(kd_loss(s, t), naive_kd_loss(s, t), **TOL)
    _, (grad,) = value_and_grad(lambda x: kd_loss(x, t), s)
    _, (scaled,) = value_and_grad(lambda x: 3.0 * kd_loss(x, t) + 1.0, s)
    torch.testing.assert_close(scaled, 3 * grad, **TOL)


def test_hidden_state_mse_on_kept_dims():
    teacher = logits(2, N, 10, seed=40)
    kept = torch.tensor([0, 3, 4, 8])
    student = logits(2, N, 4, seed=41).requires_grad_(True)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, :5] = False
    loss = hidden_state_mse(student, teacher, kept, mask)
    expected = ((student - teacher[..., kept]) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    assert torch.all(student.grad[~mask] == 0)
    assert hidden_state_mse(student, teacher[..., kept], None, torch.zeros_like(mask)).item() == 0
    with pytest.raises(ValueError, match="kept_hidden_dims"):
        hidden_state_mse(student, teacher)


def test_bad_arguments_raise_clear_errors():
    s, t = logits(N, V, seed=42), logits(N, V, seed=43)
    for bad in ({"kind": "kl"}, {"temperature": 0.0}, {"beta": 1.5}, {"chunk_tokens": 0}):
        with pytest.raises(ValueError):
            kd_loss(s, t, **bad)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, t, torch.full((N,), V))
    with pytest.raises(ValueError, match="indices"):
        topk_kd_loss(s[:, :10], *topk_of(t, 4), mode="renorm")
    with pytest.raises(ValueError, match="teacher logits"):
        kd_loss(s, t[:-1])
