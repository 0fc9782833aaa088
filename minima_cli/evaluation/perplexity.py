"""Strided perplexity: documents joined `EOS d1 EOS d2 ...`, windows of max_length every stride,
each token scored once in the first window that holds it after that window's first token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from minima_cli.errors import MinimaError


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
