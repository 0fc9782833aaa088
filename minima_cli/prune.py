"""`minima prune`: structured pruning of a LLaMA-family model on five axes into a standard HF model.

Two pure steps, then I/O:
1. `resolve_target(teacher shape, --shape/--params/--ratio) -> student shape`
2. `plan_prune(scores, teacher shape, student shape, priority) -> PrunePlan` (kept indices per axis)
3. `prune_checkpoint(source, plan, out)`: stream every tensor through `slice_tensor` into new
   safetensors shards, write the shrunk config, copy the tokenizer.

The pruned model equals the teacher run with the plan's masks at 0 (see masks.py for the hidden
dim semantics), which the tests check on every axis.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from minima_cli.arch import (
    ModelShape,
    count_parameters,
    format_count,
    shape_from_config,
    shape_problem,
)
from minima_cli.checkpoint import (
    ModelSource,
    SafetensorsStreamWriter,
    TensorSpec,
    atomic_output_dir,
    check_output,
    copy_tokenizer_files,
    load_config,
    load_model,
    model_fingerprint,
    read_rows,
    read_safetensors_specs,
    resolve_model,
    write_manifest,
)
from minima_cli.errors import MinimaError
from minima_cli.masks import Masks
from minima_cli.progress import step_progress
from minima_cli.score import load_scores

PRIORITIES = ("local", "global")
LAYER_SELECTIONS = ("auto", "score", "units", "middle")
SHAPE_KEYS = {"layers": "layers", "hidden": "hidden", "heads": "heads", "kv-heads": "kv_heads",
              "kv_heads": "kv_heads", "ffn": "ffn"}


# --- targets -------------------------------------------------------------------------------------


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


SIZE_SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> int:
    """'3B' -> 3_000_000_000; '60M', '1.5e9', '135000000' also work."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KkMmBbGgTt]?)\s*", text)
    if not match:
        raise MinimaError(f"--params {text!r} is not a size like 3B, 60M or 1.5e9")
    return round(float(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()])


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


# --- plans ---------------------------------------------------------------------------------------


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


# --- tensors -------------------------------------------------------------------------------------

LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")
Index = torch.Tensor | None
Slices = tuple[str, Index, Index]


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).flatten()


class TensorRouter:
    """Where each teacher tensor goes: `route(name) -> (student name, kept rows, kept columns)`,
    or None to drop it. Index tensors are built once per plan, not once per tensor."""

    def __init__(self, plan: PrunePlan, tied: bool):
        self.tied = tied
        hidden = torch.tensor(plan.hidden)
        self.hidden = hidden
        self.layers: dict[int, tuple[int, dict[str, tuple[Index, Index]]]] = {}
        for i, layer in enumerate(plan.layers):
            heads = head_rows(plan.heads[i], plan.head_dim)
            groups = head_rows(plan.kv_groups[i], plan.head_dim)
            ffn = torch.tensor(plan.ffn[i])
            self.layers[layer] = (i, {
                "input_layernorm.weight": (hidden, None),
                "post_attention_layernorm.weight": (hidden, None),
                "self_attn.q_proj.weight": (heads, hidden),
                "self_attn.q_proj.bias": (heads, None),
                "self_attn.k_proj.weight": (groups, hidden),
                "self_attn.k_proj.bias": (groups, None),
                "self_attn.v_proj.weight": (groups, hidden),
                "self_attn.v_proj.bias": (groups, None),
                "self_attn.o_proj.weight": (hidden, heads),
                "self_attn.o_proj.bias": (hidden, None),
                "self_attn.q_norm.weight": (None, None),  # Qwen3: per head_dim, shared by heads
                "self_attn.k_norm.weight": (None, None),
                "mlp.gate_proj.weight": (ffn, hidden),
                "mlp.gate_proj.bias": (ffn, None),
                "mlp.up_proj.weight": (ffn, hidden),
                "mlp.up_proj.bias": (ffn, None),
                "mlp.down_proj.weight": (hidden, ffn),
                "mlp.down_proj.bias": (hidden, None),
            })

    def route(self, name: str) -> Slices | None:
        if name == "model.embed_tokens.weight":
            return name, None, self.hidden
        if name == "lm_head.weight":
            return None if self.tied else (name, None, self.hidden)
        if name == "model.norm.weight":
            return name, self.hidden, None
        if name.endswith("rotary_emb.inv_freq"):
            return None  # a buffer recomputed from the config
        match = LAYER_TENSOR.fullmatch(name)
        if match and int(match.group(1)) not in self.layers:
            return None  # a removed layer
        if match and match.group(2) in self.layers[int(match.group(1))][1]:
            i, slices = self.layers[int(match.group(1))]
            return (f"model.layers.{i}.{match.group(2)}", *slices[match.group(2)])
        raise MinimaError(f"unexpected tensor {name!r} for a LLaMA-family model")


def slice_tensor(tensor: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    if cols is not None:
        tensor = tensor.index_select(1, cols)
    return tensor.contiguous()


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9, 10] -> [(3, 3), (9, 2)]: maximal runs of consecutive row indices."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


CHUNK_BYTES = 32 << 20


def sliced_chunks(read_rows: Any, spec: TensorSpec, rows: Index, cols: Index,
                  chunk_bytes: int | None = None) -> Iterator[torch.Tensor]:
    """The student tensor in row chunks of at most ~chunk_bytes read: only kept rows are read,
    then the kept columns selected, so memory stays bounded by a chunk, not the tensor."""
    if len(spec.shape) < 2:
        yield slice_tensor(read_rows(spec, [(0, spec.shape[0] if spec.shape else 1)]), rows, cols)
        return
    kept = rows.tolist() if rows is not None else range(spec.shape[0])
    row_bytes = max(1, spec.nbytes // spec.shape[0])
    per_chunk = max(1, (chunk_bytes or CHUNK_BYTES) // row_bytes)
    for begin in range(0, len(kept), per_chunk):
        chunk = read_rows(spec, row_runs(kept[begin:begin + per_chunk]))
        yield chunk.index_select(1, cols) if cols is not None else chunk


def student_spec(spec: TensorSpec, where: Slices) -> TensorSpec:
    name, rows, cols = where
    shape = list(spec.shape)
    if rows is not None:
        shape[0] = len(rows)
    if cols is not None:
        shape[1] = len(cols)
    return TensorSpec(name, tuple(shape), spec.dtype)


# --- checkpoints ---------------------------------------------------------------------------------


def student_config(config: Any, plan: PrunePlan, teacher: ModelShape) -> Any:
    student = copy.deepcopy(config)
    shape = plan.student_shape(teacher)
    student.num_hidden_layers = shape.layers
    student.hidden_size = shape.hidden
    student.num_attention_heads = shape.heads
    student.num_key_value_heads = shape.kv_heads
    student.intermediate_size = shape.ffn
    student.head_dim = teacher.head_dim  # no longer hidden // heads in general
    if getattr(student, "layer_types", None):
        student.layer_types = [config.layer_types[i] for i in plan.layers]
    if getattr(student, "max_window_layers", None) is not None:
        student.max_window_layers = sum(1 for i in plan.layers if i < config.max_window_layers)
    if hasattr(student, "quantization_config"):  # a GGUF teacher was dequantized
        del student.quantization_config
    return student


def tensor_sources(source: ModelSource) -> Iterator[tuple[str, list[TensorSpec], Any]]:
    """(shard file name, tensor specs in file order, tensor reader) per shard. Safetensors shards
    are read tensor by tensor with plain reads; a GGUF model is dequantized into memory once."""
    if source.is_gguf:
        state = load_model(source).state_dict()
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]

        def rows_in_memory(spec: TensorSpec, runs: list[tuple[int, int]]) -> torch.Tensor:
            tensor = state[spec.name].reshape(spec.shape or (1,))
            return torch.cat([tensor[start:start + count] for start, count in runs])

        yield "model.safetensors", specs, rows_in_memory
        return
    for path in source.weight_files:
        with path.open("rb", buffering=0) as handle:
            yield path.name, read_safetensors_specs(path), partial(read_rows, handle)


def prune_checkpoint(
    source: ModelSource, config: Any, plan: PrunePlan, teacher: ModelShape, out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the pruned model into `out` (an empty dir): config, shards, index, tokenizer.
    Each finished shard is fsynced in a background thread while the next one is sliced."""
    student = student_config(config, plan, teacher)
    if not getattr(student, "architectures", None):
        student.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    student.save_pretrained(out)
    router = TensorRouter(plan, teacher.tied)
    weight_map, total_bytes, largest = {}, 0, 0
    n_tensors = None if source.is_gguf else sum(
        len(read_safetensors_specs(p)) for p in source.weight_files)
    with ThreadPoolExecutor(max_workers=1) as closer, \
            step_progress("prune", n_tensors, enabled=progress, tokens=False) as bar:
        closing = []
        for file_name, specs, read in tensor_sources(source):
            routes = [(spec, router.route(spec.name)) for spec in specs]
            kept = [(spec, where) for spec, where in routes if where is not None]
            bar.update(len(specs) - len(kept))
            if not kept:
                continue
            out_specs = [student_spec(spec, where) for spec, where in kept]
            writer = SafetensorsStreamWriter(out / file_name, out_specs)
            for spec, (name, rows, cols) in kept:
                largest = max(largest, spec.nbytes)
                writer.write_chunks(name, sliced_chunks(read, spec, rows, cols))
                bar.update()
            closing.append(closer.submit(writer.close))
            weight_map.update({s.name: file_name for s in out_specs})
            total_bytes += sum(s.nbytes for s in out_specs)
        for future in closing:
            future.result()
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_tokenizer_files(source, out)
    if not (out / "generation_config.json").exists():  # a GGUF carries none as a file
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(student).save_pretrained(out)
    return {"bytes_written": total_bytes, "largest_tensor_bytes": largest}


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


def parameter_table(teacher: ModelShape, student: ModelShape) -> list[tuple[str, str, str, str]]:
    """Rows (axis, teacher, student, kept) for the dry-run and summary table."""
    rows = []
    for axis in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        t, s = getattr(teacher, axis), getattr(student, axis)
        rows.append((axis, str(t), str(s), f"{100 * s / t:.1f}%"))
    t, s = count_parameters(teacher), count_parameters(student)
    rows.append(("parameters", format_count(t), format_count(s), f"{100 * s / t:.1f}%"))
    return rows


def run_prune(
    *,
    model_path: str,
    output: Path | None,
    scores_path: str | None,
    shape: str | None = None,
    params: str | None = None,
    ratio: float | None = None,
    priority: str = "local",
    layer_selection: str = "auto",
    multiple_of: int = 8,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Resolve the target, plan from the scores and (unless dry_run) write the pruned model."""
    if shape is None and params is None and ratio is None:
        raise MinimaError("give a target: --shape, --params or --ratio")
    if multiple_of <= 0:
        raise MinimaError(f"--multiple-of must be positive, got {multiple_of}")
    if not dry_run:
        if output is None:
            raise MinimaError("--output is required (or pass --dry-run)")
        if scores_path is None:
            raise MinimaError("--scores is required (run `minima score` first)")
        check_output(output, force)
    source = resolve_model(model_path)
    scored = load_scores(scores_path) if scores_path is not None else None  # before slow loads
    config = load_config(source)
    teacher = shape_from_config(config)
    target = resolve_target(teacher, parse_shape(shape) if shape else None,
                            parse_size(params) if params is not None else None, ratio, multiple_of)
    result: dict[str, Any] = {"teacher_shape": teacher.as_dict(), "student_shape": target.as_dict(),
                              "table": parameter_table(teacher, target)}
    if scored is None:
        return result  # a dry run without scores: the shape alone
    scores, score_manifest = scored
    check_scores_match(scores, score_manifest, source, teacher)
    plan = plan_prune(scores, teacher, target, priority, layer_selection)
    result["plan"] = plan.as_dict()
    if dry_run:
        return result
    start = time.perf_counter()
    with atomic_output_dir(output, force=force) as tmp:
        stats = prune_checkpoint(source, config, plan, teacher, tmp, progress)
        seconds = time.perf_counter() - start
        write_manifest(
            tmp, "prune",
            inputs={"model": {"path": str(source), "fingerprint": model_fingerprint(source)},
                    "scores": {"path": str(scores_path),
                               "method": score_manifest.get("config", {}).get("method")}},
            config={"shape": shape, "params": params, "ratio": ratio, "priority": priority,
                    "layer_selection": plan.notes["layer_selection"], "multiple_of": multiple_of},
            teacher_shape=teacher.as_dict(), student_shape=target.as_dict(),
            metrics={"teacher_parameters": count_parameters(teacher),
                     "student_parameters": count_parameters(target),
                     "kept_fraction": count_parameters(target) / count_parameters(teacher),
                     **stats},
            kept=plan.as_dict(), wall_time_s=seconds,
        )
    result["wall_time_s"] = seconds
    return result
