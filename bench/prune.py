"""Benchmark `minima prune`: time against a plain file copy, and peak memory against the largest
tensor.

A random sharded teacher (LlamaConfig, untied, `save_pretrained(max_shard_size="100MB")`) is
written to a work dir; random scores of the mask shapes are planned with `resolve_target(ratio)`
and `plan_prune`, and `prune_checkpoint` streams the teacher into a fresh dir. Each prune runs in
a fresh subprocess (this script with --child) so that its peak RSS (VmHWM) belongs to the prune
alone; the child also reports its RSS after imports and planning, before pruning, so the
increment is visible. The copy is `shutil.copyfile` of every teacher file into a fresh dir.
The files are read once first (warm page cache), then copy and prune runs are interleaved for
--repeats rounds and medians are reported. Goal: prune / copy <= 1.5x.

Note: prune_checkpoint fsyncs every shard it writes (a kill or power loss must never leave a
corrupt checkpoint) and a plain copy does not, so both like-for-like pairs are printed too:
prune vs copy + fsync, and prune with fsync disabled vs the plain copy.

Run from the repository root:

    .venv/bin/python bench/prune.py
    .venv/bin/python bench/prune.py --dtype bfloat16 --repeats 5 --workdir /tmp/prune-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GOAL = 1.5
MB = 1024 * 1024


def build_teacher(directory: Path, args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128, head_dim=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(directory, max_shard_size="100MB")



def max_rss_mb() -> float:
    """Peak RSS of this process. VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork
    over into a child's ru_maxrss across exec, which would hide the prune's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(teacher: Path, out: Path, ratio: float, no_fsync: bool = False) -> None:
    """One prune in this fresh process; prints a JSON line of seconds and RSS figures.
    With no_fsync, os.fsync is a no-op: the like-for-like partner of a plain (page-cache) copy."""
    if no_fsync:
        os.fsync = lambda fd: None
    from minima_cli.model.arch import shape_from_config
    from minima_cli.model.checkpoint import load_config, resolve_model
    from minima_cli.model.scores import random_scores
    from minima_cli.model.selection import plan_prune
    from minima_cli.model.shapes import resolve_target
    from minima_cli.model.slicing import prune_checkpoint

    source = resolve_model(teacher)
    config = load_config(source)
    shape = shape_from_config(config)
    target = resolve_target(shape, ratio=ratio)
    plan = plan_prune(random_scores(shape, seed=0), shape, target)
    baseline = max_rss_mb()
    out.mkdir()
    start = time.perf_counter()
    stats = prune_checkpoint(source, config, plan, shape, out, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": max_rss_mb(),
                      "largest_tensor_mb": stats["largest_tensor_bytes"] / MB,
                      "bytes_written": stats["bytes_written"], "target": target.as_dict()}))


def run_child(teacher: Path, out: Path, ratio: float, no_fsync: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--teacher", str(teacher), "--out", str(out),
               "--ratio", str(ratio), *(["--no-fsync"] if no_fsync else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the prune child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def copy_files(teacher: Path, out: Path, fsync: bool) -> float:
    start = time.perf_counter()
    out.mkdir()
    for path in sorted(teacher.iterdir()):
        if path.is_file():
            shutil.copyfile(path, out / path.name)
            if fsync:
                with open(out / path.name, "rb+") as handle:
                    os.fsync(handle.fileno())
    return time.perf_counter() - start


def warm_page_cache(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        with path.open("rb") as handle:
            while chunk := handle.read(16 * MB):
                total += len(chunk)
    return total


def benchmark(workdir: Path, args: argparse.Namespace) -> None:
    teacher = workdir / f"teacher-{args.dtype}-{args.hidden}-{args.layers}-{args.ffn}-{args.vocab}"
    if not (teacher / "config.json").is_file():
        print(f"building the teacher in {teacher} ...", flush=True)
        build_teacher(teacher, args)
    shards = sorted(teacher.glob("*.safetensors"))
    size = warm_page_cache(teacher)
    print(f"teacher: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab "
          f"{args.vocab}, {args.dtype}, untied; {size / MB:.0f} MB in {len(shards)} shards")
    print(f"prune to ratio {args.ratio} of the parameters; {args.repeats} interleaved repeats "
          f"(medians), each prune in a fresh process")

    copies, synced, prunes, unsynced = [], [], [], []
    out = workdir / "out"
    for _ in range(args.repeats):
        for fsync, times in ((False, copies), (True, synced)):
            shutil.rmtree(out, ignore_errors=True)
            times.append(copy_files(teacher, out, fsync))
        for no_fsync, runs in ((False, prunes), (True, unsynced)):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_child(teacher, out, args.ratio, no_fsync))
    shutil.rmtree(out, ignore_errors=True)

    target = prunes[0]["target"]
    print(f"student: hidden {target['hidden']}, {target['layers']} layers, {target['heads']} heads"
          f" / {target['kv_heads']} kv, ffn {target['ffn']}")
    copy_s, synced_s = statistics.median(copies), statistics.median(synced)
    prune_s = statistics.median(p["seconds"] for p in prunes)
    unsynced_s = statistics.median(p["seconds"] for p in unsynced)
    largest = prunes[0]["largest_tensor_mb"]
    baseline = statistics.median(p["baseline_rss_mb"] for p in prunes)
    peak = statistics.median(p["peak_rss_mb"] for p in prunes)
    print(f"\n{'copy (shutil.copyfile)':<36}{copy_s:>9.2f} s  ({size / MB / copy_s:.0f} MB/s)")
    print(f"{'copy + fsync (durable)':<36}{synced_s:>9.2f} s")
    print(f"{'prune (as shipped: fsynced)':<36}{prune_s:>9.2f} s  "
          f"(wrote {prunes[0]['bytes_written'] / MB:.0f} MB)")
    print(f"{'prune with fsync disabled':<36}{unsynced_s:>9.2f} s")
    for label, ratio in (("prune / copy (issue's goal)", prune_s / copy_s),
                         ("prune / durable copy", prune_s / synced_s),
                         ("unsynced prune / copy", unsynced_s / copy_s)):
        print(f"{label:<36}{ratio:>9.2f} x  (goal <= {GOAL:.1f}x): "
              f"{'PASS' if ratio <= GOAL else 'MISS'}")
    print(f"{'largest tensor':<36}{largest:>9.1f} MB")
    print(f"{'child RSS after imports + plan':<36}{baseline:>9.1f} MB")
    print(f"{'child peak RSS':<36}{peak:>9.1f} MB")
    print(f"{'RSS increment during prune':<36}{peak - baseline:>9.1f} MB  "
          f"({(peak - baseline) / largest:.2f} x the largest tensor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="reuse this dir (the teacher is kept)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-fsync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.teacher, args.out, args.ratio, args.no_fsync)
    elif args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        benchmark(args.workdir, args)
    else:
        with tempfile.TemporaryDirectory(prefix="minima-prune-bench-") as workdir:
            benchmark(Path(workdir), args)


if __name__ == "__main__":
    main()
