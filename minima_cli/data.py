"""Data layer shared by the stages: read documents, tokenize them, pack them into blocks.

A *document* is one string. Sources are local `.txt` (one document per non-empty line),
`.jsonl` / `.json` (records with a text field), `.parquet` (a text column), a directory of
such files, or, when the source is not a local path, a `datasets` hub name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError

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
    return bool(_HUB_NAME.match(source)) and not source.endswith(SUPPORTED_SUFFIXES)


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
    if path.suffix == ".txt":
        return _read_txt(path)
    if path.suffix == ".jsonl":
        return _texts(_read_jsonl(path), path, text_field)
    if path.suffix == ".json":
        return _read_json(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    kinds = ", ".join(SUPPORTED_SUFFIXES)
    raise MinimaError(f"unsupported data file {path} (expected one of {kinds}, or a directory)")


def _read_txt(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
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
            return _texts(_read_jsonl(path), path, text_field)
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
