"""Data at scale: tokenisation throughput of `minima tokenize` (1 and 2 workers) against
`datasets.Dataset.map(batched=True, num_proc=2)` with the same tokenizer, then, on each store,
peak RSS and wall time of `minima distill --max-steps 5` (a fresh process each) with a bounded
validation set (`--valid-tokens`), for generated jsonl corpora of the given sizes.

    .venv/bin/python bench/data_scale.py                 # 10 MB and 100 MB
    .venv/bin/python bench/data_scale.py --sizes 10,100,1000 --workdir /big/disk/bench

Uses the tiny world (built once in the workdir, offline) as tokenizer, teacher and student.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RSS = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
       "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
       "time.perf_counter() - t, r.returncode); sys.stderr.write(r.stderr.decode()[-2000:])")


def make_corpus(path: Path, megabytes: int) -> int:
    """Repeat the tiny world's training documents (with a counter, so documents differ) to
    about `megabytes` MB of jsonl; returns the document count."""
    from minima_cli.data.tiny_corpus import make_corpus as tiny

    docs = tiny(2000, seed=1)
    target, written, n = megabytes * 1_000_000, 0, 0
    with path.open("w") as f:
        while written < target:
            # tiny documents are ~100 characters: join 40 into a document of a few KB
            text = f"{n}. " + " ".join(docs[(n * 40 + k) % len(docs)] for k in range(40))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def tokenize_store(corpus: Path, tokenizer_dir: Path, out: Path, workers: int) -> tuple[float,
                                                                                        int]:
    from minima_cli.data.sources import parse_sources, tokenizer_fingerprint
    from minima_cli.data.store import build_store, resolve_tokenizer
    from minima_cli.model.checkpoint import load_tokenizer

    shutil.rmtree(out, ignore_errors=True)
    tokenizer = load_tokenizer(resolve_tokenizer(tokenizer_dir))
    start = time.perf_counter()
    manifest = build_store(parse_sources(str(corpus)), tokenizer, str(tokenizer_dir), out,
                           tokenizer_fp=tokenizer_fingerprint(tokenizer), workers=workers)
    return time.perf_counter() - start, manifest["tokens"]


def tokenize_datasets(corpus: Path, tokenizer_dir: Path, cache: Path) -> tuple[float, float]:
    """(load + map seconds, map seconds) of Dataset.map(batched=True, num_proc=2)."""
    import datasets

    datasets.disable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train",
                               cache_dir=str(cache))
    loaded = time.perf_counter()
    ds.map(_encode, batched=True, num_proc=2, remove_columns=["text"],
           fn_kwargs={"tokenizer_dir": str(tokenizer_dir)})
    end = time.perf_counter()
    shutil.rmtree(cache, ignore_errors=True)
    return end - start, end - loaded


_TOKENIZER = None


def _encode(batch: dict, tokenizer_dir: str) -> dict:
    global _TOKENIZER
    if _TOKENIZER is None:
        from minima_cli.data.store import resolve_tokenizer
        from minima_cli.model.checkpoint import load_tokenizer

        _TOKENIZER = load_tokenizer(resolve_tokenizer(tokenizer_dir))
    from minima_cli.data.tokenize import tokenize_documents

    return {"input_ids": tokenize_documents(_TOKENIZER, batch["text"])}


def distill_rss(world: Path, store: Path, out: Path, steps: int) -> tuple[float, float]:
    """(peak RSS MB, wall seconds) of `minima distill --max-steps STEPS` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)
    command = [sys.executable, "-m", "minima_cli.cli", "distill", "-t", str(world / "teacher"),
               "-s", str(world / "teacher"), "-d", str(store), "-o", str(out), "--seq-len",
               "64", "--batch-size", "4", "--max-steps", str(steps), "--eval-every",
               str(steps), "--valid-tokens", "8192", "--precision", "fp32", "-q"]
    result = subprocess.run([sys.executable, "-c", RSS, *command], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    rss_kb, seconds, code = result.stdout.split()
    if code != "0":
        raise SystemExit(f"distill failed: {result.stderr[-2000:]}")
    return int(rss_kb) / 1024, float(seconds)


def eval_seconds(world: Path, store: Path, repeats: int = 3) -> tuple[float, int]:
    """(seconds, validation blocks) of one evaluation as distill runs it at each --eval-every:
    the mean next-token loss of the teacher over the `--valid-tokens 8192` set of the store,
    batch 4 x 64 tokens (the fastest of `repeats`, on the cores the distill runs use)."""
    import time

    import torch

    from minima_cli.data.streams import prepare_data
    from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model
    from minima_cli.training.state import evaluate_loss

    torch.set_num_threads(2)
    source = resolve_model(world / "teacher")
    prepared = prepare_data(str(store), load_tokenizer(source), seq_len=64, seed=0,
                            valid_tokens=8192)
    model = load_model(source).eval()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_loss(model, prepared.valid, 4)
        best = min(best, time.perf_counter() - start)
    return best, len(prepared.valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--workdir", default="runs/bench-data-scale")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    if not (world / "teacher").is_dir():
        from minima_cli.stages.tiny import build_tiny_world

        world.mkdir(exist_ok=True)
        build_tiny_world(world, seed=0, n_documents=400, steps=10)
    rows = []
    for mb in (int(s) for s in args.sizes.split(",")):
        corpus = work / f"corpus-{mb}mb.jsonl"
        if not corpus.is_file():
            make_corpus(corpus, mb)
        row = {"mb": mb}
        for workers in (1, 2):
            seconds, tokens = tokenize_store(corpus, world / "teacher",
                                             work / f"store-{mb}mb", workers)
            row[f"w{workers}_s"], row["tokens"] = seconds, tokens
            row[f"w{workers}_mtok_s"] = tokens / seconds / 1e6
        if not args.skip_datasets:
            total, mapped = tokenize_datasets(corpus, world / "teacher", work / "hf-cache")
            row["datasets_s"], row["datasets_map_s"] = total, mapped
            row["datasets_mtok_s"] = row["tokens"] / total / 1e6
        store = work / f"store-{mb}mb"
        row["store_mb"] = sum(p.stat().st_size for p in store.iterdir()) / 1e6
        row["rss_mb"], row["distill_s"] = distill_rss(world, store, work / "student",
                                                      args.steps)
        row["rss1_mb"], row["first_step_s"] = distill_rss(world, store, work / "student", 1)
        row["eval_s"], row["valid_blocks"] = eval_seconds(world, store)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| corpus | tokens | store | tokenize 1 worker | 2 workers | datasets.map "
          "num_proc=2 | distill 5 steps: peak RSS, wall | 1 step: wall | one evaluation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = (f"{r['datasets_s']:.1f} s ({r['datasets_mtok_s']:.2f} M tok/s)"
              if "datasets_s" in r else "-")
        print(f"| {r['mb']} MB | {r['tokens'] / 1e6:.1f} M | {r['store_mb']:.0f} MB | "
              f"{r['w1_s']:.1f} s ({r['w1_mtok_s']:.2f} M tok/s) | {r['w2_s']:.1f} s "
              f"({r['w2_mtok_s']:.2f} M tok/s) | {hf} | {r['rss_mb']:.0f} MB, "
              f"{r['distill_s']:.1f} s | {r['first_step_s']:.1f} s | {r['eval_s']:.2f} s "
              f"({r['valid_blocks']} blocks) |")


if __name__ == "__main__":
    main()
