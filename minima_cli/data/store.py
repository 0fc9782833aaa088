"""The token store: a corpus tokenised once into a directory of raw shards that every rank
memory-maps, so a process's memory does not grow with the corpus (docs/formats.md, "Token store").

```
STORE/
  store.json             the manifest: format version, dtype, tokenizer fingerprint and vocab
                         size, EOS id, each source with its content hash, document and token
                         counts, the shard table
  tokens-00000.bin       uint16 (vocabulary <= 65,536) or uint32 little-endian token ids
  offsets-00000.bin      int64 [documents + 1], shard-local: document j of the shard is
                         tokens[offsets[j]:offsets[j + 1]]
```

Documents are whole within a shard, in source order, without separators or special tokens.
`build_store` reads sources with `datasets` (streaming, so a hub dataset is never held whole),
tokenises chunks of documents in worker processes (results taken in submission order, so the
store is a pure function of the inputs), writes each shard atomically into `STORE.tmp-build/`
with a progress file, continues a killed build from its last complete shard, and renames the
directory to STORE only when complete. `TokenStore` reads it; `StoreBlocks` serves EOS-separated
`seq_len` blocks of its training documents straight from the memory map.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from minima_cli.data import tokenize as tokenize_module
from minima_cli.data.read import (
    SUPPORTED_SUFFIXES,
    TEXT_SUFFIXES,
    _read_json,
    data_files,
    looks_like_hub_name,
    read_jsonl,
    record_text,
    text_lines,
)
from minima_cli.data.sources import STORE_MANIFEST, DataSource, source_fingerprint
from minima_cli.data.tokenize import token_arrays
from minima_cli.errors import MinimaError, first_line
from minima_cli.fsutil import atomic_file, fsync_dir

STORE_FORMAT = "minima-token-store"
STORE_VERSION = 1
PROGRESS = "progress.json"
BUILD_SUFFIX = ".tmp-build"
SHARD_TOKENS = 1 << 26  # 64M tokens (128 MB as uint16) per shard by default
CHUNK_DOCUMENTS = 512  # documents per tokenisation task
CHUNK_CHARS = 1 << 19  # ... or this many characters (small enough to balance 2+ workers)
# what a directory scan reads (a .md file only when named: a README beside data is not data)
SCAN_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")

# datasets' builder for each local file suffix (a .md file is text, as data/read.py reads it)
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".md": "text",
            ".parquet": "parquet", ".arrow": "arrow"}


def is_store(path: str | Path) -> bool:
    """Whether `path` is a token store directory (it holds the store manifest)."""
    return (Path(path).expanduser() / STORE_MANIFEST).is_file()


def looks_like_partial_store(path: Path) -> bool:
    """A directory with shards but no manifest: a copy or build that did not finish."""
    return path.is_dir() and not is_store(path) and any(path.glob("tokens-*.bin"))


def store_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_names(index: int) -> tuple[str, str]:
    return f"tokens-{index:05d}.bin", f"offsets-{index:05d}.bin"


# ---------------------------------------------------------------------------------------------
# Reading


class TokenStore:
    """A store opened for reading: shards are memory-mapped on first use.

    `len(store)` is the number of documents; `document(i)` its tokens; `tokens(start, stop)` a
    range of the flat token stream (documents concatenated, no separators); `flat` that stream
    as a sliceable view; `lengths()` every document's length (int64, one read of the offsets).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        manifest_path = self.path / STORE_MANIFEST
        if not manifest_path.is_file():
            if looks_like_partial_store(self.path):
                raise MinimaError(f"{self.path}: token shards but no {STORE_MANIFEST} (an "
                                  "unfinished copy or build?): rebuild it with `minima tokenize`")
            raise MinimaError(f"{self.path} is not a token store (no {STORE_MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
            shards = manifest["shards"]
            self.dtype = np.dtype(manifest["dtype"])
            ok = manifest.get("format") == STORE_FORMAT and self.dtype.name in ("uint16",
                                                                                "uint32")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MinimaError(f"{manifest_path}: unreadable store manifest ({e})") from None
        if not ok:
            raise MinimaError(f"{manifest_path}: not a {STORE_FORMAT} manifest")
        if manifest.get("version") != STORE_VERSION:
            raise MinimaError(f"{self.path}: store version {manifest.get('version')} is not "
                              f"{STORE_VERSION} (made by another minima version): rebuild it")
        self.manifest = manifest
        self.tokenizer_fingerprint = str(manifest["tokenizer"]["fingerprint"])
        self.eos_id = manifest["tokenizer"].get("eos_id")
        self._shards = shards
        docs = [int(s["documents"]) for s in shards]
        toks = [int(s["tokens"]) for s in shards]
        self.doc_starts = np.concatenate([[0], np.cumsum(docs, dtype=np.int64)]).astype(np.int64)
        self.token_starts = np.concatenate([[0], np.cumsum(toks, dtype=np.int64)]).astype(
            np.int64)
        if int(self.doc_starts[-1]) != int(manifest["documents"]) or \
                int(self.token_starts[-1]) != int(manifest["tokens"]):
            raise MinimaError(f"{manifest_path}: the shard table does not add up to the "
                              "document and token counts")
        for shard in shards:  # cheap: sizes only, so a truncated copy is refused at once
            for name, count, dtype in ((shard["tokens_file"], shard["tokens"], self.dtype),
                                       (shard["offsets_file"], shard["documents"] + 1, np.int64)):
                file = self.path / name
                expected = int(count) * np.dtype(dtype).itemsize
                size = file.stat().st_size if file.is_file() else None
                if size is None:
                    raise MinimaError(f"{self.path}: shard file {name} is missing")
                if size != expected:
                    raise MinimaError(f"{self.path}: shard file {name} is truncated or damaged "
                                      f"({size} bytes, expected {expected})")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.keep: Any = None  # what must live as long as the store (a temporary directory)

    # -- identity

    @property
    def fingerprint(self) -> str:
        """The store's content identity: the tokenizer, the sources' content and every shard's
        sha256 (no paths, no times), so a moved store keeps runs resumable."""
        identity = {k: self.manifest[k] for k in ("version", "dtype", "tokenizer", "documents",
                                                  "tokens")}
        identity["sources"] = [s["content"] for s in self.manifest["sources"]]
        identity["shards"] = [s["sha256"] for s in self._shards]
        return "store:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def n_documents(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def n_tokens(self) -> int:
        return int(self.token_starts[-1])

    def __len__(self) -> int:
        return self.n_documents

    # -- access

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        maps = self._maps.get(s)
        if maps is None:
            entry = self._shards[s]
            tokens = _mapped(self.path / entry["tokens_file"], self.dtype, int(entry["tokens"]))
            offsets = _mapped(self.path / entry["offsets_file"], np.dtype(np.int64),
                              int(entry["documents"]) + 1)
            maps = self._maps[s] = (tokens, offsets)
        return maps

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document {i} of {self.n_documents}")
        s = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        return s, i - int(self.doc_starts[s])

    def document(self, i: int) -> np.ndarray:
        """Document i's token ids (a copy, in the store dtype)."""
        s, j = self._locate(i)
        tokens, offsets = self._shard(s)
        return np.array(tokens[offsets[j]:offsets[j + 1]])

    def document_part(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document i (clipped to its length): a view of the map, so only
        the pages of that range are read."""
        s, j = self._locate(i)
        tokens, offsets = self._shard(s)
        begin, end = int(offsets[j]), int(offsets[j + 1])
        return tokens[min(begin + start, end):min(begin + stop, end)]

    def document_length(self, i: int) -> int:
        s, j = self._locate(i)
        offsets = self._shard(s)[1]
        return int(offsets[j + 1] - offsets[j])

    def lengths(self) -> np.ndarray:
        """Every document's token count (int64 [documents]): 8 bytes a document, read once."""
        if not self._shards:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(self._shard(s)[1]) for s in range(len(self._shards))])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the flat stream (documents concatenated), across shards."""
        start, stop = max(0, int(start)), min(int(stop), self.n_tokens)
        parts = []
        while start < stop:
            s = int(np.searchsorted(self.token_starts, start, side="right")) - 1
            local = start - int(self.token_starts[s])
            end = min(stop, int(self.token_starts[s + 1]))
            parts.append(np.asarray(self._shard(s)[0][local:local + end - start]))
            start = end
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    @property
    def flat(self) -> FlatTokens:
        return FlatTokens(self)

    def separated_start(self, i: int) -> int:
        """Where document i starts in the EOS-separated stream (one EOS after each document)."""
        if i == self.n_documents:
            return self.n_tokens + self.n_documents
        s, j = self._locate(i)
        return int(self.token_starts[s]) + int(self._shard(s)[1][j]) + i

    def document_at(self, q: int) -> int:
        """The document whose span (its tokens and its EOS) holds separated position q."""
        full_starts = self.token_starts[:-1] + self.doc_starts[:-1]
        s = int(np.searchsorted(full_starts, q, side="right")) - 1
        offsets = self._shard(s)[1]
        base = int(self.token_starts[s]) + int(self.doc_starts[s])
        n = int(self._shards[s]["documents"])
        j = bisect.bisect_right(range(n), q, key=lambda k: base + int(offsets[k]) + k) - 1
        return int(self.doc_starts[s]) + j


def _mapped(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only array over `count` items of the file at `path`, memory-mapped with
    MADV_RANDOM: training reads blocks at random places, and the kernel's readahead (8 MB on
    some disks) would otherwise read, and count in the process's RSS, far more than a block."""
    if count == 0:
        return np.zeros(0, dtype)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), count * dtype.itemsize, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count)


class FlatTokens:
    """The store's flat token stream as a read-only sequence: `len`, `[i]`, `[a:b]`."""

    def __init__(self, store: TokenStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.n_tokens

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("the flat token view slices with step 1 only")
            return self.store.tokens(start, stop)
        index = key + len(self) if key < 0 else key
        if not 0 <= index < len(self):
            raise IndexError(key)
        return self.store.tokens(index, index + 1)[0]


class StoreBlocks:
    """The `[n, seq_len]` training blocks of a store, read on demand: the EOS-separated stream of
    every document not in `held` (sorted held-out document indices) cut into `seq_len` blocks,
    the ragged tail dropped -- the blocks `pack.pack_tokens` makes of the same documents.

    Block b is a pure function of (store, held, seq_len, eos_id, b); it acts as the int32 block
    tensor `MixedBlockStream` and the teacher cache expect (`len`, `shape`, `ndim`, `[i]`,
    `[a:b]`).
    """

    ndim = 2

    def __init__(self, store: TokenStore, seq_len: int, eos_id: int,
                 held: np.ndarray | None = None):
        self.store, self.seq_len, self.eos_id = store, int(seq_len), int(eos_id)
        self.held = np.unique(np.asarray([] if held is None else held, dtype=np.int64))
        held_lengths = np.array([store.document_length(int(v)) + 1 for v in self.held],
                                dtype=np.int64)
        full = np.array([store.separated_start(int(v)) for v in self.held], dtype=np.int64)
        before = np.concatenate([[0], np.cumsum(held_lengths)]).astype(np.int64)
        # train-stream position at which held document k would have started
        self._held_train_starts = full - before[:-1]
        self._held_cumulative = before
        train_length = store.n_tokens + store.n_documents - int(before[-1])
        self.n_blocks = train_length // self.seq_len
        if self.n_blocks == 0:
            raise MinimaError(
                f"not enough data to pack: {train_length} tokens (EOS separators included) "
                f"but one block of seq_len={self.seq_len} needs {self.seq_len}")
        self.shape = (self.n_blocks, self.seq_len)

    def __len__(self) -> int:
        return self.n_blocks

    def _is_held(self, i: int) -> bool:
        k = int(np.searchsorted(self.held, i))
        return k < len(self.held) and int(self.held[k]) == i

    def block(self, b: int) -> np.ndarray:
        """Block b as int32 [seq_len]."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} of {self.n_blocks}")
        p = b * self.seq_len
        k = int(np.searchsorted(self._held_train_starts, p, side="right"))
        q = p + int(self._held_cumulative[k])
        i = self.store.document_at(q)
        within = q - self.store.separated_start(i)
        out = np.empty(self.seq_len, dtype=np.int32)
        filled = 0
        while filled < self.seq_len:
            if self._is_held(i):
                i, within = i + 1, 0
                continue
            # only the part of the document this block holds: a long document is not copied
            take = self.store.document_part(i, within, within + self.seq_len - filled)
            out[filled:filled + len(take)] = take
            filled += len(take)
            if filled < self.seq_len:  # the document ended inside the block
                out[filled] = self.eos_id
                filled += 1
            i, within = i + 1, 0
        return out

    def __getitem__(self, key: int | slice) -> Any:
        import torch

        if isinstance(key, slice):
            rows = range(*key.indices(self.n_blocks))
            if not len(rows):
                return torch.zeros(0, self.seq_len, dtype=torch.int32)
            return torch.from_numpy(np.stack([self.block(r) for r in rows]))
        b = int(key)
        return torch.from_numpy(self.block(b + self.n_blocks if b < 0 else b))


def held_stream(store: TokenStore, held: np.ndarray, eos_id: int) -> np.ndarray:
    """The EOS-separated tokens of the held-out documents, in store order (int32)."""
    parts = []
    for i in np.unique(np.asarray(held, dtype=np.int64)):
        parts.append(store.document(int(i)).astype(np.int32))
        parts.append(np.array([eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


# ---------------------------------------------------------------------------------------------
# Reading sources with datasets


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def source_files(source: DataSource, suffixes: tuple[str, ...] = SCAN_SUFFIXES
                 ) -> list[Path] | None:
    """The local files of a source in reading order, or None for a hub dataset."""
    path = Path(source.path_or_name).expanduser()
    if path.is_dir():
        if is_store(path) or looks_like_partial_store(path):
            raise MinimaError(f"{path} is a token store, not text: use it as --data directly")
        return data_files(path, suffixes)
    if path.exists():
        if path.suffix not in BUILDERS:
            raise MinimaError(f"unsupported data file {path} (expected one of "
                              f"{', '.join(BUILDERS)}, or a directory)")
        return [path]
    if looks_like_hub_name(source.path_or_name):
        return None
    raise MinimaError(f"data source not found: {source.path_or_name}")


def _open(source: DataSource, file: Path | None) -> Any:
    datasets = _quiet_datasets()
    try:
        if file is None:
            return datasets.load_dataset(source.path_or_name, split="train", streaming=True)
        return datasets.load_dataset(BUILDERS[file.suffix], data_files=[str(file)],
                                     split="train", streaming=True)
    except Exception as e:  # network, auth, not found, unreadable: all mean "cannot use this"
        if file is None:
            raise MinimaError(f"data source {source.path_or_name!r} is not a local path and "
                              f"could not be streamed from the hub: {first_line(e)}") from None
        raise MinimaError(f"{file}: cannot read ({first_line(e)})") from None


def _local_texts(file: Path, field: str) -> Iterator[str | None]:
    """Each record's text (None when blank) of a local text, JSON or parquet file, parsed exactly
    as data/read.py's in-memory readers parse it (same documents, same one-line errors: a NUL
    byte, bytes that are not UTF-8, a missing field, a value that is not a string), streamed
    where the format allows (a `.json` value is read whole, as JSON is)."""
    if file.suffix in TEXT_SUFFIXES:  # a document per line; datasets' text builder agrees
        for _, line in text_lines(file):
            yield line.rstrip("\r\n") if line.strip() else None
        return
    if file.suffix == ".json":  # a list of records, {field: [...]} or JSON lines
        yield from (text if text.strip() else None for text in _read_json(file, field))
        return
    if file.suffix == ".parquet":
        yield from _parquet_texts(file, field)
        return
    for lineno, record in read_jsonl(file):  # .jsonl
        yield _record_text(f"{file}:{lineno}", record, field)


def _record_text(where: str, record: Any, field: str) -> str | None:
    text = record_text(where, record, field)
    return text if text and text.strip() else None


def _parquet_texts(file: Path, field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise MinimaError(f"{file}: cannot read parquet file ({first_line(e)})") from None
    if field not in names:
        raise MinimaError(f"{file}: no column '{field}' (columns present: "
                          f"{', '.join(names) or 'none'})")
    row = 0
    try:
        batches = parquet.iter_batches(columns=[field], batch_size=4096)
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                yield _record_text(f"{file} row {row}", {field: value}, field)
    except MinimaError:
        raise
    except Exception as e:
        raise MinimaError(f"{file}: cannot read parquet file ({first_line(e)})") from None


def iter_records(source: DataSource, start: tuple[int, int] = (0, 0),
                 suffixes: tuple[str, ...] = SCAN_SUFFIXES
                 ) -> Iterator[tuple[tuple[int, int], str | None]]:
    """((file, record) position after this record, its text or None when blank) for every
    record of a source from `start`: local text, JSON and parquet files parsed as data/read.py
    parses them (`_local_texts`), `.arrow` files and hub datasets streamed with `datasets`.
    `suffixes`: what a directory scan reads."""
    files = source_files(source, suffixes)
    field = source.text_field
    targets: list[Path | None] = [None] if files is None else list(files)
    for f, file in enumerate(targets):
        if f < start[0]:
            continue
        skip = start[1] if f == start[0] else 0
        if file is not None and file.suffix != ".arrow":
            texts = _local_texts(file, field)
            for position, text in enumerate(texts, start=1):
                if position > skip:
                    yield (f, position), text
            continue
        dataset = _open(source, file)
        if skip:
            dataset = dataset.skip(skip)
        where = source.path_or_name if file is None else str(file)
        text_file = file is not None and file.suffix in (".txt", ".md")
        field_here = "text" if text_file else field  # datasets' text builder's column
        position = skip
        try:
            for record in dataset:
                position += 1
                if field_here not in record:
                    fields = ", ".join(map(str, record)) or "none"
                    raise MinimaError(f"{where} record {position}: no field '{field_here}' "
                                      f"(fields present: {fields})")
                value = record[field_here]
                if value is not None and not isinstance(value, str):
                    raise MinimaError(f"{where} record {position}: field '{field_here}' is "
                                      f"{type(value).__name__}, not a string")
                yield (f, position), (value if value and value.strip() else None)
        except MinimaError:
            raise
        except Exception as e:  # malformed JSON, unreadable parquet, a dropped connection
            raise MinimaError(f"{where}: cannot read ({first_line(e)})") from None


def check_source(source: DataSource, suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> None:
    """Cheap checks before a build: the source exists, its first records carry the text field,
    and it holds at least one non-blank document (reading until the first one)."""
    for _, text in iter_records(source, suffixes=suffixes):
        if text is not None:
            return
    raise MinimaError(f"no documents in {source.path_or_name} (it is empty or every "
                      f"'{source.text_field}' is blank)")


# ---------------------------------------------------------------------------------------------
# Building

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_tokenizer(path: str | Path) -> Any:
    """Where a tokenizer lives: a model directory or .gguf (`model.checkpoint.resolve_model`),
    or a directory holding only tokenizer files."""
    from minima_cli.model.checkpoint import ModelSource, resolve_model

    directory = Path(path).expanduser()
    if directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES):
        return ModelSource(directory)
    return resolve_model(directory)


def encode_chunk(texts: list[str], dtype: str, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids in `dtype`, int64 lengths) of a chunk of documents, in this process."""
    return token_arrays(tokenizer, texts, dtype)


def _chunks(sources: list[DataSource], cursor: dict[str, int],
            suffixes: tuple[str, ...] = SCAN_SUFFIXES
            ) -> Iterator[tuple[list[str], list[tuple[int, int, int]]]]:
    """Chunks of (documents, the position after each document) from the cursor on."""
    texts: list[str] = []
    positions: list[tuple[int, int, int]] = []
    chars = 0
    for s in range(cursor["source"], len(sources)):
        start = (cursor["file"], cursor["record"]) if s == cursor["source"] else (0, 0)
        for (f, r), text in iter_records(sources[s], start, suffixes):
            if text is None:
                continue
            texts.append(text)
            positions.append((s, f, r))
            chars += len(text)
            if len(texts) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
                yield texts, positions
                texts, positions, chars = [], [], 0
    if texts:
        yield texts, positions


def _encoded(chunks: Iterator[tuple[list[str], list]], tokenizer: Any, tokenizer_path: str,
             workers: int, dtype: str) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """Tokenised chunks in input order. With workers > 1, a pool of at most that many processes
    (no more than there are chunks: a source of one chunk is tokenised here), at most
    2 * workers chunks in flight; which process tokenises a chunk never changes its ids."""
    ahead: list[tuple[list[str], list]] = []
    if workers > 1:  # look ahead: start no more processes than there are chunks to give them
        for chunk in chunks:
            ahead.append(chunk)
            if len(ahead) >= workers:
                break
    processes = min(workers, len(ahead))
    if processes <= 1:
        for texts, positions in chain(ahead, chunks):
            flat, lengths = encode_chunk(texts, dtype, tokenizer)
            yield flat, lengths, positions
        return
    import multiprocessing

    # forkserver: workers inherit none of this process's descriptors (its output lock); the
    # server imports only data/tokenize.py (numpy), and each worker rebuilds the tokenizer from
    # its JSON, so starting one costs a fraction of a second
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload([tokenize_module.__name__])
    spec = tokenize_module.worker_spec(tokenizer, tokenizer_path)
    with context.Pool(processes, initializer=tokenize_module.init_worker,
                      initargs=(spec,)) as pool:
        pending: deque[tuple[Any, list]] = deque()
        for texts, positions in chain(ahead, chunks):
            pending.append((pool.apply_async(tokenize_module.encode_in_worker, (texts, dtype)),
                            positions))
            if len(pending) >= 2 * processes:
                result, done = pending.popleft()
                yield (*result.get(), done)
        while pending:
            result, done = pending.popleft()
            yield (*result.get(), done)


def build_key(sources: list[DataSource], contents: list[str], tokenizer_fp: str, dtype: str,
              max_tokens: int, shard_tokens: int,
              suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> str:
    """What decides the bytes of a store: a build in progress continues only under the same."""
    spec: dict[str, Any] = {
        "version": STORE_VERSION, "tokenizer": tokenizer_fp, "dtype": dtype,
        "max_tokens": int(max_tokens), "shard_tokens": int(shard_tokens),
        "sources": [[c, s.text_field] for s, c in zip(sources, contents, strict=True)]}
    if suffixes != SCAN_SUFFIXES:
        spec["scan"] = list(suffixes)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _load_progress(build: Path, key: str) -> dict[str, Any] | None:
    try:
        progress = json.loads((build / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if progress.get("key") != key:
        return None
    for shard in progress["shards"]:  # every recorded shard must be there whole
        for name, size in ((shard["tokens_file"], shard["tokens"] * progress["itemsize"]),
                           (shard["offsets_file"], (shard["documents"] + 1) * 8)):
            file = build / name
            if not file.is_file() or file.stat().st_size != size:
                return None
    return progress


def build_store(sources: list[DataSource], tokenizer: Any, tokenizer_path: str, output: Path,
                *, tokenizer_fp: str, workers: int = 1, max_tokens: int = 0,
                shard_tokens: int = SHARD_TOKENS, force: bool = False,
                on_shard: Any = None, finish: Any = None, contents: list[str] | None = None,
                suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> dict[str, Any]:
    """Tokenise `sources` into the store `output` (see the module doc); returns its manifest.

    A build in `output.tmp-build/` with the same inputs and settings is continued from its last
    complete shard; one with other inputs is discarded. `on_shard(entry, totals)` is called after
    each shard is safely written (progress display, tests); `finish(directory, manifest)` adds
    files (the stage's minima.json) before the store becomes visible. `contents` takes the
    sources' precomputed content fingerprints; `suffixes` is what a directory scan reads.
    """
    if workers < 1:
        raise MinimaError(f"--workers must be at least 1, got {workers}")
    if max_tokens < 0:
        raise MinimaError(f"--max-tokens must be >= 0 (0: no limit), got {max_tokens}")
    if shard_tokens < 1:
        raise MinimaError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    output = Path(output).expanduser()
    contents = contents or [source_fingerprint(s) for s in sources]
    for source in sources:
        check_source(source, suffixes)
    vocab_size = len(tokenizer)
    dtype = store_dtype(vocab_size)
    itemsize = np.dtype(dtype).itemsize
    key = build_key(sources, contents, tokenizer_fp, dtype, max_tokens, shard_tokens, suffixes)
    build = output.with_name(output.name + BUILD_SUFFIX)
    progress = _load_progress(build, key) if build.is_dir() else None
    if progress is not None:  # drop what a kill left after the last recorded shard
        keep = {PROGRESS, *(name for shard in progress["shards"]
                            for name in (shard["tokens_file"], shard["offsets_file"]))}
        for stray in build.iterdir():
            if stray.name not in keep:
                stray.unlink()
    if progress is None:
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        progress = {"key": key, "itemsize": itemsize, "shards": [], "documents": 0,
                    "tokens": 0, "cursor": {"source": 0, "file": 0, "record": 0},
                    "done": False}
        _write_atomic(build / PROGRESS, json.dumps(progress).encode())
    try:
        if not progress["done"]:
            _fill(build, progress, sources, tokenizer, tokenizer_path, workers, dtype,
                  max_tokens, shard_tokens, on_shard, suffixes)
        if progress["documents"] == 0:
            raise MinimaError("no documents to tokenise (every source is empty or blank)")
    except MinimaError:
        shutil.rmtree(build, ignore_errors=True)  # a user error leaves nothing behind
        raise
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "dtype": dtype,
        "tokenizer": {"fingerprint": tokenizer_fp, "vocab_size": vocab_size,
                      "eos_id": tokenizer.eos_token_id},
        "sources": [{"path": s.path_or_name, "text_field": s.text_field, "content": c}
                    for s, c in zip(sources, contents, strict=True)],
        "max_tokens": max_tokens, "shard_tokens": shard_tokens,
        "documents": progress["documents"], "tokens": progress["tokens"],
        "shards": progress["shards"],
    }
    _write_atomic(build / STORE_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    (build / PROGRESS).unlink()
    if finish is not None:
        finish(build, manifest)
    fsync_dir(build)
    if output.exists():
        if not force:
            raise MinimaError(f"output {output} exists (pass --force to overwrite)")
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(build, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build, output)
    fsync_dir(output.parent)
    return manifest


def _fill(build: Path, progress: dict[str, Any], sources: list[DataSource], tokenizer: Any,
          tokenizer_path: str, workers: int, dtype: str, max_tokens: int, shard_tokens: int,
          on_shard: Any, suffixes: tuple[str, ...] = SCAN_SUFFIXES) -> None:
    """Tokenise from the progress cursor on, writing a shard whenever one is full."""
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    held = 0  # tokens in the open shard
    last: tuple[int, int, int] | None = None

    def flush(final: bool) -> None:
        nonlocal pieces, lengths, held
        if lengths:
            index = len(progress["shards"])
            tokens_name, offsets_name = shard_names(index)
            tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
            offsets = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            data = tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
            _write_atomic(build / tokens_name, data)
            _write_atomic(build / offsets_name, offsets.astype("<i8").tobytes())
            entry = {"tokens_file": tokens_name, "offsets_file": offsets_name,
                     "documents": len(lengths), "tokens": int(offsets[-1]),
                     "sha256": hashlib.sha256(data).hexdigest()}
            progress["shards"].append(entry)
            progress["documents"] += len(lengths)
            progress["tokens"] += int(offsets[-1])
            assert last is not None
            progress["cursor"] = {"source": last[0], "file": last[1], "record": last[2]}
        if final:
            progress["done"] = True
        if lengths or final:
            _write_atomic(build / PROGRESS, json.dumps(progress).encode())
        if lengths and on_shard is not None:
            on_shard(progress["shards"][-1], progress)
        pieces, lengths, held = [], [], 0

    budget = max_tokens - progress["tokens"] if max_tokens else None
    chunks = _chunks(sources, progress["cursor"], suffixes)
    started, text_chars = time.perf_counter(), 0

    def counted(chunks: Iterator[tuple[list[str], list]]) -> Iterator[tuple[list[str], list]]:
        nonlocal text_chars
        for texts, positions in chunks:
            text_chars += sum(len(t) for t in texts)
            yield texts, positions

    chunks = counted(chunks)
    for flat, chunk_lengths, positions in _encoded(chunks, tokenizer, tokenizer_path, workers,
                                                   dtype):
        start = 0
        for length, position in zip(chunk_lengths.tolist(), positions, strict=True):
            doc = flat[start:start + length]
            start += length
            if budget is not None:
                if budget <= 0:
                    break
                doc = doc[:budget]
                budget -= len(doc)
            pieces.append(doc)
            lengths.append(len(doc))
            held += len(doc)
            last = position
            if held >= shard_tokens:
                flush(final=False)
        if budget is not None and budget <= 0:
            break
    flush(final=True)
    record_rate(text_chars, time.perf_counter() - started, workers)


# ---------------------------------------------------------------------------------------------
# The measured tokenisation rate (for `minima run --dry-run`)

RATE_MIN_CHARS = 1 << 20  # builds smaller than this do not measure a rate worth keeping


def rate_cache() -> Path:
    """$MINIMA_RATE_CACHE, else ~/.cache/minima/tokenize_rates.json (per machine)."""
    if os.environ.get("MINIMA_RATE_CACHE"):
        return Path(os.environ["MINIMA_RATE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minima" / \
        "tokenize_rates.json"


def _machine() -> str:
    from minima_cli.training.flops import cpu_model

    return f"{cpu_model()} x{os.cpu_count()}"


def record_rate(chars: int, seconds: float, workers: int) -> None:
    """Keep the text characters per second per worker of the latest build of at least
    RATE_MIN_CHARS on this machine (best effort: a read-only home keeps nothing)."""
    if chars < RATE_MIN_CHARS or seconds <= 0:
        return
    cache = rate_cache()
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known[_machine()] = {"chars_per_s_per_worker": chars / seconds / workers, "chars": chars,
                         "workers": workers}
    try:
        from minima_cli.fsutil import atomic_write_text

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, indent=1))
    except OSError:
        pass


def measured_rate() -> float | None:
    """Characters per second per worker measured by the latest large enough build here."""
    try:
        entry = json.loads(rate_cache().read_text()).get(_machine())
        return float(entry["chars_per_s_per_worker"]) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def describe_source(source: DataSource) -> str:
    """One line for `minima run --dry-run` about a training source: a store's size on disk and
    token count, or a raw source's size and its tokenisation time (one process, as a run's
    cache is built) estimated from the rate measured on this machine, if any."""
    from minima_cli.units import format_count

    path = Path(source.path_or_name).expanduser()
    if is_store(path):
        try:
            store = TokenStore(path)
        except MinimaError as e:
            return f"{source.path_or_name}: {e}"
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return (f"{source.path_or_name}: token store, {size / 1e9:.3g} GB on disk, "
                f"{format_count(store.n_tokens)} tokens, {format_count(store.n_documents)} "
                "documents (memory-mapped)")
    if not path.exists():
        if looks_like_hub_name(source.path_or_name):
            return (f"{source.path_or_name}: hub dataset, tokenised as it streams on first use "
                    "(size unknown until read; `minima tokenize` it into a store first)")
        return f"{source.path_or_name}: not there yet (made by an earlier stage)"
    try:
        files = [path] if path.is_file() else data_files(path, SUPPORTED_SUFFIXES)
    except MinimaError as e:
        return f"{source.path_or_name}: {e}"
    size = sum(f.stat().st_size for f in files)
    line = f"{source.path_or_name}: raw text, {size / 1e6:.3g} MB, tokenised into the run's " \
        "cache on first use"
    rate = measured_rate()
    if rate is None:
        return line + " (no tokenisation rate measured on this machine yet: `minima tokenize` " \
            "of 1 MB or more records one)"
    # bytes ~ characters for mostly-ASCII text; parquet is compressed, so this is a floor there
    return line + f", about {max(1, round(size / rate))} s at the {rate / 1e6:.2g} M chars/s " \
        "measured here"


# ---------------------------------------------------------------------------------------------
# A run's cache of raw sources

RUN_CACHE_VERSION = 1


def run_cache_key(content: str, text_field: str, tokenizer_fp: str) -> str:
    """The cache entry of a raw source: seq_len, seed and the split are not in it, so changing
    them re-cuts the cached store without tokenising again."""
    key = json.dumps(["store", RUN_CACHE_VERSION, content, text_field, tokenizer_fp])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def source_store(source: DataSource, tokenizer: Any, cache_dir: str | Path, *, content: str,
                 tokenizer_fp: str) -> TokenStore:
    """A raw source tokenised into a store in a run's cache, `<cache_dir>/store-<key>/`: built
    by `build_store` on first use (in this process, resumable from `store-<key>.tmp-build/`
    after a kill), opened on later uses. An entry that does not open, or whose tokenizer or
    content is not this one, is rebuilt, never trusted.

    The documents are those data/read.py's `read_documents` returns (same parsers, a directory
    scanned for the same suffixes), so the blocks, split and fingerprint of a run on raw text
    are those of the in-memory path this replaced."""
    key = run_cache_key(content, source.text_field, tokenizer_fp)
    path = Path(cache_dir).expanduser() / f"store-{key}"
    if is_store(path):
        try:
            store = TokenStore(path)
            if store.tokenizer_fingerprint == tokenizer_fp and \
                    [s.get("content") for s in store.manifest["sources"]] == [content]:
                return store
        except MinimaError:
            pass  # damaged: rebuilt below
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        build_store([source], tokenizer, "", path, tokenizer_fp=tokenizer_fp, contents=[content],
                    suffixes=SUPPORTED_SUFFIXES, force=True)
    except OSError as e:
        raise MinimaError(f"cannot write the token cache {path}: {e.strerror or e}") from None
    return TokenStore(path)


def sample_store_blocks(path: str | Path, tokenizer: Any, seq_len: int, n_blocks: int,
                        seed: int) -> Any:
    """`n_blocks` seeded random `seq_len` blocks of a store (int64 `[n, seq_len]`), for score:
    drawn without replacement in O(n) memory (no permutation of every block)."""
    import torch

    from minima_cli.data.sources import tokenizer_fingerprint

    store = TokenStore(path)
    if store.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise MinimaError(f"data source {path}: the token store was made with another "
                          "tokenizer than this model's")
    blocks = StoreBlocks(store, seq_len, tokenizer.eos_token_id)
    rows = np.random.default_rng([seed, 21]).choice(len(blocks), min(n_blocks, len(blocks)),
                                                   replace=False)
    return torch.stack([blocks[int(r)] for r in rows]).long()
