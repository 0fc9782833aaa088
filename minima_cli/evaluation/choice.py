"""Multiple choice as lm-evaluation-harness scores it: context = shots joined by a blank line +
question, continuation " " + choice (cloze) or the letter after an MMLU-style listing (letters);
acc by summed log-likelihood, acc_norm by log-likelihood per character."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.read import read_records
from minima_cli.errors import MinimaError
from minima_cli.evaluation.tasks import TaskSpec, option_int

TARGET_DELIMITER = " "  # lm-eval's default between a question and its answer


FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default between few-shot examples


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
