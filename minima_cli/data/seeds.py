"""The data layer's seeded randomness: every use of a run's seed draws from its own stream, keyed
`[seed, TAG, ...]`, so adding a use never shifts the draws of another, and each draw is a pure
function of its key (a resumed run rebuilds it from the key alone)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from minima_cli.errors import MinimaError

# Tags of the token-block data (distill, score's sources): the document split of each source, the
# order a source serves its blocks in each epoch, and the draws that mix the sources.
SPLIT, SHUFFLE, MIX = 1, 2, 3

# Tags of the chat data (sft): the conversation split, the row order of each epoch.
CHAT_SPLIT, CHAT_SHUFFLE = 11, 12


def index_dtype(n: int) -> np.dtype:
    """The narrowest dtype that holds every index of `range(n)` among uint32 and int64."""
    return np.dtype(np.uint32 if n <= 1 << 32 else np.int64)


def permutation(n: int, key: Sequence[int]) -> np.ndarray:
    """The permutation of `range(n)` drawn from the stream `key` (`[seed, TAG, ...]`): the order
    numpy's `Generator.permutation(n)` draws, which shuffles `arange(n)` in place with swaps that
    do not depend on the dtype, so shuffling a uint32 `arange` gives the same order at 4 bytes an
    index instead of 8, with no int64 copy on the way (int64 above 2**32 items)."""
    order = np.arange(n, dtype=index_dtype(n))
    np.random.default_rng(list(key)).shuffle(order)
    return order


def split_indices(
    n: int,
    key: Sequence[int],
    *,
    valid_fraction: float = 0.0,
    valid_count: int = 0,
    items: str = "documents",
    fraction_option: str = "valid_fraction",
) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices of `n` items, each ascending: the first `valid_count` items of the
    permutation drawn from `key`, or `valid_fraction` of them (at least one), are held out.

    `items` and `fraction_option` only word the errors (what is split, the option to change)."""
    if valid_fraction and valid_count:
        raise MinimaError("give valid_fraction or valid_documents, not both")
    if not 0.0 <= valid_fraction < 1.0:
        raise MinimaError(f"{fraction_option} must be in [0, 1), got {valid_fraction}")
    if valid_count < 0:
        raise MinimaError(f"valid_documents must be at least 0, got {valid_count}")
    n_valid = valid_count
    if valid_fraction:
        n_valid = max(1, round(valid_fraction * n))  # a fraction always holds one out
    if n_valid >= n:
        raise MinimaError(
            f"the validation split takes {n_valid} of {n} {items}: nothing is left for training"
        )
    held = np.zeros(n, dtype=bool)
    held[permutation(n, key)[:n_valid]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
