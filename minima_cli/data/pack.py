"""Packing: split a source's documents into train / validation, join documents with EOS separators
and cut the stream into `[n_blocks, seq_len]` blocks, dropping the ragged tail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from minima_cli.data.seeds import SPLIT, split_indices
from minima_cli.data.tokenize import TokenizedSource
from minima_cli.errors import MinimaError


def pack_documents(token_ids: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by `eos_id`, and cut into `[n_blocks, seq_len]`
    (int64): `pack_tokens` over the documents as one flat source, so both pack alike.

    The ragged tail that does not fill a whole block is dropped.
    """
    return pack_tokens(TokenizedSource.of(token_ids), None, seq_len, eos_id).long()


def split_documents(
    n_documents: int,
    *,
    seed: int,
    source_index: int = 0,
    valid_fraction: float = 0.0,
    valid_documents: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document indices, each ascending: a seeded random subset of
    `valid_documents` documents, or `valid_fraction` of them (at least one), is held out."""
    return split_indices(n_documents, [seed, SPLIT, source_index],
                         valid_fraction=valid_fraction, valid_count=valid_documents)


def separated_stream(
    flat: TokenizedSource, documents: np.ndarray | None, eos_id: int
) -> np.ndarray:
    """The tokens of `documents` (indices; None = all) in source order, each followed by EOS."""
    lengths = np.diff(flat.offsets)
    if documents is None:
        selected, documents = flat.tokens, np.arange(flat.n_documents)
    else:
        documents = np.unique(documents)  # source order, which the token mask below produces
        keep = np.zeros(flat.n_documents, dtype=bool)
        keep[documents] = True
        selected = flat.tokens[np.repeat(keep, lengths)]
    return np.insert(selected, np.cumsum(lengths[documents]), np.int32(eos_id))


def blocks_from_stream(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut a token stream into `[n_blocks, seq_len]` (int32, a view), dropping the ragged tail."""
    if seq_len < 1:
        raise MinimaError(f"seq_len must be at least 1, got {seq_len}")
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise MinimaError(
            f"not enough data to pack: {len(stream)} tokens (EOS separators included) "
            f"but one block of seq_len={seq_len} needs {seq_len}"
        )
    return torch.from_numpy(stream[: n_blocks * seq_len].reshape(n_blocks, seq_len))


def pack_tokens(
    flat: TokenizedSource, documents: np.ndarray | None, seq_len: int, eos_id: int
) -> torch.Tensor:
    """The blocks of `documents` (indices; None = all) of a flat source, each document followed
    by EOS (int32 blocks: half the memory; batches are widened)."""
    return blocks_from_stream(separated_stream(flat, documents, eos_id), seq_len)


# The seed tag of the bounded validation set (`--valid-tokens`), beside data/seeds.py's tags.
VALID_TOKENS = 4

VALID_DRAW = 1024  # candidate documents drawn at a time


def held_out_by_tokens(lengths: Any, n_documents: int, budget: int, *, seed: int,
                       source_index: int = 0) -> np.ndarray:
    """Documents held out for a validation set of at least `budget` tokens (each document's
    tokens plus its EOS), drawn in a seeded random order from `[seed, VALID_TOKENS, source]`
    until the budget is met; sorted. Costs O(held-out documents) whatever the corpus size:
    candidates are drawn with replacement and repeats skipped, no permutation of the corpus.

    `lengths(i)` is document i's token count (a store reads it from its memory map)."""
    total_needed = int(budget)
    if total_needed < 1:
        raise MinimaError(f"valid_tokens must be positive, got {budget}")
    rng = np.random.default_rng([seed, VALID_TOKENS, source_index])
    chosen: dict[int, None] = {}
    got = 0
    while got < total_needed:
        if len(chosen) == n_documents:
            raise MinimaError(
                f"the validation set of {total_needed} tokens takes every document "
                f"({got} tokens with separators): nothing is left for training; lower "
                "--valid-tokens")
        for i in rng.integers(0, n_documents, VALID_DRAW).tolist():
            if i in chosen:
                continue
            chosen[i] = None
            got += int(lengths(i)) + 1
            if got >= total_needed:
                break
    if len(chosen) == n_documents:
        raise MinimaError(f"the validation set of {total_needed} tokens takes every document: "
                          "nothing is left for training; lower --valid-tokens")
    return np.array(sorted(chosen), dtype=np.int64)
