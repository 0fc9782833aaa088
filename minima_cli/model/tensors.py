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
