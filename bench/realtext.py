"""Real text that every machine running minima has on disk: the docstrings of Python's standard
library (one document per module, ~1.2 MB of English technical prose with code examples) and
the reference manual topics that `pydoc` ships (`pydoc_data.topics`, ~0.46 MB, one document per
topic). No network, no hub. Used by the distillation benchmarks for training text and for a
held-out set split by document (whole modules / topics), so no held-out sentence was trained on.

    from realtext import real_documents, split_by_document, write_jsonl
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import tempfile
from pathlib import Path

# Not prose, or not the library itself: test suites, the IDE, the old 2to3 fixers, demos.
SKIP_TOP = {"site-packages", "test", "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter"}
MIN_DOCSTRING = 80  # one-liners ("Return x.") carry little text


def module_docstrings(path: Path) -> str:
    """Every module, class and function docstring of one source file, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
    return "\n\n".join(d for d in docs if d and len(d) >= MIN_DOCSTRING)


def real_documents(max_chars: int | None = None) -> list[tuple[str, str]]:
    """(name, text) documents, deterministic order: stdlib modules' docstrings, then the
    `pydoc` topics. Stops once `max_chars` characters are collected (None: everything)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents: list[tuple[str, str]] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIP_TOP or "tests" in parts:
            continue
        text = module_docstrings(path)
        if text:
            documents.append(("/".join(parts), text))
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return documents
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for name in sorted(topics):
        documents.append((f"pydoc:{name}", topics[name]))
        total += len(topics[name])
        if max_chars is not None and total >= max_chars:
            break
    return documents


def split_by_document(documents: list[tuple[str, str]], held_out: float,
                      seed: int = 0) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): a seeded random `held_out` fraction of whole documents."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(held_out * len(documents)))
    held = set(order[:n_held])
    train = [text for i, (_, text) in enumerate(documents) if i not in held]
    valid = [text for i, (_, text) in enumerate(documents) if i in held]
    return train, valid


def write_jsonl(texts: list[str], path: Path) -> Path:
    """One {"text": ...} record per document (multi-line documents stay whole), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    os.replace(tmp, path)
    return path
