"""Tests for minima_cli.tiny: the synthetic world used by tests, the demo and the benchmarks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from minima_cli.errors import MinimaError
from minima_cli.tiny import (
    ATTRIBUTE_VALUES,
    FACT_TEMPLATES,
    IM_END,
    IM_START,
    NUMBER_WORDS,
    build_tiny_world,
    make_corpus,
    make_facts,
    pretrain,
    tiny_llama_config,
    train_tokenizer,
)


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
