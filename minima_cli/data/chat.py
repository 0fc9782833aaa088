"""Chat data for `minima sft`: records to assistant-masked token rows and a resumable stream.

Pipeline: records (`messages`, ShareGPT `conversations`, `prompt` + `response`/`completion`, or
Alpaca `instruction` [+ `input`] + `output`; detected per record) -> messages -> text by the
tokenizer's chat template (ChatML when it has none; that template is then saved with the model)
-> token ids with a mask that is 1 exactly on the assistant spans -> rows (one example per row,
or examples packed whole into `seq_len` rows) -> a seeded, resumable stream of batches for the
shared loop (training/loop.py); each batch carries its `share` of the step's assistant tokens,
which weights its loss (docs/losses.md).

Assistant spans: where the template marks them with `{% generation %}` (minima's ChatML does),
those character spans; otherwise the template is rendered incrementally and each assistant turn
spans from the end of the conversation before it (with the generation prompt) to the end of the
conversation through it, trailing whitespace excluded. A token is an assistant token when it
starts inside a span. The span covers the reply and the template's end-of-turn marker
(`<|im_end|>`), so the model learns to stop.

Packing: best-fit decreasing, never splitting an example; each example restarts its position ids
at 0, from which transformers builds a block-diagonal causal mask (sdpa / eager / flex) or
variable-length flash attention: packed examples never attend to each other. (Only without a KV
cache: every forward here passes `use_cache=False`.) An example longer
than `seq_len` is cut to its first `seq_len` tokens (counted in the manifest as `truncated`; one
with no assistant token left is dropped and counted as `dropped`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima_cli.data.position import ResumableStream
from minima_cli.data.read import RECORD_SUFFIXES, data_files, read_records
from minima_cli.data.seeds import CHAT_SHUFFLE, CHAT_SPLIT, permutation, split_indices
from minima_cli.errors import MinimaError
from minima_cli.fsutil import file_sha256
from minima_cli.losses import IGNORE_INDEX
from minima_cli.progress import step_progress

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# ChatML, minima's chat template for tokenizers without one (the tiny world's tokenizer reserves
# <|im_start|> / <|im_end|> for it), with the assistant replies marked for
# `return_assistant_tokens_mask`; the markers change nothing in the text. sft trains with it and
# `minima eval` prompts with it (`chat_prompt`), so a model is prompted the way it was trained.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


ROLES = ("system", "user", "assistant", "tool")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}


FORMATS = ("messages", "sharegpt", "prompt-response", "instruction")


CHAT_SUFFIXES = RECORD_SUFFIXES


FORMAT_HELP = ("expected 'messages', 'conversations' (ShareGPT), 'prompt' + 'response' (or "
               "'completion'), or 'instruction' (+ 'input') + 'output'")


STATE_VERSION = 1


def to_messages(record: Any, where: str) -> tuple[str, list[dict[str, str]]]:
    """(format, messages) of one record; one clear line for an unknown format, a malformed
    conversation, or one without an assistant turn."""
    if not isinstance(record, dict):
        raise MinimaError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        kind, messages = "messages", _check_messages(record["messages"], where, "messages")
    elif "conversations" in record:
        kind, messages = "sharegpt", _sharegpt(record["conversations"], where)
    elif "prompt" in record and ("response" in record or "completion" in record):
        reply = record["response"] if "response" in record else record["completion"]
        kind, messages = "prompt-response", _prompt_response(record, record["prompt"], reply,
                                                             where)
    elif "instruction" in record and "output" in record:
        fields = [_string(record, name, where) for name in ("instruction", "input", "output")]
        instruction, extra, output = fields
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        kind, messages = "instruction", [*_system(record, where),
                                         {"role": "user", "content": user},
                                         {"role": "assistant", "content": output}]
    else:
        present = ", ".join(map(str, record)) or "none"
        raise MinimaError(f"{where}: unknown chat format (fields: {present}); {FORMAT_HELP}")
    if not any(m["role"] == "assistant" for m in messages):
        raise MinimaError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    check_turn_order(messages, where)
    return kind, messages


# The roles that may follow each role (None: the conversation's start): an optional system
# message first, then user and assistant alternating from a user turn; tool results follow an
# assistant turn (its call) and are answered by the assistant. Chat templates assume this order
# and some refuse others; a model tuned on other orders learns prompts it will never be given.
NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"), "system": ("user",), "user": ("assistant",),
    "assistant": ("user", "tool"), "tool": ("tool", "assistant")}
ORDER_RULE = ("an optional system message first, then user and assistant turns alternating from "
              "a user turn, tool turns only after an assistant turn")


def check_turn_order(messages: Sequence[dict[str, str]], where: str) -> None:
    """One clear line for the first message out of the order NEXT_ROLES allows."""
    previous: str | None = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in NEXT_ROLES[previous]:
            wrong = (f"'{role}' cannot follow '{previous}'" if previous else
                     f"a conversation cannot start with '{role}'")
            raise MinimaError(f"{where}: message {i}: {wrong}; a conversation is {ORDER_RULE}")
        previous = role


def _string(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MinimaError(f"{where}: field '{name}' is {type(value).__name__}, not a string")
    return value


def _system(record: dict, where: str) -> list[dict[str, str]]:
    system = _string(record, "system", where)
    return [{"role": "system", "content": system}] if system.strip() else []


def _check_messages(messages: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise MinimaError(f"{where}: '{field}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise MinimaError(f"{where}: {field}[{i}] must be {{role: {'|'.join(ROLES)}, "
                              "content: str}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise MinimaError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "role" in turn:
            messages.extend(_check_messages([turn], where, f"conversations[{i}]"))
            continue
        if (not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES
                or not isinstance(turn.get("value"), str)):
            raise MinimaError(f"{where}: conversations[{i}] must be {{from: "
                              f"{'|'.join(SHAREGPT_ROLES)}, value: str}}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _prompt_response(record: dict, prompt: Any, reply: Any, where: str) -> list[dict[str, str]]:
    """Strings, or TRL's conversational prompt-completion (lists of messages)."""
    if isinstance(prompt, list) and isinstance(reply, list):
        return [*_check_messages(prompt, where, "prompt"),
                *_check_messages(reply, where, "completion")]
    if not isinstance(prompt, str) or not isinstance(reply, str):
        raise MinimaError(f"{where}: 'prompt' and the reply must both be strings (or both lists "
                          "of messages)")
    return [*_system(record, where), {"role": "user", "content": prompt},
            {"role": "assistant", "content": reply}]


def chat_files(source: str | Path) -> list[Path]:
    """The chat data files of a file or directory (.jsonl, .json, .parquet)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MinimaError(f"chat data not found: {source}")
    if path.is_dir():
        return data_files(path, CHAT_SUFFIXES)
    if path.suffix not in CHAT_SUFFIXES:
        raise MinimaError(f"unsupported chat data file {path} (expected "
                          f"{', '.join(CHAT_SUFFIXES)}, or a directory of them)")
    return [path]


def read_chat(source: str | Path) -> tuple[list[list[dict[str, str]]], dict[str, Any]]:
    """Conversations of a chat data file or directory, and a summary (files with hashes, the
    count of each format)."""
    files = chat_files(source)
    conversations, formats = [], Counter()
    for path in files:
        for where, record in read_records(path):
            kind, messages = to_messages(record, where)
            formats[kind] += 1
            conversations.append(messages)
    if not conversations:
        raise MinimaError(f"no conversations in {source}")
    summary = {"files": [{"path": str(p), "sha256": file_sha256(p)} for p in files],
               "conversations": len(conversations), "formats": dict(formats)}
    return conversations, summary


def has_generation_blocks(template: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer: Any, template: str, conversations: list[list[dict]], *,
            add_generation_prompt: bool = False, spans: bool = False) -> tuple[list[str], list]:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template(conversations, chat_template=template,
                                     add_generation_prompt=add_generation_prompt,
                                     return_assistant_tokens_mask=spans,
                                     **tokenizer.special_tokens_map)
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise MinimaError(f"the chat template failed on a conversation: {e}") from None


def render_with_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if has_generation_blocks(template):
        (text,), (spans,) = _render(tokenizer, template, [messages], spans=True)
        if not spans:
            raise MinimaError("the chat template's {% generation %} blocks marked no assistant "
                              "reply in a conversation")
        return text, [tuple(s) for s in spans]
    (text,), _ = _render(tokenizer, template, [messages])
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        (before,), _ = _render(tokenizer, template, [messages[:i]], add_generation_prompt=True)
        (through,), _ = _render(tokenizer, template, [messages[: i + 1]])
        if not (text.startswith(before) and text.startswith(through)):
            raise MinimaError("the chat template does not render a conversation as its turns "
                              "in order (it rewrites earlier turns or the generation prompt), so "
                              "the assistant tokens cannot be found: mark the replies with "
                              "{% generation %} ... {% endgeneration %}")
        start = len(before)
        spans.append((start, max(start, len(through.rstrip()))))
    return text, spans


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token (given by its character offsets) that starts inside a span."""
    starts = sorted(spans)
    mask = []
    for begin, _ in offsets:
        k = bisect.bisect_right(starts, (begin, math.inf)) - 1
        mask.append(k >= 0 and starts[k][0] <= begin < starts[k][1])
    return mask


@dataclass(frozen=True)
class Example:
    ids: list[int]
    mask: list[bool]  # True on assistant tokens


def encode_conversations(tokenizer: Any, template: str, conversations: list[list[dict]],
                         *, progress: bool = False) -> list[Example]:
    """Token ids and assistant masks, rendered one conversation at a time and tokenized in
    batches (the chat template decides every special token: nothing is added)."""
    if not getattr(tokenizer, "is_fast", False):
        raise MinimaError("sft needs a fast tokenizer (tokenizer.json) to map the assistant "
                          "spans to tokens")
    examples: list[Example] = []
    chunk = 512
    with step_progress("encode chat", math.ceil(len(conversations) / chunk), enabled=progress,
                       tokens=False) as bar:
        for start in range(0, len(conversations), chunk):
            rendered = [render_with_spans(tokenizer, template, messages)
                        for messages in conversations[start : start + chunk]]
            encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                                return_offsets_mapping=True)
            for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"],
                                                encoded["offset_mapping"], strict=True):
                examples.append(Example(list(ids), span_mask(offsets, spans)))
            bar.update()
    return examples


def chat_template_of(tokenizer: Any) -> tuple[str, bool]:
    """(template, is_default): the tokenizer's own chat template, or minima's ChatML."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the "default" one, as transformers picks
        template = template.get("default")
    return (template, False) if template else (CHATML_TEMPLATE, True)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The conversation so far plus the assistant's turn opener, by the template sft trains with
    (`chat_template_of`: the tokenizer's own, ChatML when it has none)."""
    template, _ = chat_template_of(tokenizer)
    (text,), _ = _render(tokenizer, template, [messages], add_generation_prompt=True)
    return text


def missing_chatml_tokens(tokenizer: Any) -> list[str]:
    """ChatML's markers that are not single tokens of this tokenizer."""
    vocab = tokenizer.get_vocab()
    return [t for t in (IM_START, IM_END) if t not in vocab]


def fit_examples(examples: list[Example], seq_len: int) -> tuple[list[Example], dict[str, int]]:
    """Cut examples to `seq_len` tokens; drop those left without an assistant token."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example.ids) > seq_len:
            truncated += 1
            example = Example(example.ids[:seq_len], example.mask[:seq_len])
        if any(example.mask[1:]):  # the first token is never predicted
            kept.append(example)
        else:
            dropped += 1
    return kept, {"truncated": truncated, "dropped": dropped}


def pack_examples(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, every example whole in exactly one row and
    no row longer than `seq_len`. Deterministic (ties broken by index)."""
    if any(n > seq_len or n < 1 for n in lengths):
        raise MinimaError(f"every example must have 1 to seq_len={seq_len} tokens to be packed")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            room, row = seq_len - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def make_rows(examples: list[Example], seq_len: int, packing: bool) -> list[list[Example]]:
    if not packing:
        return [[e] for e in examples]
    return [[examples[i] for i in row] for row in pack_examples([len(e.ids) for e in examples],
                                                                seq_len)]


def row_tensors(row: Sequence[Example]) -> tuple[list[int], list[int], list[int]]:
    """(input ids, labels, position ids) of one row: the label at t is token t + 1 when that is
    an assistant token of the same example, else -100; positions restart at each example."""
    ids, labels, positions = [], [], []
    for example in row:
        n = len(example.ids)
        ids.extend(example.ids)
        labels.extend(example.ids[t + 1] if example.mask[t + 1] else IGNORE_INDEX
                      for t in range(n - 1))
        labels.append(IGNORE_INDEX)  # the last token predicts nothing of this example
        positions.extend(range(n))
    return ids, labels, positions


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded on the right to its longest row. The padding gets its own position run
    (0, 1, ...), so the packed-sequence mask keeps it apart from the real tokens."""
    parts = [row_tensors(row) for row in rows]
    width = max(len(ids) for ids, _, _ in parts)
    input_ids = torch.full((len(parts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(parts), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(parts), width), dtype=torch.long)
    for r, (ids, labs, pos) in enumerate(parts):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(labs)
        positions[r, :n] = torch.tensor(pos)
        positions[r, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def assistant_labels(rows: Sequence[Sequence[Example]]) -> int:
    """Positions that count in the loss: tokens after the first of an example that are the
    assistant's."""
    return sum(sum(e.mask[1:]) for row in rows for e in row)


def token_share(mine: Sequence[Sequence[Example]], step_rows: Sequence[Sequence[Example]],
                micro_batches: int) -> float:
    """What a micro-batch's mean loss is scaled by so that, once the loop divides by the
    accumulation count and data parallelism averages the ranks' gradients, the optimizer step's
    loss is the mean over every assistant token of all its micro-batches on all ranks (as one
    big batch in one process), not a mean of per-micro-batch means, which would over-weight the
    tokens of short batches. `micro_batches` = ranks x accumulation steps; `step_rows` are the
    rows of the whole step."""
    return assistant_labels(mine) * micro_batches / max(assistant_labels(step_rows), 1)


def rows_fingerprint(rows: list[list[Example]], extra: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for row in rows:
        for example in row:
            digest.update(np.asarray(example.ids, dtype=np.int64).tobytes())
            digest.update(np.packbits(np.asarray(example.mask, dtype=bool)).tobytes())
            digest.update(b"|")
        digest.update(b"#")
    return digest.hexdigest()


class ChatRowStream(ResumableStream):
    """An endless stream of collated batches over `rows`, in a seeded random order redrawn each
    epoch. The rows of one optimizer step (`batch_size * world_size * grad_accum`) are drawn
    together, so every micro-batch's `share` weights it by its assistant tokens within the step;
    with `world_size` > 1 each global micro-batch is cut into per-rank slices, so the state is
    the same on every rank. `state_dict()` is small and JSON-able; a fresh stream over the same
    rows continues exactly from it."""

    state_version = STATE_VERSION

    def __init__(self, rows: list[list[Example]], *, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, fingerprint: str = "",
                 grad_accum: int = 1):
        if not rows:
            raise MinimaError("no training examples")
        if batch_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise MinimaError(f"bad batch size {batch_size}, accumulation {grad_accum} or rank "
                              f"{rank} of {world_size}")
        super().__init__(seed=seed, fingerprint=fingerprint)
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.grad_accum = grad_accum
        self.epoch, self.index, self.batches_served, self.tokens_served = 0, 0, 0, 0
        self.resumed_tokens = 0  # tokens served before this process resumed the stream
        self._order = self.order(0)
        # the step being served: its rows, the position it was drawn from, micro-batches served
        self._step_rows: list[list[Example]] = []
        self._step_start = (0, 0)
        self._in_step = 0

    def order(self, epoch: int) -> np.ndarray:
        return permutation(len(self.rows), [self.seed, CHAT_SHUFFLE, epoch])

    def _draw_step(self) -> None:
        self._step_start, self._step_rows = (self.epoch, self.index), []
        for _ in range(self.batch_size * self.world_size * self.grad_accum):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self.order(self.epoch)
            self._step_rows.append(self.rows[int(self._order[self.index])])
            self.index += 1

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._in_step == 0:
            self._draw_step()
        width = self.batch_size * self.world_size
        picks = self._step_rows[self._in_step * width : (self._in_step + 1) * width]
        self._in_step = (self._in_step + 1) % self.grad_accum
        self.batches_served += 1
        self.tokens_served += sum(len(e.ids) for row in picks for e in row)
        mine = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        batch = collate(mine, self.pad_id)
        batch["share"] = torch.tensor(token_share(mine, self._step_rows,
                                                  self.world_size * self.grad_accum))
        return batch

    def position(self) -> dict[str, Any]:
        """The position the current step was drawn from, and how much of it was served."""
        epoch, index = self._step_start if self._in_step else (self.epoch, self.index)
        return {"epoch": epoch, "index": index, "in_step": self._in_step,
                "batches_served": self.batches_served, "tokens_served": self.tokens_served}

    def restore(self, state: dict[str, Any]) -> None:
        if not 0 <= int(state["index"]) <= len(self.rows):
            raise MinimaError("the saved data position does not fit this data (data mismatch)")
        in_step = int(state.get("in_step", 0))
        if not 0 <= in_step < self.grad_accum:
            raise MinimaError("the saved data position is inside an accumulation step this run "
                              "does not have (--grad-accum changed?)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self.order(self.epoch)
        self._in_step = 0
        if in_step:
            self._draw_step()
            self._in_step = in_step
        self.batches_served = int(state["batches_served"])
        self.tokens_served = self.resumed_tokens = int(state["tokens_served"])


def split_conversations(n: int, *, seed: int, valid_fraction: float) -> tuple[list[int], list[int]]:
    """(train, valid) indices, each ascending: a seeded `valid_fraction` of the conversations (at
    least one) is held out."""
    train, valid = split_indices(n, [seed, CHAT_SPLIT], valid_fraction=valid_fraction,
                                 items="conversations", fraction_option="--valid-fraction")
    return train.tolist(), valid.tolist()
