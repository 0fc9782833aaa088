"""Checkpoints on disk: resolve and load models (HF safetensors dirs or GGUF files), fingerprint
them, write outputs atomically with a `minima.json` manifest, and stream safetensors tensor by
tensor so pruning a 7B model needs little more memory than its largest tensor.

Security: weights load from safetensors (or GGUF) only; pickle checkpoints are refused and
`trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli import __version__
from minima_cli.arch import check_supported
from minima_cli.errors import MinimaError

MANIFEST = "minima.json"
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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- fingerprints and hashes ---------------------------------------------------------------------

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- atomic outputs and manifests ----------------------------------------------------------------


def check_output(path: Path, force: bool) -> None:
    """Fail early (before any work) when the output exists and --force was not given."""
    if path.exists() and not force:
        raise MinimaError(f"output {path} exists (pass --force to overwrite)")
    if path.exists() and not path.is_dir():
        raise MinimaError(f"output {path} exists and is not a directory")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `path`; on success fsync it and rename it to `path`.

    On any failure (or a kill) the temp dir is removed or left as `path.tmp-*`, never a
    half-written `path`. With `force`, an existing `path` is replaced only after the new one is
    complete."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(path: Path) -> None:
    """Delete temp dirs left by killed runs for the same output (their pid is gone)."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        pid = stale.name[len(path.name) + 5 :].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Write `minima.json`: stage, inputs (with hashes), config, metrics, versions, wall time."""
    import transformers

    manifest = {
        "stage": stage,
        "minima_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MinimaError(f"{directory}: no {MANIFEST}, not a minima output")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MinimaError(f"{path}: corrupt manifest ({error})") from error


def copy_tokenizer_files(source: ModelSource, destination: Path) -> None:
    """Carry tokenizer and generation config over; a GGUF source gets real HF files written."""
    if source.is_gguf:
        load_tokenizer(source).save_pretrained(destination)
        return
    for name in TOKENIZER_FILES:
        if (source.directory / name).is_file():
            shutil.copy2(source.directory / name, destination / name)


# --- safetensors streaming -----------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # absolute byte offset of the data in its safetensors file, when read

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_specs(path: Path) -> list[TensorSpec]:
    """Tensor names, shapes, dtypes and offsets from a safetensors header, in file order."""
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    data_start = 8 + header_size
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda item: item[1]["data_offsets"][0])
    specs = []
    for name, entry in entries:
        if entry["dtype"] not in SAFETENSORS_TO_TORCH:
            raise MinimaError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        spec = TensorSpec(name, tuple(entry["shape"]), SAFETENSORS_TO_TORCH[entry["dtype"]],
                          data_start + begin)
        if spec.nbytes != end - begin:
            raise MinimaError(f"{path}: tensor {name} has a corrupt header entry")
        specs.append(spec)
    return specs


def read_rows(handle: Any, spec: TensorSpec, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of a tensor (the first dim) given as (start, count) runs, read straight from the
    file into one fresh buffer with `preadv`: no mmap page faults, unread rows never touched."""
    row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
    total = sum(count for _, count in runs)
    buffer = torch.empty(total * row_bytes, dtype=torch.uint8)
    view, position = memoryview(buffer.numpy()), 0
    for start, count in runs:
        size = count * row_bytes
        if os.preadv(handle.fileno(), [view[position:position + size]],
                     spec.offset + start * row_bytes) != size:
            raise MinimaError(f"{handle.name}: truncated tensor {spec.name}")
        position += size
    return buffer.view(spec.dtype).view(total, *spec.shape[1:])


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time: the header (all shapes known up front) goes
    first, then each tensor's bytes in order, so only one tensor is ever held in memory."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.specs, self.next = path, specs, 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
        self.handle = path.open("wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_chunks(name, [tensor] if tensor.dim() else [tensor.reshape(1)])

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next tensor as consecutive row chunks (slices of its first dim)."""
        spec = self.specs[self.next]
        rows = 0
        for chunk in chunks:
            if name != spec.name or chunk.dtype != spec.dtype or (
                    tuple(chunk.shape[1:]) != spec.shape[1:] and spec.shape):
                got = f"{name} {tuple(chunk.shape)} {chunk.dtype}"
                raise RuntimeError(f"stream order broken: got {got}, want {spec}")
            data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            self.handle.write(data.numpy().data)  # a view: no copy of the tensor
            rows += chunk.shape[0]
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"stream order broken: {name} got {rows} rows, want {spec}")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise RuntimeError(f"{self.path}: wrote {self.next} of {len(self.specs)} tensors")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
