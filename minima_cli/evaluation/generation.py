"""Generation tasks: prompts (or chat messages through the chat template), greedy or seeded
sampling with a KV cache, and exact / contains matching against the reference answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.chat import IM_END, chat_prompt
from minima_cli.data.read import read_records
from minima_cli.errors import MinimaError


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
