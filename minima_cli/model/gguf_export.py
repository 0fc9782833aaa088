"""A LLaMA-family checkpoint as one GGUF file in llama.cpp's `llama` layout.

`plan_export(source, encoding)` does every check that needs no weights: the architecture (no
biases, no q/k norms, no sliding window, SiLU, RoPE without a scaling llama.cpp's llama cannot
express), the tokenizer (byte-level BPE with a pre-tokenizer llama.cpp names), the tensor list
and each tensor's encoding. `write_gguf(plan, source, path)` then streams the tensors, one at a
time from the safetensors files (a GGUF source is dequantized by minima's loader first), through
the q/k row permutation and the encoding, into the file with gguf's GGUFWriter.

What the file holds (docs/formats.md, "GGUF"):
- `llama.*`: block count, context length, embedding and FFN widths, head counts, key/value
  length and RoPE dimension (= head_dim, so pruned shapes with hidden != heads * head_dim load),
  RoPE base and scaling (linear as metadata, llama3 as the `rope_freqs` tensor, as llama.cpp's
  converter), RMS eps, vocab size;
- `tokenizer.ggml.*`: model `gpt2`, pre-tokenizer, tokens, token types, merges, bos/eos/unk/pad
  ids, add_bos/add_eos, and `tokenizer.chat_template` (a GGUF source's tokenizer keys are copied);
- `minima.*`: the source's fingerprint (model.checkpoint.model_fingerprint), its name, the
  encoding and minima's version.

Encodings: 1-D tensors (norms, rope_freqs) stay f32 as llama.cpp keeps them; 2-D tensors take
the chosen encoding, except that q8_0/q4_0 fall back to f16 on rows that are not a multiple of 32
(as llama.cpp's converter does) and q4_0 keeps the output projection (the embedding matrix when
tied) in q8_0, the way llama-quantize keeps it in a higher-precision type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima_cli import __version__
from minima_cli.errors import MinimaError
from minima_cli.model.checkpoint import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
)
from minima_cli.model.quantize import can_encode, encode, encoded_bytes
from minima_cli.model.tensors import TensorSpec, read_rows, read_safetensors_specs
from minima_cli.progress import step_progress

ENCODINGS = ("f32", "f16", "bf16", "q8_0", "q4_0")

# llama.cpp's token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# the pre-tokenizer regex of Llama 3's tokenizer.json (llama.cpp's "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# HF parameter name (layer i as {i}) -> GGUF tensor name; the llama layout, nothing else
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# buffers some checkpoints carry that the GGUF has no use for
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str  # "" for a tensor computed here (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]  # torch order: rows first, the row (GGUF's ne[0]) last
    encoding: str
    permute_heads: int = 0  # q/k: the head count of llama.cpp's row permutation, else 0

    @property
    def nbytes(self) -> int:
        return encoded_bytes(self.shape, self.encoding)


@dataclass
class ExportPlan:
    encoding: str
    config: Any
    metadata: list[tuple[str, Any, Any, Any]]  # (key, value, GGUFValueType, array sub-type)
    tensors: list[TensorPlan]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # gguf name -> computed tensor
    # safetensors name -> (file, spec), read once (empty for a GGUF source)
    specs: dict[str, tuple[Path, TensorSpec]] = field(default_factory=dict)

    @property
    def file_type(self) -> int:
        import gguf

        return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[self.encoding]


# --- pure pieces ---------------------------------------------------------------------------------


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: HF rotates the two halves of each head's dims (rotate_half),
    llama.cpp rotates adjacent pairs (GPT-J style), so each head's rows [0..d/2) and [d/2..d) are
    interleaved: row 2i <- i, row 2i+1 <- d/2 + i (convert_hf_to_gguf.py's `permute`)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_rows (what a GGUF reader does to get HF's order back)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_settings(config: Any) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling parameters with `rope_type`) from a transformers 5 config
    (`rope_parameters`) or an older one (`rope_theta`, `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)) or 10000.0
    merged = {**scaling, **params}
    merged["rope_type"] = merged.get("rope_type", merged.get("type", "default"))
    return float(theta), merged


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def export_problem(config: Any) -> str | None:
    """Why llama.cpp's `llama` layout cannot express this model, or None."""
    kind = getattr(config, "model_type", None)
    if kind == "qwen2":
        return ("qwen2 has q/k/v biases, which the GGUF llama layout has no tensors for (minima "
                "exports llama and mistral models)")
    if kind == "qwen3":
        return ("qwen3 normalises q and k per head (q_norm/k_norm), which the GGUF llama layout "
                "cannot express (minima exports llama and mistral models)")
    if kind not in ("llama", "mistral"):
        return f"unsupported architecture {kind!r}: minima exports llama and mistral models"
    if getattr(config, "attention_bias", False):
        return "attention biases (attention_bias: true) have no place in the GGUF llama layout"
    if getattr(config, "mlp_bias", False):
        return "MLP biases (mlp_bias: true) have no place in the GGUF llama layout"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return (f"sliding-window attention (sliding_window: {window}) is not part of the GGUF "
                "llama layout")
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}: the GGUF llama layout uses SiLU"
    if head_dim_of(config) % 2:
        return f"head_dim {head_dim_of(config)} is odd; RoPE needs an even head size"
    _, rope = rope_settings(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        return (f"RoPE scaling {rope['rope_type']!r}: minima writes default, linear and llama3 "
                "RoPE only")
    return None


def llama3_rope_factors(theta: float, head_dim: int, rope: dict[str, Any]) -> torch.Tensor:
    """Per frequency the divisor of Llama 3's RoPE scaling, as llama.cpp's `rope_freqs` tensor."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def tensor_encoding(gguf_name: str, shape: tuple[int, ...], encoding: str, tied: bool) -> str:
    """The encoding of one tensor under the chosen one (see the module docstring)."""
    if len(shape) < 2:
        return "f32"
    if encoding == "q4_0" and (gguf_name == "output.weight"
                               or (tied and gguf_name == "token_embd.weight")):
        encoding = "q8_0"
    if encoding in ("q8_0", "q4_0") and not can_encode(shape, encoding):
        return "f16"
    return encoding


def expected_tensors(config: Any, encoding: str) -> list[TensorPlan]:
    """Every tensor of the llama layout for this config, in llama.cpp's order."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd, ffn, vocab = head_dim_of(config), config.intermediate_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shapes = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (heads * hd, d),
              "self_attn.k_proj.weight": (kv * hd, d), "self_attn.v_proj.weight": (kv * hd, d),
              "self_attn.o_proj.weight": (d, heads * hd), "post_attention_layernorm.weight": (d,),
              "mlp.gate_proj.weight": (ffn, d), "mlp.up_proj.weight": (ffn, d),
              "mlp.down_proj.weight": (d, ffn)}
    entries = [("model.embed_tokens.weight", "token_embd.weight", (vocab, d), 0)]
    for i in range(config.num_hidden_layers):
        for suffix, name in LAYER_TENSORS.items():
            permute = heads if "q_proj" in suffix else kv if "k_proj" in suffix else 0
            entries.append((f"model.layers.{i}.{suffix}", f"blk.{i}.{name}", shapes[suffix],
                            permute))
    entries.append(("model.norm.weight", "output_norm.weight", (d,), 0))
    if not tied:
        entries.append(("lm_head.weight", "output.weight", (vocab, d), 0))
    return [TensorPlan(hf, name, shape, tensor_encoding(name, shape, encoding, tied), permute)
            for hf, name, shape, permute in entries]


def llama_metadata(config: Any, name: str) -> list[tuple[str, Any, str]]:
    """(key, value, kind) of the architecture keys; kind is u32, f32, str or bool."""
    hd = head_dim_of(config)
    theta, rope = rope_settings(config)
    entries = [
        ("general.name", name, "str"),
        ("llama.block_count", config.num_hidden_layers, "u32"),
        ("llama.context_length", config.max_position_embeddings, "u32"),
        ("llama.embedding_length", config.hidden_size, "u32"),
        ("llama.feed_forward_length", config.intermediate_size, "u32"),
        ("llama.attention.head_count", config.num_attention_heads, "u32"),
        ("llama.attention.head_count_kv", config.num_key_value_heads, "u32"),
        ("llama.attention.key_length", hd, "u32"),
        ("llama.attention.value_length", hd, "u32"),
        ("llama.rope.dimension_count", hd, "u32"),
        ("llama.rope.freq_base", theta, "f32"),
        ("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps, "f32"),
        ("llama.vocab_size", config.vocab_size, "u32"),
    ]
    if rope["rope_type"] == "linear":
        entries += [("llama.rope.scaling.type", "linear", "str"),
                    ("llama.rope.scaling.factor", float(rope["factor"]), "f32")]
    return entries


def pre_tokenizer_name(pre: Any) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it has none."""
    def byte_level(p: Any, regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel"
                and bool(p.get("use_regex", True)) == regex and not p.get("add_prefix_space"))

    if byte_level(pre, True):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits"
                and parts[0].get("individual_digits") and byte_level(parts[1], True)):
            return "smollm"
        if (len(parts) == 2 and parts[0].get("type") == "Split"
                and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
                and byte_level(parts[1], False)):
            return "llama-bpe"
    return None


def describe(pre: Any) -> str:
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        return "Sequence[" + ", ".join(describe(p) for p in pre.get("pretokenizers", [])) + "]"
    return pre.get("type", "?") if isinstance(pre, dict) else str(pre)


def bpe_vocabulary(tokenizer_json: dict[str, Any], vocab_size: int
                   ) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer.json, padded to the model's
    vocabulary with `[PAD<i>]` (type UNUSED) as llama.cpp's converter pads it."""
    model = tokenizer_json["model"]
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    for token, index in model["vocab"].items():
        if index >= vocab_size:
            raise MinimaError(f"tokenizer token {token!r} has id {index}, beyond the model's "
                              f"{vocab_size} embedding rows")
        tokens[index] = token
    for added in tokenizer_json.get("added_tokens", []):
        index = added["id"]
        if index >= vocab_size:
            raise MinimaError(f"tokenizer token {added['content']!r} has id {index}, beyond the "
                              f"model's {vocab_size} embedding rows")
        tokens[index] = added["content"]
        types[index] = CONTROL if added.get("special") else USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], types[index] = f"[PAD{index}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges  # type: ignore[return-value]


def hf_tokenizer_metadata(tokenizer: Any, vocab_size: int) -> list[tuple[str, Any, str]]:
    """The `tokenizer.*` keys of a byte-level BPE transformers tokenizer; one-line errors for
    tokenizers llama.cpp would split differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MinimaError("the tokenizer has no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MinimaError(f"tokenizer is {model.get('type')}"
                          f"{' with byte fallback' if model.get('byte_fallback') else ''}, not "
                          "byte-level BPE: minima exports byte-level BPE tokenizers only "
                          "(SentencePiece is not supported)")
    if spec.get("normalizer") is not None:
        raise MinimaError(f"tokenizer has a normalizer ({describe(spec['normalizer'])}) that "
                          "llama.cpp's byte-level BPE does not apply")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise MinimaError(f"tokenizer pre-tokenizer {describe(spec.get('pre_tokenizer'))} has "
                          "no llama.cpp equivalent minima knows (gpt-2, smollm, llama-bpe)")
    tokens, types, merges = bpe_vocabulary(spec, vocab_size)
    entries: list[tuple[str, Any, str]] = [
        ("tokenizer.ggml.model", "gpt2", "str"),
        ("tokenizer.ggml.pre", pre, "str"),
        ("tokenizer.ggml.tokens", tokens, "str[]"),
        ("tokenizer.ggml.token_type", types, "i32[]"),
        ("tokenizer.ggml.merges", merges, "str[]"),
    ]
    for key, attribute in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                           ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        index = getattr(tokenizer, attribute, None)
        if index is not None:
            entries.append((f"tokenizer.ggml.{key}_token_id", int(index), "u32"))
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(with_special) > len(plain) and bos is not None and with_special[0] == bos
    add_eos = len(with_special) > len(plain) and eos is not None and with_special[-1] == eos
    entries += [("tokenizer.ggml.add_bos_token", add_bos, "bool"),
                ("tokenizer.ggml.add_eos_token", add_eos, "bool")]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        entries.append(("tokenizer.chat_template", template, "str"))
    return entries


def gguf_tokenizer_metadata(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """A GGUF source's `tokenizer.*` keys as they are (value, type, array sub-type)."""
    import gguf

    reader = gguf.GGUFReader(path)
    entries = []
    for key, item in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = item.types[-1] if item.types[0] == gguf.GGUFValueType.ARRAY else None
            entries.append((key, item.contents(), item.types[0], sub))
    return entries


def typed(entries: list[tuple[str, Any, str]]) -> list[tuple[str, Any, Any, Any]]:
    import gguf

    t = gguf.GGUFValueType
    kinds = {"u32": (t.UINT32, None), "f32": (t.FLOAT32, None), "str": (t.STRING, None),
             "bool": (t.BOOL, None), "str[]": (t.ARRAY, t.STRING), "i32[]": (t.ARRAY, t.INT32)}
    return [(key, value, *kinds[kind]) for key, value, kind in entries]


# --- plan and write ------------------------------------------------------------------------------


def plan_export(source: ModelSource, encoding: str) -> ExportPlan:
    """Every check that needs no weights, and what will be written."""
    if encoding not in ENCODINGS:
        raise MinimaError(f"unknown type {encoding!r}: one of {', '.join(ENCODINGS)}")
    config = load_config(source)
    problem = export_problem(config)
    if problem:
        raise MinimaError(f"cannot export {source}: {problem}")
    tensors = expected_tensors(config, encoding)
    specs = {} if source.is_gguf else check_safetensors(source, tensors)
    if source.is_gguf:
        tokenizer = gguf_tokenizer_metadata(source.directory / source.gguf_file)
    else:
        tokenizer = typed(hf_tokenizer_metadata(load_tokenizer(source), config.vocab_size))
    name = source.gguf_file.removesuffix(".gguf") if source.is_gguf else source.directory.name
    metadata = typed(llama_metadata(config, name)) + tokenizer + typed([
        ("minima.source.fingerprint", model_fingerprint(source), "str"),
        ("minima.source.name", name, "str"),
        ("minima.type", encoding, "str"),
        ("minima.version", __version__, "str"),
    ])
    extra = {}
    theta, rope = rope_settings(config)
    if rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(theta, head_dim_of(config), rope)
        extra["rope_freqs.weight"] = factors
        tensors.insert(0, TensorPlan("", "rope_freqs.weight", tuple(factors.shape), "f32"))
    return ExportPlan(encoding, config, metadata, tensors, extra, specs)


def check_safetensors(source: ModelSource, tensors: list[TensorPlan]
                      ) -> dict[str, tuple[Path, TensorSpec]]:
    """The checkpoint's tensors are exactly the llama layout's (a tied lm_head may be stored);
    returns where each one is."""
    wanted = {t.hf_name: t for t in tensors}
    specs = {spec.name: (path, spec) for path in source.weight_files
             for spec in read_safetensors_specs(path)}
    for name, (_, spec) in specs.items():
        shape = spec.shape
        if name in wanted:
            if tuple(shape) != wanted[name].shape:
                raise MinimaError(f"{source}: tensor {name} has shape {list(shape)}, the config "
                                  f"says {list(wanted[name].shape)}")
        elif name != "lm_head.weight" and not name.endswith(IGNORED_SUFFIXES):
            raise MinimaError(f"cannot export {source}: tensor {name} has no place in the GGUF "
                              "llama layout")
    missing = [name for name in wanted if name not in specs]
    if missing:
        raise MinimaError(f"{source}: tensor {missing[0]} is missing")
    return specs


def source_tensors(source: ModelSource, plan: ExportPlan) -> Iterator[torch.Tensor]:
    """The plan's tensors in plan order, one at a time: safetensors are read tensor by tensor
    (`preadv`, nothing else held); a GGUF source is dequantized by minima's loader first."""
    if source.is_gguf:
        state = load_model(source, dtype=torch.float32).state_dict()
        for item in plan.tensors:
            yield plan.extra[item.gguf_name] if not item.hf_name else state.pop(item.hf_name)
        return
    where = plan.specs
    handles: dict[Path, Any] = {}
    try:
        for item in plan.tensors:
            if not item.hf_name:
                yield plan.extra[item.gguf_name]
                continue
            path, spec = where[item.hf_name]
            if path not in handles:
                handles[path] = path.open("rb", buffering=0)
            yield read_rows(handles[path], spec, [(0, spec.shape[0])])
    finally:
        for handle in handles.values():
            handle.close()


def stream_order(source: ModelSource, plan: ExportPlan) -> None:
    """Put the plan's tensors in file order (sequential reads); computed ones first."""
    if source.is_gguf:
        return
    files = {path: index for index, path in enumerate(source.weight_files)}
    position = {name: (files[path], spec.offset) for name, (path, spec) in plan.specs.items()}
    plan.tensors.sort(key=lambda t: position.get(t.hf_name, (-1, 0)))


def write_gguf(plan: ExportPlan, source: ModelSource, path: Path, progress: bool = True
               ) -> dict[str, Any]:
    """Write the GGUF file at `path` (a fresh file; the caller makes it atomic). Returns stats."""
    import gguf

    stream_order(source, plan)
    writer = gguf.GGUFWriter(None, "llama")
    for key, value, vtype, sub in plan.metadata:
        writer.add_key_value(key, value, vtype, sub)
    writer.add_file_type(int(plan.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kinds = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for item in plan.tensors:
        rows = item.shape[0] if len(item.shape) > 1 else 1
        writer.add_tensor_info(item.gguf_name, (rows, item.nbytes // rows) if len(item.shape) > 1
                               else (item.nbytes,), np.dtype(np.uint8), item.nbytes,
                               raw_dtype=kinds[item.encoding])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    largest = 0
    with step_progress("export", len(plan.tensors), enabled=progress, tokens=False) as bar:
        for item, tensor in zip(plan.tensors, source_tensors(source, plan), strict=True):
            largest = max(largest, tensor.numel() * tensor.element_size())
            if tuple(tensor.shape) != item.shape:
                raise MinimaError(f"{source}: tensor {item.hf_name} has shape "
                                  f"{list(tensor.shape)}, expected {list(item.shape)}")
            if item.permute_heads:
                tensor = permute_rows(tensor, item.permute_heads)
            data = encode(tensor, item.encoding)
            writer.write_tensor_data(data.numpy())
            counts[item.encoding] = counts.get(item.encoding, 0) + 1
            del tensor, data
            bar.update()
    writer.close()
    return {"tensors": len(plan.tensors), "tensor_encodings": counts,
            "fallback_f16": [t.gguf_name for t in plan.tensors
                             if t.encoding == "f16" and plan.encoding in ("q8_0", "q4_0")],
            "largest_tensor_bytes": largest, "file_bytes": path.stat().st_size}
