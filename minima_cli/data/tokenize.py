"""Tokenisation: documents to token ids without special tokens, and a source to one flat int32
token stream with document offsets (`TokenizedSource`), cached on disk per (content, text field,
tokenizer) and written atomically (docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from minima_cli.data.read import read_documents
from minima_cli.data.sources import DataSource, source_fingerprint, tokenizer_fingerprint
from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_file


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


TOKENIZE_CHUNK = 4096  # documents per tokenizer call: bounds the Python lists alive at once


CACHE_VERSION = 1


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


def tokenize_flat(tokenizer: Any, documents: list[str]) -> TokenizedSource:
    """`tokenize_documents` into the flat layout, a chunk of documents at a time."""
    chunks = (documents[start : start + TOKENIZE_CHUNK]
              for start in range(0, len(documents), TOKENIZE_CHUNK))
    parts = [TokenizedSource.of(tokenize_documents(tokenizer, chunk)) for chunk in chunks]
    if len(parts) < 2:
        return parts[0] if parts else TokenizedSource.of([])
    lengths = np.concatenate([np.diff(part.offsets) for part in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSource(np.concatenate([part.tokens for part in parts]), offsets)


def cache_key(content: str, text_field: str, tokenizer_fp: str) -> str:
    """The cache entry of a source: seq_len and seed are not in it, so changing them re-packs
    the cached tokens without tokenising again."""
    key = json.dumps([CACHE_VERSION, content, text_field, tokenizer_fp])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def tokenize_source(
    source: DataSource,
    tokenizer: Any,
    cache_dir: str | Path | None = None,
    *,
    content: str | None = None,
    tokenizer_fp: str | None = None,
) -> TokenizedSource:
    """A source's tokens, loaded from `cache_dir` when it holds an entry for the same content,
    text field and tokenizer; otherwise read, tokenized and (with a `cache_dir`) saved atomically.

    `content` and `tokenizer_fp` take precomputed fingerprints (hashing a large file twice costs).
    """
    if cache_dir is None:
        return tokenize_flat(tokenizer, read_documents(source.path_or_name, source.text_field))
    content = content or source_fingerprint(source)
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    key = cache_key(content, source.text_field, tokenizer_fp)
    path = Path(cache_dir).expanduser() / f"tokens-{key}.safetensors"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    flat = tokenize_flat(tokenizer, read_documents(source.path_or_name, source.text_field))
    metadata = {"source": source.path_or_name, "text_field": source.text_field,
                "documents": str(flat.n_documents), "tokens": str(len(flat.tokens))}
    _save_atomic(path, {"tokens": flat.tokens, "offsets": flat.offsets}, metadata)
    return flat


def _load_cached(path: Path) -> TokenizedSource | None:
    """The cache entry at `path`, or None when it is missing or not a sound entry (rebuilt)."""
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        arrays = load_file(path)
        tokens, offsets = arrays["tokens"], arrays["offsets"]
    except Exception:  # damaged or foreign file: treat as a miss and overwrite it
        return None
    sound = (
        tokens.dtype == np.int32 and offsets.dtype == np.int64
        and tokens.ndim == 1 and offsets.ndim == 1 and len(offsets) >= 1
        and offsets[0] == 0 and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 0))
    )
    return TokenizedSource(tokens, offsets) if sound else None


def _save_atomic(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write to a temp file beside `path`, fsync, rename: a reader sees the whole file or none."""
    from safetensors.numpy import save_file

    try:
        with atomic_file(path) as tmp:
            save_file(arrays, str(tmp), metadata=metadata)
    except OSError as e:
        raise MinimaError(f"cannot write the token cache {path}: {e.strerror}") from None
