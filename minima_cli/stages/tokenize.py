"""`minima tokenize`: text sources -> a token store (data/store.py; layout in docs/formats.md),
read with `datasets` (hub names streamed), tokenised in `--workers` processes, written shard by
shard into `OUTPUT.tmp-build/` (a killed build continues there) and renamed to OUTPUT when
complete. `--data STORE` of distill, cache-teacher and schedule then reads it memory-mapped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from minima_cli.data.sources import parse_sources, tokenizer_fingerprint
from minima_cli.data.store import build_store, resolve_tokenizer
from minima_cli.errors import MinimaError
from minima_cli.fsutil import check_output, read_manifest, write_manifest
from minima_cli.model.checkpoint import load_tokenizer
from minima_cli.stages import RunControl
from minima_cli.stages.configs import TokenizeConfig


def run(config: TokenizeConfig, control: RunControl) -> dict[str, Any]:
    if config.workers < 1:
        raise MinimaError(f"--workers must be at least 1, got {config.workers}")
    if config.max_tokens < 0:
        raise MinimaError(f"--max-tokens must be >= 0 (0: no limit), got {config.max_tokens}")
    output = Path(config.output).expanduser()
    check_output(output, control.force)
    sources = parse_sources(config.data, config.text_field)
    source = resolve_tokenizer(config.tokenizer)
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise MinimaError(f"{config.tokenizer}: the tokenizer has no EOS token, which separates "
                          "packed documents")
    start = time.perf_counter()
    progress = None
    if control.progress:
        from minima_cli.progress import console

        def progress(entry: dict[str, Any], totals: dict[str, Any]) -> None:
            console.print(f"[dim]{entry['tokens_file']}: {totals['documents']:,} documents, "
                          f"{totals['tokens']:,} tokens, {time.perf_counter() - start:.1f} s"
                          "[/dim]")

    def finish(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        seconds = time.perf_counter() - start
        return write_manifest(
            directory, "tokenize",
            inputs={"data": manifest["sources"],
                    "tokenizer": {"path": str(source), **manifest["tokenizer"]}},
            config={"workers": config.workers, "max_tokens": config.max_tokens,
                    "text_field": config.text_field, "shard_tokens": config.shard_tokens},
            metrics={"documents": manifest["documents"], "tokens": manifest["tokens"],
                     "shards": len(manifest["shards"]), "dtype": manifest["dtype"],
                     "tokens_per_s": manifest["tokens"] / max(seconds, 1e-9)},
            wall_time_s=seconds)

    build_store(sources, tokenizer, str(config.tokenizer), output,
                tokenizer_fp=tokenizer_fingerprint(tokenizer), workers=config.workers,
                max_tokens=config.max_tokens, shard_tokens=config.shard_tokens,
                force=control.force, on_shard=progress, finish=finish)
    return read_manifest(output)
