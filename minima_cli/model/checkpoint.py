"""Models on disk: resolve a path to an HF safetensors directory or a GGUF file, load its config,
model and tokenizer (LLaMA-family only), fingerprint it cheaply, check that two tokenizers match,
and carry tokenizer files over to a new model directory.

Security: weights load from safetensors (or GGUF) only; pickle checkpoints are refused and
`trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError, first_line
from minima_cli.model.arch import check_supported

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# Files that travel with a model directory unchanged when its weights are rewritten.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: an HF directory of safetensors, or one GGUF file."""

    directory: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def weight_files(self) -> list[Path]:
        if self.gguf_file:
            return [self.directory / self.gguf_file]
        return sorted(self.directory.glob("*.safetensors"))

    def __str__(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def resolve_model(path: str | Path) -> ModelSource:
    """Find the model at `path` (an HF dir, a .gguf file, or a dir holding one .gguf) or fail."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MinimaError(f"model not found: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource(path.parent, path.name)
        raise MinimaError(f"{path}: not a model directory or .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0].name)
        if len(ggufs) > 1:
            raise MinimaError(f"{path}: several .gguf files, pass one of them as the model path")
        raise MinimaError(f"{path}: no config.json, not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise MinimaError(
                f"{path}: only pickle weights ({pickles[0]}); minima loads safetensors only "
                "(convert with `save_pretrained(..., safe_serialization=True)`)"
            )
        raise MinimaError(f"{path}: no *.safetensors weights")
    return ModelSource(path)


def load_config(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The model's config; fails with one line unless it is a supported LLaMA-family model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source.directory, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        raise MinimaError(f"{source}: cannot read config ({first_line(error)})") from error
    check_supported(config)
    return config


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own tqdm bars ("Loading weights", "Writing model shards", and the
    GGUF reader's "Converting and de-quantizing", a plain tqdm that ignores transformers'
    switch) for a moment: minima's stages show their own progress."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    source: ModelSource, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a causal LM in eval mode. GGUF weights are dequantized and the quantized flag cleared,
    so the model trains and saves like any other."""
    from transformers import AutoModelForCausalLM

    load_config(source, trust_remote_code=trust_remote_code)  # architecture check first
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(source.directory, **kwargs)
    if source.is_gguf:
        clear_quantized_flag(model)
    return model.eval()


def clear_quantized_flag(model: torch.nn.Module) -> None:
    """A GGUF model is dequantized on load but still flagged quantized, which makes the HF
    Trainer refuse it and `save_pretrained` write a quantization config; the weights are plain
    floats, so drop the flag."""
    model.hf_quantizer = None
    model.is_quantized = False
    with contextlib.suppress(AttributeError):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.directory, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # the Rust tokenizers library raises bare Exceptions on bad files
        raise MinimaError(f"{source}: cannot load tokenizer ({first_line(error)})") from error


FINGERPRINT_SAMPLES = 16


FINGERPRINT_BLOCK = 4096


def model_fingerprint(source: ModelSource) -> str:
    """A cheap identity for a model: its config plus, per weight file, the size, the first 64 KiB
    (the safetensors header) and 16 blocks sampled across the file. Any retraining changes
    nearly every byte, so two different models collide with negligible probability, yet a 7B
    checkpoint is fingerprinted in milliseconds instead of a full read."""
    digest = hashlib.blake2b(digest_size=16)
    if not source.is_gguf:
        digest.update((source.directory / "config.json").read_bytes())
    for path in source.weight_files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(65536))
            for i in range(FINGERPRINT_SAMPLES):
                handle.seek(size * (2 * i + 1) // (2 * FINGERPRINT_SAMPLES))
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def copy_tokenizer_files(source: ModelSource, destination: Path) -> None:
    """Carry tokenizer and generation config over; a GGUF source gets real HF files written."""
    if source.is_gguf:
        load_tokenizer(source).save_pretrained(destination)
        return
    for name in TOKENIZER_FILES:
        if (source.directory / name).is_file():
            shutil.copy2(source.directory / name, destination / name)


def check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same
    (padded embedding rows beyond it are fine; losses.py ignores them)."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise MinimaError("teacher and student tokenizers differ: distillation needs one "
                          "tokenizer (the same vocabulary)")
    for name in ("eos_token", "bos_token", "pad_token"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise MinimaError(f"teacher and student tokenizers differ in {name}")
