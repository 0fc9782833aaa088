"""Slow, and only where a llama.cpp runtime exists: MINIMA_LLAMA_CPP_PYTHON names a Python that
has llama-cpp-python (it is not a dependency of minima), e.g.

    MINIMA_LLAMA_CPP_PYTHON=/work/llamacpp-venv/bin/python pytest -m slow \
        tests/integration/test_export_llama_cpp.py

llama.cpp runs the exported file (llama_cpp_logits.py, token by token) and its next-token
logits are compared with transformers on the same file and with the HF checkpoint; its own
tokenizer must give the checkpoint's ids, and the chat template must be in the file.

Tolerances, as fractions of the largest |logit| (measured on the tiny world, scale ~3-4):
f32 2e-4 of the checkpoint (measured 3e-5); f16 1e-3 (1.5e-4); q8_0 and q4_0 against transformers
on the same file 1e-2 (llama.cpp's CPU kernels quantise the activations to 8 bits for these
types; measured 2.0e-3 and 2.7e-3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minima_cli.stages.export import run_export

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("llama_cpp_logits.py")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
TEXTS = ["the cat sat on the mat.", "héllo wörld 日本語 🙂", "  spaces   and\ttabs\n\nlines ",
         "<|im_start|>user\nhi<|im_end|>\n", "numbers 12345 3.14"]
TOLERANCE = {"f32": 2e-4, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 1e-2}


def interpreter() -> str:
    python = os.environ.get("MINIMA_LLAMA_CPP_PYTHON")
    if not python:
        pytest.skip("set MINIMA_LLAMA_CPP_PYTHON to a Python with llama-cpp-python")
    return python


def llama_cpp(path: Path, ids: list[int], text: str | None = None) -> dict:
    args = [interpreter(), str(SCRIPT), str(path), json.dumps(ids)]
    result = subprocess.run([*args, *([text] if text is not None else [])],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_llama_cpp_runs_the_export_like_the_checkpoint(tiny_world, tmp_path):
    interpreter()
    source = tmp_path / "teacher"
    shutil.copytree(tiny_world / "teacher", source)
    (source / "chat_template.jinja").write_text(CHATML)
    tokenizer = AutoTokenizer.from_pretrained(source)
    checkpoint = AutoModelForCausalLM.from_pretrained(source).eval()
    line = (tiny_world / "data" / "valid.txt").read_text().splitlines()[0]
    ids = tokenizer(line).input_ids[:32]
    with torch.no_grad():
        expected = checkpoint(torch.tensor([ids])).logits[0]
    scale = expected.abs().max().item()
    figures = {}
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        path = tmp_path / f"{kind}.gguf"
        run_export(model_path=str(source), output=path, encoding=kind, progress=False)
        result = llama_cpp(path, ids, TEXTS[0])
        runtime = torch.tensor(result["logits"])
        same_file = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        with torch.no_grad():
            transformers_logits = same_file(torch.tensor([ids])).logits[0]
        vs_file = (runtime - transformers_logits).abs().max().item() / scale
        vs_checkpoint = (runtime - expected).abs().max().item() / scale
        figures[kind] = (vs_file, vs_checkpoint)
        assert vs_file < TOLERANCE[kind], (kind, vs_file)
        if kind in ("f32", "f16"):
            assert vs_checkpoint < TOLERANCE[kind], (kind, vs_checkpoint)
        assert runtime.argmax(-1).tolist() == transformers_logits.argmax(-1).tolist() or \
            kind in ("q8_0", "q4_0")
    print({k: f"vs same file {a:.2e}, vs checkpoint {b:.2e}" for k, (a, b) in figures.items()})
    path = tmp_path / "q8_0.gguf"
    for text in TEXTS:
        result = llama_cpp(path, [0], text)
        assert result["ids"] == tokenizer(text).input_ids, text
    assert result["chat_template"] == CHATML


def test_llama_cpp_runs_the_smollm2_teacher_export(tmp_path):
    """The SmolLM2 teacher (its Q4_1 GGUF dequantised by minima's loader) exported as f16 and
    q8_0, in llama.cpp against transformers on the same file. f16: within 2e-2 of the largest
    |logit| (measured 2.8e-3) and the same top-1 everywhere. q8_0: llama.cpp's quantised matmuls
    quantise the activations to 8 bits, so its logits move by about as much as they do on the
    original Q4_1 file that llama.cpp's own tools made (measured: mean |diff| 0.30 vs 0.30,
    max 3.9 vs 3.0, top-1 agreement 0.96 on both, logits up to 38); the test holds q8_0 to 1.5x
    the original file's mean difference and 0.9 top-1 agreement."""
    interpreter()
    from test_smollm2 import REPO, smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer((REPO / "LICENSE").read_text()).input_ids[:48]

    def compare(path: Path) -> tuple[float, float, float]:
        runtime = torch.tensor(llama_cpp(path, ids)["logits"])
        same_file = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=torch.float32).eval()
        with torch.no_grad():
            reference = same_file(torch.tensor([ids])).logits[0]
        diff = (runtime - reference).abs()
        agree = (runtime.argmax(-1) == reference.argmax(-1)).float().mean().item()
        return diff.max().item() / reference.abs().max().item(), diff.mean().item(), agree

    figures = {"original Q4_1": compare(gguf)}
    for kind in ("f16", "q8_0"):
        path = tmp_path / f"teacher-{kind}.gguf"
        run_export(model_path=str(gguf), output=path, encoding=kind, progress=False)
        figures[kind] = compare(path)
    print({k: f"max {r:.2e} of max |logit|, mean {m:.3f}, top-1 {a:.2f}"
           for k, (r, m, a) in figures.items()})
    assert figures["f16"][0] < 2e-2 and figures["f16"][2] == 1.0
    assert figures["q8_0"][1] < 1.5 * figures["original Q4_1"][1] and figures["q8_0"][2] > 0.9
