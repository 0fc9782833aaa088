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
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError, first_line
from minima_cli.model.arch import (
    check_supported,
    config_problem,
    count_parameters,
    expected_tensor_shapes,
    shape_from_config,
)
from minima_cli.model.tensors import TensorSpec, check_gguf, read_safetensors_specs

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
        hint = ""
        if len(path.parts) == 2 and not str(path).startswith((".", "/", "~")) and \
                not path.suffix:  # reads as a hub id (org/name): minima never downloads
            hint = (f" (a hub name? minima reads models from disk only: download it first, "
                    f"e.g. `hf download {path} --local-dir DIR`)")
        raise MinimaError(f"model not found: {path}{hint}")
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
    """The model's config; fails with one line unless it is a supported LLaMA-family model.
    config.json is checked as plain JSON first (required fields, positive sizes, heads dividing
    hidden), so a broken one never reaches transformers' own validation and load report; then
    the weight files' headers (whole files, shapes that match the config). Every stage reads the
    config before any weights, so these checks run early, even for a dry run."""
    from transformers import AutoConfig

    if not source.is_gguf:
        check_raw_config(source)
    specs = check_weight_files(source)  # a cut GGUF says "truncated" before transformers reads it
    try:
        config = AutoConfig.from_pretrained(
            source.directory, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # transformers and huggingface_hub raise many kinds here
        raise MinimaError(f"{source}: cannot read config ({first_line(error)})") from error
    check_supported(config)
    check_config_matches_weights(source, config, specs)
    return config


def check_gguf_once(source: ModelSource) -> None:
    """check_gguf, once per file version: config, tokenizer and model loads each ask."""
    path = source.directory / str(source.gguf_file)
    stat = path.stat()
    _check_gguf_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _check_gguf_cached(path: Path, size: int, mtime_ns: int) -> None:
    check_gguf(path)


def read_raw_config(source: ModelSource) -> dict[str, Any]:
    """config.json as a dict (one line on unreadable JSON)."""
    path = source.directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MinimaError(f"{path}: not valid JSON ({first_line(error)})") from None
    return raw


def check_raw_config(source: ModelSource) -> None:
    problem = config_problem(read_raw_config(source))
    if problem is not None:
        raise MinimaError(f"{source}: {problem}")


def check_weight_files(source: ModelSource) -> dict[str, TensorSpec]:
    """Every weight file is whole before transformers touches it: safetensors headers parsed
    and their tensors covering each file exactly, every shard an index names present, a GGUF's
    tensor table inside the file. Returns the safetensors specs by tensor name ({} for GGUF).
    Reads headers only: milliseconds even for a large model."""
    if source.is_gguf:
        check_gguf_once(source)
        return {}
    index = source.directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise MinimaError(f"{index}: corrupt shard index") from None
        missing = sorted(name for name in shards if not (source.directory / name).is_file())
        if missing:
            raise MinimaError(f"{source}: shard {missing[0]} named in "
                              "model.safetensors.index.json is missing")
    return {spec.name: spec for path in source.weight_files
            for spec in read_safetensors_specs(path)}


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_matches_weights(source: ModelSource, config: Any,
                                 specs: dict[str, TensorSpec]) -> None:
    """config.json describes these weights: the layer count and the shapes of the embeddings
    and first layer agree (a hand-edited config would otherwise fail inside transformers with a
    multi-line report, or silently build a different model)."""
    if not specs:
        return
    shape = shape_from_config(config)
    for name, want in expected_tensor_shapes(shape).items():
        spec = specs.get(name)
        if spec is not None and spec.shape != want:
            raise MinimaError(f"{source}: config.json does not match the weights: {name} is "
                              f"{list(spec.shape)} in the weights, {list(want)} by the config")
    layers = {int(m.group(1)) for m in map(_LAYER_INDEX.match, specs) if m}
    if layers and max(layers) + 1 != shape.layers:
        raise MinimaError(f"{source}: config.json says {shape.layers} layers but the weights "
                          f"hold {max(layers) + 1}")


def load_memory_bytes(config: Any, dtype: torch.dtype | None) -> int:
    """What the weights of `config` take in memory once loaded: parameters x bytes per value
    (the requested dtype, else the config's, else float32)."""
    if dtype is None:
        dtype = getattr(config, "dtype", None)  # transformers 5 (torch_dtype is deprecated)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            dtype = torch.float32
    return count_parameters(shape_from_config(config)) * dtype.itemsize


def check_fits_in_memory(source: ModelSource, config: Any, dtype: torch.dtype | None) -> None:
    """Refuse before loading a model whose weights alone exceed the memory available now (a
    config with 100000 layers would otherwise be killed by the OOM killer, or swap for hours)."""
    import psutil

    need = load_memory_bytes(config, dtype)
    available = psutil.virtual_memory().available
    if need > available:
        raise MinimaError(f"{source}: loading needs about {need / 1e9:.3g} GB of memory for the "
                          f"weights alone, only {available / 1e9:.3g} GB is available")


def check_finite_weights(model: torch.nn.Module, source: ModelSource) -> None:
    """Refuse a model holding NaN or infinite weights: scores, plans, losses and metrics made
    from it would be garbage. One pass of isfinite over the weights (docs/formats.md: its cost)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MinimaError(f"{source}: weight {name} holds {bad} NaN or infinite value(s)")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A float32 sum is the fast test (a vectorised reduction,
    about 25x faster on CPU than materialising isfinite's bool tensor): NaN and inf propagate
    through it. Only a non-finite sum, which huge finite values could also give by overflow,
    pays for the exact check."""
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(tensor).all())


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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config = load_config(source, trust_remote_code=trust_remote_code)  # architecture check first
    check_fits_in_memory(source, config, dtype)  # load_config checked the weight files
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # what the checks above cannot see
        raise MinimaError(f"{source}: cannot load the model ({first_line(error)})") from error
    if source.is_gguf:
        clear_quantized_flag(model)
    check_finite_weights(model, source)
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

    if source.is_gguf:
        check_gguf_once(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.directory, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # the Rust tokenizers library raises bare Exceptions on bad files
        raise MinimaError(f"{source}: cannot load tokenizer ({first_line(error)})") from error
    if not source.is_gguf:  # a GGUF's config and tokenizer come from one file
        check_vocab_fits(source, tokenizer)
    return tokenizer


def check_vocab_fits(source: ModelSource, tokenizer: Any) -> None:
    """Every token id the tokenizer can produce has an embedding row (vocab_size may be larger:
    padded rows are fine), else the first rare token is an index error deep in a forward."""
    vocab = read_raw_config(source).get("vocab_size") if (
        source.directory / "config.json").is_file() else None
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise MinimaError(f"{source}: the tokenizer has {len(tokenizer)} tokens but config.json's "
                          f"vocab_size is {vocab}")


def model_fingerprint(source: ModelSource) -> str:
    """A model's content identity: its config plus, per weight file, its name, size and full
    sha256 (fsutil.cached_file_sha256: hashed once, then remembered by path, size, mtime and
    inode outside the model directory). Any content change is seen, including one tensor edited
    in place with the same size, which a sample of the file would miss."""
    from minima_cli.fsutil import cached_file_sha256

    digest = hashlib.blake2b(digest_size=16)
    if not source.is_gguf:
        digest.update((source.directory / "config.json").read_bytes())
    for path in source.weight_files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:{cached_file_sha256(path)}".encode())
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
