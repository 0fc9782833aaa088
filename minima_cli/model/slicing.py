"""Write a pruned checkpoint: route every teacher tensor through a `PrunePlan` (`TensorRouter`:
student name, kept rows, kept columns), read only the kept rows, and stream the result into new
safetensors shards with the shrunk config and the tokenizer files, so memory stays near one
chunk of the largest tensor. The result equals the teacher run with the plan's masks at 0
(docs/masks.md), which tests/test_prune.py checks on every axis.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape
from minima_cli.model.checkpoint import ModelSource, copy_tokenizer_files, load_model
from minima_cli.model.selection import PrunePlan
from minima_cli.model.tensors import (
    SafetensorsStreamWriter,
    TensorSpec,
    read_rows,
    read_safetensors_specs,
)
from minima_cli.progress import step_progress

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
