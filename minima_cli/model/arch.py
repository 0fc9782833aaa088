"""LLaMA-family architecture access: which models minima supports, their shape, parameter counts.

Everything here is pure (configs and numbers in, numbers out) except the small module accessors
at the bottom, which only walk an already-built `transformers` model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from minima_cli.errors import MinimaError

# model_type -> which projections carry biases and whether q/k have a per-head RMSNorm.
# All four share LLaMA's layout: model.embed_tokens, model.layers[i].{input_layernorm,
# self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """The five prunable axes of a LLaMA-family model, plus what parameter counting needs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 for plain multi-head attention)."""
        return self.heads // self.kv_heads

    def replace(self, **changes: Any) -> ModelShape:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_supported(config: Any) -> None:
    """Raise a one-line MinimaError unless `config` is a LLaMA-family causal LM minima can prune."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MinimaError(
            f"unsupported architecture {model_type!r}: minima handles LLaMA-family models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise MinimaError(
            f"config has {config.num_attention_heads} attention heads, not a multiple of "
            f"{config.num_key_value_heads} kv heads"
        )


# The fields every supported config.json must hold as positive integers; transformers would
# silently default a missing one (hidden_size 4096) and then fail on the weights with a long
# load report, so they are checked on the raw JSON first.
REQUIRED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "vocab_size")


def config_problem(raw: dict[str, Any]) -> str | None:
    """Why a raw config.json cannot describe a supported model, or None. Pure: the dict only."""
    if not isinstance(raw, dict):
        return "config.json is not a JSON object"
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        return (f"unsupported architecture {model_type!r}: minima handles LLaMA-family models "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    for name in (*REQUIRED_CONFIG_FIELDS, "num_key_value_heads", "head_dim"):
        value = raw.get(name)
        if value is None and name in ("num_key_value_heads", "head_dim"):
            continue  # optional: kv heads default to heads, head_dim to hidden / heads
        if value is None:
            return f"config.json has no {name}"
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"config.json: {name} must be a positive integer, got {value!r}"
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        return (f"config.json: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}")
    # transformers' LlamaConfig insists on hidden % heads == 0 even with an explicit head_dim;
    # the others only need it when head_dim is derived from hidden / heads
    if hidden % heads and (raw.get("model_type") == "llama" or raw.get("head_dim") is None):
        return f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
    return None


def shape_from_config(config: Any) -> ModelShape:
    """Read the prunable shape (and bias layout) of a supported config."""
    check_supported(config)
    model_type = config.model_type
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    if model_type == "qwen2":  # Qwen2 hard-codes biases on q/k/v and none on o_proj
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = attention_bias
    return ModelShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        ffn=config.intermediate_size,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        model_type=model_type,
    )


def shape_problem(shape: ModelShape) -> str | None:
    """Why transformers would refuse a config of this shape, or None. LlamaConfig (5.x) insists
    on hidden % heads == 0 even with an explicit head_dim; the others do not."""
    if shape.heads % shape.kv_heads:
        return f"heads={shape.heads} is not a multiple of kv-heads={shape.kv_heads}"
    if shape.model_type == "llama" and shape.hidden % shape.heads:
        return (f"hidden={shape.hidden} is not a multiple of heads={shape.heads}, which "
                "transformers' LlamaConfig requires")
    return None


def count_parameters(shape: ModelShape) -> int:
    """Exact parameter count of a LLaMA-family model of this shape (tied weights counted once)."""
    d, hd = shape.hidden, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    attention = d * q + 2 * d * kv + q * d
    if shape.qkv_bias:
        attention += q + 2 * kv
    if shape.o_bias:
        attention += d
    if shape.qk_norm:
        attention += 2 * hd
    mlp = 3 * d * shape.ffn + (2 * shape.ffn + d if shape.mlp_bias else 0)
    per_layer = attention + mlp + 2 * d  # two RMSNorms
    embeddings = shape.vocab * d * (1 if shape.tied else 2)
    return embeddings + shape.layers * per_layer + d  # final norm


def expected_tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shapes a few tensors of a checkpoint of this shape must have (embeddings, the first
    layer's q and gate projections): enough to catch a config.json that does not describe its
    weights before transformers builds the model."""
    return {
        "model.embed_tokens.weight": (shape.vocab, shape.hidden),
        "model.layers.0.self_attn.q_proj.weight": (shape.heads * shape.head_dim, shape.hidden),
        "model.layers.0.self_attn.k_proj.weight": (shape.kv_heads * shape.head_dim, shape.hidden),
        "model.layers.0.mlp.gate_proj.weight": (shape.ffn, shape.hidden),
    }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def residual_norms(model: nn.Module) -> list[nn.Module]:
    """Every RMSNorm that reads the residual stream (not Qwen3's per-head q/k norms)."""
    norms = []
    for layer in decoder_layers(model):
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return [*norms, model.model.norm]


def plain_output_head(model: nn.Module) -> torch.Tensor | None:
    """The lm_head weight when the logits are exactly `final hidden @ weight^T` (a bias-free
    Linear: the LLaMA family), else None."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    return None
