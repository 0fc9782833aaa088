"""Shared fixtures: tiny random LLaMA-family models (built in milliseconds) and one small trained
tiny world per test session (teacher + tokenizer + corpus) for the CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# model_type -> config class name and the extra config fields of that architecture
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "llama_bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
}


def tiny_random_model(kind: str = "llama", *, gqa: bool = True, tied: bool = True,
                      layers: int = 3, hidden: int = 32, heads: int = 4, ffn: int = 48,
                      vocab: int = 96, dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers

    class_name, extra = ARCHITECTURES[kind]
    config = getattr(transformers, class_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2 if gqa else heads,
        head_dim=hidden // heads, max_position_embeddings=128, tie_word_embeddings=tied,
        rms_norm_eps=1e-6, **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so slicing is tested
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def save_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small trained tiny world (teacher/, data/), shared by the CLI tests."""
    from minima_cli.tiny import build_tiny_world

    root = tmp_path_factory.mktemp("tiny_world")
    build_tiny_world(root, seed=0, gqa=True, tied=True, n_documents=400, steps=30)
    return root
