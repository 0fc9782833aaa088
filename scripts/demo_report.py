"""The demo's closing table: teacher vs pruned student, loaded with plain transformers.

Usage: python scripts/demo_report.py DEMO_DIR   (after `make demo` has built DEMO_DIR)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from minima_cli.checkpoint import quiet_transformers
from minima_cli.data import pack_documents, read_documents, tokenize_documents
from minima_cli.train_state import evaluate_loss

PROMPT = "the colour of"


def describe(path: Path, blocks_for) -> tuple[int, float, str]:
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    loss = evaluate_loss(model, blocks_for(tokenizer))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return sum(p.numel() for p in model.parameters()), math.exp(loss), tokenizer.decode(out[0])


def main(demo: Path) -> None:
    documents = read_documents(demo / "world" / "data" / "valid.txt")

    def blocks_for(tokenizer):
        return pack_documents(tokenize_documents(tokenizer, documents), 64,
                              tokenizer.eos_token_id)

    table = Table(title="minima demo: teacher -> pruned -> distilled")
    for column in ("model", "parameters", "valid perplexity", f"greedy: {PROMPT!r} ..."):
        table.add_column(column)
    models = (("teacher", demo / "world" / "teacher"), ("pruned", demo / "pruned"),
              ("distilled", demo / "distilled"))
    for name, path in models:
        params, perplexity, sample = describe(path, blocks_for)
        table.add_row(name, f"{params:,}", f"{perplexity:.2f}", sample)
    Console().print(table)
    print(f"pruned and distilled students are plain Hugging Face checkpoints: {demo / 'pruned'}, "
          f"{demo / 'distilled'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
