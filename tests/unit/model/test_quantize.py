"""model/quantize.py against gguf.quants' numpy reference (itself bit-exact with ggml's
quantize_row_q8_0_ref / quantize_row_q4_0_ref), and its encodings' sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from minima_cli.model.quantize import (
    can_encode,
    dequantize_q4_0,
    dequantize_q8_0,
    encode,
    encoded_bytes,
    quantize_q4_0,
    quantize_q8_0,
    roundf,
)

REFERENCE = {"q8_0": (quantize_q8_0, GGMLQuantizationType.Q8_0, dequantize_q8_0),
             "q4_0": (quantize_q4_0, GGMLQuantizationType.Q4_0, dequantize_q4_0)}


def hard_blocks(scale: float, seed: int) -> torch.Tensor:
    """Random blocks plus the cases rounding gets wrong: a zero block, ties in magnitude with
    opposite signs, exact halves after scaling, a block of one value, huge and tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 128, generator=g) * scale
    x[0, :32] = 0
    x[1, :32] = 1.0
    x[1, 7] = -1.0  # |max| tie: the first one decides q4_0's sign
    x[2, :32] = torch.arange(32, dtype=torch.float32) - 15.5  # halves
    x[3, :32] = 127 * (torch.arange(32) % 5 - 2) / 4.0  # x / d lands on .5 exactly
    x[4, :32] = 3.0
    x[5, :32] = torch.rand(32, generator=g) * 6e4  # near fp16's top
    x[6, :32] = torch.rand(32, generator=g) * 1e-6  # fp16 subnormal scales
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("scale", [1e-4, 0.02, 1.0, 300.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_byte_exact_against_gguf_reference(kind, scale, seed):
    ours, qtype, _ = REFERENCE[kind]
    x = hard_blocks(scale, seed)
    expected = quants.quantize(x.numpy(), qtype)
    got = ours(x).numpy()
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_dequantize_matches_reference_and_error_bound(kind):
    ours, qtype, dequantize = REFERENCE[kind]
    x = torch.randn(16, 256)
    data = ours(x)
    back = dequantize(data, 256)
    assert np.allclose(back.numpy(), quants.dequantize(data.numpy(), qtype))
    # per block: half a step d = amax / 127 for q8_0; up to a whole step d = amax / 8 for q4_0
    # (-max maps to 8, clamped to 7); plus the scale's fp16 rounding (2^-11 relative, times 127)
    amax = x.reshape(-1, 32).abs().amax(1, keepdim=True)
    step = amax / (127 if kind == "q8_0" else 8)
    err = (back.reshape(-1, 32) - x.reshape(-1, 32)).abs()
    assert (err <= step * ((0.5 if kind == "q8_0" else 1.0) + 127 * 2 ** -11)).all()


def test_roundf_halves_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.2])
    assert roundf(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, -0.0, 127.0, 3.0]


def test_encodings_sizes_and_rounding():
    x = torch.randn(4, 64)
    assert encode(x, "f32").numel() == encoded_bytes((4, 64), "f32") == 4 * 64 * 4
    assert encode(x, "f16").numel() == encoded_bytes((4, 64), "f16") == 4 * 64 * 2
    assert encode(x, "q8_0").numel() == encoded_bytes((4, 64), "q8_0") == 4 * 2 * 34
    assert encode(x, "q4_0").numel() == encoded_bytes((4, 64), "q4_0") == 4 * 2 * 18
    bf16 = encode(x, "bf16")
    assert np.array_equal(bf16.numpy().view(np.uint8),
                          quants.quantize(x.numpy(), GGMLQuantizationType.BF16).view(np.uint8))
    assert torch.equal(encode(x, "f16").view(torch.float16), x.half())
    assert can_encode((4, 64), "q4_0") and not can_encode((4, 48), "q8_0")
    with pytest.raises(ValueError):
        quantize_q8_0(torch.randn(2, 48))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_chunked_encoding_equals_the_whole_tensor(kind, monkeypatch):
    """encode() quantises a few rows at a time; the bytes are those of one pass."""
    import minima_cli.model.quantize as quantize

    x = torch.randn(37, 96) * 3
    whole = REFERENCE[kind][0](x)
    monkeypatch.setattr(quantize, "CHUNK", 96 * 5)  # 5 rows a chunk, a ragged last one
    assert torch.equal(encode(x, kind), whole)
    assert torch.equal(encode(x[0], kind), REFERENCE[kind][0](x[0]))  # 1-D
