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

import json
import re
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

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
