"""`minima distill`: knowledge distillation from a full teacher into a (pruned) student.

Per micro-batch: the teacher's logits (forward under no_grad, or its top-k read from an offline
`minima cache-teacher` directory), the student's forward, and the chunked loss
`alpha * CE + (1 - alpha) * KD` (losses.py) plus, optionally, `hidden_weight` times the MSE of
mapped hidden states (for a pruned student: against the teacher's states on the kept hidden dims,
which the prune manifest records). With `--on-policy LAMBDA`, on that fraction of steps the student
continues the first `--prompt-tokens` of each block and learns from the teacher on its own tokens
(training/on_policy.py). The loop itself (schedule, accumulation, checkpoints, exact
resume, DeepSpeed ZeRO, logs) is training/loop.py's. The final student is written atomically to
OUTPUT as a standard HF directory; `OUTPUT.run/` (checkpoints, log, token cache) is removed on
success. Losses: docs/losses.md; outputs, manifest and resume: docs/stages.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.streams import prepare_data
from minima_cli.data.teacher_cache import TeacherCache, teacher_topk
from minima_cli.errors import MinimaError
from minima_cli.fsutil import MANIFEST, read_manifest, write_manifest
from minima_cli.losses import (
    TopK,
    distillation_loss,
    fused_linear_distillation_loss,
    hidden_state_mse,
    next_token_labels,
    summed_cross_entropy,
    topk_logits_suffice,
)
from minima_cli.model.arch import plain_output_head, shape_from_config
from minima_cli.model.checkpoint import (
    ModelSource,
    check_same_tokenizer,
    copy_tokenizer_files,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from minima_cli.model.selection import kept_problem
from minima_cli.progress import console
from minima_cli.stages import RunControl
from minima_cli.stages.configs import DistillConfig
from minima_cli.training.loop import (
    load_teacher,
    open_session,
    save_final_model,
    train,
    training_run_dir,
    training_throughput,
)
from minima_cli.training.on_policy import OnPolicy, log_totals


@dataclass(frozen=True)
class HiddenMap:
    """Student layer -> teacher layer pairs and the teacher's hidden dims the student kept."""

    pairs: list[tuple[int, int]]
    kept_hidden: list[int] | None


def parse_layer_pairs(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """'0:1,1:3' -> [(0, 1), (1, 3)]: student layer : teacher layer, 0-based."""
    pairs = []
    for item in spec.split(","):
        try:
            s, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise MinimaError(f"--hidden-layers: {item!r} is not STUDENT:TEACHER "
                              "(e.g. '0:1,1:3')") from None
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise MinimaError(f"--hidden-layers: {s}:{t} is out of range (student has "
                              f"{student_layers} layers, teacher {teacher_layers})")
        pairs.append((s, t))
    return pairs


def uniform_layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Each student layer to the teacher layer at the same relative depth (last to last)."""
    return [(j, round((j + 1) * teacher_layers / student_layers) - 1)
            for j in range(student_layers)]


def hidden_map(spec: str, student: Any, teacher: Any,
               prune_kept: dict[str, Any] | None) -> HiddenMap:
    """Pairs and kept dims for the hidden-state loss. A `minima prune` output of this teacher
    maps each kept layer to its origin and compares on the kept hidden dims; any other student
    must have the teacher's hidden size."""
    s_layers, t_layers = student.num_hidden_layers, teacher.num_hidden_layers
    if prune_kept is not None:
        if len(prune_kept["hidden"]) != student.hidden_size or len(
                prune_kept["layers"]) != s_layers:
            raise MinimaError("the student's prune manifest does not match its config")
        pairs = (list(enumerate(prune_kept["layers"])) if spec == "auto"
                 else parse_layer_pairs(spec, s_layers, t_layers))
        kept = list(prune_kept["hidden"])
        return HiddenMap(pairs, None if kept == list(range(teacher.hidden_size)) else kept)
    if student.hidden_size != teacher.hidden_size:
        raise MinimaError(
            f"--hidden-weight: the student's hidden size {student.hidden_size} differs from the "
            f"teacher's {teacher.hidden_size} and the student is not a `minima prune` output of "
            "this teacher, so its hidden dims cannot be mapped")
    pairs = (uniform_layer_pairs(s_layers, t_layers) if spec == "auto"
             else parse_layer_pairs(spec, s_layers, t_layers))
    return HiddenMap(pairs, None)


def prune_kept_of(student: ModelSource, teacher_fingerprint: str | None,
                  teacher_config: Any) -> dict[str, Any] | None:
    """The kept indices of a student that `minima prune` made from this very teacher, checked
    against the teacher's shape: a hand-edited manifest with an index out of range would
    otherwise be an IndexError in the middle of training."""
    if student.is_gguf or not (student.directory / MANIFEST).is_file():
        return None
    manifest = read_manifest(student.directory)
    origin = manifest.get("inputs", {}).get("model", {}).get("fingerprint")
    if manifest.get("stage") != "prune" or origin != teacher_fingerprint:
        return None
    kept = manifest.get("kept")
    problem = kept_problem(kept, shape_from_config(teacher_config))
    if problem:
        raise MinimaError(f"{student.directory / MANIFEST}: corrupt prune manifest ({problem})")
    return kept


def needs_teacher(config: DistillConfig) -> bool:
    """alpha 1 without a hidden-state loss is the LM loss alone (a CE-only baseline at the same
    data, steps and schedule): no teacher forward, no teacher in memory. On-policy steps are KD
    only, so they always need it."""
    return config.alpha < 1 or config.hidden_weight > 0 or config.generates


def sparse_head_applies(config: DistillConfig, student: torch.nn.Module,
                        deepspeed_stage: int) -> bool:
    """Whether the student's lm_head can be left out of the step: the loss reads its logits at
    the teacher's top k only (top-k renorm, alpha 0), the head is a plain bias-free Linear, and
    its weight is whole on every rank (not ZeRO-3, which partitions it)."""
    return (topk_logits_suffice(config.loss, config.topk_mode, config.alpha)
            and deepspeed_stage != 3 and plain_output_head(student) is not None)


def make_loss_fn(config: DistillConfig, *, teacher: torch.nn.Module | None,
                 cache: TeacherCache | None, stream: Any, vocab_size: int,
                 hidden: HiddenMap | None, on_policy: OnPolicy | None = None,
                 unwrap: Any = None):
    """`loss_fn(student, batch) -> (loss, parts)` for train.train. With `on_policy` (the run's
    step hook) its generating steps continue each block's first `prompt_length()` tokens and
    take the KD loss on the generated tokens; the teacher's forward is timed. With `unwrap`
    (the session's: wrapped model -> the HF model), the student's forward stops at its final
    hidden states and the loss computes only the teacher's top-k logits from the lm_head's
    rows (`sparse_head_applies`)."""
    kept = torch.tensor(hidden.kept_hidden) if hidden and hidden.kept_hidden else None
    timed = on_policy.timed if on_policy is not None else None
    sparse = unwrap is not None

    def topk(logits: torch.Tensor) -> TopK:
        return TopK(*teacher_topk(logits, config.topk, vocab_size))

    def loss_fn(student: torch.nn.Module, batch: torch.Tensor):
        if on_policy is not None and on_policy.generating():
            scored = on_policy.rollout(student, teacher, batch[:, :config.prompt_length()])
            return on_policy.kd_on_generated(student, teacher, scored, config,
                                             topk if config.loss == "topk" else None)
        want_hidden = hidden is not None
        # use_cache=False: no KV cache is built in training (memory, and it would be unused);
        # logits_to_keep=[] skips the lm_head when the loss builds its own k logits
        no_logits = {"logits_to_keep": batch.new_zeros(0)} if sparse else {}
        out = student(input_ids=batch, output_hidden_states=want_hidden or sparse,
                      use_cache=False, **no_logits)
        if not needs_teacher(config):  # alpha 1: the LM loss alone
            total, count = summed_cross_entropy(out.logits, next_token_labels(batch))
            ce = total / max(count, 1)
            return ce, {"ce": ce.detach()}
        if cache is not None:
            # reading stored log-probs is no computation: CPU autocast refuses to `cat` the
            # cache's float16 rows ("Unexpected floating ScalarType")
            with torch.autocast(batch.device.type, enabled=False):
                target: torch.Tensor | TopK = cache.lookup(stream.last_picks, batch.device)
        else:
            with timed("teacher") if timed else contextlib.nullcontext(), torch.no_grad():
                teacher_out = teacher(input_ids=batch, output_hidden_states=want_hidden,
                                      use_cache=False)
            target = teacher_out.logits
            if config.loss == "topk":
                target = topk(target)
        options = {"alpha": config.alpha, "kind": config.loss, "topk_mode": config.topk_mode,
                   "temperature": config.temperature, "beta": config.beta,
                   "vocab_size": vocab_size}
        if sparse:  # HF's last hidden state is the final norm's output: the lm_head's input
            loss, parts = fused_linear_distillation_loss(
                out.hidden_states[-1], plain_output_head(unwrap(student)), target,
                next_token_labels(batch), **options)
        else:
            loss, parts = distillation_loss(out.logits, target, next_token_labels(batch),
                                            **options)
        logged = {"ce": parts["ce"], "kd": parts["kd"]}
        if hidden is not None:
            mse = sum(hidden_state_mse(out.hidden_states[s + 1], teacher_out.hidden_states[t + 1],
                                       kept) for s, t in hidden.pairs) / len(hidden.pairs)
            loss = loss + config.hidden_weight * mse
            logged["hidden_mse"] = mse.detach()
        return loss, logged

    return loss_fn


def run_distill(*, teacher_path: str | None, student_path: str, data: str, output: Path,
                config: DistillConfig, resume: bool = False, force: bool = False,
                progress: bool = True, text_field: str = "text",
                teacher_cache: str | None = None) -> dict[str, Any]:
    config.check()
    run_dir = training_run_dir(output, force=force, resume=resume)
    if teacher_path is None and teacher_cache is None:
        raise MinimaError("give the teacher: --teacher MODEL or --teacher-cache DIR")
    cache = TeacherCache(teacher_cache) if teacher_cache else None
    if cache is not None:
        if config.loss != "topk":
            raise MinimaError("a teacher cache holds the teacher's top-k log-probs: use --loss "
                              "topk with --teacher-cache")
        if config.hidden_weight > 0:
            raise MinimaError("--hidden-weight needs the teacher's hidden states: pass --teacher "
                              "instead of --teacher-cache")
        cache.check_topk(config.topk)
    student_src = resolve_model(student_path)
    teacher_src = resolve_model(teacher_path) if teacher_path and cache is None else None
    student_config = load_config(student_src)
    max_positions = getattr(student_config, "max_position_embeddings", None)
    if max_positions and config.seq_len > max_positions:
        raise MinimaError(f"--seq-len {config.seq_len} exceeds the student's {max_positions} "
                          "positions")
    generated_length = config.prompt_length() + config.gen_tokens
    if config.generates and max_positions and generated_length > max_positions:
        raise MinimaError(f"--prompt-tokens {config.prompt_length()} + --gen-tokens "
                          f"{config.gen_tokens} exceed the student's {max_positions} positions")
    tokenizer = load_tokenizer(student_src)
    if config.loss == "topk" and cache is None and config.topk > len(tokenizer):
        raise MinimaError(f"--topk {config.topk} exceeds the vocabulary ({len(tokenizer)} "
                          "tokens)")
    teacher_fp = cache.teacher_fingerprint if cache else model_fingerprint(teacher_src)
    hidden = None
    if teacher_src is not None:
        check_same_tokenizer(load_tokenizer(teacher_src), tokenizer)
        if config.hidden_weight > 0:
            teacher_config = load_config(teacher_src)
            hidden = hidden_map(config.hidden_layers, student_config, teacher_config,
                                prune_kept_of(student_src, teacher_fp, teacher_config))
    session = open_session(config)
    if not session.is_main:
        session.barrier()  # let rank 0 tokenize and fill the token cache first
    prepared = prepare_data(data, tokenizer, seq_len=config.seq_len, seed=config.seed,
                            valid_fraction=config.valid_fraction, text_field=text_field,
                            cache_dir=run_dir / "token-cache", valid_tokens=config.valid_tokens)
    if session.is_main:
        session.barrier()
    if cache is not None:
        cache.check_data(prepared)
    torch.manual_seed(config.seed)
    teacher = None
    if not needs_teacher(config):
        if session.is_main and progress:
            console.print("[dim]alpha 1: the LM loss alone, the teacher is not loaded[/dim]")
    elif teacher_src is not None:
        teacher = load_teacher(teacher_src, session)
    student = load_model(student_src)
    stream = prepared.stream(config.batch_size, rank=session.rank,
                             world_size=session.world_size)
    on_policy = OnPolicy.for_session(
        config, session, eos_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
        else [], pad_id=tokenizer.eos_token_id or 0, vocab_size=len(tokenizer))
    sparse_head = sparse_head_applies(config, student, session.deepspeed_stage)
    loss_fn = make_loss_fn(config, teacher=teacher, cache=cache, stream=stream,
                           vocab_size=len(tokenizer), hidden=hidden, on_policy=on_policy,
                           unwrap=session.unwrap if sparse_head else None)
    run_id = {"config": config.fingerprint(), "data": prepared.fingerprint,
              "student": model_fingerprint(student_src), "teacher": teacher_fp}
    # model FLOPs: the student trains; the teacher forwards only when it runs (not with a cache)
    throughput = training_throughput(
        session, config, shape_from_config(student.config),
        shape_from_config(load_config(teacher_src)) if teacher is not None else None,
        head_columns=config.topk if sparse_head else None)
    result = train(session=session, model=student, loss_fn=loss_fn, stream=stream,
                   valid_blocks=prepared.valid, config=config, run_dir=run_dir, run_id=run_id,
                   resume=resume, progress=progress, description="distill",
                   throughput=throughput, step_hook=on_policy)
    # this process's tokens over its time: after --resume, not the steps before the resume
    tokens_per_s = result.tokens_run / max(result.seconds, 1e-9)

    def write_extra(tmp: Path) -> dict[str, Any]:
        copy_tokenizer_files(student_src, tmp)
        teacher_input = ({"cache": str(cache.path), "fingerprint": teacher_fp} if cache else
                         {"path": str(teacher_src), "fingerprint": teacher_fp})
        return write_manifest(
            tmp, "distill",
            inputs={"teacher": teacher_input,
                    "student": {"path": str(student_src), "fingerprint": run_id["student"]},
                    "data": prepared.summary()},
            config=asdict(config),
            student_shape=shape_from_config(session.unwrap(result.model).config).as_dict(),
            hidden_map=asdict(hidden) if hidden else None,
            metrics={**result.metrics, "steps": result.steps, "tokens": result.tokens,
                     "world_size": session.world_size, "precision": session.precision,
                     "tokens_per_s": tokens_per_s, **throughput.summary(tokens_per_s),
                     **log_totals(run_dir / "log.jsonl")},
            wall_time_s=result.seconds)

    return save_final_model(session, result.model, output, force, run_dir, write_extra)


def run(config: DistillConfig, control: RunControl) -> dict[str, Any] | None:
    return run_distill(teacher_path=config.teacher, student_path=config.student,
                       data=config.data, output=Path(config.output), config=config,
                       resume=control.resume, force=control.force, progress=control.progress,
                       text_field=config.text_field, teacher_cache=config.teacher_cache)
