"""Training data sources and their identities: `parse_sources` turns "a.txt:0.7,b.jsonl:0.3" (or a
YAML list) into weighted `DataSource`s; the fingerprints of a source's content, of a tokenizer and
of a run's data (`data_fingerprint`) guard the token cache, the teacher cache and resumes
(docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minima_cli.data.read import SUPPORTED_SUFFIXES, data_files, looks_like_hub_name
from minima_cli.errors import MinimaError
from minima_cli.fsutil import file_sha256

STATE_VERSION = 1
STORE_MANIFEST = "store.json"  # what makes a directory a token store (data/store.py)

def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_SOURCE_KEYS = ("path", "weight", "text_field")


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
    path) of a directory, `store:<sha256>` for a token store (data/store.py: its manifest's
    tokenizer, sources and shard hashes), or `hub:<name>` for a hub dataset (its revision is not
    tracked)."""
    path = Path(source.path_or_name).expanduser()
    if path.is_dir() and (path / STORE_MANIFEST).is_file():
        from minima_cli.data.store import TokenStore

        return TokenStore(path).fingerprint
    if path.is_dir() and any(path.glob("tokens-*.bin")):
        raise MinimaError(f"{path}: token shards but no {STORE_MANIFEST} (an unfinished copy or "
                          "build?): rebuild it with `minima tokenize`")
    if path.is_dir():
        digest = hashlib.sha256()
        for file in data_files(path, (*SUPPORTED_SUFFIXES, ".arrow")):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    if path.exists():
        return file_sha256(path)
    if looks_like_hub_name(source.path_or_name):
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
    valid_tokens: int = 0,
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
    if valid_tokens:  # only when used, so the fingerprints of existing runs do not change
        config["valid_tokens"] = int(valid_tokens)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
