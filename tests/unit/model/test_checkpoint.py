"""Checkpoint I/O: resolving models, streaming safetensors, atomic outputs, fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import save_model, tiny_random_model
from safetensors.torch import load_file

from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_output_dir
from minima_cli.model.arch import count_parameters, shape_from_config
from minima_cli.model.checkpoint import model_fingerprint, resolve_model
from minima_cli.model.tensors import SafetensorsStreamWriter, TensorSpec, read_safetensors_specs


def test_stream_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.randn(2, 2).to(torch.float16)[:, :1],  # non-contiguous view
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert [s.name for s in read_safetensors_specs(tmp_path / "x.safetensors")] == list(tensors)


def test_stream_writer_refuses_out_of_order_or_missing_tensors(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(RuntimeError, match="stream order"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="wrote 1 of 2"):
        writer.close()


def test_atomic_output_dir_success_failure_and_force(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.name.startswith("out.tmp-") and not out.exists()
        (tmp / "f").write_text("one")
    assert (out / "f").read_text() == "one"
    with pytest.raises(MinimaError, match="exists"), atomic_output_dir(out):
        pass
    with pytest.raises(ValueError), atomic_output_dir(out, force=True) as tmp:
        (tmp / "f").write_text("half")
        raise ValueError("crash mid-write")
    assert (out / "f").read_text() == "one"  # the finished output survives a failed rewrite
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "f").write_text("two")
    assert (out / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writer_leaves_no_output_and_its_temp_is_cleaned_later(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, sys; from pathlib import Path; from minima_cli.fsutil import "
        "atomic_output_dir\n"
        "with atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'f').write_text('x'); os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out)])
    assert result.returncode == -9
    assert not out.exists() and len(list(tmp_path.glob("out.tmp-*"))) == 1
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resolve_model_kinds_and_errors(tmp_path):
    model_dir = save_model(tiny_random_model(), tmp_path / "m")
    assert resolve_model(model_dir).weight_files == [model_dir / "model.safetensors"]
    gguf = tmp_path / "g" / "x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf.parent).gguf_file == "x.gguf"
    assert resolve_model(gguf).is_gguf
    with pytest.raises(MinimaError, match="not found"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(MinimaError, match="not a model directory"):
        resolve_model(tmp_path / "notes.txt")
    os.remove(model_dir / "model.safetensors")
    with pytest.raises(MinimaError, match="no \\*.safetensors"):
        resolve_model(model_dir)


def test_fingerprint_tracks_the_weights(tmp_path):
    a = resolve_model(save_model(tiny_random_model(seed=0), tmp_path / "a"))
    b = resolve_model(save_model(tiny_random_model(seed=0), tmp_path / "b"))
    c = resolve_model(save_model(tiny_random_model(seed=1), tmp_path / "c"))
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_matches_the_built_model(kind, tied):
    model = tiny_random_model(kind, tied=tied)
    shape = shape_from_config(model.config)
    assert count_parameters(shape) == sum(p.numel() for p in model.parameters())


def test_a_gguf_model_is_no_longer_flagged_quantized():
    # The flag that makes the HF Trainer refuse a dequantized GGUF model, set as transformers does.
    from transformers.trainer_utils import validate_quantization_for_training

    from minima_cli.model.checkpoint import clear_quantized_flag

    model = tiny_random_model()
    from types import SimpleNamespace

    model.is_quantized = True
    model.hf_quantizer = SimpleNamespace(is_trainable=False, is_qat_trainable=False)
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)  # what the HF Trainer checks
    clear_quantized_flag(model)
    validate_quantization_for_training(model)
    assert not model.is_quantized and model.hf_quantizer is None
    assert "quantization_config" not in model.config.to_dict()


def test_quiet_transformers_silences_the_gguf_reader_bar(capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from minima_cli.model.checkpoint import quiet_transformers

    original = gguf_utils.tqdm
    with quiet_transformers():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capsys.readouterr().err
    assert gguf_utils.tqdm is original
