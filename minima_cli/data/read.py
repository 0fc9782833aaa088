"""Read documents (one string each) from a local `.txt` (a document per non-empty line; `.md` when
named), `.jsonl` / `.json` (records with a text field, or `{field: [...]}`), `.parquet` (a text
column), a directory of such files, or a `datasets` hub name. Every problem is one MinimaError
line naming the file (and line) at fault.
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


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # files of records: chat data, eval tasks


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
            files = data_files(path)
            docs = list(chain.from_iterable(_read_file(f, text_field) for f in files))
        else:
            docs = list(_read_file(path, text_field))
    elif isinstance(source, str) and looks_like_hub_name(source):
        docs = _read_hub(source, text_field)
    else:
        raise MinimaError(f"data source not found: {source}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MinimaError(
            f"no documents in {source} (it is empty or every '{text_field}' is blank)"
        )
    return docs


def looks_like_hub_name(source: str) -> bool:
    """Whether a data source that is not a local path reads as a hub dataset id."""
    return bool(_HUB_NAME.match(source)) and not source.endswith((*SUPPORTED_SUFFIXES, ".md"))


def data_files(directory: Path, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[Path]:
    """The data files (by suffix) under `directory`, recursively and sorted; hidden files and
    folders are skipped. None is an error."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix in suffixes
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise MinimaError(f"no {'/'.join(suffixes)} files in directory {directory}")
    return files


def _read_file(path: Path, text_field: str) -> Iterable[str]:
    if path.suffix in TEXT_SUFFIXES:
        return _read_txt(path)
    if path.suffix == ".jsonl":
        return _texts(_json_records(path, _JSON_LINES), text_field)
    if path.suffix == ".json":
        return _read_json(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    kinds = ", ".join((*SUPPORTED_SUFFIXES, ".md"))
    raise MinimaError(f"unsupported data file {path} (expected one of {kinds}, or a directory)")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file. Binary data (a NUL byte) or bytes that are not
    UTF-8 are one MinimaError naming the file and line, not a UnicodeDecodeError traceback (or,
    worse, a model trained on binary garbage)."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if "\0" in line:
                    raise MinimaError(f"{path}:{lineno}: binary data (a NUL byte), not text")
                yield lineno, line
    except UnicodeDecodeError:
        raise MinimaError(f"{path}:{first_bad_utf8_line(path)}: not UTF-8 text") from None


def first_bad_utf8_line(path: Path) -> int:
    """The line number of the first line that is not valid UTF-8 (a second, binary pass: only
    taken once decoding has failed, to name the line)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _read_txt(path: Path) -> list[str]:
    return [line.rstrip("\r\n") for _, line in text_lines(path) if line.strip()]


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise MinimaError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(where, record) for each record of a file of records (chat data, evaluation tasks): where
    names the file and the record for messages, `FILE:LINE` in JSON lines, `FILE record N` in a
    JSON list, `FILE row N` in parquet. A `.json` file holds a list of records, or JSON lines (as
    `datasets` allows); any other suffix but `.parquet` is read as JSON lines. Every problem with
    the file is one clear line."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"{path} row {i}", r)
                    for i, r in enumerate(pq.read_table(path).to_pylist(), start=1)]
        data = _load_json(path) if path.suffix == ".json" else _JSON_LINES
        return list(_json_records(path, data))
    except FileNotFoundError:
        raise MinimaError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise MinimaError(f"{path}: not UTF-8 text") from None
    except MinimaError:
        raise
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise MinimaError(f"{path}: cannot read ({e})") from None


_JSON_LINES = object()  # what `_load_json` returns for JSON lines under a .json name


def _load_json(path: Path) -> Any:
    """The value of a .json file, or `_JSON_LINES` when it holds several top-level values."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MinimaError(f"{path}:{first_bad_utf8_line(path)}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _JSON_LINES
        raise MinimaError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _json_records(path: Path, data: Any) -> Iterator[tuple[str, Any]]:
    """(where, record) of a .json file's value, or of JSON lines read lazily (a large corpus is
    never held as records)."""
    if data is _JSON_LINES:
        yield from ((f"{path}:{lineno}", record) for lineno, record in read_jsonl(path))
        return
    if not isinstance(data, list):
        raise MinimaError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from ((f"{path} record {i}", record) for i, record in enumerate(data, start=1))


def _read_json(path: Path, text_field: str) -> list[str]:
    data = _load_json(path)
    if isinstance(data, dict) and isinstance(data.get(text_field), list):
        # Columnar layout: {"text": [...], ...}.
        return _texts(((str(path), {text_field: v}) for v in data[text_field]), text_field)
    if isinstance(data, dict):
        fields = ", ".join(map(str, data)) or "none"
        raise MinimaError(
            f"{path}: no list under field '{text_field}' (fields present: {fields}); "
            "expected a list of records or {'" + text_field + "': [...]}"
        )
    return _texts(_json_records(path, data), text_field)


def record_text(where: str, record: Any, field: str) -> str | None:
    """The `field` of one record (None for a null value); one line naming `where` when the
    record is not an object or has no string there."""
    if not isinstance(record, dict):
        raise MinimaError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise MinimaError(f"{where}: no field '{field}' (fields present: {fields})")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise MinimaError(f"{where}: field '{field}' is {type(value).__name__}, not a string")
    return value


def _texts(records: Iterable[tuple[str, Any]], field: str) -> list[str]:
    """The `field` of each (where, record); `None` values count as empty documents."""
    return [value for where, record in records
            if (value := record_text(where, record, field)) is not None]


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
    return _texts(((f"{path} row {i}", {text_field: v}) for i, v in enumerate(column, start=1)),
                  text_field)


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
    return _texts(((name, {text_field: v}) for v in ds[text_field]), text_field)
