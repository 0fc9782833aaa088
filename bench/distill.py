"""Benchmark `minima distill`'s training step against its compute floor and against TRL's
`GKDTrainer` on the same teacher, student, data, batch and precision.

Goals: minima step / floor <= 1.1x, and minima tokens/s / TRL tokens/s >= 1.7x.

Set-up (all built here, offline): a byte-level BPE tokenizer of --vocab tokens trained on real
text (Python's stdlib docstrings, bench/realtext.py), a random-weight LLaMA teacher (GQA, untied)
and a smaller random-weight student with the same vocabulary, saved as HF directories; the data
file is that real text. Precision fp32 by default: CPUs without AVX-512 bf16 / AMX units run
bf16 matmuls ~70x slower than fp32 (measured on the 2-core AMD EPYC this was written on), so
`--precision bf16` (minima's loop in bf16 autocast with a bf16 teacher, TRL with bf16=True, the
floor and plain loops in bf16 autocast) only finishes there on a tiny configuration.

Sides, interleaved per round (minima, floor, plain, TRL), medians of the rounds; every side's
time is per step over steps --warmup-steps+1..--steps (warm-up excluded). Every side steps
PyTorch's fused AdamW (`minima_cli.training.state.adamw`; TRL's default `adamw_torch_fused`):
- minima: `run_distill(...)` with alpha 0 (pure forward KL, TRL's GKD loss with beta 0), T = 1,
  no checkpoint, validation only after the last step. Steps are timed between the ends of its
  optimizer steps (a global optimizer-step hook: run_distill is not modified), so data, both
  forwards, loss, backward, clip, AdamW and logging all count; were the loop ever to run out of
  process, the difference of two run lengths' wall_time_s is used instead.
- floor: the same models and batches in a bare loop: teacher forward under no_grad (timed), then
  student forward, `logits.mean()` backward and an AdamW step (timed); the mean of steps
  --warmup-steps..--steps. This is the compute no distillation loop can avoid.
- plain (informational): a bare PyTorch loop with TRL's loss recipe (unchunked log_softmax on
  full logits, forward KL via autograd, clip, AdamW): what the Trainer's overhead is not.
- TRL: `GKDTrainer(lmbda=0, beta=0 (forward KL), seq_kd=False)` with the same batch, lr, clip,
  AdamW betas, seq_len, no eval, no saving, no logging, bf16 as --precision; timed between the
  ends of its steps (a TrainerCallback).

Run from the repository root (defaults: ~5 minutes on an idle 2-core CPU; on a shared one
--threads 1 keeps every parallel op from waiting for a descheduled second thread):

    .venv/bin/python bench/distill.py
    .venv/bin/python bench/distill.py --threads 1 --profile
    .venv/bin/python bench/distill.py --precision bf16 --hidden 128 --layers 2 \
        --student-hidden 64 --student-layers 2 --vocab 4096 --seq-len 64 --steps 4 --warmup-steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from realtext import real_documents, split_by_document, write_jsonl  # noqa: E402
from reference_losses import naive_kd_loss  # noqa: E402  (tests/reference_losses.py)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from minima_cli.data.streams import prepare_data  # noqa: E402
from minima_cli.model.checkpoint import (
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)  # noqa: E402,E501
from minima_cli.stages.configs import DistillConfig  # noqa: E402
from minima_cli.stages.distill import run_distill
from minima_cli.stages.tiny import train_tokenizer  # noqa: E402
from minima_cli.training.state import adamw, clip_gradients  # noqa: E402

STEP_GOAL = 1.1  # minima step / floor step, at most
TRL_GOAL = 1.7  # minima tokens/s / TRL tokens/s, at least
LR = 3e-4
BETAS = (0.9, 0.95)


# ---------------------------------------------------------------- set-up


def llama_config(vocab: int, hidden: int, layers: int, tokenizer, max_positions: int,
                 ) -> LlamaConfig:
    heads = max(2, hidden // 64)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=-(-(8 * hidden // 3) // 32) * 32,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        head_dim=hidden // heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_world(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Tokenizer, teacher, student (HF dirs) and the data file under `root`."""
    documents = real_documents(max_chars=args.text_chars)
    train, _ = split_by_document(documents, held_out=0.05)
    tokenizer = train_tokenizer(train, vocab_size=args.vocab,
                                model_max_length=max(256, args.seq_len))
    paths = {"data": write_jsonl(train, root / "train.jsonl")}
    for name, hidden, layers, seed in (("teacher", args.hidden, args.layers, 0),
                                       ("student", args.student_hidden, args.student_layers, 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(len(tokenizer), hidden, layers, tokenizer,
                                              max(256, args.seq_len)))
        with quiet_transformers():
            model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def load_pair(paths: dict[str, Path], device: torch.device | str = "cpu",
              ) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = load_model(resolve_model(paths["teacher"])).eval().requires_grad_(False)
    return teacher.to(device), load_model(resolve_model(paths["student"])).train().to(device)


def parameter_counts(paths: dict[str, Path]) -> tuple[int, int]:
    """(teacher, student) parameters; each model is loaded only to be counted."""
    teacher, student = (sum(p.numel() for p in load_model(resolve_model(paths[name])).parameters())
                        for name in ("teacher", "student"))
    return teacher, student


def student_tokenizer(paths: dict[str, Path]):
    return load_tokenizer(resolve_model(paths["student"]))


def train_blocks(paths: dict[str, Path], args: argparse.Namespace) -> torch.Tensor:
    """The training blocks run_distill sees, in a fixed order (int64 `[n, seq_len]`)."""
    prepared = prepare_data(str(paths["data"]), student_tokenizer(paths), seq_len=args.seq_len,
                            seed=0, valid_fraction=args.valid_fraction)
    return torch.cat([blocks[:] for blocks in prepared.train]).long()


def bench_device(args: argparse.Namespace) -> torch.device:
    """Where the bench's own sides (floor, plain, TRL) run: --device (bench/mfu.py), else the
    CPU."""
    return torch.device(getattr(args, "device", "cpu"))


def use_device(device: torch.device) -> None:
    """Make minima's own sides run where the bench's do: run_distill's LocalSession takes
    `training.loop.default_device()` (the GPU when there is one), so it is pinned to `device`
    for this process, and a `cuda:N` becomes the current GPU (TRL's Trainer and
    `minima cache-teacher` take the current one)."""
    import minima_cli.training.loop as loop

    if device.type == "cuda":
        torch.cuda.set_device(device)
    loop.default_device = lambda: device


def checked_device(parser: argparse.ArgumentParser, device: str) -> str:
    """--device resolved (auto: the GPU when there is one), or the parser's error and exit 2."""
    from minima_cli.errors import MinimaError
    from minima_cli.runtime import resolve_device

    try:
        return resolve_device(device)
    except MinimaError as error:
        parser.error(str(error))


def autocast(precision: str, device: torch.device | str = "cpu",
             ) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work before a clock is read (its kernels run asynchronously);
    nothing on the CPU. With no device: whenever this process has started CUDA."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the sides


@contextlib.contextmanager
def step_clock() -> Iterator[list[float]]:
    """perf_counter() after every optimizer step taken in this process while inside (after
    the GPU's queue drains, on CUDA)."""
    ends: list[float] = []

    def stamp(*_) -> None:
        synchronize()
        ends.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(stamp)
    try:
        yield ends
    finally:
        handle.remove()


def minima_run(paths: dict[str, Path], out: Path, steps: int, args: argparse.Namespace
               ) -> tuple[float, list[float]]:
    """One run_distill of `steps` steps: (its wall_time_s, the times its optimizer steps ended)."""
    config = DistillConfig(loss="fkl", alpha=0.0, temperature=1.0, seq_len=args.seq_len,
                           batch_size=args.batch_size, lr=LR, max_steps=steps,
                           save_every=10 * steps, eval_every=10 * steps,
                           valid_fraction=args.valid_fraction, seed=0,
                           precision=args.precision)  # bf16: autocast, teacher in bf16
    with step_clock() as ends:
        manifest = run_distill(teacher_path=str(paths["teacher"]),
                               student_path=str(paths["student"]), data=str(paths["data"]),
                               output=out, config=config, force=True, progress=False)
    return float(manifest["wall_time_s"]), ends


def minima_seconds(paths: dict[str, Path], root: Path, args: argparse.Namespace) -> float:
    """Seconds per minima step, steps --warmup-steps+1..--steps: between optimizer-step ends
    (data, forwards, loss, backward, clip, AdamW, logging: everything a step does). If the loop
    runs its steps out of this process (no hook fires), the difference of two run lengths'
    wall_time_s instead, which cancels the warm-up steps and the final validation."""
    wall, ends = minima_run(paths, root / "m-long", args.steps, args)
    if len(ends) == args.steps:
        return (ends[-1] - ends[args.warmup_steps - 1]) / (args.steps - args.warmup_steps)
    short, _ = minima_run(paths, root / "m-short", args.warmup_steps, args)
    return (wall - short) / (args.steps - args.warmup_steps)


def batches(blocks: torch.Tensor, args: argparse.Namespace) -> Iterator[torch.Tensor]:
    device = bench_device(args)
    for step in range(args.steps):
        rows = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(blocks)
        yield blocks[rows].to(device)


def floor_seconds(paths, blocks, args) -> tuple[float, float]:
    """(teacher forward, student forward+backward+AdamW) seconds per step, steps after warm-up."""
    device = bench_device(args)
    teacher, student = load_pair(paths, device)
    optimizer = adamw([{"params": list(student.parameters())}], LR)
    t_times, s_times = [], []
    with autocast(args.precision, device):
        for batch in batches(blocks, args):
            synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                teacher(input_ids=batch).logits.sum().item()
            middle = time.perf_counter()
            student(input_ids=batch).logits.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            t_times.append(middle - start)
            s_times.append(time.perf_counter() - middle)
    skip = args.warmup_steps
    return statistics.mean(t_times[skip:]), statistics.mean(s_times[skip:])


def plain_seconds(paths, blocks, args) -> float:
    """Seconds per step of a bare loop with TRL's unchunked forward-KL recipe."""
    device = bench_device(args)
    teacher, student = load_pair(paths, device)
    optimizer = adamw([{"params": list(student.parameters())}], LR)
    times = []
    with autocast(args.precision, device):
        for batch in batches(blocks, args):
            synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
            student_logits = student(input_ids=batch).logits
            naive_kd_loss(student_logits[:, :-1], teacher_logits[:, :-1]).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.mean(times[args.warmup_steps:])


def trl_seconds(paths, blocks, out: Path, args) -> float:
    """Seconds per step of TRL's GKDTrainer between the ends of the warm-up and the last step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_args, **_kwargs) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    device = bench_device(args)
    teacher, student = load_pair(paths)  # the Trainer places them (use_cpu below)
    n = args.steps * args.batch_size
    rows = blocks[torch.arange(n) % len(blocks)]
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    config = GKDConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR,
        optim="adamw_torch_fused", adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8,
        weight_decay=0.1,
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0,
        lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=args.seq_len,
        bf16=args.precision == "bf16", fp16=False, use_cpu=device.type == "cpu", seed=0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        # TRL turns activation checkpointing on by default; minima and the floor keep
        # activations, so the comparison does too
        gradient_checkpointing=False,
    )
    clock = StepClock()
    with quiet_transformers():
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                             train_dataset=dataset, data_collator=collate,
                             processing_class=student_tokenizer(paths),
                             callbacks=[clock])
        trainer.train()
    ends = clock.ends
    if len(ends) != args.steps:
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {args.steps}")
    return (ends[-1] - ends[args.warmup_steps - 1]) / (args.steps - args.warmup_steps)


def interleaved(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Run the sides in turn, `repeats` rounds, each round starting one side later (A B C,
    B C A, ...) so that a load trend on a shared machine favours no side: every round's result."""
    results: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            results[name].append(sides[name]())
        print(f"  round {round_ + 1}/{repeats} done (load average {os.getloadavg()[0]:.1f})",
              flush=True)
    return results


def paired(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio: the sides of one round ran minutes apart at
    most, so a ratio within a round cancels most of the load of other processes."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


# ---------------------------------------------------------------- profile


def profile_minima_step(paths, blocks, args) -> None:
    """Where a minima-style step's time goes: its loop body with timing sections."""
    from minima_cli.losses import distillation_loss

    device = bench_device(args)
    teacher, student = load_pair(paths, device)
    optimizer = adamw([{"params": list(student.parameters())}], LR)
    vocab = len(student_tokenizer(paths))
    sections: dict[str, list[float]] = {}

    def lap(name: str, start: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        sections.setdefault(name, []).append(now - start)
        return now

    with autocast(args.precision, device):
        for batch in batches(blocks, args):
            t = time.perf_counter()
            labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
            t = lap("teacher forward", t)
            student_logits = student(input_ids=batch).logits
            t = lap("student forward", t)
            loss, _ = distillation_loss(student_logits, teacher_logits, labels, alpha=0.0,
                                        vocab_size=vocab)
            t = lap("KD loss (forward computes the gradient)", t)
            loss.backward()
            t = lap("student backward", t)
            clip_gradients(list(student.parameters()), 1.0)
            t = lap("clip", t)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lap("AdamW step", t)
    total = sum(statistics.mean(v[args.warmup_steps:]) for v in sections.values())
    print("\nminima step body, timed sections (mean of steps after warm-up):")
    for name, values in sections.items():
        seconds = statistics.mean(values[args.warmup_steps:])
        print(f"  {name:<42}{seconds:>8.3f} s {seconds / total:>7.1%}")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384, help="teacher hidden size")
    parser.add_argument("--layers", type=int, default=6, help="teacher layers")
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary to train")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="first steps of every run left out of its time")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N; auto: the GPU when there is one (every side)")
    parser.add_argument("--text-chars", type=int, default=1_500_000,
                        help="characters of real text (tokenizer training and data)")
    parser.add_argument("--valid-fraction", type=float, default=0.002)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="also time the sections of a minima-style step")
    args = parser.parse_args()
    if not 0 < args.warmup_steps < args.steps:
        parser.error("need 0 < --warmup-steps < --steps")
    args.device = checked_device(parser, args.device)
    use_device(torch.device(args.device))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        paths = build_world(root, args)
        blocks = train_blocks(paths, args)
        n_t, n_s = parameter_counts(paths)
        tokens = args.batch_size * args.seq_len
        print(f"teacher: hidden {args.hidden}, {args.layers} layers, {n_t / 1e6:.1f}M params; "
              f"student: hidden {args.student_hidden}, {args.student_layers} layers, "
              f"{n_s / 1e6:.1f}M params; vocab {len(student_tokenizer(paths))} (GQA, untied)")
        print(f"batch {args.batch_size} x {args.seq_len} = {tokens} tokens/step, {args.precision}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; steps "
              f"{args.warmup_steps + 1}..{args.steps} timed, {args.repeats} interleaved rounds")

        sides: dict[str, Callable[[], object]] = {
            "minima": lambda: minima_seconds(paths, root, args),
            "floor": lambda: floor_seconds(paths, blocks, args),
            "plain": lambda: plain_seconds(paths, blocks, args),
        }
        if not args.skip_trl:
            sides["trl"] = lambda: trl_seconds(paths, blocks, root / "trl", args)
        results = interleaved(sides, args.repeats)
        if args.profile:
            profile_minima_step(paths, blocks, args)

    minima_rounds = results["minima"]
    minima = statistics.median(minima_rounds)
    teacher_fwd = statistics.median(t for t, _ in results["floor"])
    student_step = statistics.median(s for _, s in results["floor"])
    floor = statistics.median(t + s for t, s in results["floor"])
    rows = [("minima distill (run_distill)", minima, minima_rounds),
            ("floor: teacher fwd + student fwd/bwd/AdamW", floor,
             [t + s for t, s in results["floor"]]),
            ("  teacher forward (no_grad)", teacher_fwd, [t for t, _ in results["floor"]]),
            ("  student forward + backward + AdamW", student_step,
             [s for _, s in results["floor"]]),
            ("plain loop, unchunked KD (TRL's loss)", statistics.median(results["plain"]),
             results["plain"])]
    if "trl" in results:
        rows.append(("TRL GKDTrainer", statistics.median(results["trl"]), results["trl"]))
    print(f"\n{'side':<46}{'s/step':>8}{'tokens/s':>10}   rounds (s/step)")
    for name, seconds, rounds in rows:
        print(f"{name:<46}{seconds:>8.3f}{tokens / seconds:>10.0f}   "
              + " ".join(f"{r:.3f}" for r in rounds))

    floors = [t + s for t, s in results["floor"]]
    print("\nratios: median over rounds of the ratio within each round (medians of the times "
          "above in brackets)")
    verdicts = []
    ratio = paired(minima_rounds, floors)
    verdicts.append(ratio <= STEP_GOAL)
    print(f"minima step / floor            {ratio:6.3f}x [{minima / floor:.3f}x] "
          f"(goal <= {STEP_GOAL}x): {'PASS' if ratio <= STEP_GOAL else 'MISS'}")
    if "trl" in results:
        trl = statistics.median(results["trl"])
        speedup = paired(results["trl"], minima_rounds)
        verdicts.append(speedup >= TRL_GOAL)
        print(f"minima tokens/s / TRL tokens/s {speedup:6.3f}x [{trl / minima:.3f}x] "
              f"(goal >= {TRL_GOAL}x): {'PASS' if speedup >= TRL_GOAL else 'MISS'}")
        print(f"  informational: floor / TRL {paired(results['trl'], floors):.3f}x (the best "
              f"any loop can do), plain loop / TRL {paired(results['trl'], results['plain']):.3f}x")
    print("PASS" if all(verdicts) else "MISS", f"({args.precision})")
    if not all(math.isfinite(r[1]) for r in rows):
        raise SystemExit("a side produced no time")


if __name__ == "__main__":
    main()
