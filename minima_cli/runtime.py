"""`minima eval`: perplexity, multiple choice, generation and lm-evaluation-harness tasks, for
one model or several side by side (deltas against the first).

Task specs, one `--task` each (`KIND:TARGET[:key=value,...]`):
- `ppl:FILE` perplexity of a text file (`.txt`: a document a line; `.jsonl`/`.json`/`.parquet`
  with a `text` field, `field=NAME` for another).
- `mc:FILE.jsonl[:shots=5,dev=DEV.jsonl,style=cloze|letters]` multiple choice, MMLU-style records
  `{"question": str, "choices": [str, ...], "answer": int}` (optional `category` for a breakdown).
- `gen:FILE.jsonl[:match=exact|contains,max_tokens=32,temperature=0,top_p=1]` generation; records
  `{"prompt": str, "answer": str | [str, ...]}` or chat `{"messages": [...]}` whose last
  (assistant) message is the reference and the rest the prompt, through the chat template.
- `lm-eval:NAME_OR_YAML[:shots=N]` any lm-evaluation-harness task (a hub dataset needs a network)
  or a local task YAML (works offline).

Conventions, so that minima's numbers and the harness's agree:
- Multiple choice follows lm-eval: context = few-shot examples (each `question + " " + answer`,
  joined by a blank line) + the question; continuation = `" " + choice`; `acc` takes the argmax of
  the summed log-likelihood of the continuation tokens, `acc_norm` the argmax of that divided by
  the choice's length in characters. Shots are the first N records of the dev file (MMLU's
  `first_n`). Tokenization as in lm-eval: encode context + continuation and the context alone,
  the continuation's tokens are the difference (trailing context spaces move to it).
- Perplexity is defined in `perplexity_windows`: documents are joined into one stream
  `EOS d1 EOS d2 EOS ... dn EOS` (as in training, every document ends with EOS; the leading EOS
  gives the first document's first token a context), windows of `max_length` tokens start every
  `stride` tokens, and a token is scored in the first window that holds it after that window's
  first token, with the window's earlier tokens as context: with stride < max_length every token
  after the first is scored exactly once; stride == max_length scores independent chunks (each
  chunk's first token has no context and is not scored), as HF's "perplexity of fixed-length
  models" guide. ppl = exp(total NLL / scored tokens), token-weighted over the whole file.
- Throughput (`tokens_per_second`) counts every token the model reads in minima-run tasks
  (windows, contexts with continuations, prompts and generated tokens) over their wall time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from minima_cli.errors import MinimaError


def resolve_device(device: str) -> str:
    """auto -> cuda when there is one; anything torch cannot use is one clear line."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MinimaError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MinimaError(f"--device {device}: no CUDA device is available")
    return device


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. Matrices this small gain nothing from more threads, and on
    a busy 2-core machine OpenMP threads spinning against other processes made the build up to 8x
    slower (180 s instead of 22 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
