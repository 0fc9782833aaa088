"""The tiny world: a synthetic corpus, tokenizer and small LLaMA teacher built on CPU in seconds.

Tests, the demo and the benchmarks use it instead of a hub model. The corpus has learnable
structure (a fact table about invented entities, arithmetic with number words, counting, and a
small grammar), so a ~200k-parameter model's loss drops clearly within a couple of hundred steps
(about 6.3 -> 1.4 with the defaults), and pruning or distilling it has a measurable effect.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from minima_cli.checkpoint import quiet_transformers
from minima_cli.data import pack_documents, tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.progress import step_progress
from minima_cli.train_state import evaluate_loss

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
        syllables = rng.randint(2, 3)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        name += rng.choice(_CODAS)
        if name not in seen:  # unique, so every question has one right answer
            seen.add(name)
            names.append(name)
    return [
        {"entity": name, "attribute": attribute, "value": rng.choice(values)}
        for name in names
        for attribute, values in ATTRIBUTE_VALUES.items()
    ]


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


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train `model` as a causal LM on random `blocks` rows; returns the loss of every step.

    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), 10 % linear warmup then cosine
    decay, gradient clipping at 1.0. Batches come from a seeded generator, so the losses are
    reproducible on one machine. Leaves the model in eval mode.
    """
    if blocks.ndim != 2 or len(blocks) == 0:
        raise MinimaError(
            f"pretrain needs a non-empty [n_blocks, seq_len] tensor, got {blocks.shape}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps, warmup)
    )
    generator = torch.Generator().manual_seed(seed)

    losses = []
    model.train()
    try:
        with step_progress("pretrain", steps, enabled=progress, loss=float("nan")) as bar:
            for _ in range(steps):
                batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(batch.numel(), loss=losses[-1])
    finally:
        model.eval()
    return losses


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. Matrices this small gain nothing from more threads, and on
    a busy 2-core machine OpenMP threads spinning against other processes made the build up to 8x
    slower (180 s instead of 22 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    and `data/valid.txt` (one document per line; valid is ~5 % held out) and `data/facts.jsonl`.
    Returns a JSON-able summary for the caller's manifest.
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
    with _torch_threads(1):
        losses = pretrain(model, train_blocks, steps=steps, seed=seed, progress=progress)
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

    tail = losses[-10:]  # one step's loss is noisy: report the mean of the last ten
    return {
        "teacher": str(teacher_dir),
        "train": str(data_dir / "train.txt"),
        "valid": str(data_dir / "valid.txt"),
        "facts": str(data_dir / "facts.jsonl"),
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
