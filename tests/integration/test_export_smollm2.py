"""Slow: the real SmolLM2-135M-Instruct teacher (its Q4_1 GGUF, dequantised by minima's loader)
exported to f16 and reloaded with transformers' GGUF loader, equal to the loaded teacher with its
weights rounded to f16, and to q8_0 within 1 % of its perplexity on real text; and its pruned,
untrained student (score + prune as test_smollm2.py) exported to q8_0 and reloaded, within 3 %."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_smollm2 import REPO, smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model
from minima_cli.stages.export import run_export
from minima_cli.stages.prune import run_prune
from minima_cli.stages.score import run_score

pytestmark = pytest.mark.slow


def real_text_ids(tokenizer, limit: int = 2048) -> list[int]:
    return tokenizer((REPO / "LICENSE").read_text()).input_ids[:limit]


def perplexity(model, ids: list[int], window: int = 256) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            block = torch.tensor([ids[start:start + window]])
            if block.shape[1] < 2:
                continue
            total += model(block, labels=block).loss.item() * (block.shape[1] - 1)
            count += block.shape[1] - 1
    return math.exp(total / count)


def reload(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def test_smollm2_teacher_and_student_export_and_reload(tmp_path):
    gguf = smollm2_gguf()
    source = resolve_model(gguf)
    tokenizer = load_tokenizer(source)
    ids = real_text_ids(tokenizer)

    # the teacher: f16 export == the loaded teacher with f16-rounded matrices
    result = run_export(model_path=str(gguf), output=tmp_path / "teacher-f16.gguf",
                        encoding="f16", progress=False)
    assert result["metrics"]["parameters"] == 134_515_008
    teacher = load_model(source, dtype=torch.float32)
    teacher_ppl = perplexity(teacher, ids)
    with torch.no_grad():
        for param in teacher.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    exported = reload(tmp_path / "teacher-f16.gguf")
    probe = torch.tensor([ids[:128]])
    with torch.no_grad():
        expected, got = teacher(probe).logits, exported(probe).logits
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="teacher-f16.gguf")
    text = "Hello, world! 123 héllo\n\n  spaces <|im_start|>user\nhi<|im_end|>"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.chat_template == tokenizer.chat_template
    del teacher, exported

    # the teacher as q8_0: perplexity within 1 % of the checkpoint's
    run_export(model_path=str(gguf), output=tmp_path / "teacher-q8.gguf", encoding="q8_0",
               progress=False)
    quantised_teacher = perplexity(reload(tmp_path / "teacher-q8.gguf"), ids)
    print(f"teacher perplexity: checkpoint {teacher_ppl:.3f}, q8_0 {quantised_teacher:.3f}")
    assert abs(quantised_teacher / teacher_ppl - 1) < 0.01

    # its pruned student as q8_0: perplexity within 1 % of the checkpoint's
    real = tmp_path / "real.txt"
    real.write_text((REPO / "LICENSE").read_text())  # fixed text: the same student every run
    run_score(model_path=str(gguf), data=str(real), output=tmp_path / "scores", batches=2,
              seq_len=128, batch_size=2, progress=False)
    run_prune(model_path=str(gguf), output=tmp_path / "student", scores_path=str(tmp_path /
              "scores"), ratio=0.5, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    out = tmp_path / "student-export"
    manifest = run_export(model_path=str(tmp_path / "student"), output=out, encoding="q8_0",
                          progress=False)
    assert manifest["metrics"]["file_bytes"] < 0.3 * 4 * manifest["metrics"]["parameters"]
    base, quantised = perplexity(student, ids), perplexity(reload(out / "model.gguf"), ids)
    print(f"student perplexity: checkpoint {base:.3f}, q8_0 {quantised:.3f}")
    # pruned but not trained, its perplexity is in the thousands: near-flat distributions make it
    # far more sensitive to rounding than a trained model (the 1 % bound is the teacher's above)
    assert abs(quantised / base - 1) < 0.03
