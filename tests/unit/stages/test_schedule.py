"""`minima schedule` (MiniDisc): the selection rule, rank correlations, nested candidates, plans in
a pruned model's coordinates, the sandwich loss, and the command end to end on the tiny world."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli, save_model, tiny_random_model

from minima_cli.cli.app import main
from minima_cli.errors import MinimaError
from minima_cli.losses import distillation_loss, next_token_labels
from minima_cli.minidisc import (
    candidate_shapes,
    choose_assistant,
    kendall,
    parse_sparsities,
    relative_plan,
    sandwich_widths,
    spearman,
)
from minima_cli.model.arch import ModelShape, count_parameters, shape_from_config
from minima_cli.model.checkpoint import resolve_model
from minima_cli.model.masks import masked
from minima_cli.model.scores import random_scores
from minima_cli.model.selection import plan_masks, plan_prune
from minima_cli.model.shapes import resolve_target
from minima_cli.stages import schedule
from minima_cli.stages.configs import DistillConfig
from minima_cli.stages.schedule import build_candidates, materialise, sandwich_step, train_sandwich
from minima_cli.training.loop import LocalSession, default_device


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine they spin."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- pure pieces ----------------------------------------------------------------------------------


def test_parse_sparsities():
    assert parse_sparsities("50, 0,10%,50") == [0.0, 0.1, 0.5]
    for text, message in (("100", r"\[0, 100\)"), ("-5", r"\[0, 100\)"), ("ten", "not a number"),
                          (" , ", "empty")):
        with pytest.raises(MinimaError, match=message):
            parse_sparsities(text)


def test_selection_rule_is_the_argmax_of_the_tradeoff_among_eligible_candidates():
    s = [0.0, 0.3, 0.6, 0.9]
    p = [0.80, 0.76, 0.70, 0.60]
    # trade-offs at lambda 0.2: 0.80, 0.82, 0.82, 0.78 -> tie between 0.3 and 0.6: less sparse wins
    best, values = choose_assistant(s, p, 0.2, student_sparsity=0.95)
    assert values == pytest.approx([0.80, 0.82, 0.82, 0.78]) and best == 1
    assert choose_assistant(s, p, 0.5, 0.95)[0] == 3  # a larger lambda favours sparser ones
    assert choose_assistant(s, p, 0.5, 0.9)[0] == 2  # 0.9 is not less sparse than the student
    assert choose_assistant(s, p, 0.0, 0.95)[0] == 0  # lambda 0: the best P, the teacher
    assert choose_assistant(s, p, 1.0, 0.05)[0] == 0  # only the teacher is eligible


@pytest.mark.parametrize(("lam", "p", "message"), [
    (1.5, [0.5, 0.4], r"--lambda 1.5 must be in \[0, 1\]"),
    (-0.1, [0.5, 0.4], r"must be in \[0, 1\]"),
    (float("nan"), [0.5, 0.4], r"must be in \[0, 1\]"),
    (0.2, [1.2, 0.4], r"dev metric 1.2 must be in \[0, 1\]"),
])
def test_selection_rule_rejects_bad_inputs(lam, p, message):
    with pytest.raises(MinimaError, match=message):
        choose_assistant([0.0, 0.5], p, lam, 0.9)


def test_rank_correlations_match_hand_computed_values():
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/120
    assert kendall([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)  # (8 - 2) / 10
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: average ranks for Spearman, tau-b for Kendall
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / 22.5 ** 0.5)
    assert kendall([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / 30 ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # nan: undefined
    with pytest.raises(MinimaError, match="at least 2"):
        kendall([1], [1])
    with pytest.raises(MinimaError, match="same length"):
        spearman([1, 2], [1, 2, 3])


def test_sandwich_widths_follow_the_sandwich_rule():
    rng = random.Random(0)
    assert sandwich_widths(5, 0, rng) == [0, 1, 2, 3, 4] == sandwich_widths(5, 7, rng)
    for _ in range(20):
        chosen = sandwich_widths(6, 3, rng)
        assert len(chosen) == 3 and chosen[0] == 0 and chosen[-1] == 5 and 0 < chosen[1] < 5
    assert sandwich_widths(6, 2, rng) == [0, 5]
    with pytest.raises(MinimaError, match="at least the largest and the smallest"):
        sandwich_widths(6, 1, rng)


# --- nested candidates ----------------------------------------------------------------------------


def assert_mask_subset(narrow, wide):
    for axis, mask in narrow.as_dict().items():
        assert bool((mask <= wide.as_dict()[axis]).all()), axis


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_candidates_are_nested_from_one_ranking(kind):
    # 12 heads over 6 kv groups: the symmetric shapes alone are not nested (LLaMA: 5 groups of 1
    # head at 80 %, then 2 groups of 2 at 85 %), so the candidates must be widened to nest;
    # LlamaConfig also wants hidden % heads == 0, the others do not.
    teacher = ModelShape(layers=3, hidden=96, heads=12, kv_heads=6, head_dim=8, ffn=160,
                         vocab=96, model_type=kind)
    scores = random_scores(teacher, seed=3)
    student = resolve_target(teacher, ratio=0.1)
    grid = parse_sparsities("0,10,20,30,40,50,60,70,80,85,90,95")
    symmetric = [resolve_target(teacher, ratio=1 - s) for s in grid[1:]]
    assert any(b.kv_heads > a.kv_heads or b.group_size > a.group_size
               for a, b in zip(symmetric, symmetric[1:], strict=False))
    candidates, student_plan = build_candidates(scores, teacher, student, grid)
    assert candidates[0].sparsity == 0 and candidates[0].shape == teacher
    sparsities = [c.sparsity for c in candidates]
    assert sparsities == sorted(sparsities) and sparsities[-1] < 0.9
    total = count_parameters(teacher)
    assert all(c.asked < 1 - count_parameters(student) / total for c in candidates)
    masks = [plan_masks(c.plan, teacher) for c in candidates] + [plan_masks(student_plan, teacher)]
    for wide, narrow in zip(masks, masks[1:], strict=False):
        assert_mask_subset(narrow, wide)
        assert sum(m.sum() for m in narrow.as_dict().values()) < \
            sum(m.sum() for m in wide.as_dict().values())
    for a, b in zip(candidates, candidates[1:], strict=False):
        assert a.shape.group_size >= b.shape.group_size and a.shape.kv_heads >= b.shape.kv_heads


def test_candidates_skip_sparsities_beyond_the_student_and_repeated_shapes():
    teacher = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=176,
                         vocab=512)
    student = resolve_target(teacher, ratio=0.5)
    shapes = candidate_shapes(teacher, student, [0.1, 0.11, 0.3, 0.5, 0.7])
    assert [s for s, _ in shapes] == [0.0, 0.1, 0.3]  # 0.11 solves to the same shape as 0.1
    assert all(count_parameters(shape) > count_parameters(student) for _, shape in shapes)


def test_relative_plan_prunes_a_pruned_model_to_the_same_student(tmp_path):
    model = tiny_random_model("llama", layers=3, hidden=64, heads=8, ffn=96, tied=False)
    teacher = shape_from_config(model.config)
    scores = random_scores(teacher, seed=1)
    student = resolve_target(teacher, shape={"layers": 2}, ratio=0.3)
    candidates, student_plan = build_candidates(scores, teacher, student, [0.4])
    assistant = candidates[1]
    source = resolve_model(save_model(model, tmp_path / "teacher"))
    middle = materialise(source, assistant.plan, tmp_path / "assistant")
    final = materialise(resolve_model(middle), relative_plan(assistant.plan, student_plan),
                        tmp_path / "student")
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(final).eval()
    assert shape_from_config(pruned.config) == student
    ids = torch.randint(0, teacher.vocab, (2, 12))
    with torch.no_grad(), masked(model, plan_masks(student_plan, teacher), teacher):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, expected, atol=1e-4)
    with pytest.raises(MinimaError, match="not nested"):
        relative_plan(student_plan, assistant.plan)


# --- the sandwich ---------------------------------------------------------------------------------


def sandwich_setup(seed: int = 0):
    """A shared network, a different teacher, three nested widths and a batch."""
    model = tiny_random_model(layers=2, hidden=32, heads=4, ffn=48, seed=seed)
    teacher_model = tiny_random_model(layers=2, hidden=32, heads=4, ffn=48, seed=7)
    shape = shape_from_config(model.config)
    scores = random_scores(shape, seed=2)
    widths = [plan_masks(plan_prune(scores, shape, resolve_target(shape, ratio=r)), shape)
              for r in (0.8, 0.5, 0.3)]
    batch = torch.randint(0, shape.vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    return model, teacher_model, shape, widths, batch


def sandwich_sgd_step(clip: float):
    """(per-width losses, weight change) of one sandwich step with plain SGD at lr 1, whose
    weight change is what is left of the gradient after clipping."""
    model, teacher_model, shape, widths, batch = sandwich_setup()
    before = [p.detach().clone() for p in model.parameters()]
    session = LocalSession("fp32", "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mean, losses = sandwich_step(session, model, optimizer, teacher_model, shape, widths, batch,
                                 DistillConfig(alpha=0.3, clip=clip), shape.vocab, lr=1.0)
    assert mean == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    return losses, [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def test_sandwich_step_descends_the_mean_of_the_per_width_losses():
    losses, change = sandwich_sgd_step(clip=0.0)
    model, teacher_model, shape, widths, batch = sandwich_setup()
    with torch.no_grad():
        teacher_logits = teacher_model(input_ids=batch).logits
    separate = []  # the reference: each width's loss on its own, then the plain mean
    for masks in widths:
        with masked(model, masks, shape):
            separate.append(distillation_loss(model(input_ids=batch).logits, teacher_logits,
                                              next_token_labels(batch), alpha=0.3)[0])
    torch.stack(separate).mean().backward()
    assert losses == pytest.approx([loss.item() for loss in separate], rel=1e-5)
    assert len(set(losses)) == 3  # the widths really differ
    for got, param in zip(change, model.parameters(), strict=True):
        assert torch.allclose(got, param.grad, atol=1e-6)


def test_sandwich_clip_0_is_no_clipping():
    """It used to call clip_grad_norm_(..., 0), which zeroes every gradient."""
    _, unclipped = sandwich_sgd_step(clip=0.0)
    _, never_reached = sandwich_sgd_step(clip=1e9)
    _, clipped = sandwich_sgd_step(clip=1e-3)
    assert any(bool(c.abs().max() > 1e-3) for c in unclipped)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, never_reached, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(unclipped, clipped, strict=True))
    with pytest.raises(MinimaError, match="--clip must be >= 0"):
        sandwich_sgd_step(clip=-1.0)


def train_small_sandwich(clip: float = 1.0, seen: dict[str, list] | None = None, **kwargs):
    """Three sandwich steps; `seen` collects (input device, output dtype) of the first MLP of
    the network and of the teacher at every forward."""
    model, teacher_model, shape, widths, _ = sandwich_setup()
    for name, module in (("network", model), ("teacher", teacher_model)) if seen else ():
        module.model.layers[0].mlp.register_forward_hook(
            lambda m, args, output, name=name: seen[name].append((args[0].device, output.dtype)))
    batches = iter(torch.randint(0, shape.vocab, (3, 2, 10),
                                 generator=torch.Generator().manual_seed(3)))
    config = DistillConfig(max_steps=3, lr=1e-2, clip=clip)
    history = train_sandwich(model, teacher_model, shape, widths, batches, config, shape.vocab,
                             **kwargs)
    return history, model, teacher_model


def test_train_sandwich_clip_0_matches_a_clip_never_reached():
    history, model, _ = train_small_sandwich(0.0, device="cpu", precision="fp32")
    same, reference, _ = train_small_sandwich(1e9, device="cpu", precision="fp32")
    assert history == same and len(history) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(),
                                                 strict=True))


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32),
                                                  ("bf16", torch.bfloat16)])
def test_train_sandwich_runs_on_the_given_device_and_precision(precision, dtype):
    """bf16 is autocast (on the CPU here) for the network and the teacher alike."""
    seen = {"network": [], "teacher": []}
    device = torch.device("cpu")
    history, model, _ = train_small_sandwich(seen=seen, device=device, precision=precision)
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history)
    assert seen["teacher"] == [(device, dtype)] * 3  # once per step
    assert seen["network"] == [(device, dtype)] * 9  # once per width per step
    assert all(p.device == device and p.dtype == torch.float32 for p in model.parameters())


def test_the_schedule_sandwich_runs_like_distill(tmp_path, monkeypatch):
    """`minima schedule`: the default device (the GPU if there is one) and the configured
    precision, the teacher loaded as distill loads it (bf16 weights in a bf16 run)."""
    model, _, shape, _, _ = sandwich_setup()
    source = resolve_model(save_model(model, tmp_path / "teacher"))
    candidates, _ = build_candidates(random_scores(shape, seed=2), shape,
                                     resolve_target(shape, ratio=0.3), [0.0, 0.5])
    calls = []

    def spy(network, teacher, *args, device, precision):
        calls.append((device, precision, teacher.dtype))
        return train_sandwich(network, teacher, *args, device=device, precision=precision)

    monkeypatch.setattr(schedule, "train_sandwich", spy)
    blocks = torch.randint(0, shape.vocab, (2, 2, 10))
    prepared = SimpleNamespace(stream=lambda batch_size: iter(blocks))
    losses, history = schedule.sandwich_dev_losses(
        source, shape, candidates, prepared, blocks[0],
        DistillConfig(max_steps=2, precision="bf16"), shape.vocab, 0, False)
    assert calls == [(default_device(), "bf16", torch.bfloat16)]
    assert len(losses) == len(candidates) and len(history) == 2
    assert all(math.isfinite(loss) for loss in losses + history)


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("schedule") / "scores"
    assert main(["score", "-m", str(tiny_world / "teacher"), "-d",
                 str(tiny_world / "data" / "train.txt"), "-o", str(out), "--seq-len", "32",
                 "--batches", "2", "-q"]) == 0
    return out


def schedule_args(tiny_world, scored, out, *extra):
    return ["schedule", "-t", tiny_world / "teacher", "-s", scored, "-d",
            tiny_world / "data" / "train.txt", "-o", out, "--seq-len", "32", "--batch-size", "4",
            "--lr", "3e-3", "-q", *extra]


@pytest.fixture
def builds(monkeypatch):
    """Every token store build (data/store.py) during the test, by output path."""
    import minima_cli.data.store as store

    built = []
    real = store.build_store

    def counting(sources, *args, **kwargs):
        built.append(Path(args[2]))  # (tokenizer, tokenizer_path, output, ...)
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(store, "build_store", counting)
    return built


def test_schedule_exhaustive_end_to_end(tiny_world, scored, tmp_path, capsys, builds):
    out = tmp_path / "schedule"
    code, stdout, err = run_cli(schedule_args(
        tiny_world, scored, out, "--student-ratio", "0.3", "--sparsities", "0,30,60,90",
        "--sandwich-steps", "4", "--distill-steps", "3", "--exhaustive",
        "--dev-data", tiny_world / "data" / "valid.txt"), capsys)
    assert code == 0, err
    report = json.loads((out / "schedule.json").read_text())
    rows = report["candidates"]
    assert [round(r["asked_sparsity"], 2) for r in rows] == [0.0, 0.3, 0.6]  # 90 % skipped
    assert report["skipped_sparsities"] == [0.9]
    assert all(0 < r["P"] <= 1 for r in rows)
    assert [r["tradeoff"] for r in rows] == pytest.approx(
        [r["P"] + 0.2 * r["sparsity"] for r in rows])
    chosen = report["chosen"]
    assert chosen == max(range(3), key=lambda i: rows[i]["tradeoff"])
    found = report["exhaustive"]
    assert found["runs"] == 5 and len(found["rows"]) == 3  # 2 chains of 2 runs + the direct one
    assert found["rows"][0]["assistant_P"] == rows[0]["P"]  # the teacher is its own assistant
    assert report["result"]["student_P"] == found["chosen_student_P"]
    assert (out / "assistant").is_dir() == (chosen != 0)
    assert not (out / "work").exists() and (out / "minima.json").is_file()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert sum(p.numel() for p in student.parameters()) == report["student"]["params"]
    assert "schedule: teacher -> " in stdout and "exhaustive: best student P" in stdout
    # the text was tokenised once, into OUTPUT.token-cache/: the 5 distillations read that store
    assert len(builds) == 1 and builds[0].parent == tmp_path / "schedule.token-cache"


def test_schedule_reuses_its_token_cache(tiny_world, scored, tmp_path, capsys, builds):
    out = tmp_path / "plan"
    args = schedule_args(tiny_world, scored, out, "--student-ratio", "0.3", "--sparsities",
                         "0,30", "--sandwich-steps", "2", "--plan-only")
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    cache = tmp_path / "plan.token-cache"
    assert len(builds) == 1 and [p.name for p in cache.iterdir()] == [builds[0].name]
    first = json.loads((out / "schedule.json").read_text())
    code, _, err = run_cli([*args, "--force"], capsys)
    assert code == 0, err
    assert len(builds) == 1  # the second run opened the cached store: no rebuild
    again = json.loads((out / "schedule.json").read_text())
    assert again["candidates"] == first["candidates"] and again["chosen"] == first["chosen"]


def test_schedule_plan_only_writes_the_table_and_no_model(tiny_world, scored, tmp_path, capsys):
    out = tmp_path / "plan"
    code, stdout, err = run_cli(schedule_args(
        tiny_world, scored, out, "--student-params", "100K", "--sparsities", "0,20,40",
        "--sandwich-steps", "2", "--sandwich-widths", "2", "--plan-only", "--lambda", "1"),
        capsys)
    assert code == 0, err
    report = json.loads((out / "schedule.json").read_text())
    assert report["sandwich"]["widths_per_step"] == 2 and "result" not in report
    assert sorted(p.name for p in out.iterdir()) == ["minima.json", "schedule.json"]
    assert "plan only" in stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--student-ratio", "0.3", "--lambda", "1.5"], r"--lambda must be <= 1, got 1.5"),
    (["--student-ratio", "0.3", "--lambda", "-0.2"], r"--lambda must be >= 0, got -0.2"),
    (["--student-params", "0"], "--student-params must be positive"),
    (["--student-params", "-3M"], "not a size"),
    (["--student-ratio", "1.2"], r"must be in \(0, 1\)"),
    ([], "exactly one of --student-ratio and --student-params"),
    (["--student-ratio", "0.3", "--student-params", "1M"], "exactly one of"),
    (["--student-ratio", "0.3", "--sparsities", "0,100"], r"\[0, 100\)"),
    (["--student-ratio", "0.3", "--sandwich-widths", "1"], "at least the largest"),
    (["--student-ratio", "0.3", "--sandwich-steps", "0"], "--sandwich-steps must be positive"),
    (["--student-ratio", "0.3", "--exhaustive", "--plan-only"], "cannot be --plan-only"),
])
def test_schedule_bad_inputs_exit_2_with_one_line(tiny_world, scored, tmp_path, capsys, extra,
                                                  message):
    out = tmp_path / "bad"
    code, _, err = run_cli(schedule_args(tiny_world, scored, out, *extra), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not list(tmp_path.glob("bad.tmp-*"))
