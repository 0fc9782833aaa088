"""Pruning: the plan functions directly, and the correctness contract — the pruned model's logits
equal the teacher's with the matching masks at 0 — on every axis and architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_model, tiny_random_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape, count_parameters, shape_from_config
from minima_cli.model.checkpoint import resolve_model
from minima_cli.model.masks import Masks, masked
from minima_cli.model.scores import random_scores
from minima_cli.model.selection import plan_masks, plan_prune, select_layers, top_k
from minima_cli.model.shapes import parse_shape, resolve_target, split_heads
from minima_cli.model.slicing import prune_checkpoint, row_runs
from minima_cli.units import parse_size

LLAMA2_7B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008,
                       vocab=32000, tied=False)
SMOLLM2 = ModelShape(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536,
                     vocab=49152, tied=True)



# --- targets -------------------------------------------------------------------------------------


def test_parse_shape_and_errors():
    assert parse_shape("layers=24, hidden=3072,heads=24,kv-heads=24,ffn=8192") == {
        "layers": 24, "hidden": 3072, "heads": 24, "kv_heads": 24, "ffn": 8192}
    with pytest.raises(MinimaError, match="unknown shape key 'width'"):
        parse_shape("width=3")
    with pytest.raises(MinimaError, match="not an integer"):
        parse_shape("ffn=1.5")
    with pytest.raises(MinimaError, match="not key=value"):
        parse_shape("ffn")


def test_parse_size():
    assert parse_size("3B") == 3_000_000_000
    assert parse_size("60m") == 60_000_000
    assert parse_size("1.5e9") == 1_500_000_000
    assert parse_size("135000") == 135_000
    with pytest.raises(MinimaError, match="not a size"):
        parse_size("three")


def test_split_heads_keeps_gqa_standard():
    assert split_heads(SMOLLM2, 6, None) == (6, 2)  # drop a whole kv group of 3 heads
    assert split_heads(SMOLLM2, None, 1) == (3, 1)
    assert split_heads(SMOLLM2, 6, 3) == (6, 3)  # thin each group to 2 heads
    assert split_heads(SMOLLM2, 2, None) == (2, 2)  # 2 groups of 1 (no whole-group split)
    with pytest.raises(MinimaError, match="not divisible into kept kv groups"):
        split_heads(SMOLLM2, 5, None)
    with pytest.raises(MinimaError, match="cannot be split into 2 kept kv groups"):
        split_heads(SMOLLM2, 7, 2)


def test_minima_flagship_shape_is_3b():
    # The MiniMA student (vocab extended to 49216, untied): 3.02B per the paper.
    teacher = LLAMA2_7B.replace(vocab=49216)
    assert count_parameters(LLAMA2_7B) == 6_738_415_616  # LLaMA2-7B's published count
    student = resolve_target(teacher, parse_shape("layers=24,hidden=3072,heads=24,ffn=8192"))
    assert student.kv_heads == 24
    assert round(count_parameters(student) / 1e9, 2) == 3.02


def test_symmetric_shaping_hits_the_budget_with_teacher_proportions():
    target = resolve_target(LLAMA2_7B, params=3_000_000_000)
    assert abs(count_parameters(target) - 3e9) / 3e9 < 0.02
    assert target.layers == 32 and target.hidden % 8 == 0 and target.ffn % 8 == 0
    factors = [target.hidden / 4096, target.ffn / 11008, target.heads / 32]
    assert max(factors) - min(factors) < 0.05  # every width scaled alike
    by_ratio = resolve_target(LLAMA2_7B, ratio=0.45)
    assert abs(count_parameters(by_ratio) / count_parameters(LLAMA2_7B) - 0.45) < 0.01


LLAMA3_8B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                       vocab=128256, tied=False)


@pytest.mark.parametrize("teacher", [SMOLLM2, LLAMA2_7B, LLAMA3_8B])
def test_solved_llama_targets_are_valid_configs(teacher):
    # transformers' LlamaConfig refuses hidden % heads != 0 (even with an explicit head_dim).
    for ratio in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9):
        target = resolve_target(teacher, ratio=ratio)
        assert target.hidden % target.heads == 0 and target.heads % target.kv_heads == 0
        # 9 heads and a multiple of 8 make SmolLM2's hidden step lcm(8, 9) = 72: coarse.
        assert abs(count_parameters(target) / count_parameters(teacher) - ratio) < 0.06


def test_explicit_llama_shape_must_divide_but_other_architectures_need_not():
    with pytest.raises(MinimaError, match="LlamaConfig requires"):
        resolve_target(SMOLLM2, {"hidden": 392, "heads": 6})
    qwen2 = SMOLLM2.replace(model_type="qwen2")
    assert resolve_target(qwen2, {"hidden": 392, "heads": 6}).hidden == 392


def test_partial_shape_plus_budget_solves_the_free_axes():
    target = resolve_target(SMOLLM2, {"layers": 20}, params=60_000_000)
    assert target.layers == 20
    assert abs(count_parameters(target) - 60e6) / 60e6 < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": {"ffn": 99999}}, "larger than the model"),
        ({"shape": {"hidden": 0}}, "must be positive"),
        ({"shape": {"layers": -2}}, "must be positive"),
        ({"params": 10**12}, "not smaller than the model"),
        ({"params": 0}, "must be positive"),
        ({"ratio": 1.5}, "must be in"),
        ({"ratio": 0.0}, "must be in"),
        ({"params": 10**6, "ratio": 0.5}, "not both"),
        ({"shape": {"heads": 5}}, "not divisible"),
        ({"params": 1000}, "cannot reach"),
    ],
)
def test_bad_targets(kwargs, message):
    with pytest.raises(MinimaError, match=message):
        resolve_target(SMOLLM2, **kwargs)


# --- plans ---------------------------------------------------------------------------------------


def test_top_k_is_ascending_and_stable():
    assert top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert top_k(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]


def test_layer_selection_rules():
    layer_scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    survival = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2])
    assert select_layers(3, "score", layer_scores, survival) == [0, 2, 4]
    assert select_layers(3, "units", layer_scores, survival) == [1, 2, 3]
    assert select_layers(24, "middle", torch.zeros(32), torch.zeros(32)) == list(range(4, 28))


def test_local_plan_keeps_each_layers_top_units_and_gqa_groups():
    teacher = SMOLLM2.replace(layers=2)
    scores = random_scores(teacher)
    target = teacher.replace(heads=4, kv_heads=2, ffn=100, hidden=500)
    plan = plan_prune(scores, teacher, target)
    for i, layer in enumerate(plan.layers):
        assert plan.ffn[i] == top_k(scores["ffn"][layer], 100)
        assert plan.kv_groups[i] == top_k(scores["kv_groups"][layer], 2)
        for j, group in enumerate(plan.kv_groups[i]):  # new group j holds group's own heads
            members = plan.heads[i][2 * j: 2 * j + 2]
            assert all(h // 3 == group for h in members)
    assert plan.hidden == top_k(scores["hidden"], 500)
    assert plan.student_shape(teacher) == target


def test_global_priority_removes_the_layers_with_fewest_surviving_units():
    teacher = SMOLLM2.replace(layers=4)
    scores = random_scores(teacher)
    scores["ffn"][2] *= 0.01  # layer 2's neurons lose every global comparison
    scores["heads"][2] *= 0.01
    scores["layers"] = torch.tensor([0.1, 0.2, 0.9, 0.3])  # ...though its layer score is best
    target = teacher.replace(layers=3)
    assert 2 not in plan_prune(scores, teacher, target, priority="global").layers
    local = plan_prune(scores, teacher, target, priority="local")
    assert local.layers == [1, 2, 3] and local.notes["layer_selection"] == "score"


# --- exactness -----------------------------------------------------------------------------------

CASES = {  # axis -> target changes on a 3-layer, hidden 32, 4 heads (2 kv groups), ffn 48 model
    "heads": {"heads": 2, "kv_heads": 2},  # thin query heads inside each group
    "kv_groups": {"heads": 2, "kv_heads": 1},  # drop whole groups
    "ffn": {"ffn": 20},
    "hidden": {"hidden": 20},
    "layers": {"layers": 2},
    "all": {"layers": 2, "hidden": 24, "heads": 2, "kv_heads": 1, "ffn": 16},
}


def prune_and_compare(tmp_path, model, changes, *, priority="local", seed=0):
    teacher_dir = save_model(model, tmp_path / "teacher")
    source = resolve_model(teacher_dir)
    teacher = shape_from_config(model.config)
    target = teacher.replace(**changes)
    plan = plan_prune(random_scores(teacher, seed), teacher, target, priority=priority)
    out = tmp_path / "student"
    out.mkdir()
    prune_checkpoint(source, model.config, plan, teacher, out, progress=False)
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        with masked(model, plan_masks(plan, teacher), teacher):
            expected = model(ids).logits
        actual = student(ids).logits
    return student, target, expected, actual


@pytest.mark.parametrize("axis", list(CASES))
@pytest.mark.parametrize(
    ("kind", "gqa", "tied"),
    [("llama", True, True), ("llama", False, False), ("llama_bias", True, False),
     ("mistral", True, True), ("qwen2", True, False), ("qwen3", True, True)],
)
def test_pruned_logits_equal_masked_teacher(tmp_path, kind, gqa, tied, axis):
    model = tiny_random_model(kind, gqa=gqa, tied=tied)
    changes = dict(CASES[axis])
    if not gqa and "kv_heads" in changes:  # MHA: a kv group is one head
        changes["kv_heads"] = changes["heads"]
    student, target, expected, actual = prune_and_compare(tmp_path, model, changes)
    assert sum(p.numel() for p in student.parameters()) == count_parameters(target)
    assert student.config.tie_word_embeddings == tied
    if tied:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_masked_teacher_with_all_ones_is_the_teacher():
    model = tiny_random_model("qwen2")
    shape = shape_from_config(model.config)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        plain = model(ids).logits
        with masked(model, Masks.ones(shape), shape):
            hooked = model(ids).logits
    torch.testing.assert_close(hooked, plain, atol=1e-6, rtol=1e-6)


def test_global_priority_prune_is_exact_too(tmp_path):
    model = tiny_random_model("llama", layers=4)
    _, _, expected, actual = prune_and_compare(tmp_path, model, CASES["all"], priority="global")
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_row_runs():
    assert row_runs([3, 4, 5, 9, 10, 12]) == [(3, 3), (9, 2), (12, 1)]
    assert row_runs([]) == []


def test_exact_when_tensors_stream_in_many_small_chunks(tmp_path, monkeypatch):
    import minima_cli.model.slicing as prune

    monkeypatch.setattr(prune, "CHUNK_BYTES", 300)  # a few rows per read
    model = tiny_random_model("llama_bias", tied=False)
    _, _, expected, actual = prune_and_compare(tmp_path, model, CASES["all"])
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_bf16_stays_bf16_and_sharded_checkpoints_stream(tmp_path):
    model = tiny_random_model("llama", tied=False, dtype=torch.bfloat16)
    teacher_dir = tmp_path / "teacher"
    model.save_pretrained(teacher_dir, max_shard_size="20KB")
    assert len(list(teacher_dir.glob("*.safetensors"))) > 1
    teacher = shape_from_config(model.config)
    plan = plan_prune(random_scores(teacher), teacher, teacher.replace(**CASES["all"]))
    out = tmp_path / "student"
    out.mkdir()
    prune_checkpoint(resolve_model(teacher_dir), model.config, plan, teacher, out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        assert all(t.dtype == torch.bfloat16 for t in load_file(out / file).values())
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.dtype == torch.bfloat16
    assert sum(p.numel() for p in student.parameters()) == count_parameters(
        plan.student_shape(teacher))
