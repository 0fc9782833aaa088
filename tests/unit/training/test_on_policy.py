"""On-policy distillation's pure pieces (training/on_policy.py): which steps generate, sampling
(greedy, temperature, nucleus), KV-cache generation against a naive full-forward loop with
uneven left-padded prompts and stop tokens, the scoring batch's labels (prompt and anything after
a stop token carry no loss), the step hook's record and the manifest totals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_random_model

from minima_cli.losses import IGNORE_INDEX
from minima_cli.training.on_policy import (
    OnPolicy,
    generate,
    is_on_policy_step,
    left_pad,
    log_totals,
    sample_next,
    sampling_generator,
    scoring_batch,
)

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # uneven: left padding


@pytest.fixture(scope="module")
def model():
    """A tiny float64 model with weights scaled up, so greedy continuations vary (at the default
    init it repeats its last token) and argmax ties are out of reach of rounding."""
    model = tiny_random_model(dtype=torch.float64, vocab=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(12)
    return model


def naive_generate(model, prompts, n, temperature, top_p, generator, eos=()):
    """Reference: every row on its own, unpadded, a full forward (no cache) per token; the rows'
    last logits are sampled together, so a generator is drawn from as `generate` draws."""
    sequences, outputs = [list(p) for p in prompts], [[] for _ in prompts]
    alive = [True] * len(prompts)
    for _ in range(n):
        logits = torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1]
                              for s in sequences])
        tokens = sample_next(logits, generator, temperature, top_p).tolist()
        for row, token in enumerate(tokens):
            sequences[row].append(token)
            if alive[row]:
                outputs[row].append(token)
                alive[row] = token not in eos
        if not any(alive):
            break
    return outputs


def as_lists(ids, mask):
    return [row[m].tolist() for row, m in zip(ids, mask, strict=True)]


def test_on_policy_steps_are_a_pure_function_of_seed_and_step():
    steps = range(2000)
    assert not any(is_on_policy_step(0, s, 0.0) for s in steps)
    assert all(is_on_policy_step(0, s, 1.0) for s in steps)
    for lam in (0.1, 0.5, 0.8):
        chosen = [is_on_policy_step(3, s, lam) for s in steps]
        assert abs(sum(chosen) / len(chosen) - lam) < 0.03, lam
        assert chosen == [is_on_policy_step(3, s, lam) for s in steps]  # deterministic
    assert ([is_on_policy_step(3, s, 0.5) for s in steps]
            != [is_on_policy_step(4, s, 0.5) for s in steps])  # the seed matters
    # nested: a step on-policy at lambda is on-policy at every larger lambda
    assert all(is_on_policy_step(1, s, 0.7) for s in steps if is_on_policy_step(1, s, 0.3))


def test_sampling_generators_are_keyed_and_leave_the_global_rng_alone():
    before = torch.get_rng_state()
    draw = [torch.rand(3, generator=sampling_generator(0, 5, r, m)) for r, m in
            ((0, 0), (0, 0), (0, 1), (1, 0))]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[3])
    assert not torch.equal(draw[0], torch.rand(3, generator=sampling_generator(0, 6, 0, 0)))
    assert torch.equal(before, torch.get_rng_state())


def test_greedy_and_tiny_top_p_take_the_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    assert torch.equal(sample_next(logits, None, 0.0, 1.0), argmax)
    assert torch.equal(sample_next(logits, None, 0.0, 0.3), argmax)
    generator = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 3.0):
        assert torch.equal(sample_next(logits, generator, temperature, 1e-6), argmax)


def test_sampling_follows_the_tempered_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, 4)
    generator = torch.Generator().manual_seed(2)
    # top-p 0.75: the nucleus is {1, 3} (0.5 + 0.3 reaches it), renormalised
    drawn = sample_next(logits, generator, 1.0, 0.75)
    counts = torch.bincount(drawn, minlength=4) / len(drawn)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(float(counts[1]) - 0.5 / 0.8) < 0.015
    # top-p 1 at temperature 2: every token, from softmax(logits / 2)
    drawn = sample_next(logits, generator, 2.0, 1.0)
    counts = torch.bincount(drawn, minlength=4) / len(drawn)
    expected = torch.softmax(probs.log() / 2, -1)
    assert torch.allclose(counts, expected, atol=0.015)
    # the same generator state gives the same draws
    again = [sample_next(logits[:50], torch.Generator().manual_seed(9), 1.0, 0.9)
             for _ in range(2)]
    assert torch.equal(*again)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_kv_cache_generation_equals_the_naive_loop(model, temperature, top_p):
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    model.train()
    gen_ids, gen_mask = generate(
        model, ids, mask, max_new_tokens=7, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(4), eos_ids=[], synced=False)
    assert model.training, "generation puts the model back in training mode"
    expected = naive_generate(model.eval(), PROMPTS, 7, temperature, top_p,
                              torch.Generator().manual_seed(4))
    assert gen_mask.all() and gen_ids.tolist() == expected
    assert len({tuple(row) for row in expected}) == len(PROMPTS)  # not a degenerate model


def test_generation_stops_at_stop_tokens_and_early_only_when_not_synced(model):
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    free = naive_generate(model, PROMPTS, 7, 0.0, 1.0, None)
    # a stop token that the first row emits at its third token, the others later or never
    stop = free[0][2]
    expected = naive_generate(model, PROMPTS, 7, 0.0, 1.0, None, eos=(stop,))
    assert any(len(row) < 7 for row in expected)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        gen_ids, gen_mask = generate(model, ids, mask, max_new_tokens=7, temperature=0.0,
                                     top_p=1.0, generator=None, eos_ids=[stop], synced=False,
                                     pad_id=63)
        assert as_lists(gen_ids, gen_mask) == expected
        assert (gen_ids[~gen_mask] == 63).all()  # after a stop: padding, masked
        assert gen_mask.sum(1).tolist() == [len(row) for row in expected]
        # every row stopping at its first token: one forward unsynced, all of them synced
        first = [row[0] for row in free]
        for synced, forwards in ((False, 1), (True, 5)):
            calls.clear()
            gen_ids, gen_mask = generate(model, ids, mask, max_new_tokens=5, temperature=0.0,
                                         top_p=1.0, generator=None, eos_ids=first,
                                         synced=synced)
            assert len(calls) == forwards and gen_mask.sum(1).tolist() == [1, 1, 1]
            assert gen_ids.shape[1] == forwards and gen_ids[:, 0].tolist() == first
    finally:
        hook.remove()


def test_scoring_rows_put_loss_on_generated_tokens_only():
    ids, mask = left_pad([[1, 2, 3], [4]], 0, "cpu")
    gen_ids = torch.tensor([[7, 8, 9], [5, 99, 0]])
    gen_mask = torch.tensor([[True, True, True], [True, True, False]])  # row 1 stopped at 99
    scored = scoring_batch(ids, mask, gen_ids, gen_mask, pad_id=0)
    assert scored["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 99, 0, 0, 0]]
    assert scored["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
    X = IGNORE_INDEX
    # label t is token t + 1 where that token was generated: prompt tokens, the padding and
    # what follows a stop token count nothing
    assert scored["labels"].tolist() == [[X, X, 7, 8, 9, X], [5, 99, X, X, X, X]]
    assert int(scored["tokens"]) == 5
    # unpadded prompts (distill): no mask needed
    plain = scoring_batch(torch.tensor([[1, 2], [3, 4]]), None, torch.tensor([[5], [6]]),
                          torch.tensor([[True], [True]]), pad_id=0)
    assert plain["labels"].tolist() == [[X, 5, X], [X, 6, X]]


def test_the_step_hook_records_the_split_and_the_manifest_sums_it(tmp_path):
    options = SimpleNamespace(on_policy=0.5, gen_tokens=2, gen_temperature=1.0, gen_top_p=1.0,
                              seq_kd=False)
    hook = OnPolicy(options, seed=0, rank=0, world_size=1, device=torch.device("cpu"),
                    synced=False, eos_ids=[], pad_id=0, vocab_size=64, unwrap=lambda m: m)
    assert hook.bar_keys == ("generate_s", "teacher_s", "student_s")
    step = next(s for s in range(100) if is_on_policy_step(0, s, 0.5))
    hook.begin_step(step)
    assert hook.generating()
    with hook.timed("teacher"):
        sum(range(10000))
    record = hook.end_step(1.0)
    assert record["on_policy"] == 1 and 0 < record["teacher_s"] < 1
    assert record["student_s"] == pytest.approx(1.0 - record["teacher_s"])
    off = OnPolicy(SimpleNamespace(**{**vars(options), "on_policy": 0.0}), seed=0, rank=0,
                   world_size=1, device=torch.device("cpu"), synced=False, eos_ids=[],
                   pad_id=0, vocab_size=64, unwrap=lambda m: m)
    assert off.bar_keys == () and not off.generating()
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "on_policy": 1, "generated_tokens": 12}, {"step": 2, "on_policy": 0,
                                                            "generated_tokens": 0},
        {"step": 3, "on_policy": 1, "generated_tokens": 7})))
    assert log_totals(log) == {"on_policy_steps": 2, "generated_tokens": 19}


def test_the_on_policy_options_are_hashed_so_a_changed_resume_is_refused():
    from minima_cli.stages.configs import DistillConfig, SftConfig

    base = DistillConfig()
    for change in ({"on_policy": 0.5}, {"gen_tokens": 8}, {"gen_temperature": 0.0},
                   {"gen_top_p": 0.9}, {"on_policy": 0.5, "seq_kd": True},
                   {"prompt_tokens": 100}):
        assert DistillConfig(**change).fingerprint() != base.fingerprint(), change
    assert SftConfig(on_policy=1.0).fingerprint() != SftConfig().fingerprint()
