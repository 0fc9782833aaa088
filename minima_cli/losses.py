"""Distillation losses: forward / reverse KL, generalized JSD, top-k teachers, the LM
cross-entropy mix and a hidden-state MSE. Pure torch, no I/O. Conventions and guarantees, with
the tests that check them: docs/losses.md.

Per token, over the vocabulary, teacher p = softmax(t / T) and student q = softmax(s / T):

    fkl  T^2 * sum p (log p - log q)                  MiniMA's loss (its softCE has this gradient)
    rkl  T^2 * sum q (log q - log p)
    jsd  T^2 * (beta KL(p || m) + (1 - beta) KL(q || m)),  m = beta p + (1 - beta) q

JSD follows TRL's `GKDTrainer.generalized_jsd_loss` (GKD, Agarwal et al. 2024, eq. 1): the
mixture is `logsumexp([log q + log(1 - beta), log p + log(beta)])`, beta weights KL(teacher || m),
and beta = 0 / beta = 1 are special-cased to forward / reverse KL exactly as TRL does (the formula
itself would give 0 there). One difference: TRL applies no T^2 to JSD; here every kind gets T^2 so
gradient scales match across temperatures (identical at T = 1).

Top-k teacher (what an offline cache stores: log_softmax(teacher logits) at T = 1, its top k
values and token ids), forward KL over:
    renorm  the k tokens only, both sides renormalised over them (as TRL's GOLD top_k does); any T.
    tail    the k tokens plus one bucket holding the rest of the mass on both sides (teacher
            1 - sum p_k, student logsumexp of its non-top-k logits); T = 1 only, since the
            tempered tail mass of the teacher cannot be recovered from its top k.

Conventions shared by every function:
- logits are `[..., vocab]` and aligned with labels/mask `[...]`: labels[i] is the target of
  logits[i] (shift the labels, not the logits, so that no `[tokens, vocab]` copy is made);
- a token counts iff its label is not -100 and its mask entry is True; losses are means over the
  counted tokens; none counted gives 0 (and zero gradients), never NaN;
- `vocab_size` is the tokenizer's real vocabulary: teacher and student may have different padded
  sizes (Qwen2.5-14B vs 3B style); only the first `vocab_size` rows/columns take part, the padding
  gets zero gradient. Left as None, both sides must have the same size;
- the teacher is a constant: no gradient reaches it;
- computation happens in float32 (float64 inputs stay float64); gradients come back in the dtype
  of the student's tensors.

Memory: the vocabulary losses run in chunks of tokens inside a `torch.autograd.Function` whose
forward computes the loss *and* its gradient chunk by chunk (upcasting one chunk at a time) and
keeps only the gradient, in the student's dtype; backward scales it by grad_output. No float32
`[tokens, vocab]` tensor is ever alive besides that one gradient. The fused-linear variants take
the student's final hidden states and lm_head weight instead of logits and never build the full
student logits at all (Liger's "fused linear" idea): per chunk logits = h @ W^T, then grad_hidden
rows and grad_weight (summed in float32) are accumulated; that matmul runs in the caller's
autocast dtype, everything else in float32 whatever autocast is on. When the loss reads only the
teacher's top k columns (`topk_logits_suffice`: top-k renorm, alpha 0), the fused variant
computes just those k logits a token from gathered lm_head rows: k dot products instead of
vocab, the lm_head's matmuls leave the step. `chunk_tokens=None` picks
`CHUNK_ELEMENTS[device] / vocab` tokens per chunk: 2 MiB float32 temporaries on CPU, small
enough to stay in cache (much smaller chunks pay more per-op overhead than they save), 64 MiB
on accelerators, where fewer, larger kernels matter more. The fused variants take at least 128
tokens per chunk, since each chunk rereads the whole lm_head gradient.
When at least DENSE_FRACTION of the tokens count, chunks are row ranges (views, no gather copies).
The saved gradient is handed to autograd without a copy, so each graph can be backpropagated
once (no retain_graph).

API:
    kd_loss(student_logits, teacher_logits, *, kind="fkl"|"rkl"|"jsd", temperature=1.0,
            beta=0.5, mask=None, vocab_size=None, chunk_tokens=None) -> scalar
    topk_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, *,
                 mode="renorm"|"tail", temperature=1.0, mask=None, vocab_size=None,
                 chunk_tokens=None) -> scalar
    distillation_loss(student_logits, teacher, labels, *, alpha=0.5, kind="fkl", ...)
        -> (alpha * CE + (1 - alpha) * KD, {"ce": ..., "kd": ...} detached, for logging);
        teacher is full logits or `TopK(logprobs, indices)` (then `kind="topk"`, `topk_mode`)
    fused_linear_kd_loss(student_hidden, student_head_weight, teacher, *, kind, ...) -> scalar
    fused_linear_distillation_loss(student_hidden, student_head_weight, teacher, labels, *,
                                   alpha=0.5, ...) -> (total, parts);
        teacher is logits, `TopK`, or `TeacherHead(hidden, weight)` (its logits built per chunk)
    hidden_state_mse(student_hidden, teacher_hidden, kept_hidden_dims=None, mask=None) -> scalar
The unchunked plain-autograd references the tests hold these to (and the benchmarks' baseline)
are tests/reference_losses.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from minima_cli.training.config import KD_LOSSES as KINDS
from minima_cli.training.config import TOPK_MODES

IGNORE_INDEX = -100
# tokens x vocab per chunk when chunk_tokens is None, by device type (others: "default")
CHUNK_ELEMENTS = {"cpu": 1 << 19, "default": 1 << 24}


class TopK(NamedTuple):
    """A teacher known only by its top k per token, as an offline cache stores it."""

    logprobs: Tensor  # [..., k] log_softmax(teacher logits) at T = 1, any float dtype
    indices: Tensor  # [..., k] token ids (distinct per token, < vocab_size)


class TeacherHead(NamedTuple):
    """A teacher given by its final hidden states and lm_head weight (fused variants)."""

    hidden: Tensor  # [..., teacher_hidden]
    weight: Tensor  # [teacher_vocab, teacher_hidden]


Teacher = Tensor | TopK | TeacherHead


@dataclass(frozen=True)
class _Spec:
    kind: str
    mode: str
    temperature: float
    beta: float
    alpha: float  # weight of the CE term; 0 for a pure KD loss
    vocab_size: int


# ---------------------------------------------------------------- per-chunk math (no autograd)
# Each divergence takes the chunk's log-probs at temperature T (fresh tensors, consumed in place:
# every live [chunk, vocab] temporary counts towards the loss's peak memory) and returns the
# per-token value and its gradient w.r.t. the scaled student logits z = s / T (so d loss / ds =
# T * that). Few, fused kernels on purpose: every [chunk, vocab] pass is memory bound, and every
# ATen op is a parallel region whose threads must all get a core, which on a shared machine can
# wait for a descheduled thread; hence 7-8 ops per chunk.


def _log_softmax(x: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log_softmax(x / T) as a fresh `dtype` tensor (one kernel at T = 1); x is left alone."""
    if temperature != 1:
        x = x.to(dtype, copy=True).div_(temperature)
    return torch.log_softmax(x, -1, dtype=dtype)


def _log_softmax_(x: Tensor) -> Tensor:
    return x.sub_(x.logsumexp(-1, keepdim=True))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) as a batched matmul, without an `a * b` temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _fkl(log_p: Tensor, log_q: Tensor, p_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    p = log_p.exp()
    per = _rowdot(p, log_p.sub_(log_q))
    # d/dz = q - p; p_weight < 1 folds a CE mix in (see _chunk_loss_grad)
    return per, log_q.exp_().sub_(p, alpha=p_weight)


def _rkl(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    q = log_q.exp()
    d = log_q.sub_(log_p)  # log q - log p
    per = _rowdot(q, d)
    return per, d.sub_(per[:, None]).mul_(q)  # d/dz = q (d - E_q[d])


def _jsd(log_p: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    if beta == 0:
        return _fkl(log_p, log_q)
    if beta == 1:
        return _rkl(log_p, log_q)
    log_m = log_p + math.log(beta)
    torch.logaddexp(log_m, log_q + math.log1p(-beta), out=log_m)  # TRL's mixture, stably
    per = beta * _rowdot(log_p.exp(), log_p.sub_(log_m))
    del log_p
    q = log_q.exp()
    g = log_q.sub_(log_m).mul_(1 - beta)  # d JSD / d q, up to a constant that softmax removes
    mean_g = _rowdot(q, g)
    per += mean_g
    return per, g.sub_(mean_g[:, None]).mul_(q)


def _renorm(z_k: Tensor, logprobs: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Forward KL over the teacher's k tokens, both sides renormalised over them: z_k the
    student's scaled logits at those tokens, logprobs the teacher's (both consumed); the
    per-token value and d/dz_k."""
    return _fkl(_log_softmax_(logprobs.div_(temperature)), _log_softmax_(z_k))


def _topk(z: Tensor, teacher: TopK, mode: str, temperature: float) -> tuple[Tensor, Tensor]:
    idx = teacher.indices
    if mode == "renorm":
        per, g = _renorm(z.gather(1, idx), teacher.logprobs, temperature)
        return per, z.zero_().scatter_(1, idx, g)
    # tail: (k + 1)-way distributions, the last bucket holding everything outside the top k
    log_q = _log_softmax_(z)
    lp = teacher.logprobs
    p = lp.exp()
    log_q_k = log_q.gather(1, idx)
    per = _rowdot(p, lp - log_q_k)
    grad_k = log_q_k.exp_().sub_(p)
    if idx.shape[1] == z.shape[1]:  # k = vocab: no tail bucket at all
        return per, log_q.exp_().scatter_(1, idx, grad_k)
    p_tail = (1 - p.sum(-1)).clamp_(min=0)  # clamp: a bf16 cache can sum past 1
    q = log_q.scatter_(1, idx, -math.inf).exp_()  # q outside the top k, 0 inside
    log_ratio = p_tail.log() - q.sum(-1).log()  # log(p_tail / q_tail)
    has = p_tail > 0
    per += torch.where(has, p_tail * log_ratio, 0)
    # outside the top k, d/dz = q - p_tail * q / q_tail: the tail mass spread like q
    q.mul_(torch.where(has, 1 - log_ratio.exp(), 1)[:, None])
    return per, q.scatter_(1, idx, grad_k)


def _grad_scale(spec: _Spec) -> float:
    """What `_chunk_loss_grad`'s g is multiplied by to give d loss / ds (per summed token): a
    pure KD loss leaves its factor T out of every chunk, and the drivers apply it once."""
    return spec.temperature if spec.alpha == 0 else 1.0


def _counted_sum(per_token: Tensor, keep: Tensor | None) -> Tensor:
    # where, not a product: a row that does not count may hold inf/NaN
    return per_token.sum() if keep is None else torch.where(keep, per_token, 0).sum()


def _chunk_loss_grad(
    s: Tensor, teacher: Tensor | TopK, labels: Tensor | None, spec: _Spec,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed KD and CE over the chunk's counted rows (`keep`, None: all), and
    g = d(alpha CE + (1 - alpha) KD)/ds / _grad_scale(spec), per token (a fresh compute-dtype
    tensor; rows not kept hold anything, the caller zeroes them).

    s and a tensor teacher are only read (views of the callers' logits are fine); a TopK
    teacher's log-probs are consumed."""
    T, alpha = spec.temperature, spec.alpha
    cdtype = torch.promote_types(s.dtype, torch.float32)
    n = len(s)
    log_q = None if spec.kind == "topk" else _log_softmax(s, T, cdtype)
    ce = torch.zeros((), dtype=cdtype, device=s.device)
    g_ce, fused_ce = None, False
    if labels is not None:  # CE at T = 1
        y = labels[:, None]
        log_q1 = log_q if T == 1 and log_q is not None else _log_softmax(s, 1.0, cdtype)
        ce = _counted_sum(log_q1.gather(1, y).squeeze(1), keep).neg()
        # forward KL at T = 1 takes the CE mix into its own gradient: q - (1 - a) p - a onehot
        fused_ce = spec.kind == "fkl" and T == 1 and alpha > 0
        if alpha > 0 and not fused_ce:
            q1 = log_q1.exp() if log_q1 is log_q else log_q1.exp_()
            g_ce = q1.scatter_add_(1, y, q1.new_full((n, 1), -1))
        del log_q1
    if spec.kind == "topk":
        z = s.to(cdtype, copy=True)
        per, g = _topk(z.div_(T) if T != 1 else z, teacher, spec.mode, T)
    else:
        log_t = _log_softmax(teacher, T, cdtype)
        if spec.kind == "fkl":
            per, g = _fkl(log_t, log_q, 1 - alpha if fused_ce else 1.0)
        elif spec.kind == "rkl":
            per, g = _rkl(log_t, log_q)
        else:
            per, g = _jsd(log_t, log_q, spec.beta)
    if fused_ce:
        g.scatter_add_(1, y, g.new_full((n, 1), -alpha))
    elif g_ce is not None:
        g.mul_((1 - alpha) * T).add_(g_ce, alpha=alpha)
    return _counted_sum(per, keep) * (T * T), ce, g


# ---------------------------------------------------------------- chunk drivers
# Rows are taken in chunks of `size`. When most tokens count (a causal LM's labels drop one per
# sequence), chunks are plain row ranges: the student and teacher chunks are views, no copies,
# and the few rows that do not count are excluded from the sums and zeroed in the gradient.
# Otherwise (prompt masking, mostly padding) the counted rows are gathered first.
DENSE_FRACTION = 0.75

RowIndex = slice | Tensor


def _row_chunks(rows: Tensor, n: int, size: int
                ) -> Iterator[tuple[RowIndex, Tensor | None, Tensor | None]]:
    """(index into the n rows, keep mask or None, dropped chunk-local rows or None) per chunk."""
    if len(rows) < DENSE_FRACTION * n:
        for start in range(0, len(rows), size):
            yield rows[start : start + size], None, None
        return
    counted = torch.zeros(n, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
    for start in range(0, n, size):
        keep = counted[start : start + size]
        dropped = (~keep).nonzero().squeeze(1)
        if len(dropped):
            yield slice(start, start + size), keep, dropped
        else:
            yield slice(start, start + size), None, None


def _teacher_rows(teacher: Teacher, index: RowIndex, V: int, dtype: torch.dtype
                  ) -> Tensor | TopK:
    """The teacher's chunk: logits `[n, >= V]` (read only, maybe a view) or a TopK (a copy)."""
    if isinstance(teacher, TopK):
        return TopK(teacher.logprobs[index].to(dtype, copy=True), teacher.indices[index])
    if isinstance(teacher, TeacherHead):
        with torch.no_grad():
            return teacher.hidden[index] @ teacher.weight[:V].T
    return teacher[index, :V]


def _chunk_labels(labels: Tensor | None, index: RowIndex, keep: Tensor | None) -> Tensor | None:
    if labels is None:
        return None
    y = labels[index]
    return y if keep is None else torch.where(keep, y, 0)  # uncounted rows may hold -100


def _finish(kd: Tensor, ce: Tensor, n: int, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:
    scale = 1 / max(n, 1)
    kd, ce = kd * scale, ce * scale
    return spec.alpha * ce + (1 - spec.alpha) * kd, kd, ce


def _outside_autocast(forward):
    """Run a loss Function's forward with the caller's autocast off: the math is float32 by
    design, and autocast would run its batched-matmul row sums in bf16 (rounding every
    per-token value and the JSD/RKL gradients). A matmul that builds logits takes the caller's
    autocast dtype explicitly instead (`_head_matmul_dtype`)."""

    @functools.wraps(forward)
    def wrapped(ctx, first: Tensor, *args):
        if not torch.amp.is_autocast_available(first.device.type):
            return forward(ctx, first, *args)
        with torch.autocast(first.device.type, enabled=False):
            return forward(ctx, first, *args)

    return wrapped


def _head_matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the fused losses' logits matmul: the caller's autocast dtype (what the
    model's own lm_head would run in), else float32 on CPUs (without bf16 matmul units bf16
    GEMMs run far slower) and the weight's dtype elsewhere."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    cdtype = torch.promote_types(hidden.dtype, torch.float32)
    return cdtype if device == "cpu" else weight.dtype


class _ChunkedKD(torch.autograd.Function):
    """Loss over student logits `[N, Vs]`; forward keeps only d loss / d logits."""

    @staticmethod
    @_outside_autocast
    def forward(ctx, student, teacher, labels, rows, spec: _Spec, chunk: int):
        V, cdtype = spec.vocab_size, torch.promote_types(student.dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0]
        n = student.shape[0]
        if need_grad:  # zeros only where some entries are never written (masked rows, padding)
            full = len(rows) >= DENSE_FRACTION * n and student.shape[1] == V
            grad = torch.empty_like(student) if full else torch.zeros_like(student)
        kd = ce = torch.zeros((), dtype=cdtype, device=student.device)
        for index, keep, dropped in _row_chunks(rows, n, chunk):
            kd_c, ce_c, g = _chunk_loss_grad(
                student.detach()[index, :V], _teacher_rows(teacher, index, V, cdtype),
                _chunk_labels(labels, index, keep), spec, keep)
            kd, ce = kd + kd_c, ce + ce_c
            if need_grad:
                if dropped is not None:
                    g.index_fill_(0, dropped, 0)
                # a bf16 student (autocast) gets its gradient rounded once, here: index_put
                # (gathered rows) does not convert dtypes as a slice assignment does
                grad[index, :V] = g.to(grad.dtype)
        ctx.grad = grad if need_grad else None
        ctx.scale = _grad_scale(spec) / max(len(rows), 1)
        total, kd, ce = _finish(kd, ce, len(rows), spec)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad, ctx.grad = ctx.grad, None  # hand the buffer over: autograd then takes it uncopied
        if grad is None:
            raise RuntimeError("chunked KD loss: backward ran twice (retain_graph is unsupported)")
        return grad.mul_((grad_total * ctx.scale).to(grad.dtype)), None, None, None, None, None


class _FusedLinearKD(torch.autograd.Function):
    """Loss over logits = hidden @ weight^T, built one chunk of tokens at a time."""

    @staticmethod
    @_outside_autocast
    def forward(ctx, hidden, weight, teacher, labels, rows, spec: _Spec, chunk: int,
                mm_dtype: torch.dtype):
        V, cdtype = spec.vocab_size, torch.promote_types(hidden.dtype, torch.float32)
        w = weight.detach()[:V].to(mm_dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # fp32 sum over chunks: a bf16 running sum would drop the small late chunks
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)
        kd = ce = torch.zeros((), dtype=cdtype, device=hidden.device)
        for index, keep, dropped in _row_chunks(rows, hidden.shape[0], chunk):
            h = hidden.detach()[index]
            s = (h.to(mm_dtype) @ w.T).to(cdtype)
            kd_c, ce_c, g = _chunk_loss_grad(s, _teacher_rows(teacher, index, V, cdtype),
                                             _chunk_labels(labels, index, keep), spec, keep)
            del s
            kd, ce = kd + kd_c, ce + ce_c
            if dropped is not None:
                g.index_fill_(0, dropped, 0)
            if grad_h is not None:
                grad_h[index] = (g.to(mm_dtype) @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w[:V].addmm_(g.T, h.to(cdtype))
        scale = _grad_scale(spec) / max(len(rows), 1)
        ctx.grads = grad_h, None if grad_w is None else grad_w.mul_(scale).to(weight.dtype)
        ctx.scale = scale
        total, kd, ce = _finish(kd, ce, len(rows), spec)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        return *_head_grads(ctx, grad_total), None, None, None, None, None, None


def _head_grads(ctx, grad_total: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The fused losses' saved (grad_hidden unscaled, grad_weight scaled) times grad_output."""
    (grad_h, grad_w), ctx.grads = ctx.grads, (None, None)
    if grad_h is None and grad_w is None:
        raise RuntimeError("fused KD loss: backward ran twice (retain_graph is unsupported)")
    grad_h = None if grad_h is None else grad_h.mul_((grad_total * ctx.scale).to(grad_h.dtype))
    grad_w = None if grad_w is None else grad_w.mul_(grad_total.to(grad_w.dtype))
    return grad_h, grad_w


class _SparseHeadKD(torch.autograd.Function):
    """Top-k renormalised forward KL without the CE term on logits = hidden @ weight^T. Only
    the teacher's k columns of each token's logits enter this loss, so they are computed as k
    dot products with gathered weight rows (float32), never the `[tokens, vocab]` matmul; the
    weight's gradient is k row updates a token. Same value and gradients as `_FusedLinearKD`
    (up to rounding: its logits are rounded to the matmul dtype, here they are float32)."""

    @staticmethod
    @_outside_autocast
    def forward(ctx, hidden, weight, teacher: TopK, rows, spec: _Spec, chunk: int):
        V, T = spec.vocab_size, spec.temperature
        cdtype = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.detach()
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None  # fp32: a token's k row updates are summed over all tokens
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)
        kd = torch.zeros((), dtype=cdtype, device=hidden.device)
        for index, keep, dropped in _row_chunks(rows, hidden.shape[0], chunk):
            h = hidden.detach()[index].to(cdtype)  # [c, H]
            top = _teacher_rows(teacher, index, V, cdtype)
            w_k = torch.nn.functional.embedding(top.indices, w).to(cdtype)  # [c, k, H]
            z = (w_k @ h.unsqueeze(2)).squeeze(2)  # the student's logits at the k tokens
            per, g = _renorm(z.div_(T) if T != 1 else z, top.logprobs, T)
            kd = kd + _counted_sum(per, keep) * (T * T)
            if dropped is not None:
                g.index_fill_(0, dropped, 0)
            if grad_h is not None:
                grad_h[index] = (g.unsqueeze(1) @ w_k).squeeze(1).to(hidden.dtype)
            if grad_w is not None:
                rows_k = (g.unsqueeze(2) * h.unsqueeze(1)).view(-1, h.shape[1])
                grad_w.index_add_(0, top.indices.reshape(-1), rows_k)
        scale = _grad_scale(spec) / max(len(rows), 1)
        ctx.grads = grad_h, None if grad_w is None else grad_w.mul_(scale).to(weight.dtype)
        ctx.scale = scale
        total, kd, ce = _finish(kd, torch.zeros_like(kd), len(rows), spec)
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        return *_head_grads(ctx, grad_total), None, None, None, None


# ---------------------------------------------------------------- validation helpers


def _vocab(student_vocab: int, teacher_vocab: int | None, vocab_size: int | None) -> int:
    if vocab_size is None:
        if teacher_vocab not in (None, student_vocab):
            raise ValueError(
                f"teacher and student vocab sizes differ ({teacher_vocab} vs {student_vocab}): "
                "pass vocab_size = the tokenizer's real vocabulary size"
            )
        return student_vocab
    limit = min(student_vocab, teacher_vocab or student_vocab)
    if not 1 <= vocab_size <= limit:
        raise ValueError(f"vocab_size {vocab_size} outside 1..{limit} (the logits' sizes)")
    return vocab_size


def _spec(kind: str, mode: str, temperature: float, beta: float, alpha: float, V: int) -> _Spec:
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KINDS}")
    if mode not in TOPK_MODES:
        raise ValueError(f"unknown top-k mode {mode!r}; expected one of {TOPK_MODES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "topk" and mode == "tail" and temperature != 1:
        raise ValueError("top-k tail mode needs temperature 1: the tempered tail is unknown")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _Spec(kind, mode, float(temperature), float(beta), float(alpha), V)


def _valid(lead: torch.Size, labels: Tensor | None, mask: Tensor | None, device) -> Tensor:
    """Boolean `[tokens]`: the tokens that count."""
    valid = torch.ones(lead.numel(), dtype=torch.bool, device=device)
    for name, t in (("labels", labels), ("mask", mask)):
        if t is not None and t.shape != lead:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logits' leading {tuple(lead)}")
    if labels is not None:
        valid &= labels.reshape(-1) != IGNORE_INDEX
    if mask is not None:
        valid &= mask.reshape(-1).to(torch.bool)
    return valid


def _flat_teacher(teacher: Teacher, lead: torch.Size, fused: bool) -> tuple[Teacher, int | None]:
    """Teacher flattened to `[tokens, ...]` and detached, with its vocab size (None for TopK)."""
    if isinstance(teacher, TopK):
        if teacher.logprobs.shape != teacher.indices.shape or teacher.logprobs.shape[:-1] != lead:
            raise ValueError("top-k logprobs and indices must both be [..., k] over the tokens")
        k = teacher.logprobs.shape[-1]
        flat = TopK(teacher.logprobs.detach().reshape(-1, k), teacher.indices.reshape(-1, k).long())
        return flat, None
    if isinstance(teacher, TeacherHead):
        if not fused:
            raise ValueError("TeacherHead is for the fused-linear losses; pass teacher logits")
        if teacher.hidden.shape[:-1] != lead:
            raise ValueError("teacher hidden states must cover the same tokens as the student")
        hidden = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
        return TeacherHead(hidden, teacher.weight.detach()), teacher.weight.shape[0]
    if teacher.shape[:-1] != lead:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} vs student tokens {tuple(lead)}")
    return teacher.detach().reshape(-1, teacher.shape[-1]), teacher.shape[-1]


def _check_topk(teacher, V: int, kind: str) -> None:
    if isinstance(teacher, TopK) != (kind == "topk"):
        raise ValueError("kind='topk' goes with a TopK teacher, and only with one")
    if isinstance(teacher, TopK) and teacher.indices.numel():
        lo, hi = teacher.indices.min().item(), teacher.indices.max().item()
        if lo < 0 or hi >= V:
            raise ValueError(f"top-k indices must be in [0, {V}), got [{lo}, {hi}]")


def _chunk_size(chunk_tokens: int | None, V: int, device: torch.device, least: int = 1) -> int:
    if chunk_tokens is None:
        elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["default"])
        return max(least, elements // V)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return chunk_tokens


# ---------------------------------------------------------------- public chunked losses


def distillation_loss(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    labels: Tensor | None,
    *,
    alpha: float = 0.5,
    kind: str = "fkl",
    topk_mode: str = "renorm",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`alpha * CE(student, labels) + (1 - alpha) * KD(student, teacher)`, chunked.

    Returns the differentiable total and {"ce", "kd"} detached for logging (labels None: pure KD,
    alpha must be 0 and "ce" is 0). MiniMA: alpha 0.5, kind "fkl", T = 1."""
    lead, Vs = student_logits.shape[:-1], student_logits.shape[-1]
    flat_teacher, flat_labels, rows, spec = _prepare(
        teacher, labels, mask, lead, Vs, student_logits.device, fused=False, alpha=alpha,
        kind=kind, topk_mode=topk_mode, temperature=temperature, beta=beta, vocab_size=vocab_size)
    total, kd, ce = _ChunkedKD.apply(
        student_logits.reshape(-1, Vs), flat_teacher, flat_labels, rows, spec,
        _chunk_size(chunk_tokens, spec.vocab_size, student_logits.device),
    )
    return total, {"ce": ce, "kd": kd}


def _prepare(teacher, labels, mask, lead, student_vocab, device, *, fused, alpha, kind,
             topk_mode, temperature, beta, vocab_size):
    """Shared set-up of both entry points: (flat teacher, flat labels, counted rows, spec)."""
    flat_teacher, Vt = _flat_teacher(teacher, lead, fused=fused)
    V = _vocab(student_vocab, Vt, vocab_size)
    spec = _spec(kind, topk_mode, temperature, beta, alpha, V)
    if labels is None and alpha != 0:
        raise ValueError("alpha > 0 mixes in the LM cross-entropy, which needs labels")
    _check_topk(flat_teacher, V, kind)
    valid = _valid(lead, labels, mask, device)
    return flat_teacher, _check_labels(labels, valid, V), valid.nonzero().squeeze(1), spec


def _check_labels(labels: Tensor | None, valid: Tensor, V: int) -> Tensor | None:
    if labels is None:
        return None
    flat = labels.reshape(-1).long()
    counted = flat[valid]
    if counted.numel() and (counted.min() < 0 or counted.max() >= V):
        raise ValueError(f"labels must be -100 or in [0, {V})")
    return flat


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean over counted tokens of the fkl / rkl / jsd(beta) divergence, chunked."""
    if kind == "topk":
        raise ValueError("kind='topk' needs the teacher's top k: use topk_kd_loss")
    return distillation_loss(
        student_logits, teacher_logits, None, alpha=0.0, kind=kind, temperature=temperature,
        beta=beta, mask=mask, vocab_size=vocab_size, chunk_tokens=chunk_tokens,
    )[0]


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    mode: str = "renorm",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Forward KL against a teacher known by its top-k log-probs and indices, chunked."""
    return distillation_loss(
        student_logits, TopK(teacher_topk_logprobs, teacher_topk_indices), None, alpha=0.0,
        kind="topk", topk_mode=mode, temperature=temperature, mask=mask, vocab_size=vocab_size,
        chunk_tokens=chunk_tokens,
    )[0]


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher: Tensor | TopK | TeacherHead,
    labels: Tensor | None,
    *,
    alpha: float = 0.5,
    kind: str = "fkl",
    topk_mode: str = "renorm",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`distillation_loss` on logits = student_hidden @ student_head_weight^T (no bias), which
    are only ever built one chunk of tokens at a time. Gradients reach hidden and weight."""
    lead, H = student_hidden.shape[:-1], student_hidden.shape[-1]
    if student_head_weight.dim() != 2 or student_head_weight.shape[1] != H:
        raise ValueError(f"head weight {tuple(student_head_weight.shape)} vs hidden size {H}")
    flat_teacher, flat_labels, rows, spec = _prepare(
        teacher, labels, mask, lead, student_head_weight.shape[0], student_hidden.device,
        fused=True, alpha=alpha, kind=kind, topk_mode=topk_mode, temperature=temperature,
        beta=beta, vocab_size=vocab_size)
    flat_hidden, device = student_hidden.reshape(-1, H), student_hidden.device
    if topk_logits_suffice(kind, topk_mode, alpha):
        k = flat_teacher.indices.shape[1]
        total, kd, ce = _SparseHeadKD.apply(
            flat_hidden, student_head_weight, flat_teacher, rows, spec,
            _chunk_size(chunk_tokens, k * H, device))  # [chunk, k, hidden] temporaries
    else:
        total, kd, ce = _FusedLinearKD.apply(
            flat_hidden, student_head_weight, flat_teacher, flat_labels, rows, spec,
            # >= 128 tokens: each chunk's rank-n update of grad_weight rereads all of [V, hidden]
            _chunk_size(chunk_tokens, spec.vocab_size, device, least=128),
            _head_matmul_dtype(student_hidden, student_head_weight))
    return total, {"ce": ce, "kd": kd}


def topk_logits_suffice(kind: str, topk_mode: str, alpha: float) -> bool:
    """Whether the loss reads the student's logits only at the teacher's top-k tokens (top-k
    renormalised KD without the CE term): then the fused-linear loss computes just those k
    logits a token instead of the whole lm_head."""
    return kind == "topk" and topk_mode == "renorm" and alpha == 0


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher: Tensor | TopK | TeacherHead,
    *,
    kind: str = "fkl",
    topk_mode: str = "renorm",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """`kd_loss` / `topk_kd_loss` (kind="topk") without ever building the student's logits."""
    return fused_linear_distillation_loss(
        student_hidden, student_head_weight, teacher, None, alpha=0.0, kind=kind,
        topk_mode=topk_mode, temperature=temperature, beta=beta, mask=mask,
        vocab_size=vocab_size, chunk_tokens=chunk_tokens,
    )[0]


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over the counted positions (labels != IGNORE_INDEX), and their
    number; only those rows of the logits are upcast to float32."""
    keep = labels.reshape(-1) != IGNORE_INDEX
    picked = logits.reshape(-1, logits.shape[-1])[keep].float()
    return torch.nn.functional.cross_entropy(picked, labels.reshape(-1)[keep],
                                             reduction="sum"), int(keep.sum())


def hidden_state_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    kept_hidden_dims: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error per hidden dim, averaged over counted tokens.

    For a pruned student pass the prune manifest's kept hidden dims: the teacher's states are
    compared on those dims only (the student's dim i is the teacher's kept_hidden_dims[i])."""
    if kept_hidden_dims is not None:
        teacher_hidden = teacher_hidden.index_select(-1, kept_hidden_dims.to(teacher_hidden.device))
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} vs teacher "
            f"{tuple(teacher_hidden.shape)} (after kept_hidden_dims)"
        )
    cdtype = torch.promote_types(student_hidden.dtype, torch.float32)
    per = (student_hidden.to(cdtype) - teacher_hidden.to(cdtype)).square().mean(-1)
    return _masked_mean(per, _valid(per.shape, None, mask, per.device).view(per.shape))


def _masked_mean(per_token: Tensor, valid: Tensor) -> Tensor:
    # where, not a product: a masked token's inf/NaN must not leak into the value or gradient
    return torch.where(valid, per_token, 0).sum() / valid.sum().clamp(min=1)


def next_token_labels(batch: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position t predicts token t + 1; the last is ignored."""
    return torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], IGNORE_INDEX)], 1)
