"""Target shapes for `minima prune`: parse `--shape`, split heads into kept kv groups so GQA stays a
standard config, and solve a student shape from `--params` / `--ratio` by symmetric shaping (every
free width axis scaled by one factor, rounded to `multiple_of`). Pure: shapes and numbers only.
"""

from __future__ import annotations

import math

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape, count_parameters, shape_problem
from minima_cli.units import format_count

SHAPE_KEYS = {"layers": "layers", "hidden": "hidden", "heads": "heads", "kv-heads": "kv_heads",
              "kv_heads": "kv_heads", "ffn": "ffn"}


def parse_shape(spec: str) -> dict[str, int]:
    """'layers=24,hidden=3072,heads=24,kv-heads=24,ffn=8192' -> {axis: int}."""
    shape: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise MinimaError(f"--shape item {item!r} is not key=value")
        if key not in SHAPE_KEYS:
            raise MinimaError(
                f"unknown shape key {key!r}: use layers, hidden, heads, kv-heads, ffn"
            )
        try:
            shape[SHAPE_KEYS[key]] = int(value.strip())
        except ValueError:
            raise MinimaError(f"--shape {key}={value.strip()!r} is not an integer") from None
    if not shape:
        raise MinimaError("--shape is empty")
    return shape


def split_heads(teacher: ModelShape, heads: int | None, kv_heads: int | None) -> tuple[int, int]:
    """Kept (heads, kv_heads): each kept kv group keeps the same number of its own query heads,
    so the config stays standard GQA. Given only heads, drop whole kv groups when that divides
    evenly (MiniMA's unit), else thin the query heads inside every group."""
    g = teacher.group_size
    if heads is None and kv_heads is None:
        return teacher.heads, teacher.kv_heads
    if heads is None:
        return kv_heads * g, kv_heads
    if kv_heads is not None:
        if heads % kv_heads or heads // kv_heads > g or kv_heads > teacher.kv_heads:
            raise MinimaError(
                f"heads={heads} cannot be split into {kv_heads} kept kv groups: each group keeps "
                f"an equal share of its own {g} query heads (teacher {teacher.heads} heads, "
                f"{teacher.kv_heads} kv groups)"
            )
        return heads, kv_heads
    options = [(kv, heads // kv) for kv in range(teacher.kv_heads, 0, -1)
               if heads % kv == 0 and heads // kv <= g]
    if not options:
        raise MinimaError(
            f"heads={heads} is not divisible into kept kv groups (teacher: {teacher.kv_heads} "
            f"kv groups of {g} query heads)"
        )
    whole_groups = [o for o in options if o[1] == g]
    return (heads, (whole_groups or options)[0][0])


def feasible_head_counts(teacher: ModelShape) -> list[int]:
    return sorted({kv * q for kv in range(1, teacher.kv_heads + 1)
                   for q in range(1, teacher.group_size + 1)})


def round_width(value: float, full: int, step: int) -> int:
    """Round a scaled width to a multiple of `step` (hardware-friendly), within [step, full]."""
    largest = full // step * step
    return int(min(largest, max(step, round(value / step) * step)))


def symmetric_shape(teacher: ModelShape, factor: float, fixed: dict[str, int],
                    multiple_of: int = 8) -> ModelShape:
    """Scale every width axis not in `fixed` by the same factor (MiniMA's symmetric shaping)."""
    values = dict(fixed)
    needs_divisible_hidden = teacher.model_type == "llama"
    if "heads" not in values and "kv_heads" not in values:
        wanted = teacher.heads * factor
        options = feasible_head_counts(teacher)
        if needs_divisible_hidden and "hidden" in values:
            options = [h for h in options if values["hidden"] % h == 0] or options
        values["heads"] = min(options, key=lambda h: (abs(h - wanted), -h))
    heads, kv_heads = split_heads(teacher, values.get("heads"), values.get("kv_heads"))
    if "hidden" not in values:
        step = multiple_of if teacher.hidden >= 4 * multiple_of else 1
        if needs_divisible_hidden:
            step = math.lcm(step, heads)
        values["hidden"] = round_width(teacher.hidden * factor, teacher.hidden, step)
    if "ffn" not in values:
        step = multiple_of if teacher.ffn >= 4 * multiple_of else 1
        values["ffn"] = round_width(teacher.ffn * factor, teacher.ffn, step)
    return teacher.replace(layers=values.get("layers", teacher.layers), hidden=values["hidden"],
                           heads=heads, kv_heads=kv_heads, ffn=values["ffn"])


def resolve_target(
    teacher: ModelShape,
    shape: dict[str, int] | None = None,
    params: int | None = None,
    ratio: float | None = None,
    multiple_of: int = 8,
) -> ModelShape:
    """The student shape from an explicit (partial) shape and/or a parameter budget.

    Axes named in `shape` are fixed; with `params` (or `ratio` = kept fraction of parameters)
    the remaining width axes are scaled together to land closest to the budget."""
    fixed = dict(shape or {})
    for axis, value in fixed.items():
        full = getattr(teacher, axis)
        if value <= 0:
            raise MinimaError(f"target {axis}={value} must be positive")
        if value > full:
            raise MinimaError(f"target {axis}={value} is larger than the model's {full}")
    if params is not None and ratio is not None:
        raise MinimaError("give --params or --ratio, not both")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MinimaError(f"--ratio {ratio} must be in (0, 1): the fraction of parameters kept")
        params = round(ratio * count_parameters(teacher))
    if params is None:
        heads, kv_heads = split_heads(teacher, fixed.get("heads"), fixed.get("kv_heads"))
        target = teacher.replace(**{**fixed, "heads": heads, "kv_heads": kv_heads})
        if problem := shape_problem(target):
            raise MinimaError(f"target {problem}")
        return target
    total = count_parameters(teacher)
    if params <= 0:
        raise MinimaError(f"target size {params} must be positive")
    if params >= total:
        raise MinimaError(
            f"target {format_count(params)} parameters is not smaller than the model "
            f"({format_count(total)})"
        )
    if {"hidden", "ffn"} <= fixed.keys() and fixed.keys() & {"heads", "kv_heads"}:
        raise MinimaError("--params/--ratio need at least one width axis left free in --shape")
    candidates = [symmetric_shape(teacher, i / 1000, fixed, multiple_of) for i in range(1, 1001)]
    candidates = [s for s in candidates if shape_problem(s) is None]
    if not candidates:
        raise MinimaError(f"no valid shape keeps the fixed axes {fixed}: "
                          f"{shape_problem(symmetric_shape(teacher, 0.5, fixed, multiple_of))}")
    best = min(candidates, key=lambda s: (abs(count_parameters(s) - params), count_parameters(s)))
    if count_parameters(best) > 1.5 * params:
        raise MinimaError(
            f"cannot reach {format_count(params)} parameters: the smallest shape of this form has "
            f"{format_count(count_parameters(best))} (fix fewer axes or prune layers)"
        )
    return best


def parameter_table(teacher: ModelShape, student: ModelShape) -> list[tuple[str, str, str, str]]:
    """Rows (axis, teacher, student, kept) for the dry-run and summary table."""
    rows = []
    for axis in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        t, s = getattr(teacher, axis), getattr(student, axis)
        rows.append((axis, str(t), str(s), f"{100 * s / t:.1f}%"))
    t, s = count_parameters(teacher), count_parameters(student)
    rows.append(("parameters", format_count(t), format_count(s), f"{100 * s / t:.1f}%"))
    return rows
