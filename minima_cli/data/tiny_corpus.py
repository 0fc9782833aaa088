"""The tiny world's text: a fact table about invented entities, arithmetic with number words,
counting and a small grammar (a corpus with learnable structure), plus its multiple-choice and
chat evaluation sets. Pure Python; the stage that trains a tokenizer and teacher on it is
stages/tiny.py."""

from __future__ import annotations

import random

from minima_cli.errors import MinimaError

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
