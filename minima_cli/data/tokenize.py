"""Tokenisation: documents to token ids without special tokens (`tokenize_documents`, what the
token store's builder calls, data/store.py) and the flat layout of a few tokenised documents
(`TokenizedSource`: one int32 stream with document offsets) that packing and perplexity use.
A run's raw sources are tokenised into a token store in its cache (`store.source_store`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np


def tokenize_documents(tokenizer: Any, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds the EOS separators)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            # `tokenizer(..., truncation=True)` leaves its settings on the shared backend: encode
            # with a clean copy so documents are never silently cut or padded.
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        # The Rust tokenizer batches in parallel and, unlike `tokenizer(...)`, does not warn about
        # documents longer than `model_max_length` (they are cut into blocks later anyway).
        return [enc.ids for enc in backend.encode_batch(documents, add_special_tokens=False)]
    return tokenizer(documents, add_special_tokens=False)["input_ids"]


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
