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

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima_cli.checkpoint import file_sha256, fsync_dir
from minima_cli.errors import MinimaError

TEXT_SUFFIXES = (".txt", ".md")  # plain text: one document per non-empty line
# What a directory scan reads; a .md file is read only when named (a README beside data is not
# data).
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# `owner/name` or `name`: what a hub dataset id looks like. Anything else (absolute, relative with
# ./ or ../, ~, a data-file suffix, a trailing slash) is unambiguously meant as a local path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def read_documents(source: str | Path, text_field: str = "text") -> list[str]:
    """Read documents from a local file or directory, or a `datasets` hub name.

    Empty and whitespace-only documents are dropped. Raises `MinimaError` with a one-line
    message for a missing path, an unsupported file type, a missing text field, malformed
    JSON, or when no document is left.
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            files = _data_files(path)
            docs = list(chain.from_iterable(_read_file(f, text_field) for f in files))
        else:
            docs = list(_read_file(path, text_field))
    elif isinstance(source, str) and _looks_like_hub_name(source):
        docs = _read_hub(source, text_field)
    else:
        raise MinimaError(f"data source not found: {source}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MinimaError(
            f"no documents in {source} (it is empty or every '{text_field}' is blank)"
        )
    return docs


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


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and not source.endswith((*SUPPORTED_SUFFIXES, ".md"))


def _data_files(directory: Path) -> list[Path]:
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        kinds = "/".join(SUPPORTED_SUFFIXES)
        raise MinimaError(f"no {kinds} files in directory {directory}")
    return files


def _read_file(path: Path, text_field: str) -> Iterable[str]:
    if path.suffix in TEXT_SUFFIXES:
        return _read_txt(path)
    if path.suffix == ".jsonl":
        return _texts(read_jsonl(path), path, text_field)
    if path.suffix == ".json":
        return _read_json(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    kinds = ", ".join((*SUPPORTED_SUFFIXES, ".md"))
    raise MinimaError(f"unsupported data file {path} (expected one of {kinds}, or a directory)")


def _read_txt(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise MinimaError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def _read_json(path: Path, text_field: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Several top-level values: JSON lines saved under a .json name (as `datasets` allows).
            return _texts(read_jsonl(path), path, text_field)
        raise MinimaError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, list):
        return _texts(((None, record) for record in data), path, text_field)
    if isinstance(data, dict) and isinstance(data.get(text_field), list):
        # Columnar layout: {"text": [...], ...}.
        return _texts(((None, {text_field: v}) for v in data[text_field]), path, text_field)
    if isinstance(data, dict):
        fields = ", ".join(map(str, data)) or "none"
        raise MinimaError(
            f"{path}: no list under field '{text_field}' (fields present: {fields}); "
            "expected a list of records or {'" + text_field + "': [...]}"
        )
    raise MinimaError(f"{path}: expected a JSON list of records, got {type(data).__name__}")


def _texts(records: Iterable[tuple[int | None, Any]], path: Path, field: str) -> list[str]:
    """The `field` of each record; `None` values count as empty documents."""
    out = []
    for lineno, record in records:
        where = f"{path}:{lineno}" if lineno is not None else str(path)
        if not isinstance(record, dict):
            raise MinimaError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise MinimaError(f"{where}: no field '{field}' (fields present: {fields})")
        value = record[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise MinimaError(f"{where}: field '{field}' is {type(value).__name__}, not a string")
        out.append(value)
    return out


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            fields = ", ".join(names) or "none"
            raise MinimaError(f"{path}: no column '{text_field}' (columns present: {fields})")
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except MinimaError:
        raise
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise MinimaError(f"{path}: cannot read parquet file ({e})") from None
    return _texts(((None, {text_field: v}) for v in column), path, text_field)


def _read_hub(name: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, auth and not-found errors all mean "cannot use this"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinimaError(
            f"data source {name!r} is not a local path and could not be loaded as a hub "
            f"dataset: {first_line}"
        ) from None
    if text_field not in ds.column_names:
        fields = ", ".join(ds.column_names) or "none"
        raise MinimaError(f"dataset {name}: no column '{text_field}' (columns present: {fields})")
    return _texts(((None, {text_field: v}) for v in ds[text_field]), Path(name), text_field)


# --- training data: sources, token cache, splits, mixed block stream ----------------------------

# Tags that give each use of the seed its own independent random stream.
_SPLIT, _SHUFFLE, _MIX = 1, 2, 3
_SOURCE_KEYS = ("path", "weight", "text_field")
TOKENIZE_CHUNK = 4096  # documents per tokenizer call: bounds the Python lists alive at once
CACHE_VERSION = 1
STATE_VERSION = 1


@dataclass(frozen=True)
class DataSource:
    """One training source: a local path or hub name, its relative mixing weight, its text field."""

    path_or_name: str
    weight: float = 1.0
    text_field: str = "text"


def parse_sources(spec: str | list[Any], text_field: str = "text") -> list[DataSource]:
    """Sources from a CLI string (`"a.txt"`, `"a.txt:0.7,b.jsonl:0.3"`) or a YAML-style list whose
    items are such strings, `DataSource`s or `{path, weight, text_field}` mappings.

    `text_field` is the default for items that do not name one. Weights are relative (they need
    not sum to 1) and must be positive.
    """
    if isinstance(spec, str):
        items: list[Any] = [] if not spec.strip() else spec.split(",")
    elif isinstance(spec, list | tuple):
        items = list(spec)
    else:
        raise MinimaError(f"data sources must be a string or a list, got {type(spec).__name__}")
    if not items:
        raise MinimaError("no data sources given")
    return [_parse_source(item, text_field) for item in items]


def _parse_source(item: Any, text_field: str) -> DataSource:
    if isinstance(item, DataSource):
        source = item
    elif isinstance(item, str):
        text = item.strip()
        if not text:
            raise MinimaError("empty entry in the data sources (check for a stray comma)")
        path, weight = text, 1.0
        head, sep, tail = text.rpartition(":")
        # A colon followed by something other than a number belongs to the path (C:\data).
        if sep and head.strip() and _is_number(tail):
            path, weight = head.strip(), float(tail)
        source = DataSource(path, weight, text_field)
    elif isinstance(item, dict):
        unknown = sorted(set(map(str, item)) - set(_SOURCE_KEYS))
        if unknown:
            raise MinimaError(
                f"unknown key {', '.join(unknown)} in data source {item!r} "
                f"(expected {', '.join(_SOURCE_KEYS)})"
            )
        path = item.get("path")
        if not isinstance(path, str) or not path.strip():
            raise MinimaError(f"data source {item!r} needs a 'path' (file, directory or hub name)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise MinimaError(f"weight of data source {path} must be a number, got {weight!r}")
        field = item.get("text_field", text_field)
        if not isinstance(field, str) or not field:
            raise MinimaError(f"text_field of data source {path} must be a non-empty string")
        source = DataSource(path.strip(), float(weight), field)
    else:
        raise MinimaError(f"a data source must be a string or a mapping, got {type(item).__name__}")
    if not (math.isfinite(source.weight) and source.weight > 0):
        raise MinimaError(
            f"weight of data source {source.path_or_name} must be positive, got {source.weight}"
        )
    return source


# --- fingerprints ---------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the serialized fast tokenizer (the vocabulary of a
    slow one) plus the special tokens. Runtime truncation/padding settings are left out."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # `tokenizer(..., truncation=True)` mutates the backend; that must not look like a new one.
        spec = {k: v for k, v in json.loads(backend.to_str()).items()
                if k not in ("truncation", "padding")}
    else:
        spec = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    specials = {"map": tokenizer.special_tokens_map, "ids": tokenizer.all_special_ids,
                "eos": tokenizer.eos_token_id}
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def source_fingerprint(source: DataSource) -> str:
    """Identity of a source's content: the sha256 of a file, of every data file (with its relative
    path) of a directory, or `hub:<name>` for a hub dataset (its revision is not tracked)."""
    path = Path(source.path_or_name).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in _data_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    if path.exists():
        return file_sha256(path)
    if _looks_like_hub_name(source.path_or_name):
        return f"hub:{source.path_or_name}"
    raise MinimaError(f"data source not found: {source.path_or_name}")


def data_fingerprint(
    sources: list[DataSource],
    contents: list[str],
    *,
    tokenizer_fp: str,
    seq_len: int,
    seed: int,
    valid_fraction: float = 0.0,
    valid_documents: int = 0,
) -> str:
    """sha256 of everything that decides the training blocks and their order: a resume whose
    fingerprint differs would silently train on other data, so it is refused. The source paths
    are left out (content hashes stand for them): moving a data file keeps a run resumable."""
    config = {
        "version": STATE_VERSION,
        "sources": [
            {"content": c, "weight": s.weight, "text_field": s.text_field}
            for s, c in zip(sources, contents, strict=True)
        ],
        "tokenizer": tokenizer_fp,
        "seq_len": int(seq_len),
        "seed": int(seed),
        # Normalised so that 0 and 0.0 (YAML vs CLI) do not read as different data.
        "valid_fraction": float(valid_fraction),
        "valid_documents": int(valid_documents),
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# --- tokenisation with an on-disk cache -----------------------------------------------------------


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


def tokenize_flat(tokenizer: Any, documents: list[str]) -> TokenizedSource:
    """`tokenize_documents` into the flat layout, a chunk of documents at a time."""
    parts, lengths = [], []
    for start in range(0, len(documents), TOKENIZE_CHUNK):
        ids = tokenize_documents(tokenizer, documents[start : start + TOKENIZE_CHUNK])
        chunk_lengths = [len(doc) for doc in ids]
        lengths.extend(chunk_lengths)
        parts.append(np.fromiter(chain.from_iterable(ids), np.int32, count=sum(chunk_lengths)))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return TokenizedSource(tokens, offsets)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MinimaError(f"cannot write the token cache in {path.parent}: {e.strerror}") from None
    try:
        save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MinimaError(f"cannot write the token cache {path}: {e.strerror}") from None
        raise
    fsync_dir(path.parent)


# --- validation split and packing -----------------------------------------------------------------


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


# --- preparing a run's data -----------------------------------------------------------------------


@dataclass
class PreparedData:
    """A run's data: per-source training blocks (int32 `[n_i, seq_len]`), the validation blocks
    (int64 `[n_valid, seq_len]`, no rows without a split) and the data fingerprint."""

    sources: list[DataSource]
    train: list[torch.Tensor]
    valid: torch.Tensor
    seq_len: int
    seed: int
    fingerprint: str

    def stream(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> MixedBlockStream:
        return MixedBlockStream(
            self.train, [s.weight for s in self.sources], batch_size=batch_size, seed=self.seed,
            rank=rank, world_size=world_size, fingerprint=self.fingerprint,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for the run log."""
        return {
            "sources": [
                {**asdict(s), "train_blocks": len(b)}
                for s, b in zip(self.sources, self.train, strict=True)
            ],
            "valid_blocks": len(self.valid),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }


def prepare_data(
    sources: str | list[Any],
    tokenizer: Any,
    *,
    seq_len: int,
    seed: int = 0,
    valid_fraction: float = 0.0,
    valid_documents: int = 0,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> PreparedData:
    """Parse, tokenize (cached), split and pack the sources of a run.

    Each source holds out its own `valid_fraction` / `valid_documents` documents; the held-out
    documents of all sources form one validation stream, packed like the training blocks.
    """
    sources = parse_sources(sources, text_field)
    _check_seed(seed)
    if seq_len < 1:
        raise MinimaError(f"seq_len must be at least 1, got {seq_len}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise MinimaError("the tokenizer has no EOS token, which separates packed documents")
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    contents = [source_fingerprint(s) for s in sources]
    train, valid_parts = [], []
    for i, (source, content) in enumerate(zip(sources, contents, strict=True)):
        flat = tokenize_source(
            source, tokenizer, cache_dir, content=content, tokenizer_fp=tokenizer_fp
        )
        try:
            train_docs, valid_docs = split_documents(
                flat.n_documents, seed=seed, source_index=i,
                valid_fraction=valid_fraction, valid_documents=valid_documents,
            )
            train.append(pack_tokens(flat, train_docs, seq_len, eos_id))
        except MinimaError as e:
            raise MinimaError(f"data source {source.path_or_name}: {e}") from None
        if len(valid_docs):
            valid_parts.append(separated_stream(flat, valid_docs, eos_id))
    valid = torch.zeros(0, seq_len, dtype=torch.long)
    if valid_parts:
        stream = np.concatenate(valid_parts)
        if len(stream) < seq_len:
            raise MinimaError(
                f"the validation split has {len(stream)} tokens but one block of seq_len={seq_len} "
                "needs more: raise valid_fraction or valid_documents"
            )
        valid = blocks_from_stream(stream, seq_len).long()
    fingerprint = data_fingerprint(
        sources, contents, tokenizer_fp=tokenizer_fp, seq_len=seq_len, seed=seed,
        valid_fraction=valid_fraction, valid_documents=valid_documents,
    )
    return PreparedData(sources, train, valid, seq_len, seed, fingerprint)


# --- the mixed block stream -----------------------------------------------------------------------


def shuffle_order(n_blocks: int, seed: int, source_index: int, epoch: int) -> np.ndarray:
    """The order in which a source serves its blocks in one epoch: a pure function of its
    arguments, so a resumed stream rebuilds it from (seed, source, epoch) alone."""
    return np.random.default_rng([seed, _SHUFFLE, source_index, epoch]).permutation(n_blocks)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MinimaError(f"seed must be a non-negative integer, got {seed!r}")


class MixedBlockStream:
    """An endless stream of int64 `[batch_size, seq_len]` batches drawn from several sources.

    Every block of the global sequence comes from source `i` with probability
    `weight_i / sum(weights)` (one PCG64 draw per block, so the block sequence does not depend on
    the batch size). Each source serves its blocks in a seeded random order, redrawn each time it
    is exhausted (a new epoch of that source). With `world_size` > 1 each global batch of
    `batch_size * world_size` blocks is cut into per-rank slices: every rank advances the same
    state and keeps its own slice, so the state is identical on all ranks.

    The position is `state_dict()`: small, JSON-able, and `load_state_dict()` on a fresh stream
    over the same data continues with exactly the batches the saved one would have served.
    """

    def __init__(
        self,
        blocks: list[torch.Tensor],
        weights: list[float] | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fingerprint: str | None = None,
    ):
        if not blocks:
            raise MinimaError("no training data: the stream needs at least one source")
        weights = [1.0] * len(blocks) if weights is None else [float(w) for w in weights]
        if len(weights) != len(blocks):
            raise MinimaError(f"{len(weights)} weights for {len(blocks)} sources")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise MinimaError(f"source weights must be positive, got {weights}")
        if any(b.ndim != 2 or len(b) == 0 or b.shape[1] != blocks[0].shape[1] for b in blocks):
            raise MinimaError("every source needs at least one block, all of the same seq_len")
        if batch_size < 1:
            raise MinimaError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise MinimaError(f"rank {rank} is not in a world of size {world_size}")
        _check_seed(seed)
        self.blocks, self.weights, self.seed = blocks, weights, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        cumulative = np.cumsum(weights)
        self._cumulative = cumulative / cumulative[-1]
        self._fingerprint = fingerprint or _blocks_fingerprint(blocks, weights, seed)
        self.epochs = [0] * len(blocks)
        self.indices = [0] * len(blocks)
        self._orders = [shuffle_order(len(b), seed, i, 0) for i, b in enumerate(blocks)]
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _MIX])))
        self.blocks_served = 0
        self.batches_served = 0
        self.last_picks: list[tuple[int, int]] = []

    def fingerprint(self) -> str:
        return self._fingerprint

    def __iter__(self) -> MixedBlockStream:
        return self

    def __next__(self) -> torch.Tensor:
        n = self.batch_size * self.world_size
        draws = np.searchsorted(self._cumulative, self._rng.random(n), side="right")
        picks = [self._take(min(int(i), len(self.blocks) - 1)) for i in draws]
        mine = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.last_picks = mine  # (source, row) of each block: keys into an offline teacher cache
        self.blocks_served += n
        self.batches_served += 1
        return torch.stack([self.blocks[source][row] for source, row in mine]).long()

    def _take(self, source: int) -> tuple[int, int]:
        """The next block of `source`, starting its next epoch (a new order) when exhausted."""
        if self.indices[source] == len(self._orders[source]):
            self.epochs[source] += 1
            self.indices[source] = 0
            self._orders[source] = shuffle_order(
                len(self.blocks[source]), self.seed, source, self.epochs[source]
            )
        row = int(self._orders[source][self.indices[source]])
        self.indices[source] += 1
        return source, row

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-able (the PCG64 state is two Python ints of 128 bits)."""
        rng = self._rng.bit_generator.state
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "seed": self.seed,
            "epochs": list(self.epochs),
            "indices": list(self.indices),
            "rng": {**rng["state"], "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]},
            "blocks_served": self.blocks_served,
            "batches_served": self.batches_served,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved over different data."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise MinimaError("unsupported data position (saved by another minima version?)")
        if state.get("fingerprint") != self._fingerprint or state.get("seed") != self.seed:
            raise MinimaError("the saved data position belongs to a different run (data mismatch)")
        try:
            epochs = [int(e) for e in state["epochs"]]
            indices = [int(i) for i in state["indices"]]
            rng = state["rng"]
            rng_state = {
                "bit_generator": "PCG64",
                "state": {"state": int(rng["state"]), "inc": int(rng["inc"])},
                "has_uint32": int(rng["has_uint32"]),
                "uinteger": int(rng["uinteger"]),
            }
            blocks_served = int(state["blocks_served"])
            batches_served = int(state["batches_served"])
        except (KeyError, TypeError, ValueError) as e:
            raise MinimaError(f"malformed data position: {type(e).__name__} {e}") from None
        sizes = [len(b) for b in self.blocks]
        if len(epochs) != len(sizes) or len(indices) != len(sizes) or any(
            e < 0 or not 0 <= i <= n for e, i, n in zip(epochs, indices, sizes, strict=True)
        ):
            raise MinimaError("the saved data position does not fit this data (data mismatch)")
        self._rng.bit_generator.state = rng_state
        self.epochs, self.indices = epochs, indices
        self._orders = [
            shuffle_order(n, self.seed, i, e)
            for i, (n, e) in enumerate(zip(sizes, epochs, strict=True))
        ]
        self.blocks_served, self.batches_served = blocks_served, batches_served


def _blocks_fingerprint(blocks: list[torch.Tensor], weights: list[float], seed: int) -> str:
    """A fingerprint from the blocks themselves, for streams built without `prepare_data`."""
    digest = hashlib.sha256(json.dumps({"weights": weights, "seed": seed}).encode())
    for b in blocks:
        digest.update(f"{b.dtype}{tuple(b.shape)}".encode())
        digest.update(b.contiguous().numpy().tobytes())
    return digest.hexdigest()
