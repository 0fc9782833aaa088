"""Unchunked plain-autograd references of minima_cli.losses: the tests hold the chunked losses to
these, and the benchmarks use them as their baseline (docs/losses.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from minima_cli.losses import TopK, _masked_mean, _valid, _vocab


def _naive_divergence(log_p: Tensor, log_q: Tensor, kind: str, beta: float) -> Tensor:
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    mix = torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)])
    log_m = torch.logsumexp(mix, dim=0)  # TRL's mixture
    kl_teacher = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_student = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def naive_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Unchunked reference of `kd_loss` in plain autograd."""
    V = _vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    cdtype = torch.promote_types(student_logits.dtype, torch.float32)
    T = temperature
    log_q = torch.log_softmax(student_logits[..., :V].to(cdtype) / T, -1)
    log_p = torch.log_softmax(teacher_logits[..., :V].detach().to(cdtype) / T, -1)
    per = _naive_divergence(log_p, log_q, kind, beta) * T**2
    return _masked_mean(per, _valid(per.shape, None, mask, per.device).view(per.shape))


def naive_topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    mode: str = "renorm",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Unchunked reference of `topk_kd_loss` in plain autograd."""
    V = vocab_size or student_logits.shape[-1]
    cdtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits[..., :V].to(cdtype) / temperature
    lp, idx = teacher_topk_logprobs.detach().to(cdtype), teacher_topk_indices.long()
    if mode == "renorm":
        log_p = torch.log_softmax(lp / temperature, -1)
        log_q = torch.log_softmax(s.gather(-1, idx), -1)
        per = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    else:
        log_q = torch.log_softmax(s, -1)
        per = (lp.exp() * (lp - log_q.gather(-1, idx))).sum(-1)
        if idx.shape[-1] < V:
            p_tail = (1 - lp.exp().sum(-1)).clamp(min=0)
            outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
            q_tail = torch.where(outside, log_q.exp(), 0).sum(-1)
            per = per + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)
    return _masked_mean(per, _valid(per.shape, None, mask, per.device).view(per.shape))


def naive_distillation_loss(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    labels: Tensor,
    *,
    alpha: float = 0.5,
    kind: str = "fkl",
    topk_mode: str = "renorm",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unchunked reference of `distillation_loss` in plain autograd."""
    valid = _valid(labels.shape, labels, mask, labels.device).view(labels.shape)
    if isinstance(teacher, TopK):
        kd = naive_topk_kd_loss(student_logits, *teacher, mode=topk_mode, temperature=temperature,
                                mask=valid, vocab_size=vocab_size)
    else:
        kd = naive_kd_loss(student_logits, teacher, kind=kind, temperature=temperature,
                           beta=beta, mask=valid, vocab_size=vocab_size)
    V = vocab_size or student_logits.shape[-1]
    cdtype = torch.promote_types(student_logits.dtype, torch.float32)
    ce_tok = F.cross_entropy(
        student_logits[..., :V].to(cdtype).reshape(-1, V), labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view(labels.shape)
    ce = _masked_mean(ce_tok, valid)
    return alpha * ce + (1 - alpha) * kd, {"ce": ce.detach(), "kd": kd.detach()}
