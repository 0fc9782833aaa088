"""`minima eval`: perplexity, multiple choice, generation and lm-evaluation-harness tasks, for
one model or several side by side (deltas against the first).

Task specs, one `--task` each (`KIND:TARGET[:key=value,...]`):
- `ppl:FILE` perplexity of a text file (`.txt`: a document a line; `.jsonl`/`.json`/`.parquet`
  with a `text` field, `field=NAME` for another).
- `mc:FILE.jsonl[:shots=5,dev=DEV.jsonl,style=cloze|letters]` multiple choice, MMLU-style records
  `{"question": str, "choices": [str, ...], "answer": int}` (optional `category` for a breakdown).
- `gen:FILE.jsonl[:match=exact|contains,max_tokens=32,temperature=0,top_p=1]` generation; records
  `{"prompt": str, "answer": str | [str, ...]}` or chat `{"messages": [...]}` whose last
  (assistant) message is the reference and the rest the prompt, through the chat template.
- `lm-eval:NAME_OR_YAML[:shots=N]` any lm-evaluation-harness task (a hub dataset needs a network)
  or a local task YAML (works offline).

Conventions, so that minima's numbers and the harness's agree:
- Multiple choice follows lm-eval: context = few-shot examples (each `question + " " + answer`,
  joined by a blank line) + the question; continuation = `" " + choice`; `acc` takes the argmax of
  the summed log-likelihood of the continuation tokens, `acc_norm` the argmax of that divided by
  the choice's length in characters. Shots are the first N records of the dev file (MMLU's
  `first_n`). Tokenization as in lm-eval: encode context + continuation and the context alone,
  the continuation's tokens are the difference (trailing context spaces move to it).
- Perplexity is defined in `perplexity_windows`: documents are joined into one stream
  `EOS d1 EOS d2 EOS ... dn EOS` (as in training, every document ends with EOS; the leading EOS
  gives the first document's first token a context), windows of `max_length` tokens start every
  `stride` tokens, and a token is scored in the first window that holds it after that window's
  first token, with the window's earlier tokens as context: with stride < max_length every token
  after the first is scored exactly once; stride == max_length scores independent chunks (each
  chunk's first token has no context and is not scored), as HF's "perplexity of fixed-length
  models" guide. ppl = exp(total NLL / scored tokens), token-weighted over the whole file.
- Throughput (`tokens_per_second`) counts every token the model reads in minima-run tasks
  (windows, contexts with continuations, prompts and generated tokens) over their wall time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.chat import IM_END, chat_prompt
from minima_cli.data.read import read_documents, read_records
from minima_cli.errors import MinimaError, first_line
from minima_cli.progress import step_progress
from minima_cli.runtime import resolve_device
from minima_cli.stages import RunControl
from minima_cli.stages.configs import EvalConfig

TASK_KINDS = ("ppl", "mc", "gen", "lm-eval")


BACKENDS = ("minima", "lm-eval")


# Accepted `key=value` options per task kind (anything else is a typo worth one clear line).
TASK_OPTIONS = {
    "ppl": ("field",),
    "mc": ("shots", "dev", "style"),
    "gen": ("match", "max_tokens", "temperature", "top_p"),
    "lm-eval": ("shots",),
}


MC_STYLES = ("cloze", "letters")


MATCH_MODES = ("exact", "contains")


TARGET_DELIMITER = " "  # lm-eval's default between a question and its answer


FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default between few-shot examples


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


DEFAULT_MAX_LENGTH = 2048  # cap on the default window: a 128k-context model on CPU is no default


# Models this narrow run on one CPU thread: their matrices gain nothing from more, and on a busy
# machine spinning OpenMP threads slow them down.
SMALL_HIDDEN = 256


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    target: str  # a file path, or a harness task name / YAML path for lm-eval
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short key for tables and results.json: kind, file stem and the shot count."""
        stem = Path(self.target).stem if self.kind != "lm-eval" or self.is_yaml else self.target
        shots = self.options.get("shots")
        return f"{self.kind}:{stem}" + (f":{shots}-shot" if shots not in (None, "0") else "")

    @property
    def is_yaml(self) -> bool:
        return self.target.endswith((".yaml", ".yml"))


_OPTIONS = re.compile(r"^[a-z_]+=[^,]*(,[a-z_]+=[^,]*)*$")


def parse_task(text: str, *, backend: str = "minima") -> TaskSpec:
    """Parse one `--task`. A bare name is a harness task under `--backend lm-eval`; a bare
    existing file is typed by its content (text -> ppl, choices -> mc, prompt/messages -> gen)."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in TASK_KINDS:
        if backend == "lm-eval" and not Path(text).is_file():
            return TaskSpec("lm-eval", text)
        if Path(text).is_file():
            return TaskSpec(infer_kind(Path(text)), text)
        if sep and not Path(kind).exists():
            raise MinimaError(f"unknown task kind {kind!r} in {text!r}: use one of "
                              f"{', '.join(TASK_KINDS)} (e.g. mc:questions.jsonl:shots=5)")
        raise MinimaError(f"unknown task {text!r}: not a file; give KIND:FILE with KIND one of "
                          f"{', '.join(TASK_KINDS)} (e.g. ppl:valid.txt, mc:q.jsonl:shots=5), or "
                          "a harness task name with --backend lm-eval")
    target, options = rest, {}
    head, sep, tail = rest.rpartition(":")
    if sep and _OPTIONS.match(tail):
        target = head
        for item in tail.split(","):
            key, _, value = item.partition("=")
            if key not in TASK_OPTIONS[kind]:
                raise MinimaError(f"task {text!r}: unknown option {key!r} for {kind} tasks "
                                  f"(options: {', '.join(TASK_OPTIONS[kind])})")
            options[key] = value
    if not target:
        raise MinimaError(f"task {text!r}: nothing after '{kind}:'")
    spec = TaskSpec(kind, target, options)
    check_options(spec)
    return spec


def check_options(spec: TaskSpec) -> None:
    """Validate option values and that the task's files exist, before any model loads."""
    opts = spec.options
    where = f"task {spec.kind}:{spec.target}"
    if "shots" in opts:
        option_int(opts, "shots", 0, where)
    if spec.kind == "mc":
        if opts.get("style", "cloze") not in MC_STYLES:
            raise MinimaError(f"{where}: style must be one of {', '.join(MC_STYLES)}")
        if option_int(opts, "shots", 0, where) and "dev" not in opts:
            raise MinimaError(f"{where}: shots={opts['shots']} needs dev=FILE (the examples)")
    if spec.kind == "gen":
        if opts.get("match", "exact") not in MATCH_MODES:
            raise MinimaError(f"{where}: match must be one of {', '.join(MATCH_MODES)}")
        option_int(opts, "max_tokens", 32, where, least=1)
        option_float(opts, "temperature", 0.0, where)
        top_p = option_float(opts, "top_p", 1.0, where)
        if not 0 < top_p <= 1:
            raise MinimaError(f"{where}: top_p must be in (0, 1], got {top_p}")
    files = [spec.target] if spec.kind != "lm-eval" or spec.is_yaml else []
    files += [opts["dev"]] if "dev" in opts else []
    for name in files:
        if not Path(name).is_file():
            raise MinimaError(f"{where}: file not found: {name}")


def option_int(opts: dict[str, str], key: str, default: int, where: str, least: int = 0) -> int:
    try:
        value = int(opts.get(key, default))
    except ValueError:
        raise MinimaError(f"{where}: {key}={opts[key]!r} is not an integer") from None
    if value < least:
        raise MinimaError(f"{where}: {key} must be at least {least}, got {value}")
    return value


def option_float(opts: dict[str, str], key: str, default: float, where: str) -> float:
    try:
        value = float(opts.get(key, default))
    except ValueError:
        raise MinimaError(f"{where}: {key}={opts[key]!r} is not a number") from None
    if value < 0 or not math.isfinite(value):
        raise MinimaError(f"{where}: {key} must be a finite number >= 0, got {value}")
    return value


def infer_kind(path: Path) -> str:
    if path.suffix in (".txt", ".md", ".parquet"):
        return "ppl"
    if path.suffix in (".yaml", ".yml"):
        return "lm-eval"
    if path.suffix in (".jsonl", ".json"):
        try:
            records = read_records(path)
        except MinimaError:  # a .json array, say: only an explicit kind tells
            records = []
        first = records[0][1] if records else {}
        if isinstance(first, dict):
            if "choices" in first:
                return "mc"
            if "prompt" in first or "messages" in first:
                return "gen"
            if "text" in first:
                return "ppl"
    raise MinimaError(f"cannot tell what task {path} is: prefix it with ppl:, mc: or gen:")


@dataclass(frozen=True)
class McItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    category: str | None = None


def read_mc(path: str | Path) -> list[McItem]:
    """MMLU-style records; every problem (a missing field, an answer index out of range) is one
    line naming the file and line."""
    items = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise MinimaError(f"{where}: expected a JSON object")
        question, choices, answer = (record.get(k) for k in ("question", "choices", "answer"))
        if not isinstance(question, str) or not question.strip():
            raise MinimaError(f"{where}: 'question' must be a non-empty string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise MinimaError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS:
            answer = LETTERS.index(answer)  # "B" as MMLU exports often write it
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise MinimaError(f"{where}: 'answer' must be a choice index (int), got {answer!r}")
        if not 0 <= answer < len(choices):
            raise MinimaError(f"{where}: answer index {answer} is out of range for "
                              f"{len(choices)} choices (0..{len(choices) - 1})")
        category = record.get("category", record.get("subject"))
        items.append(McItem(question, tuple(choices), answer,
                            None if category is None else str(category)))
    if not items:
        raise MinimaError(f"{path}: no questions")
    return items


def mc_question_text(item: McItem, style: str) -> str:
    """What the model reads for a question. cloze: the question as written (the answer follows
    after a space); letters: MMLU's layout, the choices listed as A./B./... then 'Answer:'."""
    if style == "cloze":
        return item.question
    listed = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question.strip()}{listed}\nAnswer:"


def mc_choice_texts(item: McItem, style: str) -> list[str]:
    return list(item.choices) if style == "cloze" else list(LETTERS[: len(item.choices)])


def mc_context(item: McItem, shots: Sequence[McItem], style: str = "cloze") -> str:
    """lm-eval's plain-text few-shot context: each example as `question + " " + answer + "\\n\\n"`,
    then the question."""
    examples = "".join(
        mc_question_text(s, style) + TARGET_DELIMITER + mc_choice_texts(s, style)[s.answer]
        + FEWSHOT_DELIMITER for s in shots)
    return examples + mc_question_text(item, style)


def mc_predictions(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax log-likelihood, argmax log-likelihood / characters of the choice) as lm-eval."""
    if len(logliks) != len(choices):
        raise ValueError("one log-likelihood per choice")
    best = max(range(len(choices)), key=lambda i: logliks[i])
    best_norm = max(range(len(choices)), key=lambda i: logliks[i] / len(choices[i]))
    return best, best_norm


def encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's `tok_encode`: the tokenizer's own special tokens (a LLaMA BOS), unless the text
    already starts with the BOS string."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids: trailing spaces of the context
    move to the continuation; encode both together and the context alone; the continuation is
    the difference, so merges across the boundary tokenize as the model would see them."""
    if not context:  # an empty context is conditioned on the BOS (else EOS) token, as lm-eval
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logliks(model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                         max_length: int, batch_size: int, on_batch: Callable[[int], None] | None
                         = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), whether greedy decoding gives them) per pair.

    As lm-eval: the input is `(context + continuation)[-(max_length + 1):][:-1]` (left
    truncation), batches are right-padded, log-softmax in float32. Longest first, so a batch's
    padding stays small; results come back in the input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs, cont_lens = [], []
        for i in chunk:
            context, cont = pairs[i]
            if not 0 < len(cont) <= max_length:
                raise MinimaError(f"a continuation of {len(cont)} tokens does not fit "
                                  f"--max-length {max_length}")
            inputs.append((context + cont)[-(max_length + 1):][:-1])
            cont_lens.append(len(cont))
        width = max(len(x) for x in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=batch.to(device)).logits.float()
        for row, i in enumerate(chunk):
            end, n = len(inputs[row]), cont_lens[row]
            logprobs = torch.log_softmax(logits[row, end - n:end], dim=-1)
            target = torch.tensor(pairs[i][1], device=device)
            picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs.argmax(-1) == target).all())
            results[i] = (float(picked.sum()), greedy)
        if on_batch:
            on_batch(sum(len(x) for x in inputs))
    return results


def mc_requests(items: Sequence[McItem], shots: Sequence[McItem], style: str, tokenizer: Any
                ) -> list[tuple[list[int], list[int]]]:
    """One (context, continuation) token pair per choice of every item, item by item."""
    pairs = []
    for item in items:
        context = mc_context(item, shots, style)
        pairs += [encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
                  for choice in mc_choice_texts(item, style)]
    return pairs


def score_mc(items: Sequence[McItem], logliks: Sequence[float], style: str) -> dict[str, Any]:
    """acc / acc_norm over items (and per category when the items carry one)."""
    rows, position = [], 0
    for item in items:
        choices = mc_choice_texts(item, style)
        pred, pred_norm = mc_predictions(logliks[position:position + len(choices)], choices)
        position += len(choices)
        rows.append((item.category, pred == item.answer, pred_norm == item.answer))
    result: dict[str, Any] = {
        "acc": sum(r[1] for r in rows) / len(rows),
        "acc_norm": sum(r[2] for r in rows) / len(rows),
        "n": len(rows),
        "chance": sum(1 / len(i.choices) for i in items) / len(items),
    }
    categories = sorted({r[0] for r in rows if r[0] is not None})
    if categories:
        result["by_category"] = {
            c: {"acc": sum(r[1] for r in rows if r[0] == c) / n,
                "acc_norm": sum(r[2] for r in rows if r[0] == c) / n, "n": n}
            for c in categories for n in [sum(1 for r in rows if r[0] == c)]}
    return result


def mc_shots(spec: TaskSpec) -> list[McItem]:
    """The first `shots` records of the dev file; fewer available is a user error."""
    shots = option_int(spec.options, "shots", 0, f"task {spec.target}")
    if not shots:
        return []
    dev = read_mc(spec.options["dev"])
    if len(dev) < shots:
        raise MinimaError(f"task {spec.kind}:{spec.target}: shots={shots} but the dev file "
                          f"{spec.options['dev']} has only {len(dev)} examples")
    return dev[:shots]


def perplexity_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of `n_tokens` tokens: `(begin, end, first)` each, meaning
    the model reads tokens `[begin, end)` and scores tokens `[first, end)`, each with the
    context `[begin, position)` (the scheme of HF's "perplexity of fixed-length models" guide,
    with exact token accounting).

    Window k starts at k * stride and holds up to `max_length` tokens; it scores the tokens no
    earlier window scored, except its own first token, which has no context in it. So with
    stride < max_length every token but token 0 is scored exactly once, with at least
    max_length - stride tokens of context (unless near the start); with stride == max_length
    the windows are independent chunks and each chunk's first token goes unscored."""
    if max_length < 2:
        raise MinimaError(f"--max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise MinimaError(f"--stride must be in 1..max-length ({max_length}), got {stride}")
    windows, scored_to, begin = [], 1, 0
    while scored_to < n_tokens:
        end = min(begin + max_length, n_tokens)
        first = max(begin + 1, scored_to)
        if first < end:
            windows.append((begin, end, first))
        scored_to = end
        begin += stride
    return windows


def document_stream(tokenizer: Any, documents: Sequence[str]) -> list[int]:
    """`EOS d1 EOS d2 ... EOS dn EOS`, the training layout (documents end with EOS) with a
    leading EOS so the first document's first token is predicted like every other's."""
    from minima_cli.data.pack import separated_stream
    from minima_cli.data.tokenize import TokenizedSource, tokenize_documents

    eos = tokenizer.eos_token_id
    if eos is None:
        raise MinimaError("the tokenizer has no EOS token to separate documents with")
    flat = TokenizedSource.of(tokenize_documents(tokenizer, list(documents)))
    return [eos, *separated_stream(flat, None, eos).tolist()]


@torch.no_grad()
def strided_nll(model: torch.nn.Module, ids: Sequence[int], *, max_length: int, stride: int,
                batch_size: int = 8, on_batch: Callable[[int], None] | None = None
                ) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) over `perplexity_windows`."""
    device = next(model.parameters()).device
    stream = torch.tensor(list(ids), dtype=torch.long)
    windows = perplexity_windows(len(stream), max_length, stride)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(chunk):
            batch[row, :end - begin] = stream[begin:end]
        logits = model(input_ids=batch.to(device)).logits.float()
        for row, (begin, end, first) in enumerate(chunk):
            # logits at window position j predict token begin + j + 1
            logprobs = torch.log_softmax(logits[row, first - begin - 1:end - begin - 1], dim=-1)
            target = stream[first:end].to(device)
            total -= float(logprobs.gather(-1, target[:, None]).sum())
            count += end - first
        if on_batch:
            on_batch(sum(end - begin for begin, end, _ in chunk))
    if count == 0:
        raise MinimaError("the text is too short to score (fewer than 2 tokens)")
    return total, count


@dataclass(frozen=True)
class GenItem:
    prompt: str
    answers: tuple[str, ...]
    chat: bool  # the prompt was rendered by a chat template (it carries its own special tokens)


def read_gen(path: str | Path, tokenizer: Any) -> list[GenItem]:
    items = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise MinimaError(f"{where}: expected a JSON object")
        if "messages" in record:
            messages = record["messages"]
            if (not isinstance(messages, list) or len(messages) < 2
                    or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                               and m.get("role") in ("system", "user", "assistant")
                               for m in messages)):
                raise MinimaError(f"{where}: 'messages' must be a list of at least 2 "
                                  "{role: system|user|assistant, content: str} objects")
            if messages[-1]["role"] != "assistant":
                raise MinimaError(f"{where}: the last message must be the assistant's reference")
            prompt = chat_prompt(tokenizer, messages[:-1])
            items.append(GenItem(prompt, (messages[-1]["content"],), True))
            continue
        prompt, answer = record.get("prompt"), record.get("answer")
        if not isinstance(prompt, str) or not prompt:
            raise MinimaError(f"{where}: needs 'prompt' (a non-empty string) or 'messages'")
        answers = [answer] if isinstance(answer, str) else answer
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise MinimaError(f"{where}: 'answer' must be a non-empty string or list of strings")
        items.append(GenItem(prompt, tuple(answers), False))
    if not items:
        raise MinimaError(f"{path}: no prompts")
    return items


def match(output: str, answers: Sequence[str], mode: str) -> bool:
    """exact: the output (whitespace-stripped) equals an answer; contains: an answer occurs in
    it. Case-sensitive: the reference is what the model should say."""
    output = output.strip()
    if mode == "exact":
        return any(output == a.strip() for a in answers)
    return any(a.strip() in output for a in answers)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS, and ChatML's end of turn when the vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, items: Sequence[GenItem], *,
             max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
             max_length: int, seed: int, on_batch: Callable[[int], None] | None = None
             ) -> list[str]:
    """Greedy (temperature 0) or sampled completions, left-padded batches, stopped at EOS /
    <|im_end|>; decoded without special tokens. Prompts longer than the window lose their
    start."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    generator_seed = torch.Generator().manual_seed(seed)  # reproducible sampling per call
    outputs = []
    keep = max(1, max_length - max_new_tokens)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [tokenizer.encode(i.prompt, add_special_tokens=not i.chat)[-keep:]
                   for i in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        sample = temperature > 0
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator_seed)))
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
            if sample else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad, **kwargs)
        new = out[:, width:].cpu()
        for row in new:
            tokens = row.tolist()
            for position, token in enumerate(tokens):
                if token in stops:
                    tokens = tokens[:position]
                    break
            outputs.append(tokenizer.decode(tokens, skip_special_tokens=True))
        if on_batch:
            on_batch(int(mask.sum()) + int(new.numel()))
    return outputs


def mc_task_config(task_name: str, test_file: Path, dev_file: Path | None, style: str
                   ) -> dict[str, Any]:
    """A harness task YAML (as a dict) for a minima MC file, offline: the `json` dataset builder
    reads the local files; `first_n` shots from the dev split, like MMLU and like minima."""
    files = {"test": str(Path(test_file).resolve())}
    if dev_file is not None:
        files["validation"] = str(Path(dev_file).resolve())
    if style == "cloze":
        doc_to_text, doc_to_choice = "question", "choices"
    else:
        doc_to_text = ("{{question.strip()}}{% for c in choices %}\n{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'"
                       "[loop.index0] }}. {{c}}{% endfor %}\nAnswer:")
        doc_to_choice = "{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[:choices|length]|list }}"
    config: dict[str, Any] = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": doc_to_choice,
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "fewshot_delimiter": FEWSHOT_DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
    }
    if dev_file is not None:
        config["fewshot_split"] = "validation"
        config["fewshot_config"] = {"sampler": "first_n"}
    return config


def lm_eval_task(spec: TaskSpec, workdir: Path) -> tuple[str, list[str] | None, int | None]:
    """(harness task name, include paths or None for the built-in registry, shots) for a spec:
    an mc file becomes a generated YAML in `workdir`; a YAML path is included from its folder."""
    import yaml

    shots = int(spec.options["shots"]) if "shots" in spec.options else None
    if spec.kind == "mc":
        name = "minima_" + re.sub(r"\W", "_", Path(spec.target).stem)
        dev = Path(spec.options["dev"]) if "dev" in spec.options else None
        config = mc_task_config(name, Path(spec.target), dev, spec.options.get("style", "cloze"))
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return name, [str(workdir)], shots or 0
    if spec.is_yaml:
        return yaml_task_name(spec.target), [str(Path(spec.target).resolve().parent)], shots
    return spec.target, None, shots


def yaml_task_name(path: str | Path) -> str:
    """The `task:` a harness YAML defines (the harness includes its whole folder)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise MinimaError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise MinimaError(f"{path}: a harness task YAML needs a 'task: NAME' field")
    return config["task"]


def uses_harness(spec: TaskSpec, backend: str) -> bool:
    return spec.kind == "lm-eval" or (spec.kind == "mc" and backend == "lm-eval")


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, *, batch_size: int,
                max_length: int, limit: int | None, seed: int, progress: bool = True
                ) -> dict[str, Any]:
    """One task through `lm_eval.simple_evaluate` with an HFLM around the loaded model. The
    harness shows its own tqdm bars; without `progress` they (on stderr) are swallowed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MinimaError("the lm-eval backend needs lm-evaluation-harness: "
                          "pip install 'lm-eval>=0.4.5'") from None
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO lines would bury the table
    with tempfile.TemporaryDirectory(prefix="minima-lm-eval-") as workdir:
        name, include, shots = lm_eval_task(spec, Path(workdir))
        manager = TaskManager(include_path=include, include_defaults=include is None)
        if name not in manager.all_tasks:
            raise MinimaError(f"unknown lm-eval task {name!r}" + (
                f" (not defined in {spec.target})" if include else
                " (see `lm-eval ls tasks`, or pass a task YAML path)"))
        device = next(model.parameters()).device
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       max_length=max_length, device=str(device))
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        try:
            with quiet:
                output = lm_eval.simple_evaluate(
                    model=harness, tasks=[name], num_fewshot=shots, limit=limit,
                    task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                    bootstrap_iters=0, verbosity="ERROR")
        except (ValueError, KeyError, FileNotFoundError, ConnectionError) as error:
            raise MinimaError(f"lm-eval task {name!r} failed: {first_line(error)}") from error
    results = output["results"]
    metrics: dict[str, Any] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")  # harness keys: "acc,none"
            if comma and isinstance(value, int | float) and not metric.endswith("_stderr"):
                label = metric if filter_name == "none" else f"{metric}/{filter_name}"
                metrics[label if len(results) == 1 else f"{task}/{label}"] = float(value)
    counts = output.get("n-samples", {}).get(name, {})
    if "effective" in counts:
        metrics["n"] = counts["effective"]
    return metrics


def model_max_length(model: torch.nn.Module, requested: int | None) -> int:
    if requested is not None:
        if requested < 2:
            raise MinimaError(f"--max-length must be at least 2, got {requested}")
        return requested
    positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return min(int(positions), DEFAULT_MAX_LENGTH)


def evaluate_model(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskSpec],
                   config: EvalConfig, *, progress: bool = True,
                   generations: dict[str, list[dict[str, Any]]] | None = None
                   ) -> dict[str, Any]:
    """Every task on one loaded model: {task name: metrics}, plus parameters and throughput.
    Generated texts go to `generations[task name]` when a dict is given."""
    from minima_cli.runtime import torch_threads

    small = next(model.parameters()).device.type == "cpu" and \
        getattr(model.config, "hidden_size", 0) <= SMALL_HIDDEN
    with torch_threads(1) if small else contextlib.nullcontext():
        return _evaluate_model(model, tokenizer, tasks, config, progress, generations)


def _evaluate_model(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskSpec],
                    config: EvalConfig, progress: bool,
                    generations: dict[str, list[dict[str, Any]]] | None) -> dict[str, Any]:
    max_length = model_max_length(model, config.max_length)
    stride = config.stride if config.stride is not None else max(1, max_length // 2)
    perplexity_windows(2, max_length, stride)  # validates the pair before any work
    # parameters() yields tied weights once, so a tied lm_head is not counted twice
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                              "max_length": max_length, "tasks": {}}
    tokens, seconds = 0, 0.0
    for spec in tasks:
        started = time.perf_counter()
        counted = [0]

        def count(n: int, counted: list[int] = counted) -> None:
            counted[0] += n

        if uses_harness(spec, config.backend):
            metrics = run_lm_eval(model, tokenizer, spec, batch_size=config.batch_size,
                                  max_length=max_length, limit=config.limit, seed=config.seed,
                                  progress=progress)
            metrics["backend"] = "lm-eval"
        elif spec.kind == "ppl":
            metrics = eval_ppl(model, tokenizer, spec, max_length, stride, config, progress, count)
        elif spec.kind == "mc":
            metrics = eval_mc(model, tokenizer, spec, max_length, config, progress, count)
        else:
            metrics, outputs = eval_gen(model, tokenizer, spec, max_length, config, progress,
                                        count)
            if generations is not None:
                generations[spec.name] = outputs
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        result["tasks"][spec.name] = metrics
        if counted[0]:
            tokens += counted[0]
            seconds += time.perf_counter() - started
    result["tokens"] = tokens
    result["tokens_per_second"] = tokens / seconds if seconds > 0 else None
    return result


@contextlib.contextmanager
def task_progress(description: str, batches: int, enabled: bool, count: Callable[[int], None]
                  ) -> Iterator[Callable[[int], None]]:
    """A progress bar over a task's batches; its callback also counts the tokens toward the
    model's throughput."""
    with step_progress(description, batches, enabled=enabled) as bar:
        def on_batch(tokens: int) -> None:
            count(tokens)
            bar.update(tokens)

        yield on_batch


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def eval_ppl(model, tokenizer, spec: TaskSpec, max_length: int, stride: int, config: EvalConfig,
             progress: bool, count: Callable[[int], None]) -> dict[str, Any]:
    documents = _limit(read_documents(spec.target, spec.options.get("field", "text")),
                       config.limit)
    ids = document_stream(tokenizer, documents)
    n_windows = len(perplexity_windows(len(ids), max_length, stride))
    batches = math.ceil(n_windows / config.batch_size)
    with task_progress(f"{spec.name} ppl", batches, progress, count) as on_batch:
        nll, scored = strided_nll(model, ids, max_length=max_length, stride=stride,
                                  batch_size=config.batch_size, on_batch=on_batch)
    return {"ppl": math.exp(nll / scored), "nll_per_token": nll / scored, "tokens": scored,
            "documents": len(documents), "max_length": max_length, "stride": stride}


def eval_mc(model, tokenizer, spec: TaskSpec, max_length: int, config: EvalConfig,
            progress: bool, count: Callable[[int], None]) -> dict[str, Any]:
    style = spec.options.get("style", "cloze")
    items = _limit(read_mc(spec.target), config.limit)
    shots = mc_shots(spec)
    pairs = mc_requests(items, shots, style, tokenizer)
    batches = math.ceil(len(pairs) / config.batch_size)
    with task_progress(spec.name, batches, progress, count) as on_batch:
        logliks = continuation_logliks(model, pairs, max_length=max_length,
                                       batch_size=config.batch_size, on_batch=on_batch)
    metrics = score_mc(items, [ll for ll, _ in logliks], style)
    metrics["shots"] = len(shots)
    return metrics


def eval_gen(model, tokenizer, spec: TaskSpec, max_length: int, config: EvalConfig,
             progress: bool, count: Callable[[int], None]
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    opts, where = spec.options, f"task {spec.target}"
    mode = opts.get("match", "exact")
    items = _limit(read_gen(spec.target, tokenizer), config.limit)
    batches = math.ceil(len(items) / config.batch_size)
    with task_progress(f"{spec.name} generate", batches, progress, count) as on_batch:
        texts = generate(model, tokenizer, items,
                         max_new_tokens=option_int(opts, "max_tokens", 32, where, least=1),
                         temperature=option_float(opts, "temperature", 0.0, where),
                         top_p=option_float(opts, "top_p", 1.0, where),
                         batch_size=config.batch_size, max_length=max_length,
                         seed=config.seed, on_batch=on_batch)
    rows = [{"prompt": i.prompt, "answers": list(i.answers), "output": t,
             "correct": match(t, i.answers, mode)} for i, t in zip(items, texts, strict=True)]
    metrics = {mode + "_match": sum(r["correct"] for r in rows) / len(rows), "n": len(rows)}
    return metrics, rows


def model_label(text: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (then the name is the path as given)."""
    name, sep, path = text.partition("=")
    if sep and name and path and not Path(text).exists():
        return name, path
    return text, text


_NOT_METRICS = {"n", "tokens", "documents", "max_length", "stride", "shots", "seconds", "chance"}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A task's comparable numbers: its metrics, and per-category ones as `acc/counting`
    (not sizes, counts or settings)."""
    flat = {}
    for name, value in metrics.items():
        if name == "by_category":
            for category, values in value.items():
                flat.update({f"{k}/{category}": v for k, v in values.items()
                             if k not in _NOT_METRICS})
        elif name not in _NOT_METRICS and isinstance(value, int | float) \
                and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def compare(models: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Deltas of every metric against the first model's: [{task: {metric: delta}}, ...]."""
    base = {task: flat_metrics(m) for task, m in models[0]["tasks"].items()}
    deltas = []
    for entry in models:
        delta: dict[str, dict[str, float]] = {}
        for task, metrics in entry["tasks"].items():
            for metric, value in flat_metrics(metrics).items():
                if metric in base.get(task, {}):
                    delta.setdefault(task, {})[metric] = value - base[task][metric]
        deltas.append(delta)
    return deltas


def table_rows(models: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows for the rich table: task, metric, then each model's value (later models with their
    delta against the first)."""
    rows = [["", "parameters"] + [f"{m['parameters']:,}" for m in models],
            ["", "tokens/s"] + [f"{m['tokens_per_second']:,.0f}" if m["tokens_per_second"]
                                else "-" for m in models]]
    deltas = compare(models)
    for task in models[0]["tasks"]:
        for metric, value in flat_metrics(models[0]["tasks"][task]).items():
            cells = [_fmt(value)]
            for entry, delta in zip(models[1:], deltas[1:], strict=True):
                other = flat_metrics(entry["tasks"].get(task, {})).get(metric)
                change = delta.get(task, {}).get(metric)
                cells.append("-" if other is None else f"{_fmt(other)} ({change:+.4f})")
            rows.append([task, metric] + cells)
    return rows


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def run_eval(*, models: Sequence[str], tasks: Sequence[str], config: EvalConfig,
             output: Path | None = None, force: bool = False, dtype: torch.dtype | None = None,
             device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """The `minima eval` stage: parse and check every task and model before any loads, evaluate
    each model in turn, write `results.json` (+ generations/*.jsonl, minima.json) atomically."""
    from minima_cli.fsutil import check_output
    from minima_cli.model.checkpoint import (
        load_model,
        load_tokenizer,
        model_fingerprint,
        resolve_model,
    )

    if not models:
        raise MinimaError("give at least one --model")
    if not tasks:
        raise MinimaError("give at least one --task")
    if config.backend not in BACKENDS:
        raise MinimaError(f"--backend must be one of {', '.join(BACKENDS)}")
    if config.batch_size < 1:
        raise MinimaError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.limit is not None and config.limit < 1:
        raise MinimaError(f"--limit must be at least 1, got {config.limit}")
    if output is not None:
        check_output(Path(output), force)
    specs = [parse_task(t, backend=config.backend) for t in tasks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MinimaError(f"two tasks share the name {next(n for n in names if names.count(n) > 1)}"
                          "; evaluate them in separate runs")
    for spec in specs:  # read task files now: a bad answer index fails before a model loads
        if spec.kind == "mc":
            read_mc(spec.target)
            mc_shots(spec)
        if spec.kind == "lm-eval" and spec.is_yaml:
            yaml_task_name(spec.target)
    if any(uses_harness(s, config.backend) for s in specs) and \
            importlib.util.find_spec("lm_eval") is None:
        raise MinimaError("the lm-eval backend needs lm-evaluation-harness: "
                          "pip install 'lm-eval>=0.4.5'")
    labels = [model_label(m) for m in models]
    model_names = [name for name, _ in labels]
    if len(set(model_names)) != len(model_names):
        raise MinimaError("two --model entries share a name; tell them apart as NAME=PATH")
    sources = [resolve_model(path) for _, path in labels]
    device = resolve_device(device)
    tokenizers = [load_tokenizer(source) for source in sources]
    for spec in specs:  # chat prompts need each tokenizer's template: still before the weights
        if spec.kind == "gen":
            for tokenizer in tokenizers:
                read_gen(spec.target, tokenizer)

    started = time.perf_counter()
    entries, generations = [], []
    for name, source, tokenizer in zip(model_names, sources, tokenizers, strict=True):
        model = load_model(source, dtype=dtype).to(device)
        torch.manual_seed(config.seed)
        outputs: dict[str, list[dict[str, Any]]] = {}
        entry = {"name": name, "path": str(source), "fingerprint": model_fingerprint(source),
                 **evaluate_model(model, tokenizer, specs, config, progress=progress,
                                  generations=outputs)}
        entries.append(entry)
        generations.append(outputs)
        del model
    deltas = compare(entries)
    for entry, delta in zip(entries, deltas, strict=True):
        entry["delta_vs_first"] = delta
    results = {
        "models": entries,
        "tasks": [{"name": s.name, "kind": s.kind, "target": s.target, "options": s.options}
                  for s in specs],
        "config": {"backend": config.backend, "max_length": config.max_length,
                   "stride": config.stride, "batch_size": config.batch_size,
                   "limit": config.limit, "seed": config.seed,
                   "dtype": str(dtype).removeprefix("torch.") if dtype else "auto"},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    if output is not None:
        write_results(Path(output), results, generations, force=force)
    return results


def write_results(output: Path, results: dict[str, Any],
                  generations: list[dict[str, list[dict[str, Any]]]], *, force: bool) -> None:
    """results.json, generations/INDEX-MODEL-TASK.jsonl and minima.json, all or nothing."""
    from minima_cli.fsutil import atomic_output_dir, write_manifest

    with atomic_output_dir(output, force=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for model_index, outputs in enumerate(generations):
            for task, rows in outputs.items():
                folder = tmp / "generations"
                folder.mkdir(exist_ok=True)
                name = results["models"][model_index]["name"]
                slug = re.sub(r"[^\w.-]+", "_", f"{model_index}-{name}-{task}")
                (folder / f"{slug}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_manifest(tmp, "eval",
                       inputs={"models": [{"name": m["name"], "path": m["path"],
                                           "fingerprint": m["fingerprint"]}
                                          for m in results["models"]],
                               "tasks": results["tasks"]},
                       config=results["config"],
                       metrics={m["name"]: m["tasks"] for m in results["models"]},
                       wall_time_s=results["wall_time_s"])


def run(config: EvalConfig, control: RunControl) -> dict[str, Any]:
    from minima_cli.runtime import torch_dtype

    return run_eval(models=config.models, tasks=config.tasks, config=config,
                    output=Path(config.output) if config.output else None, force=control.force,
                    dtype=torch_dtype(config.dtype), device=config.device,
                    progress=control.progress)
