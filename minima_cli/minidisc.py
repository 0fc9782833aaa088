"""MiniDisc's pure math (docs/stages.md, "schedule"): nested candidate shapes between teacher and
student, the dev metric P = 1 / perplexity, the choice argmax P + lambda * s, and the rank
agreement (Spearman, Kendall) of the sandwich with brute force."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence

import numpy as np

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape, count_parameters, shape_problem
from minima_cli.model.selection import PrunePlan
from minima_cli.model.shapes import resolve_target

# MiniDisc's grid, in percent: every 10 % plus the finer steps near the sparse end.
DEFAULT_SPARSITIES = (0, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95)


DEFAULT_LAMBDA = 0.2


def parse_sparsities(text: str) -> list[float]:
    """'0,10,50' (percent) -> [0.0, 0.1, 0.5], sorted and de-duplicated; each in [0, 100)."""
    values = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(item.rstrip("%"))
        except ValueError:
            raise MinimaError(f"--sparsities item {item!r} is not a number (percent)") from None
        if not 0 <= value < 100:
            raise MinimaError(f"--sparsities {item}: a sparsity must be in [0, 100) percent")
        values.add(value / 100)
    if not values:
        raise MinimaError("--sparsities is empty")
    return sorted(values)


def check_lambda(lam: float) -> float:
    if not (math.isfinite(lam) and 0 <= lam <= 1):
        raise MinimaError(f"--lambda {lam:g} must be in [0, 1]")
    return lam


def dev_metric(loss: float) -> float:
    """P = exp(-mean dev cross-entropy) = 1 / perplexity, in (0, 1]."""
    return math.exp(-loss)


def sparsity(params: int, teacher_params: int) -> float:
    return 1.0 - params / teacher_params


def contain(shape: ModelShape, inner: ModelShape, teacher: ModelShape) -> ModelShape:
    """The smallest widening of `shape` (within `teacher`) that holds `inner` on every axis:
    layers, hidden, ffn, kv groups and query heads per group (the two that make a GQA head set).
    LlamaConfig also wants hidden % heads == 0, which may cost a wider hidden or more heads."""
    base = shape.replace(layers=max(shape.layers, inner.layers), ffn=max(shape.ffn, inner.ffn))
    needed = max(shape.hidden, inner.hidden)
    options = []
    for kv in range(max(shape.kv_heads, inner.kv_heads), teacher.kv_heads + 1):
        for per_group in range(max(shape.group_size, inner.group_size), teacher.group_size + 1):
            heads = kv * per_group
            hidden = -(-needed // heads) * heads if base.model_type == "llama" else needed
            option = base.replace(hidden=hidden, heads=heads, kv_heads=kv)
            if hidden <= teacher.hidden and shape_problem(option) is None:
                options.append(option)
    if not options:
        raise MinimaError(f"no shape within the teacher contains both {shape} and {inner}")
    return min(options, key=count_parameters)


def candidate_shapes(teacher: ModelShape, student: ModelShape, sparsities: Sequence[float],
                     multiple_of: int = 8) -> list[tuple[float, ModelShape]]:
    """(asked sparsity, shape) of every assistant candidate, widest first, the teacher (0) always
    first. Only sparsities below the student's count (a candidate at least as sparse as the
    student is no assistant). Each shape is solved like `minima prune --params` (symmetric
    shaping), then widened just enough to contain the next narrower one, the student last, so
    the chain teacher > ... > student is nested on every axis; repeated shapes are dropped."""
    total = count_parameters(teacher)
    student_sparsity = sparsity(count_parameters(student), total)
    asked = sorted({0.0, *(s for s in sparsities if s < student_sparsity)})
    shapes = [teacher] * len(asked)
    inner = student
    for i in range(len(asked) - 1, 0, -1):  # narrowest first: each must hold the one after it
        target = round((1 - asked[i]) * total)
        shape = contain(resolve_target(teacher, params=target, multiple_of=multiple_of), inner,
                        teacher)
        # Nesting may have added heads: re-solve hidden and FFN around them, to stay near the
        # size asked (when no such shape exists, keep the widened one).
        with contextlib.suppress(MinimaError):
            shape = resolve_target(teacher, shape={"heads": shape.heads,
                                                   "kv_heads": shape.kv_heads},
                                   params=target, multiple_of=multiple_of)
        shapes[i] = inner = contain(shape, inner, teacher)
    kept, seen = [], {student}
    for s, shape in zip(asked, shapes, strict=True):
        if shape not in seen:
            seen.add(shape)
            kept.append((s, shape))
    return kept


def relative_plan(outer: PrunePlan, inner: PrunePlan) -> PrunePlan:
    """`inner` (teacher indices, nested in `outer`) in the coordinates of the model that pruning
    by `outer` produces: pruning that model by the result equals pruning the teacher by `inner`.
    The pruned model keeps the plan's order (ascending; heads grouped by kept kv group)."""

    def positions(kept: list[int], subset: list[int], what: str) -> list[int]:
        index = {unit: i for i, unit in enumerate(kept)}
        missing = [unit for unit in subset if unit not in index]
        if missing:
            raise MinimaError(f"plans are not nested: {what} {missing[:4]} of the inner plan are "
                              "not kept by the outer one")
        return [index[unit] for unit in subset]

    layers = positions(outer.layers, inner.layers, "layers")
    kv_groups, heads, ffn = [], [], []
    for j, i in enumerate(layers):
        layer = f"layer {inner.layers[j]}"
        kv_groups.append(positions(outer.kv_groups[i], inner.kv_groups[j], f"{layer} kv groups"))
        heads.append(positions(outer.heads[i], inner.heads[j], f"{layer} heads"))
        ffn.append(positions(outer.ffn[i], inner.ffn[j], f"{layer} FFN neurons"))
    return PrunePlan(layers=layers, hidden=positions(outer.hidden, inner.hidden, "hidden dims"),
                     kv_groups=kv_groups, heads=heads, ffn=ffn, head_dim=inner.head_dim,
                     notes={**inner.notes, "relative_to": "outer plan"})


def tradeoffs(sparsities: Sequence[float], metrics: Sequence[float], lam: float) -> list[float]:
    """MiniDisc's lambda-trade-off T = P + lambda * s of each candidate."""
    check_lambda(lam)
    for p in metrics:
        if not 0 <= p <= 1:
            raise MinimaError(f"dev metric {p:g} must be in [0, 1]")
    return [p + lam * s for s, p in zip(sparsities, metrics, strict=True)]


def choose_assistant(sparsities: Sequence[float], metrics: Sequence[float], lam: float,
                     student_sparsity: float) -> tuple[int, list[float]]:
    """Index of the candidate with the best trade-off among those less sparse than the student
    (index of s = 0, the teacher, means distil directly), and every candidate's trade-off. Ties
    go to the less sparse candidate: the same trade-off for less pruning."""
    values = tradeoffs(sparsities, metrics, lam)
    eligible = [i for i, s in enumerate(sparsities) if s < student_sparsity]
    if not eligible:
        raise MinimaError("no candidate is less sparse than the student")
    return max(eligible, key=lambda i: (values[i], -sparsities[i])), values


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise MinimaError("rank correlation needs two sequences of the same length")
    if len(a) < 2:
        raise MinimaError("rank correlation needs at least 2 points")
    return a, b


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the (average-tie) ranks; nan when one side is
    constant."""
    a, b = (_ranks(v) for v in _pair(x, y))
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties corrected); nan when one side is constant."""
    a, b = _pair(x, y)
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[j] - a[i]), np.sign(b[j] - b[i])
    denominator = math.sqrt(float(np.count_nonzero(da)) * float(np.count_nonzero(db)))
    return float((da * db).sum()) / denominator if denominator > 0 else float("nan")


def sandwich_widths(n: int, per_step: int, rng: random.Random) -> list[int]:
    """Candidate indices (0 = widest) trained in one sandwich step: all of them, or with
    0 < per_step < n the sandwich rule's largest + smallest + (per_step - 2) random others."""
    if per_step == 0 or per_step >= n:
        return list(range(n))
    if per_step < 2:
        raise MinimaError(f"--sandwich-widths {per_step}: the sandwich rule trains at least the "
                          "largest and the smallest width (2), or 0 for all")
    return [0, *sorted(rng.sample(range(1, n - 1), per_step - 2)), n - 1]
