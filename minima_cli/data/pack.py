"""Data layer shared by the stages: read documents, tokenize them, pack them into blocks.

A *document* is one string. Sources are local `.txt` (one document per non-empty line),
`.jsonl` / `.json` (records with a text field), `.parquet` (a text column), a directory of
such files, or, when the source is not a local path, a `datasets` hub name.

Training data (distill, sft) goes source -> cached flat token stream (`tokenize_source`) ->
document split into train / validation -> `seq_len` blocks with EOS separators
(`prepare_data`) -> `MixedBlockStream`, which samples blocks from the sources by weight and whose
position is a small JSON-able state, so a resumed run continues with exactly the same batches.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from minima_cli.data.tokenize import TokenizedSource
from minima_cli.errors import MinimaError

_SPLIT, _SHUFFLE, _MIX = 1, 2, 3


def pack_documents(token_ids: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by `eos_id`, and cut into `[n_blocks, seq_len]`.

    The ragged tail that does not fill a whole block is dropped.
    """
    if seq_len < 1:
        raise MinimaError(f"seq_len must be at least 1, got {seq_len}")
    stream = list(chain.from_iterable(chain(doc, (eos_id,)) for doc in token_ids))
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise MinimaError(
            f"not enough data to pack: {len(stream)} tokens (EOS separators included) "
            f"but one block of seq_len={seq_len} needs {seq_len}"
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


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
    if valid_fraction and valid_documents:
        raise MinimaError("give valid_fraction or valid_documents, not both")
    if not 0.0 <= valid_fraction < 1.0:
        raise MinimaError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_documents < 0:
        raise MinimaError(f"valid_documents must be at least 0, got {valid_documents}")
    n_valid = valid_documents
    if valid_fraction:
        n_valid = max(1, round(valid_fraction * n_documents))  # a fraction always holds one out
    if n_valid >= n_documents:
        raise MinimaError(
            f"the validation split takes {n_valid} of {n_documents} documents: "
            "nothing is left for training"
        )
    held = np.zeros(n_documents, dtype=bool)
    order = np.random.default_rng([seed, _SPLIT, source_index]).permutation(n_documents)
    held[order[:n_valid]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


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
    """`pack_documents` for a flat source (int32 blocks: half the memory; batches are widened)."""
    return blocks_from_stream(separated_stream(flat, documents, eos_id), seq_len)
