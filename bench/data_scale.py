"""Data at scale: tokenisation throughput of `minima tokenize` (1 and 2 workers) against
`datasets.Dataset.map(batched=True, num_proc=2)` with the same tokenizer, then, on each store,
peak RSS and wall time of `minima distill --max-steps 5` (a fresh process each) with a bounded
validation set (`--valid-tokens`), for generated jsonl corpora of the given sizes.

    .venv/bin/python bench/data_scale.py                 # 10 MB and 100 MB
    .venv/bin/python bench/data_scale.py --sizes 10,100,1000 --workdir /big/disk/bench
    .venv/bin/python bench/data_scale.py --sizes 10,100,1000 --reuse-stores   # distill/eval only

Each tokenisation runs in a fresh process (as a user's command does: worker pools, the
tokenizer's thread pool and datasets' forks start from nothing), timed from after the imports to
the finished store or mapped dataset; the three contenders run interleaved, `--rounds` times
(one round at 1 GB and above), so a ratio compares runs made under the same machine load.
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


def timed_in_fresh_process(kind: str, corpus: Path, tokenizer_dir: Path, out: Path,
                           workers: int) -> tuple[float, int]:
    """(seconds, tokens) of one tokenisation ("store" or "datasets") in a new process."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    result = subprocess.run([sys.executable, __file__, "--one", kind, str(corpus),
                             str(tokenizer_dir), str(out), str(workers)], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} tokenisation failed: {result.stderr[-2000:]}")
    seconds, tokens = result.stdout.split()[-2:]
    return float(seconds), int(tokens)


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


def tokenize_datasets(corpus: Path, tokenizer_dir: Path, cache: Path) -> tuple[float, int]:
    """(load + map seconds, tokens) of Dataset.map(batched=True, num_proc=2): JSON to Arrow,
    then the tokenizer in 2 forked processes (one thread each, as datasets recommends)."""
    import datasets

    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the forked map workers read it
    datasets.disable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)
    from minima_cli.data.store import resolve_tokenizer
    from minima_cli.model.checkpoint import load_tokenizer

    # loaded before the clock starts, as for the store, and inherited by the forked workers
    _TOKENIZER = load_tokenizer(resolve_tokenizer(tokenizer_dir))
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train",
                               cache_dir=str(cache))
    mapped = ds.map(_encode, batched=True, num_proc=2, remove_columns=["text"],
                    fn_kwargs={"tokenizer_dir": str(tokenizer_dir)})
    end = time.perf_counter()
    tokens = sum(len(ids) for batch in mapped.iter(batch_size=65_536)
                 for ids in batch["input_ids"]) if corpus.stat().st_size < 2e8 else -1
    shutil.rmtree(cache, ignore_errors=True)
    return end - start, tokens


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


def one(kind: str, corpus: str, tokenizer_dir: str, out: str, workers: str) -> None:
    """The body of a fresh tokenisation process: prints its seconds and token count."""
    if kind == "store":
        seconds, tokens = tokenize_store(Path(corpus), Path(tokenizer_dir), Path(out),
                                         int(workers))
    else:
        seconds, tokens = tokenize_datasets(Path(corpus), Path(tokenizer_dir), Path(out))
    print(seconds, tokens)


def tokenize_rounds(corpus: Path, world: Path, work: Path, mb: int, rounds: int,
                    skip_datasets: bool) -> dict:
    """Interleaved rounds of (1 worker, 2 workers, datasets.map): the best time of each, and
    each round's ratios to datasets.map (the goal is >= 1.0 at every size)."""
    store = work / f"store-{mb}mb"
    times: dict[str, list[float]] = {"w1": [], "w2": [], "datasets": []}
    tokens = 0
    for _ in range(rounds):
        for name, kind, out, workers in (("w1", "store", store, 1),
                                         ("w2", "store", work / f"store-{mb}mb-w2", 2),
                                         ("datasets", "datasets", work / "hf-cache", 2)):
            if kind == "datasets" and skip_datasets:
                continue
            seconds, n = timed_in_fresh_process(kind, corpus, world / "teacher", out, workers)
            times[name].append(seconds)
            if name == "w2":  # the same bytes as the 1-worker store (tested); only one is kept
                shutil.rmtree(out, ignore_errors=True)
            tokens = n if kind == "store" else tokens
            if kind == "datasets" and n >= 0 and n != tokens:
                raise SystemExit(f"datasets.map made {n} tokens, the store {tokens}")
    row: dict = {"tokens": tokens, "rounds": rounds, "load_avg": os.getloadavg()}
    for name, values in times.items():
        if values:
            row[f"{name}_s"] = min(values)
            row[f"{name}_mtok_s"] = tokens / min(values) / 1e6
            row[f"{name}_all_s"] = [round(v, 2) for v in values]
    if times["datasets"]:
        for name in ("w1", "w2"):
            ratios = [d / t for d, t in zip(times["datasets"], times[name], strict=True)]
            row[f"{name}_vs_datasets"] = [round(r, 2) for r in ratios]
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--workdir", default="runs/bench-data-scale")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved tokenisation rounds below 1 GB (1 round from 1 GB)")
    parser.add_argument("--train-rounds", type=int, default=2,
                        help="rounds of the distill and evaluation timings, interleaved across "
                             "sizes (best time, highest peak RSS)")
    parser.add_argument("--reuse-stores", action="store_true",
                        help="time only distill and evaluation, on the stores already in the "
                             "workdir")
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    from minima_cli.data.store import TokenStore, is_store
    from minima_cli.training.flops import cpu_model

    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(),
                      "load_avg": os.getloadavg()}), flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world"
    if not (world / "teacher").is_dir():
        from minima_cli.stages.tiny import build_tiny_world

        world.mkdir(exist_ok=True)
        build_tiny_world(world, seed=0, n_documents=400, steps=10)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for mb in sizes:
        store = work / f"store-{mb}mb"
        row: dict = {"mb": mb}
        if args.reuse_stores and is_store(store):
            row["tokens"] = TokenStore(store).n_tokens
        else:
            corpus = work / f"corpus-{mb}mb.jsonl"
            if not corpus.is_file():
                make_corpus(corpus, mb)
            row.update(tokenize_rounds(corpus, world, work, mb, 1 if mb >= 1000 else args.rounds,
                                       args.skip_datasets))
            print(json.dumps(row), flush=True)
        row["store_mb"] = sum(p.stat().st_size for p in store.iterdir()) / 1e6
        rows.append(row)
    # distill and evaluation after every store exists, interleaved across sizes, so "flat"
    # compares sizes measured under the same machine load
    for _ in range(args.train_rounds):
        for row in rows:
            store = work / f"store-{row['mb']}mb"
            measured = {}
            measured["rss_mb"], measured["distill_s"] = distill_rss(world, store,
                                                                    work / "student", args.steps)
            measured["rss1_mb"], measured["first_step_s"] = distill_rss(world, store,
                                                                        work / "student", 1)
            measured["eval_s"], row["valid_blocks"] = eval_seconds(world, store)
            for key, value in measured.items():
                keep = max if key.startswith("rss") else min
                row[key] = keep(row.get(key, value), value)
                row.setdefault(f"{key}_all", []).append(round(value, 2))
        print(json.dumps({"train_round_load_avg": os.getloadavg()}), flush=True)
    for row in rows:
        print(json.dumps(row), flush=True)

    def tok(r: dict, name: str) -> str:
        return (f"{r[name + '_s']:.1f} s ({r[name + '_mtok_s']:.2f} M tok/s)"
                if name + "_s" in r else "-")

    print("\n| corpus | tokens | store | tokenize, 1 worker | 2 workers | datasets.map "
          "num_proc=2 | 1 and 2 workers vs datasets.map | distill 5 steps: peak RSS, wall | "
          "1 step: peak RSS, wall | one evaluation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['datasets_s'] / r['w1_s']:.2f}x, {r['datasets_s'] / r['w2_s']:.2f}x"
                 if "datasets_s" in r and "w1_s" in r else "-")
        print(f"| {r['mb']} MB | {r['tokens'] / 1e6:.1f} M | {r['store_mb']:.0f} MB | "
              f"{tok(r, 'w1')} | {tok(r, 'w2')} | {tok(r, 'datasets')} | {ratio} | "
              f"{r['rss_mb']:.0f} MB, {r['distill_s']:.1f} s | {r['rss1_mb']:.0f} MB, "
              f"{r['first_step_s']:.1f} s | {r['eval_s']:.2f} s ({r['valid_blocks']} blocks) |")


if __name__ == "__main__":
    main()
