"""Per-GPU memory estimates of a training stage for `minima run --dry-run`; pure arithmetic.

Memory per GPU (N GPUs, student P and teacher T parameters; bf16: 2-byte weights and grads and
12 bytes of fp32 master weights + Adam moments; fp32: 4 + 4 + 8):
- ZeRO-2: weights replicated, grads and optimizer states partitioned: `2P + (2 + 12)P / N`;
  the teacher's bf16 weights replicated: `2T`.
- ZeRO-3: everything partitioned: `16P / N`, teacher `2T / N`.
- Activations of one micro-batch of b x s tokens (2 bytes a value), per layer and token
  `4h + 3q + 3kv + 4f` values (norm inputs/outputs, q/k/v before and after RoPE, the attention
  context, gate/up/act/product; q = heads x head_dim, kv = kv_heads x head_dim): all layers
  without gradient checkpointing; with it, each layer's input (h) plus one layer recomputed.
  Plus the logits: student logits, their gradient and the teacher's, `3 b s V`.
Not counted: the CUDA context and allocator fragmentation (~1-3 GB), communication buckets, the
teacher's transient activations (no grad, freed layer by layer).
"""

from __future__ import annotations

from typing import Any

from minima_cli.model.arch import ModelShape

# bytes per parameter: (weights, gradients, optimizer states incl. fp32 master weights)
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


def layer_activation_values(shape: ModelShape) -> int:
    """Values one decoder layer keeps per token for its backward pass (see the module doc)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 4 * shape.hidden + 3 * q + 3 * kv + 4 * shape.ffn


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: bool,
                     value_bytes: int = 2) -> int:
    """Activation memory of one micro-batch of the student, plus student and teacher logits."""
    tokens = micro_batch * seq_len
    layer = layer_activation_values(shape) * value_bytes
    if checkpointing:
        stored = tokens * (shape.layers * shape.hidden * value_bytes + layer)
    else:
        stored = tokens * shape.layers * layer
    return stored + 3 * tokens * shape.vocab * value_bytes


def zero_memory(*, student_params: int, teacher_params: int, world: int, zero_stage: int,
                precision: str, activations: int) -> dict[str, float]:
    """Per-GPU bytes of a distillation step under ZeRO-2 or ZeRO-3 (see the module doc)."""
    if zero_stage not in (2, 3):
        raise ValueError(f"ZeRO stage {zero_stage}: estimates cover stages 2 and 3")
    weights, grads, optimizer = STATE_BYTES[precision]
    if zero_stage == 2:
        states = weights * student_params + (grads + optimizer) * student_params / world
        teacher = weights * teacher_params
    else:
        states = (weights + grads + optimizer) * student_params / world
        teacher = weights * teacher_params / world
    return {"states": states, "teacher": teacher, "activations": float(activations),
            "total": states + teacher + activations}


def token_budget(config: Any, world: int) -> dict[str, int]:
    """Steps, tokens per optimizer step and total tokens of a training config on `world` GPUs."""
    steps = config.total_steps(world)
    per_step = config.tokens_per_step(world)
    return {"steps": steps, "tokens_per_step": per_step, "tokens": steps * per_step}


def gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"
