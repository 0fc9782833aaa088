"""The pure pieces of model/gguf_export.py: llama.cpp's q/k permutation, which models the GGUF
llama layout can express, the encoding of each tensor, pre-tokenizer names, the metadata."""

from __future__ import annotations

import pytest
import torch
import transformers

from minima_cli.model.gguf_export import (
    LLAMA3_SPLIT,
    expected_tensors,
    export_problem,
    llama3_rope_factors,
    llama_metadata,
    permute_rows,
    pre_tokenizer_name,
    tensor_encoding,
    unpermute_rows,
)


def llama_config(**changes):
    values = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128)
    return transformers.LlamaConfig(**{**values, **changes})


def test_permute_interleaves_the_halves_of_each_head():
    # one head of 4 dims, rows 0..3: HF rotates (0, 2) and (1, 3); llama.cpp adjacent pairs
    w = torch.arange(8, dtype=torch.float32).reshape(8, 1)  # 2 heads of 4 rows
    assert permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = torch.randn(6 * 8, 5)
    assert torch.equal(unpermute_rows(permute_rows(x, 6), 6), x)


def test_permutation_turns_hf_rope_into_llama_cpp_rope():
    """q·k under HF's rotate_half RoPE equals q·k under llama.cpp's pairwise RoPE on permuted
    rows: the permutation is what makes the exported attention the same."""
    d, pos = 8, 5
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angle = pos * inv
    cos, sin = torch.cos(angle), torch.sin(angle)
    q = torch.randn(d)

    def hf_rope(x):  # halves
        a, b = x[: d // 2], x[d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def pair_rope(x):  # adjacent pairs (GPT-J / llama.cpp's normal mode)
        a, b = x[0::2], x[1::2]
        out = torch.empty_like(x)
        out[0::2], out[1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    permuted = permute_rows(q.reshape(d, 1), 1).flatten()
    assert torch.allclose(pair_rope(permuted), permute_rows(hf_rope(q).reshape(d, 1), 1).flatten())


@pytest.mark.parametrize("config, words", [
    (transformers.Qwen2Config(), "q/k/v biases"),
    (transformers.Qwen3Config(), "q_norm/k_norm"),
    (llama_config(attention_bias=True), "attention biases"),
    (llama_config(mlp_bias=True), "MLP biases"),
    (transformers.MistralConfig(sliding_window=64, max_position_embeddings=128), "sliding-window"),
    (llama_config(hidden_act="gelu"), "SiLU"),
    (llama_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 32}), "yarn"),
    (transformers.GPT2Config(), "unsupported architecture 'gpt2'"),
])
def test_unsupported_models_say_what(config, words):
    assert words in export_problem(config)


def test_supported_models():
    assert export_problem(llama_config()) is None
    assert export_problem(transformers.MistralConfig(sliding_window=None)) is None
    assert export_problem(llama_config(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 1e4})) is None


def test_tensor_encodings():
    assert tensor_encoding("blk.0.attn_norm.weight", (32,), "q4_0", True) == "f32"
    assert tensor_encoding("blk.0.attn_q.weight", (32, 64), "q4_0", True) == "q4_0"
    assert tensor_encoding("blk.0.attn_q.weight", (32, 40), "q8_0", True) == "f16"  # 40 % 32
    assert tensor_encoding("token_embd.weight", (64, 32), "q4_0", True) == "q8_0"  # tied output
    assert tensor_encoding("token_embd.weight", (64, 32), "q4_0", False) == "q4_0"
    assert tensor_encoding("output.weight", (64, 32), "q4_0", False) == "q8_0"
    assert tensor_encoding("output.weight", (64, 32), "bf16", False) == "bf16"


def test_expected_tensors_and_metadata():
    config = llama_config(tie_word_embeddings=False, head_dim=16)  # heads * head_dim != hidden
    tensors = {t.gguf_name: t for t in expected_tensors(config, "f16")}
    assert len(tensors) == 2 + 2 * 9 + 1
    assert tensors["blk.1.attn_q.weight"].shape == (64, 32)
    assert tensors["blk.1.attn_q.weight"].permute_heads == 4
    assert tensors["blk.1.attn_k.weight"].permute_heads == 2
    assert tensors["blk.1.attn_v.weight"].permute_heads == 0
    assert tensors["output.weight"].hf_name == "lm_head.weight"
    meta = {key: value for key, value, _ in llama_metadata(config, "m")}
    assert meta["llama.attention.key_length"] == meta["llama.rope.dimension_count"] == 16
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.block_count"] == 2
    tied = expected_tensors(llama_config(tie_word_embeddings=True), "f16")
    assert "output.weight" not in {t.gguf_name for t in tied}
    linear = llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 5e5})
    meta = {key: value for key, value, _ in llama_metadata(linear, "m")}
    assert meta["llama.rope.scaling.factor"] == 2.0 and meta["llama.rope.freq_base"] == 5e5


def test_llama3_rope_factors_span_one_to_factor():
    factors = llama3_rope_factors(5e5, 64, {"factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 8.0


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
        {**byte_level, "use_regex": False}]}) == "llama-bpe"
    assert pre_tokenizer_name({"type": "Metaspace"}) is None
    assert pre_tokenizer_name({**byte_level, "add_prefix_space": True}) is None
