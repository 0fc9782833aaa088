"""Safetensors at the byte level: parse a file's header into `TensorSpec`s, read chosen rows of a
tensor straight from the file (`preadv`), and write a file one tensor, or one row chunk, at a
time (`SafetensorsStreamWriter`), so no more than a chunk is held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError

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


# A safetensors header is JSON of at most 100 MB (the format's own limit); a larger length field
# means the file is not safetensors at all (random bytes, another format).
MAX_SAFETENSORS_HEADER = 100_000_000


def read_safetensors_specs(path: Path) -> list[TensorSpec]:
    """Tensor names, shapes, dtypes and offsets from a safetensors header, in file order.

    The header is checked against the file before anything trusts it: a zero-byte, truncated or
    random-bytes file (a killed copy, a partial download) is one MinimaError line naming the
    file, instead of the safetensors library's traceback deep inside a model load."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise MinimaError(f"{path}: not a safetensors file ({size} bytes, truncated or "
                              "empty)")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > MAX_SAFETENSORS_HEADER:
            raise MinimaError(f"{path}: not a safetensors file (corrupt header length)")
        if 8 + header_size > size:
            raise MinimaError(f"{path}: truncated safetensors file ({size} bytes, its header "
                              f"alone needs {8 + header_size})")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MinimaError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise MinimaError(f"{path}: not a safetensors file (unreadable header)")
    return _specs_of_header(path, header, 8 + header_size, size)


def _specs_of_header(path: Path, header: dict[str, Any], data_start: int,
                     size: int) -> list[TensorSpec]:
    """The header's entries as specs; every entry well-formed and the data exactly covering the
    rest of the file (what the safetensors library itself insists on when it loads)."""
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    try:
        entries.sort(key=lambda item: item[1]["data_offsets"][0])
        specs = []
        for name, entry in entries:
            if entry["dtype"] not in SAFETENSORS_TO_TORCH:
                raise MinimaError(f"{path}: tensor {name} has unsupported dtype "
                                  f"{entry['dtype']}")
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
            if begin < 0 or any(x < 0 for x in shape):
                raise ValueError(name)
            spec = TensorSpec(name, shape, SAFETENSORS_TO_TORCH[entry["dtype"]],
                              data_start + begin)
            if spec.nbytes != end - begin:
                raise MinimaError(f"{path}: tensor {name} has a corrupt header entry")
            specs.append(spec)
    except (KeyError, TypeError, ValueError, IndexError):
        raise MinimaError(f"{path}: not a safetensors file (malformed header)") from None
    data_end = data_start + max((s.offset - data_start + s.nbytes for s in specs), default=0)
    if data_end > size:
        raise MinimaError(f"{path}: truncated safetensors file ({size} bytes of {data_end})")
    if data_end < size:
        raise MinimaError(f"{path}: corrupt safetensors file ({size - data_end} bytes beyond "
                          "its last tensor)")
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
    rows = buffer.view(spec.dtype).view(total, *spec.shape[1:])
    # prune streams weights without loading the model: refuse NaN/inf here, where the rows are
    # in memory anyway (only kept rows are read; a dropped NaN row harms nothing)
    if rows.is_floating_point() and not (bool(torch.isfinite(rows.sum(dtype=torch.float32)))
                                         or bool(torch.isfinite(rows).all())):
        raise MinimaError(f"{handle.name}: weight {spec.name} holds NaN or infinite values")
    return rows


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


# GGUF metadata value types -> struct format of a scalar (8: string, 9: array are read apart).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}


class _GGUFCursor:
    """Little-endian reads over a GGUF file's bytes; running off the end is truncation."""

    def __init__(self, data: Any, path: Path):
        self.data, self.position, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.position + size > len(self.data):
            raise EOFError
        (value,) = struct.unpack_from("<" + fmt, self.data, self.position)
        self.position += size
        return value

    def string(self) -> bytes:
        length = self.take("Q")
        if self.position + length > len(self.data):
            raise EOFError
        self.position += length
        return bytes(self.data[self.position - length:self.position])

    def skip_value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("I"), self.take("Q")
            if item in _GGUF_SCALARS:  # a fixed-size array: skip it whole
                size = struct.calcsize("<" + _GGUF_SCALARS[item]) * count
                if self.position + size > len(self.data):
                    raise EOFError
                self.position += size
            else:
                for _ in range(count):
                    self.skip_value(item)
            return None
        if kind not in _GGUF_SCALARS:
            raise MinimaError(f"{self.path}: corrupt GGUF file (unknown value type {kind})")
        return self.take(_GGUF_SCALARS[kind])


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header, metadata and tensor table (no tensor data is read) and check
    that the file holds every tensor's bytes: a GGUF cut short (an interrupted download) is one
    line saying "truncated", not a numpy reshape error from inside transformers."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise MinimaError(f"{path}: truncated GGUF file ({size} bytes)")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _GGUFCursor(data, path)
        try:
            if data[:4] != b"GGUF":
                raise MinimaError(f"{path}: not a GGUF file (no GGUF magic)")
            cursor.position = 4
            version = cursor.take("I")
            if version not in (2, 3):
                raise MinimaError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_values = cursor.take("Q"), cursor.take("Q")
            alignment = 32
            for _ in range(n_values):
                key, kind = cursor.string(), cursor.take("I")
                value = cursor.skip_value(kind)
                if key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            data_end = 0
            for _ in range(n_tensors):
                name = cursor.string().decode("utf-8", "replace")
                dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
                kind, offset = cursor.take("I"), cursor.take("Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise MinimaError(f"{path}: tensor {name} has unknown GGUF type "
                                      f"{kind}") from None
                count = 1
                for dim in dims:
                    count *= dim
                data_end = max(data_end, offset + count // block * type_size)
        except EOFError:
            raise MinimaError(f"{path}: truncated GGUF file ({size} bytes, cut inside its "
                              "header): copy or download it again") from None
        start = -(-cursor.position // alignment) * alignment
    if start + data_end > size:
        raise MinimaError(f"{path}: truncated GGUF file ({size} bytes of {start + data_end}): "
                          "copy or download it again")
