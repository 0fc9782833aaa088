"""`minima schedule`: MiniDisc's teacher-assistant schedule (outputs: docs/stages.md).

A large teacher distils badly into a much smaller student (the capacity gap); an assistant of
intermediate size in between can help: teacher -> assistant -> student. MiniDisc picks the
assistant without distilling every candidate:

1. Candidates are the teacher pruned to sparsities s in {0, 10, ..., 90} u {85, 95} % (only those
   less sparse than the student count), all from one score ranking and *nested*: a narrower
   candidate's kept units are a subset of every wider one's, so one shared-weight network runs as
   any candidate through 0/1 masks (model/masks.py), and the student is a subset of every candidate.
2. The sandwich: one copy of the teacher's weights is trained once; each step, every candidate
   width (or, with `widths_per_step`, the largest, the smallest and random others, as sandwich
   rules do) runs under its masks against the frozen full teacher, and the step minimises the mean
   of their distillation losses. Each candidate's dev metric P is then read off under its masks.
3. The choice: argmax over candidates of the lambda-trade-off `P + lambda * s` (lambda 0.2),
   s = 1 - size / teacher size. The teacher (s = 0) means: distil directly.
4. The chain: the assistant is the teacher pruned to its units and distilled from the teacher; the
   student is the distilled assistant pruned further to the student's units (nesting makes this a
   plain slice) and distilled from the assistant. Every distillation is `minima distill`'s loop
   with the same budget. `exhaustive` runs every candidate's chain (MaxiDisc) to check the choice.

The dev metric P = exp(-dev loss), i.e. 1 / perplexity: the geometric mean of the probability the
model gives each dev token. It lies in (0, 1] as the trade-off needs, is monotone in the loss that
distillation optimises, and needs no task labels, so any text corpus gives it.

Pure pieces (candidate sparsities, nested shapes, the selection rule, rank correlations, plans in
a pruned model's coordinates) come first; the sandwich loop and the I/O after them.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.pack import pack_documents
from minima_cli.data.read import read_documents
from minima_cli.data.streams import prepare_data
from minima_cli.data.tokenize import tokenize_documents
from minima_cli.errors import MinimaError
from minima_cli.fsutil import atomic_output_dir, check_output, write_manifest
from minima_cli.losses import distillation_loss, next_token_labels
from minima_cli.minidisc import (
    DEFAULT_LAMBDA,
    DEFAULT_SPARSITIES,
    candidate_shapes,
    check_lambda,
    choose_assistant,
    dev_metric,
    kendall,
    parse_sparsities,
    relative_plan,
    sandwich_widths,
    sparsity,
    spearman,
)
from minima_cli.model.arch import ModelShape, count_parameters, shape_from_config
from minima_cli.model.checkpoint import (
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from minima_cli.model.masks import Masks, masked
from minima_cli.model.scores import load_scores
from minima_cli.model.selection import PrunePlan, check_scores_match, plan_masks, plan_prune
from minima_cli.model.shapes import resolve_target
from minima_cli.model.slicing import prune_checkpoint
from minima_cli.progress import step_progress
from minima_cli.stages import RunControl
from minima_cli.stages.configs import SANDWICH_LOSSES, DistillConfig, ScheduleConfig
from minima_cli.training.loop import LocalSession, LossFn, autocast, load_teacher, optimizer_step
from minima_cli.training.state import adamw, evaluate_loss, learning_rate, parameter_groups
from minima_cli.units import format_count


def sandwich_loss(shape: ModelShape, batch: torch.Tensor, teacher_logits: torch.Tensor,
                  config: DistillConfig, vocab_size: int) -> LossFn:
    """The loss function of one sandwich step, whose micro-batches are the step's widths: the
    distillation loss of the model run under a width's masks on `batch`. The shared optimizer
    step averages it over the widths and backpropagates each width as soon as its loss is
    known, so one graph is alive at a time."""
    labels = next_token_labels(batch)

    def loss_fn(model: torch.nn.Module, masks: Masks) -> tuple[torch.Tensor, dict[str, Any]]:
        with masked(model, masks, shape):
            loss, _ = distillation_loss(
                model(input_ids=batch).logits, teacher_logits, labels, alpha=config.alpha,
                kind=config.loss, temperature=config.temperature, beta=config.beta,
                vocab_size=vocab_size)
        return loss, {}

    return loss_fn


def sandwich_step(session: LocalSession, network: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, teacher: torch.nn.Module, shape: ModelShape,
                  widths: Sequence[Masks], batch: torch.Tensor, config: DistillConfig,
                  vocab_size: int, lr: float) -> tuple[float, list[float]]:
    """One sandwich step on the session's device and precision: the frozen teacher's logits for
    `batch`, then one optimizer step (learning rate `lr`, clipping at `config.clip`) on the mean
    over `widths` of the distillation losses; returns (mean loss, per-width losses)."""
    batch = batch.to(session.device)
    with torch.no_grad(), autocast(session, session.precision == "bf16"):
        teacher_logits = teacher(input_ids=batch).logits
    stats = optimizer_step(session, network, optimizer,
                           sandwich_loss(shape, batch, teacher_logits, config, vocab_size),
                           widths, grad_accum=len(widths), lr=lr, clip=config.clip)
    return sum(stats.losses) / len(stats.losses), stats.losses


def train_sandwich(network: torch.nn.Module, teacher: torch.nn.Module, shape: ModelShape,
                   widths: Sequence[Masks], batches: Any, config: DistillConfig,
                   vocab_size: int, widths_per_step: int = 0, progress: bool = False, *,
                   device: torch.device | str | None = None,
                   precision: str = "auto") -> list[float]:
    """Train the shared `network` (a copy of the teacher) for `config.max_steps` sandwich steps
    with `minima distill`'s optimiser (AdamW and its parameter groups, warmup + decay, clipping
    at `config.clip`, 0: none) on `device` (default: the GPU if there is one) in `precision`
    (bf16: autocast); returns the mean loss of every step. `batches` yields `[batch, seq_len]`
    token blocks; `network` and `teacher` are moved to the device."""
    session = LocalSession(precision, device)
    optimizer = adamw(parameter_groups(network, config.weight_decay), config.lr)
    network, optimizer = session.prepare(network, optimizer)
    teacher = session.prepare_teacher(teacher)
    widths = [masks.to(session.device) for masks in widths]
    warmup = math.ceil(config.warmup_ratio * config.max_steps)
    rng = random.Random(config.seed)
    history = []
    network.train()
    with step_progress("sandwich", config.max_steps, enabled=progress,
                       loss=float("nan")) as bar:
        for step in range(config.max_steps):
            lr = learning_rate(step, peak=config.lr, total_steps=config.max_steps,
                               warmup_steps=warmup, schedule=config.schedule,
                               min_ratio=config.min_lr_ratio)
            batch = next(batches)
            chosen = [widths[i] for i in sandwich_widths(len(widths), widths_per_step, rng)]
            loss, _ = sandwich_step(session, network, optimizer, teacher, shape, chosen, batch,
                                    config, vocab_size, lr)
            history.append(loss)
            bar.update(batch.numel(), loss=loss)
    network.eval()
    return history


def masked_dev_loss(model: torch.nn.Module, shape: ModelShape, masks: Masks,
                    dev: torch.Tensor, batch_size: int) -> float:
    with masked(model, masks, shape):
        return evaluate_loss(model, dev, batch_size)


@dataclass
class Candidate:
    """One assistant candidate: the teacher pruned by `plan` (the teacher itself at s = 0)."""

    asked: float  # the grid sparsity it was solved for
    shape: ModelShape
    plan: PrunePlan
    params: int
    sparsity: float  # actual: 1 - params / teacher params

    def row(self) -> dict[str, Any]:
        return {"asked_sparsity": self.asked, "sparsity": self.sparsity, "params": self.params,
                "shape": shape_widths(self.shape)}


def shape_widths(shape: ModelShape) -> dict[str, int]:
    return {axis: getattr(shape, axis) for axis in ("layers", "hidden", "heads", "kv_heads", "ffn")}


def build_candidates(scores: dict[str, torch.Tensor], teacher: ModelShape, student: ModelShape,
                     sparsities: Sequence[float]) -> tuple[list[Candidate], PrunePlan]:
    """Nested candidates (widest first) and the student's plan, all from one ranking: local
    priority, layers by score, so a narrower width keeps a prefix of the same ranking."""
    total = count_parameters(teacher)

    def plan(shape: ModelShape) -> PrunePlan:
        return plan_prune(scores, teacher, shape, priority="local", layer_selection="score")

    candidates = [Candidate(s, shape, plan(shape), count_parameters(shape),
                            sparsity(count_parameters(shape), total))
                  for s, shape in candidate_shapes(teacher, student, sparsities)]
    student_plan = plan(student)
    for outer, inner in zip(candidates, [*candidates[1:], None], strict=True):
        relative_plan(outer.plan, inner.plan if inner else student_plan)  # raises unless nested
    return candidates, student_plan


def materialise(source: ModelSource, plan: PrunePlan, out: Path) -> Path:
    """Write the model at `source` pruned by `plan` (in that model's coordinates) to `out`."""
    config = load_config(source)
    prune_checkpoint(source, config, plan, shape_from_config(config), out, progress=False)
    return out


def model_dev_loss(path: Path, dev: torch.Tensor, batch_size: int = 64) -> float:
    return evaluate_loss(load_model(resolve_model(path)), dev, batch_size)


def stores_of(prepared: Any) -> list[dict[str, Any]]:
    """The prepared sources as the token stores they are read from (a raw source's store in the
    run's cache), with their weights: the same blocks, split and mix for a distillation given
    them as `--data`, without tokenising the text again."""
    return [{"path": str(blocks.store.path), "weight": source.weight}
            for source, blocks in zip(prepared.sources, prepared.train, strict=True)]


def distil_chain(teacher: ModelSource, candidate: Candidate, student_plan: PrunePlan,
                 data: str | list[dict[str, Any]], config: DistillConfig, work: Path,
                 dev: torch.Tensor, *, progress: bool, text_field: str) -> dict[str, Any]:
    """teacher -> candidate -> student (or teacher -> student for the teacher itself), each
    stage a `minima distill` run of `config`; returns dev losses, runs, seconds, paths."""
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"runs": 0}
    source, plan = teacher, student_plan
    if candidate.sparsity > 0:
        assistant = work / "assistant"
        distil(config, teacher=str(teacher),
               student=str(materialise(teacher, candidate.plan, work / "assistant-init")),
               data=data, output=assistant, progress=progress, text_field=text_field)
        shutil.rmtree(work / "assistant-init")
        result.update(assistant=assistant, runs=1,
                      assistant_dev_loss=model_dev_loss(assistant, dev, config.batch_size))
        source, plan = resolve_model(assistant), relative_plan(candidate.plan, student_plan)
    student = work / "student"
    distil(config, teacher=str(source),
           student=str(materialise(source, plan, work / "student-init")), data=data,
           output=student, progress=progress, text_field=text_field)
    shutil.rmtree(work / "student-init")
    result.update(student=student, runs=result["runs"] + 1,
                  student_dev_loss=model_dev_loss(student, dev, config.batch_size),
                  seconds=time.perf_counter() - start)
    return result


def distil(config: DistillConfig, *, teacher: str, student: str,
           data: str | list[dict[str, Any]], output: Path,
           progress: bool, text_field: str) -> None:
    """One `minima distill` run, called through the stage registry (stages never import each
    other)."""
    from minima_cli.stages import RunControl, run_stage

    run_stage("distill", replace(config, teacher=teacher, student=student, data=data,
                                 output=str(output), text_field=text_field),
              RunControl(progress=progress))


def stage_config(config: DistillConfig) -> DistillConfig:
    """A chain stage's distillation: no mid-run checkpoints and one validation at the end (a
    stage is rerun whole, never resumed)."""
    return replace(config, save_every=config.max_steps, eval_every=config.max_steps)


def dev_blocks(dev_data: str | None, prepared: Any, tokenizer: Any, seq_len: int,
               text_field: str) -> torch.Tensor:
    """The dev set P is measured on: `dev_data` packed into seq_len blocks, or the validation
    split `minima distill` holds out of the training data."""
    if dev_data is None:
        blocks = prepared.valid
    else:
        ids = tokenize_documents(tokenizer, read_documents(dev_data, text_field))
        blocks = pack_documents(ids, seq_len, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise MinimaError(f"the dev data has less than one block of --seq-len {seq_len} tokens")
    return blocks


def resolve_student(teacher: ModelShape, ratio: float | None, params: str | None) -> ModelShape:
    from minima_cli.laws import parse_params

    if (ratio is None) == (params is None):
        raise MinimaError("give exactly one of --student-ratio and --student-params")
    if params is not None:
        return resolve_target(teacher, params=round(parse_params(params, "--student-params")))
    return resolve_target(teacher, ratio=ratio)


def run_schedule(*, teacher_path: str, scores_path: str, data: str, output: Path,
                 student_ratio: float | None = None, student_params: str | None = None,
                 lam: float = DEFAULT_LAMBDA, sparsities: Sequence[float] = (),
                 sandwich_steps: int = 100, widths_per_step: int = 0,
                 config: DistillConfig | None = None, dev_data: str | None = None,
                 exhaustive: bool = False, plan_only: bool = False, force: bool = False,
                 progress: bool = True, text_field: str = "text") -> dict[str, Any]:
    """Schedule (and unless `plan_only`, run) the distillation chain into `output`:
    `schedule.json`, `minima.json`, `student/` and, when an assistant wins, `assistant/`.
    `config` is every distillation's (`max_steps` each); the sandwich shares its optimiser
    settings for `sandwich_steps` steps."""
    config = stage_config(config or DistillConfig())
    config.check()
    if config.loss not in SANDWICH_LOSSES:  # the sandwich compares full teacher distributions
        raise MinimaError(f"--loss {config.loss}: schedule uses {', '.join(SANDWICH_LOSSES)}")
    check_lambda(lam)
    if sandwich_steps <= 0:
        raise MinimaError(f"--sandwich-steps must be positive, got {sandwich_steps}")
    sandwich_widths(3, widths_per_step, random.Random(0))  # rejects 1 before the slow work
    if exhaustive and plan_only:
        raise MinimaError("--exhaustive distils every candidate: it cannot be --plan-only")
    grid = list(sparsities) or [s / 100 for s in DEFAULT_SPARSITIES]
    check_output(output, force)
    source = resolve_model(teacher_path)
    scores, score_manifest = load_scores(scores_path)
    teacher_shape = shape_from_config(load_config(source))
    check_scores_match(scores, score_manifest, source, teacher_shape)
    student_shape = resolve_student(teacher_shape, student_ratio, student_params)
    candidates, student_plan = build_candidates(scores, teacher_shape, student_shape, grid)
    total = count_parameters(teacher_shape)
    student_sparsity = sparsity(count_parameters(student_shape), total)
    tokenizer = load_tokenizer(source)
    # raw text is tokenised once into OUTPUT.token-cache/ (kept, as cache-teacher keeps its own),
    # and every distillation of the chain reads those stores instead of tokenising again
    prepared = prepare_data(data, tokenizer, seq_len=config.seq_len, seed=config.seed,
                            valid_fraction=config.valid_fraction, text_field=text_field,
                            cache_dir=output.with_name(f"{output.name}.token-cache"))
    chain_data = stores_of(prepared)
    dev = dev_blocks(dev_data, prepared, tokenizer, config.seq_len, text_field)

    started = time.perf_counter()
    losses, history = sandwich_dev_losses(source, teacher_shape, candidates, prepared, dev,
                                          replace(config, max_steps=sandwich_steps),
                                          len(tokenizer), widths_per_step, progress)
    sandwich_seconds = time.perf_counter() - started
    metrics = [dev_metric(loss) for loss in losses]
    chosen, values = choose_assistant([c.sparsity for c in candidates], metrics, lam,
                                      student_sparsity)
    report: dict[str, Any] = {
        "teacher": {"path": str(source), "params": total, "P": metrics[0]},
        "student": {"params": count_parameters(student_shape), "sparsity": student_sparsity,
                    "shape": shape_widths(student_shape)},
        "lambda": lam, "metric": "P = exp(-dev loss) = 1 / dev perplexity",
        "candidates": [{**c.row(), "dev_loss": loss, "P": p, "tradeoff": t, "chosen": i == chosen}
                       for i, (c, loss, p, t) in enumerate(zip(candidates, losses, metrics,
                                                               values, strict=True))],
        "chosen": chosen,
        "schedule": ["teacher", *([f"assistant (s={100 * candidates[chosen].sparsity:.1f}%)"]
                                  if chosen else []), "student"],
        "sandwich": {"steps": sandwich_steps, "runs": 1, "seconds": sandwich_seconds,
                     "widths_per_step": widths_per_step or len(candidates),
                     "first_loss": history[0], "last_loss": history[-1]},
        "skipped_sparsities": [s for s in grid if s >= student_sparsity],
    }
    with atomic_output_dir(output, force=force) as tmp:
        if not plan_only:
            work = tmp / "work"

            def chain(i: int) -> dict[str, Any]:
                return distil_chain(source, candidates[i], student_plan, chain_data, config,
                                    work / f"c{i}", dev, progress=progress,
                                    text_field=text_field)

            if exhaustive:
                chains = []
                for i in range(len(candidates)):
                    chains.append(chain(i))
                    if i != chosen:  # only the chosen chain's models are kept
                        shutil.rmtree(work / f"c{i}")
                report["exhaustive"] = exhaustive_report(candidates, chains, values, metrics,
                                                         chosen)
                result = chains[chosen]  # the very computation the chosen schedule runs
            else:
                result = chain(chosen)
            for name in ("assistant", "student"):
                if name in result:
                    result[name].rename(tmp / name)
            shutil.rmtree(work)
            report["result"] = {
                "runs": result["runs"], "seconds": result["seconds"],
                "student_P": dev_metric(result["student_dev_loss"]),
                "assistant_P": (dev_metric(result["assistant_dev_loss"])
                                if "assistant_dev_loss" in result else None)}
        report["wall_time_s"] = time.perf_counter() - started
        write_json(tmp / "schedule.json", report)
        write_manifest(
            tmp, "schedule",
            inputs={"teacher": {"path": str(source), "fingerprint": model_fingerprint(source)},
                    "scores": {"path": str(scores_path)}, "data": prepared.summary()},
            config={"lambda": lam, "sparsities": grid, "student_ratio": student_ratio,
                    "student_params": student_params, "sandwich_steps": sandwich_steps,
                    "widths_per_step": widths_per_step, "exhaustive": exhaustive,
                    "plan_only": plan_only, "dev_data": dev_data, "distill": asdict(config)},
            metrics={"chosen": chosen, "schedule": report["schedule"],
                     **report.get("result", {})},
            wall_time_s=report["wall_time_s"])
    return report


def sandwich_dev_losses(source: ModelSource, shape: ModelShape, candidates: Sequence[Candidate],
                        prepared: Any, dev: torch.Tensor, config: DistillConfig,
                        vocab_size: int, widths_per_step: int, progress: bool,
                        device: torch.device | str | None = None) -> tuple[list[float],
                                                                             list[float]]:
    """One sandwich run from the teacher's weights; (dev loss of each candidate, step losses).
    The teacher candidate is the real, frozen teacher; the others are read off the shared
    network under their masks. It runs as `minima distill` would: on `device` (default: the GPU
    if there is one) in `config.precision` (auto: bf16 where it is fast), the teacher loaded as
    distill loads it (bf16 weights in a bf16 run), the dev losses under the same autocast."""
    session = LocalSession(config.precision, device)
    torch.manual_seed(config.seed)
    teacher = load_teacher(source, session)
    network = load_model(source)
    masks = [plan_masks(c.plan, shape).to(session.device) for c in candidates]
    history = train_sandwich(network, teacher, shape, masks, prepared.stream(config.batch_size),
                             config, vocab_size, widths_per_step, progress,
                             device=session.device, precision=session.precision)
    dev = dev.to(session.device)
    with autocast(session, session.precision == "bf16"):
        losses = [evaluate_loss(teacher, dev, config.batch_size)]
        losses += [masked_dev_loss(network, shape, m, dev, config.batch_size) for m in masks[1:]]
    return losses, history


def exhaustive_report(candidates: Sequence[Candidate], chains: Sequence[dict[str, Any]],
                      values: Sequence[float], metrics: Sequence[float],
                      chosen: int) -> dict[str, Any]:
    """MaxiDisc: every candidate's chain run; does the sandwich's ranking agree with it?"""
    students = [dev_metric(c["student_dev_loss"]) for c in chains]
    assistants = [dev_metric(c["assistant_dev_loss"]) if "assistant_dev_loss" in c else metrics[0]
                  for c in chains]
    best = max(range(len(students)), key=lambda i: (students[i], -candidates[i].sparsity))

    def agreement(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
        if len(x) < 2:
            return {"spearman": None, "kendall": None}
        rho, tau = spearman(x, y), kendall(x, y)
        return {"spearman": None if math.isnan(rho) else rho,
                "kendall": None if math.isnan(tau) else tau}

    return {
        "rows": [{"sparsity": c.sparsity, "assistant_P": a, "student_P": s, "runs": ch["runs"],
                  "seconds": ch["seconds"]}
                 for c, a, s, ch in zip(candidates, assistants, students, chains, strict=True)],
        "best": best,
        "chosen_student_P": students[chosen],
        "best_student_P": students[best],
        "runs": sum(c["runs"] for c in chains),
        "seconds": sum(c["seconds"] for c in chains),
        # the selection criterion against what it predicts, and the sandwich's P as a proxy for
        # separately distilled assistants
        "tradeoff_vs_student": agreement(values, students),
        "sandwich_P_vs_assistant_P": agreement(metrics, assistants),
    }


def write_json(path: Path, obj: Any) -> None:
    import json

    def default(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON-able: {type(value).__name__}")

    path.write_text(json.dumps(obj, indent=2, default=default) + "\n")


def describe(candidates_rows: Sequence[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Table rows: asked %, actual %, params, P, P + lambda s, chosen mark."""
    return [(f"{100 * r['asked_sparsity']:g}%", f"{100 * r['sparsity']:.1f}%",
             format_count(r["params"]), f"{r['P']:.4f}", f"{r['tradeoff']:.4f}",
             "<-" if r["chosen"] else "") for r in candidates_rows]


def run(config: ScheduleConfig, control: RunControl) -> dict[str, Any]:
    sparsities = parse_sparsities(config.sparsities) if config.sparsities is not None else ()
    return run_schedule(
        teacher_path=config.teacher, scores_path=config.scores, data=config.data,
        output=Path(config.output), student_ratio=config.student_ratio,
        student_params=config.student_params, lam=config.lam, sparsities=sparsities,
        sandwich_steps=config.sandwich_steps, widths_per_step=config.sandwich_widths,
        config=config.distill_config(), dev_data=config.dev_data, exhaustive=config.exhaustive,
        plan_only=config.plan_only, force=control.force, progress=control.progress,
        text_field=config.text_field)
