"""`minima cache-teacher`: prepare the data exactly as `minima distill` will (same seq_len, seed and
split) and store the teacher's top-k log-probs for every training block (data/teacher_cache.py;
layout in docs/formats.md), so `minima distill --teacher-cache DIR --loss topk` trains without
the teacher in memory (or on another machine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.streams import prepare_data
from minima_cli.data.teacher_cache import CACHE_DTYPES, write_teacher_cache
from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_output_dir, check_output, write_manifest
from minima_cli.model.checkpoint import (
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from minima_cli.stages import RunControl
from minima_cli.stages.configs import CacheTeacherConfig


def run_cache_teacher(*, teacher_path: str, data: str, output: Path, seq_len: int, k: int,
                      seed: int = 0, valid_fraction: float = 0.05, batch_size: int = 8,
                      blocks_per_shard: int = 1024, dtype: str = "float16",
                      text_field: str = "text", force: bool = False, valid_tokens: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """Prepare the data exactly as `distill` will (same seq_len, seed, split) and cache the
    teacher's top-k for every training block."""
    if k < 1 or seq_len < 1 or batch_size < 1 or blocks_per_shard < 1:
        raise MinimaError("--k, --seq-len, --batch-size and --blocks-per-shard must be positive")
    if dtype not in CACHE_DTYPES:
        raise MinimaError(f"unknown cache dtype {dtype!r}: choose {', '.join(CACHE_DTYPES)}")
    check_output(output, force)
    source = resolve_model(teacher_path)
    tokenizer = load_tokenizer(source)
    vocab_size = len(tokenizer)
    if k > vocab_size:
        raise MinimaError(f"--k {k} exceeds the vocabulary ({vocab_size})")
    prepared = prepare_data(data, tokenizer, seq_len=seq_len, seed=seed,
                            valid_fraction=valid_fraction, text_field=text_field,
                            cache_dir=output.with_name(f"{output.name}.token-cache"),
                            valid_tokens=valid_tokens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(source).eval().requires_grad_(False).to(device)
    start = time.perf_counter()
    with atomic_output_dir(output, force=force) as tmp:
        shards = write_teacher_cache(teacher, prepared, tmp, k=k, vocab_size=vocab_size,
                                     batch_size=batch_size, blocks_per_shard=blocks_per_shard,
                                     dtype=CACHE_DTYPES[dtype], progress=progress)
        manifest = write_manifest(
            tmp, "cache-teacher",
            inputs={"teacher": {"path": str(source), "fingerprint": model_fingerprint(source)},
                    "data": prepared.summary()},
            config={"k": k, "seq_len": seq_len, "seed": seed, "valid_fraction": valid_fraction,
                    "valid_tokens": valid_tokens,
                    "dtype": dtype, "vocab_size": vocab_size, "text_field": text_field},
            shards=shards, wall_time_s=time.perf_counter() - start,
            metrics={"tokens": sum(s["blocks"] for s in shards) * seq_len})
    return manifest


def run(config: CacheTeacherConfig, control: RunControl) -> dict[str, Any]:
    return run_cache_teacher(teacher_path=config.teacher, data=config.data,
                             output=Path(config.output), seq_len=config.seq_len, k=config.k,
                             seed=config.seed, valid_fraction=config.valid_fraction,
                             batch_size=config.batch_size,
                             blocks_per_shard=config.blocks_per_shard, dtype=config.dtype,
                             text_field=config.text_field, force=control.force,
                             progress=control.progress, valid_tokens=config.valid_tokens)
