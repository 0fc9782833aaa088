"""The tiny world: a synthetic corpus, tokenizer and small LLaMA teacher built on CPU in seconds.

Tests, the demo and the benchmarks use it instead of a hub model. The corpus has learnable
structure (a fact table about invented entities, arithmetic with number words, counting, and a
small grammar), so a ~200k-parameter model's loss drops clearly within a couple of hundred steps
(about 6.3 -> 1.4 with the defaults), and pruning or distilling it has a measurable effect.
Its evaluation sets (multiple choice and chat, `make_mc_sets` / `make_chat_sets`) make
`minima eval` meaningful offline.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minima_cli.data.pack import pack_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.model.checkpoint import quiet_transformers
from minima_cli.progress import step_progress
from minima_cli.runtime import torch_threads
from minima_cli.stages import RunControl
from minima_cli.stages.configs import TinyConfig
from minima_cli.training.loop import LocalSession, optimizer_step
from minima_cli.training.state import (
    adamw,
    check_clip,
    evaluate_loss,
    lr_factor,
    parameter_groups,
)

EOS = "<|endoftext|>"


PAD = "<|pad|>"


IM_START = "<|im_start|>"


IM_END = "<|im_end|>"


SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]  # trained first, so their ids are 0, 1, 2, 3


EOS_ID, PAD_ID = 0, 1


# Each attribute takes values from a small closed set, so a later eval can ask multiple-choice
# questions with the other values as distractors.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    "city": ("amberford", "coldwater", "dunmore", "eastgate", "fernhill", "greyport"),
    "food": ("bread", "rice", "apples", "fish", "cheese", "soup", "beans", "honey"),
    "size": ("tiny", "small", "large", "huge"),
    "pet": ("cat", "dog", "owl", "fox", "goat", "horse"),
}


# Several phrasings per attribute: the model must bind entity and value, not memorise a string.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "the colour of {e} is {v}.",
        "{e} is {v} in colour.",
        "{e} has the colour {v}.",
    ),
    "city": (
        "the home city of {e} is {v}.",
        "{e} lives in {v}.",
        "{e} comes from {v}.",
    ),
    "food": (
        "the favourite food of {e} is {v}.",
        "{e} likes to eat {v}.",
        "every day {e} eats {v}.",
    ),
    "size": (
        "the size of {e} is {v}.",
        "{e} is {v} in size.",
        "{e} is a {v} creature.",
    ),
    "pet": (
        "the pet of {e} is a {v}.",
        "{e} has a pet {v}.",
        "{e} keeps a {v} at home.",
    ),
}


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "sh")


_VOWELS = ("a", "e", "i", "o", "u")


_CODAS = ("", "", "n", "l", "r", "s")


NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip


_GRAMMAR = {
    "det": ("the", "a", "every", "one"),
    "adj": ("small", "old", "quick", "quiet", "bright", "happy", "red", "tall"),
    "noun": ("dog", "bird", "child", "farmer", "river", "tree", "stone", "cat", "boat"),
    "verb": ("sees", "follows", "finds", "likes", "carries", "watches"),
    "ivp": ("sleeps", "runs", "sings", "waits", "falls"),
    "adv": ("slowly", "quickly", "today", "again", "at night"),
    "prep": ("near", "under", "behind", "beside"),
}


def make_facts(seed: int = 0, n_entities: int = 48) -> list[dict]:
    """A deterministic fact table: every invented entity gets one value for every attribute.

    Returns dicts `{"entity": ..., "attribute": ..., "value": ...}`, grouped by entity.
    """
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_entities:
        name = _invented_name(rng)
        if name not in seen:  # unique, so every question has one right answer
            seen.add(name)
            names.append(name)
    return [
        {"entity": name, "attribute": attribute, "value": rng.choice(values)}
        for name in names
        for attribute, values in ATTRIBUTE_VALUES.items()
    ]


def _invented_name(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return name + rng.choice(_CODAS)


def fact_sentence(fact: dict, rng: random.Random) -> str:
    """One fact stated in a randomly chosen template."""
    template = rng.choice(FACT_TEMPLATES[fact["attribute"]])
    return template.format(e=fact["entity"], v=fact["value"])


def _arithmetic_sentence(rng: random.Random) -> str:
    if rng.random() < 0.6:
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    return f"{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a - b]}."


def _counting_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 14)
    length = rng.randint(3, 6)
    if rng.random() < 0.7:
        words = NUMBER_WORDS[start : start + length]
        return f"counting up: {' '.join(words)}."
    words = NUMBER_WORDS[start : start + length][::-1]
    return f"counting down: {' '.join(words)}."


def _grammar_sentence(rng: random.Random) -> str:
    def np_() -> str:
        adj = f"{rng.choice(_GRAMMAR['adj'])} " if rng.random() < 0.5 else ""
        return f"{rng.choice(_GRAMMAR['det'])} {adj}{rng.choice(_GRAMMAR['noun'])}"

    if rng.random() < 0.5:
        sentence = f"{np_()} {rng.choice(_GRAMMAR['verb'])} {np_()}"
    else:
        sentence = f"{np_()} {rng.choice(_GRAMMAR['ivp'])}"
    roll = rng.random()
    if roll < 0.3:
        sentence += f" {rng.choice(_GRAMMAR['prep'])} {np_()}"
    elif roll < 0.5:
        sentence += f" {rng.choice(_GRAMMAR['adv'])}"
    return sentence + "."


def make_corpus(n_documents: int, seed: int = 0, *, facts: list[dict] | None = None) -> list[str]:
    """`n_documents` single-line documents of 3 to 6 sentences each, deterministic for a seed.

    Half the documents are about one entity (its facts, in varied templates, mixed with filler);
    the rest mix facts about random entities with arithmetic, counting and grammar sentences.
    `facts` defaults to `make_facts(seed)`.
    """
    facts = make_facts(seed) if facts is None else facts
    if not facts:
        raise MinimaError("make_corpus needs at least one fact")
    by_entity: dict[str, list[dict]] = {}
    for fact in facts:
        by_entity.setdefault(fact["entity"], []).append(fact)
    entities = list(by_entity)
    fillers = (_arithmetic_sentence, _counting_sentence, _grammar_sentence)

    # A separate stream from make_facts, so the table does not change with the corpus size.
    rng = random.Random(f"corpus-{seed}")
    documents = []
    for _ in range(n_documents):
        n_sentences = rng.randint(3, 6)
        sentences = []
        if rng.random() < 0.5:
            about = by_entity[rng.choice(entities)]
            for _ in range(n_sentences):
                if rng.random() < 0.75:
                    sentences.append(fact_sentence(rng.choice(about), rng))
                else:
                    sentences.append(rng.choice(fillers)(rng))
        else:
            for _ in range(n_sentences):
                if rng.random() < 0.35:
                    sentences.append(fact_sentence(rng.choice(facts), rng))
                else:
                    sentences.append(rng.choice(fillers)(rng))
        documents.append(" ".join(sentences))
    return documents


# --- evaluation sets ------------------------------------------------------------------------------
# Multiple choice in minima's MMLU-style records (question, choices, answer index, category),
# cloze-style: the question is a prefix of a corpus sentence and each choice its next word.
MC_CHOICES = 4


def _choices(rng: random.Random, correct: str, pool: tuple[str, ...] | list[str]) -> dict:
    """`MC_CHOICES` distinct options, the right one at a random position."""
    options = rng.sample([p for p in pool if p != correct], MC_CHOICES - 1) + [correct]
    rng.shuffle(options)
    return {"choices": options, "answer": options.index(correct)}


# Templates whose value ends the sentence, so the words before it already name the attribute
# ("senapas is ..." could go on with a colour or a size).
ASKABLE_TEMPLATES = {attribute: tuple(t for t in templates if t.endswith("{v}."))
                     for attribute, templates in FACT_TEMPLATES.items()}


def _prompt_of(template: str, entity: str) -> str:
    """A fact template cut just before its value: "the colour of {e} is {v}." -> "the colour of
    bazo is"."""
    return template.format(e=entity, v="\0").split("\0")[0].rstrip()


def _arithmetic_question(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.6:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is", NUMBER_WORDS[a + b]
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    return f"{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]} is", NUMBER_WORDS[a - b]


def _counting_question(rng: random.Random) -> tuple[str, str]:
    """A counting run cut before its next number: "counting down: nine eight seven" -> "six"."""
    length = rng.randint(2, 4)
    if rng.random() < 0.6:
        start = rng.randint(0, len(NUMBER_WORDS) - 1 - length)
        words = NUMBER_WORDS[start : start + length + 1]
        return f"counting up: {' '.join(words[:-1])}", words[-1]
    start = rng.randint(length, len(NUMBER_WORDS) - 1)
    words = NUMBER_WORDS[start - length : start + 1][::-1]
    return f"counting down: {' '.join(words[:-1])}", words[-1]


# Grammar questions: a sentence prefix, the word class that must come next, and three classes
# that cannot (mixed lengths, so a model that merely prefers short words is not rewarded).
_GRAMMAR_SLOTS = (
    ("np_start", "noun", ("verb", "ivp", "prep")),
    ("np", "verb_any", ("det", "adj", "prep")),
    ("np_verb", "det", ("noun", "ivp", "adv")),
)


def _grammar_question(rng: random.Random) -> tuple[str, str, list[str]]:
    """(prefix, the right next word, three wrong ones) from the corpus grammar."""
    prefix_kind, right, wrong = rng.choice(_GRAMMAR_SLOTS)
    adj = f"{rng.choice(_GRAMMAR['adj'])} " if rng.random() < 0.5 else ""
    prefix = f"{rng.choice(_GRAMMAR['det'])} {adj}"
    if prefix_kind != "np_start":
        prefix += rng.choice(_GRAMMAR["noun"])
    if prefix_kind == "np_verb":
        prefix += f" {rng.choice(_GRAMMAR['verb'])}"
    words = {**_GRAMMAR, "verb_any": _GRAMMAR["verb"] + _GRAMMAR["ivp"]}
    return prefix.rstrip(), rng.choice(words[right]), [rng.choice(words[k]) for k in wrong]


def skill_question(category: str, rng: random.Random) -> dict:
    """One question the 200-step teacher answers well above chance. counting / arithmetic: the
    next number word; grammar: the one next word that the corpus grammar allows."""
    if category == "grammar":
        question, answer, wrong = _grammar_question(rng)
        options = wrong + [answer]
        rng.shuffle(options)
        return {"question": question, "choices": options, "answer": options.index(answer),
                "category": category}
    question, answer = (_counting_question if category == "counting" else _arithmetic_question)(rng)
    return {"question": question, **_choices(rng, answer, NUMBER_WORDS), "category": category}


def _fact(category: str, rng: random.Random, facts: list[dict]) -> tuple[str, str, str, str]:
    """(context, entity, attribute, value). memorised: a fact of the table with no context (only
    pre-training can have taught it); in_context: a new entity whose fact the context states."""
    if category == "memorised":
        fact = rng.choice(facts)
        return "", fact["entity"], fact["attribute"], fact["value"]
    known = {f["entity"] for f in facts}
    entity = _invented_name(rng)
    while entity in known:
        entity = _invented_name(rng)
    attribute = rng.choice(list(ATTRIBUTE_VALUES))
    value = rng.choice(ATTRIBUTE_VALUES[attribute])
    # stated in a template that leaves another one to ask in (size has a single askable one)
    stated = rng.choice([t for t in FACT_TEMPLATES[attribute]
                         if set(ASKABLE_TEMPLATES[attribute]) - {t}]).format(e=entity, v=value)
    return stated, entity, attribute, value


def fact_question(category: str, rng: random.Random, facts: list[dict]) -> dict:
    """A fact asked in a template that ends with the value; an in-context fact in a template
    other than the one that stated it, so copying the sentence is not enough."""
    context, entity, attribute, value = _fact(category, rng, facts)
    templates = [t for t in ASKABLE_TEMPLATES[attribute]
                 if t.format(e=entity, v=value) != context]
    question = _prompt_of(rng.choice(templates), entity)
    return {"question": f"{context} {question}".lstrip(),
            **_choices(rng, value, ATTRIBUTE_VALUES[attribute]), "category": category}


SKILL_CATEGORIES = ("counting", "arithmetic", "grammar")


FACT_CATEGORIES = ("memorised", "in_context")


def make_mc_sets(facts: list[dict], seed: int = 0, *, n_test: int = 100, n_dev: int = 5
                 ) -> dict[str, list[dict]]:
    """The tiny world's multiple-choice sets: `eval_mc` (skills the teacher has learned:
    counting, arithmetic, grammar), `eval_facts_mc` (memorised and in-context facts, near chance
    for the 200-step teacher), and a `_dev` set of each for few-shot examples. `n_test` / `n_dev`
    questions per category, categories interleaved (so the first N shots mix them), no question
    in both a test and its dev set."""
    rng = random.Random(f"eval-mc-{seed}")
    sets: dict[str, list[dict]] = {}
    for name, categories, make in (
        ("eval_mc", SKILL_CATEGORIES, lambda c: skill_question(c, rng)),
        ("eval_facts_mc", FACT_CATEGORIES, lambda c: fact_question(c, rng, facts)),
    ):
        seen: set[str] = set()
        for split, n in ((f"{name}_dev", n_dev), (name, n_test)):
            rows = []
            for _ in range(n):
                for category in categories:
                    question = make(category)
                    for _ in range(100):  # a few question spaces are small: retry duplicates
                        if question["question"] not in seen:
                            break
                        question = make(category)
                    seen.add(question["question"])
                    rows.append(question)
            sets[split] = rows
    return sets


CHAT_QUESTIONS = {
    "colour": "what colour is {e}?",
    "city": "where does {e} live?",
    "food": "what does {e} like to eat?",
    "size": "how big is {e}?",
    "pet": "what pet does {e} have?",
}


CHAT_CATEGORIES = ("arithmetic", "count", "in_context", "memorised")


def chat_example(category: str, rng: random.Random, facts: list[dict]) -> dict:
    """One conversation in the `messages` format whose answer is a word or a counting run, so
    `minima eval` can score it by exact match."""
    if category == "arithmetic":
        question, answer = _arithmetic_question(rng)
        user = f"what is {question.removesuffix(' is')}?"
    elif category == "count":
        start = rng.randint(0, len(NUMBER_WORDS) - 3)
        end = rng.randint(start + 2, min(start + 5, len(NUMBER_WORDS) - 1))
        user = f"count from {NUMBER_WORDS[start]} to {NUMBER_WORDS[end]}."
        answer = " ".join(NUMBER_WORDS[start : end + 1])
    else:
        context, entity, attribute, answer = _fact(category, rng, facts)
        user = f"{context} {CHAT_QUESTIONS[attribute].format(e=entity)}".lstrip()
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}], "category": category}


def make_chat_sets(facts: list[dict], seed: int = 0, *, n_train: int = 1000, n_eval: int = 100
                   ) -> dict[str, list[dict]]:
    """`chat_train` and `chat_eval` conversations, categories in turn; no eval question appears
    in training (training may repeat a question: some categories have few distinct ones)."""
    rng = random.Random(f"chat-{seed}")
    sets: dict[str, list[dict]] = {}
    held_out: set[str] = set()
    for split, n in (("chat_eval", n_eval), ("chat_train", n_train)):
        rows: list[dict] = []
        for attempt in range(100 * n + 100):  # noqa: B007 - reported below
            if len(rows) == n:
                break
            example = chat_example(CHAT_CATEGORIES[len(rows) % len(CHAT_CATEGORIES)], rng, facts)
            question = example["messages"][0]["content"]
            if split == "chat_eval":
                if question in held_out:
                    continue
                held_out.add(question)
            elif question in held_out:
                continue
            rows.append(example)
        if len(rows) < n:
            raise MinimaError(f"cannot draw {n} distinct {split} conversations ({attempt} tries)")
        sets[split] = rows
    return sets


def train_tokenizer(
    texts: list[str], vocab_size: int = 512, *, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library.

    `<|endoftext|>` is bos, eos and unk (id 0); `<|pad|>` is pad (id 1); `<|im_start|>` and
    `<|im_end|>` are reserved for chat formatting.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text (not only the corpus's letters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    gqa: bool = True,
    tied: bool = True,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    ffn_size: int = 176,
    max_positions: int = 256,
    bos_token_id: int = EOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
) -> LlamaConfig:
    """A small `LlamaConfig`; with `gqa` there are half as many kv heads as query heads."""
    if hidden_size % num_heads:
        raise MinimaError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if gqa and num_heads % 2:
        raise MinimaError(f"gqa halves the kv heads, so num_heads must be even, got {num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=ffn_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2 if gqa else num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain next-token cross-entropy: pre-training's loss function for the shared step."""
    return model(input_ids=batch, labels=batch).loss, {}


def pretrain(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    clip: float = 1.0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> list[float]:
    """Train `model` as a causal LM on random `blocks` rows; returns the loss of every step.

    The optimizer step every training stage takes (training/loop.py `optimizer_step`) on
    `device` in `precision` (bf16: autocast): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices
    only), 10 % linear warmup then cosine decay to 0.1 x `lr`, gradient clipping at `clip`
    (0: none). Batches come from a seeded CPU generator, so the losses are reproducible on one
    machine. Leaves the model on `device`, in eval mode.
    """
    if blocks.ndim != 2 or len(blocks) == 0:
        raise MinimaError(
            f"pretrain needs a non-empty [n_blocks, seq_len] tensor, got {blocks.shape}"
        )
    check_clip(clip)
    session = LocalSession(precision, device)
    # PyTorch's default AdamW kernel, not minima's fused one: the tiny world's teacher (and so
    # the demo's numbers) is pinned bitwise to it, and the fused kernel rounds differently.
    optimizer = adamw(parameter_groups(model, weight_decay=0.1), lr, fused=False)
    model, optimizer = session.prepare(model, optimizer)
    warmup = max(1, steps // 10)
    generator = torch.Generator().manual_seed(seed)

    losses = []
    model.train()
    try:
        with step_progress("pretrain", steps, enabled=progress, loss=float("nan")) as bar:
            for step in range(steps):
                batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
                # lr x factor, as torch's LambdaLR rounds it (not learning_rate's warmup rounding)
                step_lr = lr * lr_factor(step, total_steps=steps, warmup_steps=warmup,
                                         schedule="cosine", min_ratio=0.1)
                stats = optimizer_step(session, model, optimizer, lm_loss, [batch],
                                       grad_accum=1, lr=step_lr, clip=clip)
                losses.append(stats.losses[0])
                bar.update(batch.numel(), loss=losses[-1])
    finally:
        model.eval()
    return losses


def build_tiny_world(
    output_dir: Path,
    *,
    seed: int = 0,
    gqa: bool = True,
    tied: bool = True,
    n_documents: int = 2000,
    steps: int = 200,
    seq_len: int = 64,
    progress: bool = False,
) -> dict:
    """Build corpus, tokenizer and a pretrained tiny teacher into the existing `output_dir`.

    Writes `teacher/` (HF model + tokenizer + generation config, safetensors), `data/train.txt`
    and `data/valid.txt` (one document per line; valid is ~5 % held out), `data/facts.jsonl`,
    the multiple-choice sets `data/eval_mc.jsonl` and `data/eval_facts_mc.jsonl` with their
    `_dev` shots (`make_mc_sets`), and chat data `data/chat_train.jsonl` / `chat_eval.jsonl`
    (`make_chat_sets`). Returns a JSON-able summary for the caller's manifest.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise MinimaError(f"output directory {output_dir} does not exist")
    if n_documents < 2:
        raise MinimaError(f"n_documents must be at least 2 (train and valid), got {n_documents}")
    started = time.perf_counter()

    facts = make_facts(seed)
    documents = make_corpus(n_documents, seed, facts=facts)
    n_valid = max(1, round(0.05 * n_documents))
    train_docs, valid_docs = documents[:-n_valid], documents[-n_valid:]

    # Positions beyond seq_len leave room for prompts longer than a training block later.
    max_positions = max(256, seq_len)
    tokenizer = train_tokenizer(train_docs, model_max_length=max_positions)
    eos_id = tokenizer.eos_token_id
    train_blocks = pack_documents(tokenize_documents(tokenizer, train_docs), seq_len, eos_id)
    valid_ids = tokenize_documents(tokenizer, valid_docs)
    # A small corpus may hold out less than one block: then score it as one shorter block.
    valid_len = min(seq_len, sum(len(ids) + 1 for ids in valid_ids))
    valid_blocks = pack_documents(valid_ids, valid_len, eos_id)

    config = tiny_llama_config(
        len(tokenizer),
        gqa=gqa,
        tied=tied,
        max_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch_threads(1):
        # CPU and fp32 on every machine: the same teacher everywhere, bitwise on one machine
        losses = pretrain(model, train_blocks, steps=steps, seed=seed, device="cpu",
                          precision="fp32", progress=progress)
        valid_loss = evaluate_loss(model, valid_blocks)

    teacher_dir = output_dir / "teacher"
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=32,
    )
    with quiet_transformers():
        model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "train.txt").write_text("".join(d + "\n" for d in train_docs), encoding="utf-8")
    (data_dir / "valid.txt").write_text("".join(d + "\n" for d in valid_docs), encoding="utf-8")
    (data_dir / "facts.jsonl").write_text(
        "".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8"
    )
    eval_sets = {**make_mc_sets(facts, seed), **make_chat_sets(facts, seed)}
    for name, rows in eval_sets.items():
        (data_dir / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )

    tail = losses[-10:]  # one step's loss is noisy: report the mean of the last ten
    return {
        "teacher": str(teacher_dir),
        "train": str(data_dir / "train.txt"),
        "valid": str(data_dir / "valid.txt"),
        "facts": str(data_dir / "facts.jsonl"),
        **{name: str(data_dir / f"{name}.jsonl") for name in eval_sets},
        "seed": seed,
        "gqa": gqa,
        "tied": tied,
        "n_train_documents": len(train_docs),
        "n_valid_documents": len(valid_docs),
        "n_facts": len(facts),
        "vocab_size": len(tokenizer),
        "seq_len": seq_len,
        "train_tokens": train_blocks.numel(),
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "valid_loss": valid_loss,
        "valid_perplexity": math.exp(valid_loss),
        "seconds": round(time.perf_counter() - started, 2),
    }


def run(config: TinyConfig, control: RunControl) -> dict[str, Any]:
    """`minima tiny`: the tiny world into config.output, atomically, with its manifest."""
    from minima_cli.fsutil import atomic_output_dir, write_manifest

    output = Path(config.output)
    with atomic_output_dir(output, force=control.force) as tmp:
        summary = build_tiny_world(tmp, seed=config.seed, gqa=config.gqa, tied=config.tied,
                                   n_documents=config.documents, steps=config.steps,
                                   progress=control.progress)
        summary = {k: (v.replace(str(tmp), str(output)) if isinstance(v, str) else v)
                   for k, v in summary.items()}
        settings = {k: getattr(config, k) for k in ("seed", "gqa", "tied", "steps", "documents")}
        return write_manifest(tmp, "tiny", config=settings, metrics=summary,
                              wall_time_s=summary["seconds"])
