"""Tokenisation: documents to token ids without special tokens (`tokenize_documents`), the flat
arrays a token store shard holds (`token_arrays`) and the worker processes of the store's builder
(data/store.py), and the flat layout of a few tokenised documents (`TokenizedSource`: one int32
stream with document offsets) that packing and perplexity use. A run's raw sources are tokenised
into a token store in its cache (`store.source_store`).

This module imports numpy and nothing heavy, so a builder's worker process starts in a fraction
of a second (it rebuilds a fast tokenizer from its JSON, without transformers or torch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from minima_cli.errors import MinimaError


def _backend(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` of a fast HF tokenizer (or the tokenizer itself when it
    is one), None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        backend = tokenizer
    return backend


def tokenize_documents(tokenizer: Any, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds the EOS separators)."""
    backend = _backend(tokenizer)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            # `tokenizer(..., truncation=True)` leaves its settings on the shared backend: encode
            # with a clean copy so documents are never silently cut or padded.
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        # The Rust tokenizer batches in parallel and, unlike `tokenizer(...)`, does not warn about
        # documents longer than `model_max_length` (they are cut into blocks later anyway). The
        # `_fast` variant returns the same ids without computing character offsets.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [enc.ids for enc in encode(documents, add_special_tokens=False)]
    return tokenizer(documents, add_special_tokens=False)["input_ids"]


def token_arrays(tokenizer: Any, documents: list[str], dtype: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids in `dtype`, int64 lengths) of documents: what a store shard holds."""
    ids = tokenize_documents(tokenizer, documents)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    try:  # straight into the store dtype: no int64 copy, and out-of-range ids raise
        flat = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    except OverflowError:
        top = np.iinfo(dtype).max
        bad = next(t for t in chain.from_iterable(ids) if not 0 <= t <= top)
        raise MinimaError(f"a token id ({bad}) does not fit the store's {dtype}") from None
    return flat, lengths


# A store builder's worker process: its tokenizer, set once by `init_worker`.
_WORKER_TOKENIZER: Any = None


def worker_spec(tokenizer: Any, tokenizer_path: str) -> tuple[str, str]:
    """How a worker process gets `tokenizer`: a fast tokenizer's JSON (the exact tokenizer, no
    transformers import), else the path it is loaded from."""
    backend = _backend(tokenizer)
    return ("json", backend.to_str()) if backend is not None else ("path", tokenizer_path)


def init_worker(spec: tuple[str, str]) -> None:
    global _WORKER_TOKENIZER
    # one thread per worker: the workers are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    kind, value = spec
    if kind == "json":
        from tokenizers import Tokenizer

        _WORKER_TOKENIZER = Tokenizer.from_str(value)
    else:
        from minima_cli.data.store import resolve_tokenizer
        from minima_cli.model.checkpoint import load_tokenizer

        _WORKER_TOKENIZER = load_tokenizer(resolve_tokenizer(value))


def encode_in_worker(documents: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return token_arrays(_WORKER_TOKENIZER, documents, dtype)


@dataclass(frozen=True)
class TokenizedSource:
    """A source's documents as one flat int32 token stream without separators, and `offsets`
    (int64, n_documents + 1): document `i` is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].tolist()

    @classmethod
    def of(cls, token_ids: Sequence[Sequence[int]]) -> TokenizedSource:
        """The flat layout of documents given as token id lists."""
        token_ids = token_ids if isinstance(token_ids, Sequence) else list(token_ids)
        lengths = [len(doc) for doc in token_ids]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(chain.from_iterable(token_ids), np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets)
