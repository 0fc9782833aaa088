"""The tiny stage: the synthetic world used by tests, the demo and the benchmarks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from minima_cli.data.tiny_corpus import (
    _GRAMMAR,
    ASKABLE_TEMPLATES,
    ATTRIBUTE_VALUES,
    CHAT_QUESTIONS,
    FACT_TEMPLATES,
    IM_END,
    IM_START,
    NUMBER_WORDS,
    make_chat_sets,
    make_corpus,
    make_facts,
    make_mc_sets,
)
from minima_cli.errors import MinimaError
from minima_cli.stages.tiny import build_tiny_world, pretrain, tiny_llama_config, train_tokenizer


def test_make_facts_is_a_deterministic_closed_table() -> None:
    facts = make_facts(seed=3, n_entities=10)
    assert facts == make_facts(seed=3, n_entities=10)
    assert facts != make_facts(seed=4, n_entities=10)
    assert len(facts) == 10 * len(ATTRIBUTE_VALUES)
    entities = {f["entity"] for f in facts}
    assert len(entities) == 10
    assert all(re.fullmatch(r"[a-z]+", e) for e in entities)
    for fact in facts:
        assert set(fact) == {"entity", "attribute", "value"}
        assert fact["value"] in ATTRIBUTE_VALUES[fact["attribute"]]
    # One value per (entity, attribute): every question has a single right answer.
    assert len({(f["entity"], f["attribute"]) for f in facts}) == len(facts)


def test_make_corpus_is_deterministic_and_single_line() -> None:
    corpus = make_corpus(50, seed=1)
    assert corpus == make_corpus(50, seed=1)
    assert corpus != make_corpus(50, seed=2)
    assert len(corpus) == 50
    assert all(doc and "\n" not in doc and doc == doc.strip() for doc in corpus)
    # A larger corpus extends a smaller one, and the fact table does not depend on its size.
    assert make_corpus(80, seed=1)[:50] == corpus


def test_make_corpus_states_only_true_facts_and_correct_sums() -> None:
    facts = make_facts(seed=0)
    table = {(f["entity"], f["attribute"]): f["value"] for f in facts}
    text = " ".join(make_corpus(400, seed=0))
    mentions = 0
    for attribute, templates in FACT_TEMPLATES.items():
        for template in templates:
            pattern = re.escape(template).replace(re.escape("{e}"), r"([a-z]+)")
            pattern = pattern.replace(re.escape("{v}"), r"([a-z]+)")
            for entity, value in re.findall(rf"(?:^|(?<=\. )){pattern}", text):
                if (entity, attribute) in table:
                    assert value == table[entity, attribute], (entity, attribute, value)
                    mentions += 1
    assert mentions > len(facts)  # facts are stated, most more than once

    number = {word: i for i, word in enumerate(NUMBER_WORDS)}
    sums = re.findall(r"(\w+) (plus|minus) (\w+) is (\w+)\.", text)
    assert len(sums) > 50
    for a, op, b, c in sums:
        expected = number[a] + number[b] if op == "plus" else number[a] - number[b]
        assert number[c] == expected


NUMBER = {word: i for i, word in enumerate(NUMBER_WORDS)}


def _entity(text: str, templates) -> str:
    """The entity a question built from one of `templates` asks about."""
    for template in templates:
        prefix = template.split("{v}")[0].rstrip() if "{v}" in template else template
        pattern = re.escape(prefix).replace(re.escape("{e}"), r"(\w+)")
        found = re.fullmatch(pattern, text)
        if found:
            return found.group(1)
    raise AssertionError(f"no template asks {text!r}")


def _sum_answer(question: str) -> int:
    a, op, b = re.fullmatch(r"(?:what is )?(\w+) (plus|minus) (\w+)(?: is|\?)", question).groups()
    return NUMBER[a] + NUMBER[b] if op == "plus" else NUMBER[a] - NUMBER[b]


def test_mc_sets_are_deterministic_answerable_and_disjoint() -> None:
    facts = make_facts(0)
    table = {(f["entity"], f["value"]) for f in facts}
    entities = {f["entity"] for f in facts}
    sets = make_mc_sets(facts, seed=0)
    assert sets == make_mc_sets(facts, seed=0) != make_mc_sets(facts, seed=1)
    assert {k: len(v) for k, v in sets.items()} == {
        "eval_mc_dev": 15, "eval_mc": 300, "eval_facts_mc_dev": 10, "eval_facts_mc": 200}
    for name in ("eval_mc", "eval_facts_mc"):
        dev_questions = {q["question"] for q in sets[f"{name}_dev"]}
        assert not dev_questions & {q["question"] for q in sets[name]}
    # the first shots mix the categories
    assert [q["category"] for q in sets["eval_mc_dev"][:3]] == ["counting", "arithmetic",
                                                                "grammar"]
    for question in [q for rows in sets.values() for q in rows]:
        choices, answer, text = question["choices"], question["answer"], question["question"]
        assert len(choices) == len(set(choices)) == 4 and 0 <= answer < 4
        right = choices[answer]
        if question["category"] == "arithmetic":
            assert NUMBER[right] == _sum_answer(text)
        elif question["category"] == "counting":
            *_, last = text.split()
            assert NUMBER[right] == NUMBER[last] + (1 if "up" in text else -1)
        elif question["category"] == "grammar":  # exactly one choice may come next
            last = text.split()[-1]
            allowed = (_GRAMMAR["noun"] if last in _GRAMMAR["det"] + _GRAMMAR["adj"] else
                       _GRAMMAR["verb"] + _GRAMMAR["ivp"] if last in _GRAMMAR["noun"] else
                       _GRAMMAR["det"])
            assert last in _GRAMMAR["det"] + _GRAMMAR["adj"] + _GRAMMAR["noun"] + _GRAMMAR["verb"]
            assert [c for c in choices if c in allowed] == [right]
        elif question["category"] == "memorised":
            askable = [t for ts in ASKABLE_TEMPLATES.values() for t in ts]
            assert (_entity(text, askable), right) in table
        else:  # in_context: a new entity, its fact stated first, then asked another way
            stated, asked = text.split(". ")
            entity = _entity(asked, [t for ts in ASKABLE_TEMPLATES.values() for t in ts])
            assert entity not in entities
            assert f"{stated}." in [t.format(e=entity, v=right)
                                    for ts in FACT_TEMPLATES.values() for t in ts]
            assert stated not in asked


def test_chat_sets_hold_out_eval_questions() -> None:
    facts = make_facts(0)
    table = {(f["entity"], f["value"]) for f in facts}
    sets = make_chat_sets(facts, seed=0, n_train=200, n_eval=40)
    assert sets == make_chat_sets(facts, seed=0, n_train=200, n_eval=40)
    assert (len(sets["chat_train"]), len(sets["chat_eval"])) == (200, 40)
    eval_questions = {c["messages"][0]["content"] for c in sets["chat_eval"]}
    assert len(eval_questions) == 40
    assert not eval_questions & {c["messages"][0]["content"] for c in sets["chat_train"]}
    for conversation in sets["chat_train"] + sets["chat_eval"]:
        user, assistant = conversation["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if conversation["category"] == "arithmetic":
            assert NUMBER[assistant["content"]] == _sum_answer(user["content"])
        elif conversation["category"] == "count":
            start, end = re.fullmatch(r"count from (\w+) to (\w+)\.", user["content"]).groups()
            assert assistant["content"] == " ".join(NUMBER_WORDS[NUMBER[start]:NUMBER[end] + 1])
        elif conversation["category"] == "memorised":
            entity = _entity(user["content"], CHAT_QUESTIONS.values())
            assert (entity, assistant["content"]) in table
        else:
            stated, asked = user["content"].split(". ")
            entity = _entity(asked, CHAT_QUESTIONS.values())
            assert f"{stated}." in [t.format(e=entity, v=assistant["content"])
                                    for ts in FACT_TEMPLATES.values() for t in ts]


def test_train_tokenizer_specials_and_round_trip() -> None:
    corpus = make_corpus(200, seed=0)
    tokenizer = train_tokenizer(corpus, vocab_size=400, model_max_length=128)
    assert len(tokenizer) == 400
    assert tokenizer.model_max_length == 128
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    assert tokenizer.convert_tokens_to_ids([IM_START, IM_END]) == [2, 3]
    # Byte-level: text never seen in training (accents, emoji) still round-trips exactly.
    for text in [corpus[0], "Héllo wörld 🙂  two  spaces", f"{IM_START}user hi{IM_END}"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(f"{IM_START}{IM_END}")) == 2  # specials are single tokens
    # Merges learned from the corpus make it compress well below one token per byte.
    assert len(tokenizer.encode(corpus[0])) < len(corpus[0].encode()) / 2


@pytest.mark.parametrize(("gqa", "tied"), [(True, True), (False, False), (True, False)])
def test_tiny_llama_config_options(gqa: bool, tied: bool) -> None:
    config = tiny_llama_config(300, gqa=gqa, tied=tied, hidden_size=32, num_heads=4, ffn_size=48)
    assert config.num_attention_heads == 4
    assert config.num_key_value_heads == (2 if gqa else 4)
    assert config.head_dim == 8
    assert config.tie_word_embeddings is tied
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 1)
    model = LlamaForCausalLM(config)
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares is tied
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.weight.shape == (config.num_key_value_heads * config.head_dim, 32)
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 300)


def test_tiny_llama_config_rejects_bad_shapes() -> None:
    with pytest.raises(MinimaError, match="not divisible"):
        tiny_llama_config(100, hidden_size=30, num_heads=4)
    with pytest.raises(MinimaError, match="must be even"):
        tiny_llama_config(100, hidden_size=36, num_heads=3, gqa=True)


def _tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        tiny_llama_config(64, hidden_size=32, num_layers=2, num_heads=4, ffn_size=48)
    )


def test_pretrain_is_deterministic_and_learns() -> None:
    # A repetitive stream the model can learn in a few steps.
    blocks = torch.arange(64).repeat(40).view(-1, 32) % 64
    losses = pretrain(_tiny_model(0), blocks, steps=12, batch_size=4, lr=1e-2, seed=0)
    assert losses == pretrain(_tiny_model(0), blocks, steps=12, batch_size=4, lr=1e-2, seed=0)
    assert losses != pretrain(_tiny_model(0), blocks, steps=12, batch_size=4, lr=1e-2, seed=1)
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5


def test_pretrain_rejects_empty_blocks() -> None:
    with pytest.raises(MinimaError, match="non-empty"):
        pretrain(_tiny_model(0), torch.zeros(0, 8, dtype=torch.long), steps=1)


def test_pretrain_clip_0_is_no_clipping_and_a_negative_clip_an_error() -> None:
    blocks = torch.arange(64).repeat(40).view(-1, 32) % 64
    runs = {}
    for clip in (0.0, 1e9, 1e-3):  # none, a limit never reached, one always reached
        model = _tiny_model(0)
        runs[clip] = (pretrain(model, blocks, steps=3, batch_size=4, lr=1e-2, clip=clip),
                      [p.detach().clone() for p in model.parameters()])
    assert runs[0.0][0] == runs[1e9][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0][1], runs[1e9][1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.0][1], runs[1e-3][1], strict=True))
    with pytest.raises(MinimaError, match="--clip must be >= 0"):
        pretrain(_tiny_model(0), blocks, steps=1, clip=-1.0)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32),
                                                  ("bf16", torch.bfloat16)])
def test_pretrain_runs_on_the_given_device_and_precision(precision: str,
                                                          dtype: torch.dtype) -> None:
    """bf16 is autocast (on the CPU here): activations in bf16, weights stay fp32."""
    model = _tiny_model(0)
    seen: list[tuple[torch.device, torch.dtype]] = []
    model.model.layers[0].mlp.register_forward_hook(
        lambda module, args, output: seen.append((args[0].device, output.dtype)))
    blocks = torch.arange(64).repeat(40).view(-1, 32) % 64
    device = torch.device("cpu")
    losses = pretrain(model, blocks, steps=2, batch_size=4, device=device, precision=precision)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert seen == [(device, dtype)] * 2
    assert all(p.device == device and p.dtype == torch.float32 for p in model.parameters())


def test_build_tiny_world_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(MinimaError, match="does not exist"):
        build_tiny_world(tmp_path / "nope")


def test_build_tiny_world_small(tmp_path: Path) -> None:
    summary = build_tiny_world(tmp_path, seed=0, n_documents=300, steps=30, gqa=True, tied=True)

    assert summary["final_loss"] < summary["initial_loss"] - 1.0
    assert summary["valid_loss"] < summary["initial_loss"]
    assert summary["valid_perplexity"] == pytest.approx(torch.tensor(summary["valid_loss"]).exp())
    assert json.loads(json.dumps(summary)) == summary  # manifest-ready

    train = Path(summary["train"]).read_text().splitlines()
    valid = Path(summary["valid"]).read_text().splitlines()
    assert (len(train), len(valid)) == (285, 15)
    assert train + valid == make_corpus(300, seed=0)
    facts = [json.loads(line) for line in Path(summary["facts"]).read_text().splitlines()]
    assert facts == make_facts(seed=0)
    written = {**make_mc_sets(facts, 0), **make_chat_sets(facts, 0)}
    for name, rows in written.items():
        lines = Path(summary[name]).read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows

    teacher = Path(summary["teacher"])
    assert (teacher / "model.safetensors").is_file()
    assert not list(teacher.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.config.num_key_value_heads == model.config.num_attention_heads // 2
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    assert model.generation_config.eos_token_id == model.config.eos_token_id == 0

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    text = valid[0]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"

    # The reloaded teacher predicts held-out text much better than chance (ln 512 ~ 6.2).
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < summary["initial_loss"] - 1.0
