"""Which units survive a prune: `plan_prune(scores, teacher shape, student shape, priority,
layer_selection) -> PrunePlan` (kept teacher indices per axis, the same width in every kept
layer), `plan_masks` (a plan as 0/1 masks on the teacher) and the check that scores belong to the
model. The plan's on-disk form: docs/formats.md; why slicing by a plan equals the masked
teacher: docs/masks.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape
from minima_cli.model.checkpoint import ModelSource, model_fingerprint
from minima_cli.model.masks import Masks

PRIORITIES = ("local", "global")


LAYER_SELECTIONS = ("auto", "score", "units", "middle")


@dataclass
class PrunePlan:
    """Kept teacher indices per axis; every list ascending (heads grouped by kept kv group)."""

    layers: list[int]
    hidden: list[int]
    kv_groups: list[list[int]]  # per kept layer
    heads: list[list[int]]  # per kept layer
    ffn: list[list[int]]  # per kept layer
    head_dim: int
    notes: dict[str, Any] = field(default_factory=dict)

    def student_shape(self, teacher: ModelShape) -> ModelShape:
        return teacher.replace(layers=len(self.layers), hidden=len(self.hidden),
                               heads=len(self.heads[0]), kv_heads=len(self.kv_groups[0]),
                               ffn=len(self.ffn[0]))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kept_problem(kept: Any, teacher: ModelShape) -> str | None:
    """Why a prune manifest's `kept` (PrunePlan.as_dict, possibly hand-edited) is not a plan of
    `teacher`, or None: every index list ascending, without repeats, inside the teacher's axis.
    Pure; distill reads `layers` and `hidden` from it to map hidden states."""
    if not isinstance(kept, dict):
        return "'kept' is not an object"

    def bad(indices: Any, size: int) -> bool:
        return (not isinstance(indices, list) or not indices
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
                or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= size)

    for axis, size in (("layers", teacher.layers), ("hidden", teacher.hidden)):
        if bad(kept.get(axis), size):
            return (f"kept {axis} must be ascending distinct indices in [0, {size}), got "
                    f"{str(kept.get(axis))[:60]}")
    for axis, size in (("kv_groups", teacher.kv_heads), ("heads", teacher.heads),
                       ("ffn", teacher.ffn)):
        per_layer = kept.get(axis)
        if per_layer is None:
            continue
        if not isinstance(per_layer, list) or len(per_layer) != len(kept["layers"]) or any(
                bad(indices, size) for indices in per_layer):
            return (f"kept {axis} must hold, per kept layer, ascending distinct indices in "
                    f"[0, {size})")
    return None


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending (ties keep the lower index)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def select_layers(
    n_keep: int, selection: str, layer_scores: torch.Tensor, unit_survival: torch.Tensor
) -> list[int]:
    """Which layers survive: by layer-mask score, by globally surviving units, or MiniMA's rule
    of keeping the middle (drop the same number from the front and the back)."""
    n_layers = len(layer_scores)
    if selection == "middle":
        front = (n_layers - n_keep) // 2
        return list(range(front, front + n_keep))
    chosen = layer_scores if selection == "score" else unit_survival
    return top_k(chosen, n_keep)


def global_unit_survival(
    scores: dict[str, torch.Tensor], teacher: ModelShape, target: ModelShape
) -> torch.Tensor:
    """Fraction of each layer's prunable parameters that survive when heads and neurons compete
    across all layers by normalised score, with the student's total budget of each."""
    L, d, hd = teacher.layers, teacher.hidden, teacher.head_dim
    head_params = 2 * d * hd + 2 * d * hd / teacher.group_size  # q, o and its kv share
    neuron_params = 3 * d
    kept = torch.zeros(L)
    for axis, budget, unit_params in (("heads", target.heads, head_params),
                                      ("ffn", target.ffn, neuron_params)):
        flat = scores[axis].flatten()
        winners = torch.tensor(top_k(flat, budget * target.layers), dtype=torch.long)
        per_layer = torch.bincount(winners // scores[axis].shape[1], minlength=L)
        kept += per_layer.float() * unit_params
    return kept / (teacher.heads * head_params + teacher.ffn * neuron_params)


def plan_prune(
    scores: dict[str, torch.Tensor],
    teacher: ModelShape,
    target: ModelShape,
    priority: str = "local",
    layer_selection: str = "auto",
) -> PrunePlan:
    """Choose the kept units. Widths are uniform across layers (a standard HF config needs it):
    `local` ranks units inside each layer; `global` lets heads and neurons compete across layers
    by normalised score, which decides which layers go (those with the fewest survivors), and
    then each kept layer keeps its own top units."""
    if priority not in PRIORITIES:
        raise MinimaError(f"unknown priority {priority!r}: choose local or global")
    if layer_selection not in LAYER_SELECTIONS:
        raise MinimaError(f"unknown layer selection {layer_selection!r}: "
                          f"choose {', '.join(LAYER_SELECTIONS)}")
    if layer_selection == "auto":
        layer_selection = "units" if priority == "global" else "score"
    survival = global_unit_survival(scores, teacher, target)
    layers = select_layers(target.layers, layer_selection, scores["layers"], survival)
    g_kept = target.heads // target.kv_heads
    kv_groups, heads, ffn = [], [], []
    for layer in layers:
        groups = top_k(scores["kv_groups"][layer], target.kv_heads)
        kept_heads = []
        for group in groups:
            members = torch.arange(group * teacher.group_size, (group + 1) * teacher.group_size)
            kept_heads += members[top_k(scores["heads"][layer, members], g_kept)].tolist()
        kv_groups.append(groups)
        heads.append(kept_heads)
        ffn.append(top_k(scores["ffn"][layer], target.ffn))
    notes = {"priority": priority, "layer_selection": layer_selection,
             "global_unit_survival": [round(v, 4) for v in survival.tolist()]}
    return PrunePlan(layers=layers, hidden=top_k(scores["hidden"], target.hidden),
                     kv_groups=kv_groups, heads=heads, ffn=ffn, head_dim=teacher.head_dim,
                     notes=notes)


def plan_masks(plan: PrunePlan, teacher: ModelShape) -> Masks:
    """The 0/1 masks under which the teacher computes exactly what the pruned model computes."""
    masks = Masks.ones(teacher)
    masks.hidden.zero_()[plan.hidden] = 1
    masks.layers.zero_()[plan.layers] = 1
    for layer, groups, heads, neurons in zip(plan.layers, plan.kv_groups, plan.heads, plan.ffn,
                                             strict=True):
        masks.kv_groups[layer].zero_()[groups] = 1
        masks.heads[layer].zero_()[heads] = 1
        masks.ffn[layer].zero_()[neurons] = 1
    return masks


def check_scores_match(scores: dict[str, torch.Tensor], manifest: dict[str, Any],
                       source: ModelSource, teacher: ModelShape) -> None:
    expected = manifest.get("inputs", {}).get("model", {}).get("fingerprint")
    actual = model_fingerprint(source)
    if expected != actual:
        scored = manifest.get("inputs", {}).get("model", {}).get("path", "?")
        raise MinimaError(f"the scores belong to another model ({scored}), not {source}")
    want = Masks.ones(teacher).as_dict()
    for axis, mask in want.items():
        if axis not in scores or scores[axis].shape != mask.shape:
            raise MinimaError(f"scores for {axis} do not match the model's shape")
