"""GGML tensor encodings, byte for byte as llama.cpp writes them: f32, f16, bf16 and the two
block formats q8_0 and q4_0 (blocks of 32 values along a row).

- q8_0 (34 bytes a block): d = max|x| / 127 as fp16, then 32 int8 q = roundf(x / d).
- q4_0 (18 bytes a block): d = m / -8 as fp16 where m is the value of largest magnitude (the first
  one on ties), then 16 bytes of nibbles q = min(15, trunc(x / d + 8.5)): byte j holds value j in
  its low nibble and value j + 16 in its high one.

Both follow ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` exactly (the scale's inverse
is taken from the float32 scale, before it is rounded to fp16; roundf rounds half away from
zero); tests/unit/model/test_quantize.py compares them with gguf.quants' reference. Pure: tensors
in, tensors out, float32 arithmetic on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 32
# encoding -> (values per block, bytes per block)
BLOCK_SIZES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: to nearest, halves away from zero (torch.round rounds halves to even).
    floor(a) + floor(2 (a - floor(a))) is exact where floor(a + 0.5) is not (a = 0.49999997)."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """A tensor whose last dim is a multiple of 32 as float32 blocks [n_blocks, 32]."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {BLOCK}")
    return x.detach().to(torch.float32).reshape(-1, BLOCK)


def inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d is 0 (an all-zero block)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, row_len / 32 * 34]: per block the fp16 scale, then 32 int8 values."""
    blocks = blocks_of(x)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = roundf(blocks * inverse(d)).to(torch.int8)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)
    return out.reshape(*x.shape[:-1], -1) if x.dim() > 1 else out.reshape(-1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, row_len / 32 * 18]: per block the fp16 scale, then 16 bytes of nibbles."""
    blocks = blocks_of(x)
    index = blocks.abs().argmax(dim=1, keepdim=True)  # the first of equal magnitudes, as ggml
    d = torch.gather(blocks, 1, index) / -8
    q = torch.trunc(blocks * inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    nibbles = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << 4)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), nibbles], dim=1)
    return out.reshape(*x.shape[:-1], -1) if x.dim() > 1 else out.reshape(-1)


def dequantize_q8_0(data: torch.Tensor, row_len: int) -> torch.Tensor:
    blocks = data.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (d * q).reshape(-1, row_len)


def dequantize_q4_0(data: torch.Tensor, row_len: int) -> torch.Tensor:
    blocks = data.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
    nibbles = blocks[:, 2:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).to(torch.float32) - 8
    return (d * q).reshape(-1, row_len)


CHUNK = 1 << 18  # values quantised at once: the float32 temporaries stay ~1 MB each


def in_chunks(quantize: Any, x: torch.Tensor, encoding: str) -> torch.Tensor:
    """`quantize` applied to a few rows at a time into one output buffer, so the temporaries
    (float32 copies, scaled values) never grow with the tensor: peak memory stays near the
    tensor plus its encoding."""
    if not can_encode(tuple(x.shape), encoding):
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {BLOCK}")
    rows = x.detach().reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], encoded_bytes((rows.shape[1],), encoding), dtype=torch.uint8)
    step = max(1, CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = quantize(rows[start:start + step])
    return out.reshape(*x.shape[:-1], -1) if x.dim() > 1 else out.reshape(-1)


def encode(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """The tensor's bytes (uint8, rows kept as the first dims) in one of BLOCK_SIZES' encodings.
    f16 and bf16 round to nearest even, as ggml's conversions do."""
    if encoding == "f32":
        data = x.detach().to(torch.float32).contiguous()
    elif encoding == "f16":  # one rounding from any float type (bf16 and f16 widen exactly)
        data = x.detach().to(torch.float16).contiguous()
    elif encoding == "bf16":
        data = x.detach().to(torch.bfloat16).contiguous()
    elif encoding in ("q8_0", "q4_0"):
        return in_chunks(quantize_q8_0 if encoding == "q8_0" else quantize_q4_0, x, encoding)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return data.view(torch.uint8)


def encoded_bytes(shape: tuple[int, ...], encoding: str) -> int:
    """Bytes of a tensor of `shape` in `encoding` (the last dim is the row)."""
    per_block, block_bytes = BLOCK_SIZES[encoding]
    count = 1
    for size in shape:
        count *= size
    return count // per_block * block_bytes


def can_encode(shape: tuple[int, ...], encoding: str) -> bool:
    """Block formats need rows whose length is a multiple of the block."""
    per_block, _ = BLOCK_SIZES[encoding]
    return bool(shape) and shape[-1] % per_block == 0
