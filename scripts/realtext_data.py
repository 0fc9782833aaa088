"""Real text on disk for recipes/smollm2.yaml: the Python standard library's docstrings and the
`pydoc` topics (bench/realtext.py; no network), split by whole documents into train.jsonl and
valid.jsonl, so the held-out perplexity is measured on modules / topics never trained on.

Usage: python scripts/realtext_data.py OUT_DIR [--held-out 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from realtext import real_documents, split_by_document, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="directory for train.jsonl and valid.jsonl")
    parser.add_argument("--held-out", type=float, default=0.05,
                        help="fraction of documents held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args()
    documents = real_documents()
    train, valid = split_by_document(documents, args.held_out, args.seed)
    # valid first: a killed run leaves no train.jsonl, which is what make checks for
    write_jsonl(valid, args.output / "valid.jsonl")
    write_jsonl(train, args.output / "train.jsonl")
    chars = sum(len(t) for t in train)
    print(f"{len(train)} training documents ({chars / 1e6:.2f}M characters), {len(valid)} held "
          f"out -> {args.output}")


if __name__ == "__main__":
    main()
