"""`minima distill`: knowledge distillation from a full teacher into a (pruned) student.

Single process for now (CPU or one GPU); accelerate/DeepSpeed ZeRO come next. Per micro-batch:
teacher forward under no_grad, student forward, the chunked loss
`alpha * CE + (1 - alpha) * KD` (losses.py), backward; every `grad_accum` micro-batches a
clipped AdamW step on the warmup + cosine schedule. The run directory `OUTPUT.run/` holds the
checkpoints (every `save_every` steps, the last `keep_last` kept) and `log.jsonl`; `--resume`
continues from the newest checkpoint exactly (weights, optimizer, RNGs, data position). The final
student is written atomically to OUTPUT as a standard HF directory, then the run dir is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.arch import shape_from_config
from minima_cli.checkpoint import (
    atomic_output_dir,
    check_output,
    copy_tokenizer_files,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    quiet_transformers,
    resolve_model,
    write_manifest,
)
from minima_cli.data import prepare_data
from minima_cli.errors import MinimaError
from minima_cli.losses import distillation_loss
from minima_cli.progress import step_progress
from minima_cli.train_state import (
    evaluate_loss,
    learning_rate,
    list_checkpoints,
    load_training_checkpoint,
    parameter_groups,
    save_training_checkpoint,
)

LOSSES = ("fkl", "rkl", "jsd")


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a run (its hash guards --resume)."""

    loss: str = "fkl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.01
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip: float = 1.0
    max_steps: int = 100
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 50
    valid_fraction: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise MinimaError(f"unknown loss {self.loss!r}: choose {', '.join(LOSSES)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every",
                     "eval_every"):
            if getattr(self, name) <= 0:
                raise MinimaError(f"--{name.replace('_', '-')} must be positive, "
                                  f"got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise MinimaError("--lr and --temperature must be positive")
        if not 0 <= self.alpha <= 1:
            raise MinimaError(f"--alpha {self.alpha} must be in [0, 1]")

    def fingerprint(self) -> str:
        # keep_last/save_every/eval_every change no weights: a resume may alter them
        changing = {k: v for k, v in asdict(self).items()
                    if k not in ("keep_last", "save_every", "eval_every")}
        return hashlib.sha256(json.dumps(changing, sort_keys=True).encode()).hexdigest()[:16]


def check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """Distillation compares distributions token by token: the vocabularies must be the same
    (padded embedding rows beyond it are fine; losses.py ignores them)."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise MinimaError("teacher and student tokenizers differ: distillation needs one "
                          "tokenizer (the same vocabulary)")
    for name in ("eos_token", "bos_token", "pad_token"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise MinimaError(f"teacher and student tokenizers differ in {name}")


def run_distill(*, teacher_path: str, student_path: str, data: str, output: Path,
                config: DistillConfig, resume: bool = False, force: bool = False,
                progress: bool = True, text_field: str = "text") -> dict[str, Any]:
    config.check()
    check_output(output, force)
    run_dir = output.with_name(f"{output.name}.run")
    if run_dir.exists() and not resume and list_checkpoints(run_dir / "checkpoints"):
        raise MinimaError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to "
                          "continue it, or delete it")
    teacher_src, student_src = resolve_model(teacher_path), resolve_model(student_path)
    student_config = load_config(student_src)
    max_positions = getattr(student_config, "max_position_embeddings", None)
    if max_positions and config.seq_len > max_positions:
        raise MinimaError(f"--seq-len {config.seq_len} exceeds the student's {max_positions} "
                          "positions")
    tokenizer = load_tokenizer(student_src)
    check_same_tokenizer(load_tokenizer(teacher_src), tokenizer)
    prepared = prepare_data(data, tokenizer, seq_len=config.seq_len, seed=config.seed,
                            valid_fraction=config.valid_fraction, text_field=text_field,
                            cache_dir=run_dir / "token-cache")
    torch.manual_seed(config.seed)
    teacher = load_model(teacher_src).eval().requires_grad_(False)
    student = load_model(student_src).train()
    vocab_size = len(tokenizer)
    optimizer = torch.optim.AdamW(parameter_groups(student, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    stream = prepared.stream(config.batch_size)
    run_id = {"config": config.fingerprint(), "data": prepared.fingerprint,
              "student": model_fingerprint(student_src), "teacher": model_fingerprint(teacher_src)}
    first_step = 0
    if resume:
        state = load_training_checkpoint(run_dir / "checkpoints", student, optimizer)
        if state.get("run_id") != run_id:
            raise MinimaError("--resume: the checkpoint belongs to a different run (config, data "
                              "or models differ)")
        stream.load_state_dict(state["data"])
        first_step = state["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "log.jsonl").open("a")
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    with step_progress("distill", config.max_steps, enabled=progress,
                       loss=float("nan")) as bar:
        for step in range(first_step, config.max_steps):
            lr = learning_rate(step, peak=config.lr, total_steps=config.max_steps,
                               warmup_steps=warmup, schedule=config.schedule,
                               min_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ce_sum = kd_sum = 0.0
            for _ in range(config.grad_accum):
                batch = next(stream)
                labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], 1)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
                student_logits = student(input_ids=batch).logits
                loss, parts = distillation_loss(
                    student_logits, teacher_logits, labels, alpha=config.alpha,
                    kind=config.loss, temperature=config.temperature, beta=config.beta,
                    vocab_size=vocab_size)
                (loss / config.grad_accum).backward()
                ce_sum += parts["ce"].item() / config.grad_accum
                kd_sum += parts["kd"].item() / config.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            record = {"step": done, "lr": lr, "ce": ce_sum, "kd": kd_sum,
                      "loss": config.alpha * ce_sum + (1 - config.alpha) * kd_sum,
                      "grad_norm": float(grad_norm)}
            if done % config.eval_every == 0 or done == config.max_steps:
                record["valid_loss"] = evaluate_loss(student, prepared.valid, config.batch_size)
                student.train()
                record["valid_perplexity"] = math.exp(record["valid_loss"])
                metrics.update(valid_loss=record["valid_loss"],
                               valid_perplexity=record["valid_perplexity"])
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(tokens_per_step, loss=record["loss"])
            if done % config.save_every == 0 and done < config.max_steps:
                save_training_checkpoint(run_dir / "checkpoints", student, optimizer, done,
                                         {"run_id": run_id, "data": stream.state_dict()},
                                         config.keep_last)
    log.close()
    seconds = time.perf_counter() - start
    with atomic_output_dir(output, force=force) as tmp:
        with quiet_transformers():
            student.save_pretrained(tmp)
        copy_tokenizer_files(student_src, tmp)
        shutil.copy2(run_dir / "log.jsonl", tmp / "log.jsonl")
        manifest = write_manifest(
            tmp, "distill",
            inputs={"teacher": {"path": str(teacher_src), "fingerprint": run_id["teacher"]},
                    "student": {"path": str(student_src), "fingerprint": run_id["student"]},
                    "data": prepared.summary()},
            config=asdict(config), student_shape=shape_from_config(student.config).as_dict(),
            metrics={**metrics, "steps": config.max_steps,
                     "tokens": config.max_steps * tokens_per_step}, wall_time_s=seconds)
    shutil.rmtree(run_dir, ignore_errors=True)
    return manifest
