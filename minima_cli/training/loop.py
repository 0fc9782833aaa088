"""The training loop shared by `distill` and `sft`: one process, or many under torchrun /
`accelerate launch` with DeepSpeed ZeRO-2/3.

Per optimizer step (`optimizer_step`, which the schedule's sandwich and the tiny world's
pre-training take too, in a `LocalSession` without a run dir): set the learning rate (warmup, then
cosine/linear decay), run `grad_accum` micro-batches of `loss_fn(model, batch)` (bf16 autocast
when asked), clip (0: no clipping), step. Every
`eval_every` steps the validation loss; every `save_every` steps an atomic checkpoint in
`run_dir/checkpoints/` (the newest `keep_last` kept); every step a line in `run_dir/log.jsonl` and
a TensorBoard scalar. A resumed run continues from the newest checkpoint exactly where it stopped:
weights, optimizer, RNGs and the data position (identical on all ranks, see data/streams.py).

Two sessions drive the same loop:
- `LocalSession` (one process, no DeepSpeed): plain PyTorch; checkpoints in minima's safetensors
  format (training/state.py), which resume bitwise on CPU.
- `AccelerateSession` (several processes or a DeepSpeed config): `accelerate` with a
  `DeepSpeedPlugin`; checkpoints through `accelerator.save_state` (DeepSpeed's own files, since
  ZeRO partitions the optimizer across ranks) written into a temp dir that rank 0 renames.
Checkpoint and log formats: docs/formats.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from minima_cli.errors import MinimaError
from minima_cli.fsutil import check_output, fsync_tree
from minima_cli.progress import step_progress
from minima_cli.runtime import rank_and_world
from minima_cli.training.config import PRECISIONS, TrainConfig
from minima_cli.training.flops import Throughput, distill_flops_per_token, resolve_peak
from minima_cli.training.state import (
    STATE_FILE,
    adamw,
    clip_gradients,
    evaluate_loss,
    learning_rate,
    list_checkpoints,
    load_training_checkpoint,
    parameter_groups,
    save_training_checkpoint,
)

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class StepHook(Protocol):
    """What a stage may follow the loop's steps with (training/on_policy.py's OnPolicy): the
    optimizer step about to run, and the fields it adds to that step's log record (with
    `step_tokens`, the tokens the step trained on, which its tokens/s and MFU then count)."""

    bar_keys: tuple[str, ...]  # record fields the progress bar shows

    def begin_step(self, step: int) -> None: ...

    def end_step(self, step_s: float) -> dict[str, float]: ...


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX); without them bf16 is emulated and
    slower than fp32, so `auto` stays in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    """Where every training stage runs: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" (autocast) for `precision` on `device`; "auto": bf16 where it is fast."""
    if precision not in PRECISIONS:
        raise MinimaError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MinimaError(f"DeepSpeed config {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinimaError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise MinimaError(f"DeepSpeed config {path} must be a JSON object")
    return raw


def resolve_deepspeed_config(raw: dict[str, Any], *, batch_size: int, grad_accum: int,
                             clip: float, world_size: int, bf16: bool) -> dict[str, Any]:
    """Fill the HF-style "auto" (or missing) values from minima's settings and refuse a config
    that contradicts them. minima owns the optimizer and the schedule (AdamW, --lr, warmup), so
    the config must not bring its own."""
    config = json.loads(json.dumps(raw))
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise MinimaError(f"DeepSpeed config: remove the {section!r} section; minima's "
                              "AdamW and --lr/--schedule drive training")
    if config.get("fp16", {}).get("enabled") in (True, "true"):
        raise MinimaError("DeepSpeed config: fp16 is not supported; use bf16 or fp32")
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise MinimaError("DeepSpeed config: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise MinimaError(f"DeepSpeed config: zero_optimization.stage must be 0-3, got {stage!r}")
    check_zero_section(zero)
    wanted = {"train_micro_batch_size_per_gpu": batch_size,
              "gradient_accumulation_steps": grad_accum,
              "train_batch_size": batch_size * grad_accum * world_size,
              "gradient_clipping": clip}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise MinimaError(f"DeepSpeed config: {key} is {given!r} but minima's settings give "
                              f"{value!r}; set it to \"auto\"")
    bf16_section = config.setdefault("bf16", {})
    if bf16_section.get("enabled", "auto") == "auto":
        bf16_section["enabled"] = bf16
    if stage == 3:
        # the final student is saved as one consolidated state dict
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config["zero_allow_untested_optimizer"] = True  # a torch AdamW client optimizer
    config.setdefault("steps_per_print", 1 << 30)
    return config


def check_zero_section(zero: dict[str, Any]) -> None:
    """DeepSpeed's own schema for `zero_optimization` (misspelt keys, wrong types), checked
    before anything runs rather than after the models are loaded."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MinimaError(f"DeepSpeed config: zero_optimization.{where}: {first['msg']}") from None


def deepspeed_stage(config: dict[str, Any] | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compile_in_place(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """`model` with its forward compiled by torch.compile (inductor) on its first call, when
    `enabled`. In place (nn.Module.compile), not `torch.compile(model)`: that wraps the model in
    an OptimizedModule whose parameter names and state_dict keys carry `_orig_mod.`, which
    checkpoints, resume and save_pretrained would then write and expect."""
    if enabled:
        model.compile()
    return model


class LocalSession:
    """One process, plain PyTorch, on `device` (default: the GPU if there is one) in
    `precision` ("auto", "fp32" or "bf16"), the models compiled with `compile` (--compile). The
    sandwich and the tiny world's pre-training run in one too, without a run directory."""

    rank, world_size, is_main, deepspeed_stage = 0, 1, True, 0

    def __init__(self, precision: str = "auto", device: torch.device | str | None = None,
                 compile: bool = False):
        self.device = default_device() if device is None else torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.compile = compile

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return compile_in_place(model.to(self.device), self.compile), optimizer

    def prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        return compile_in_place(teacher.to(self.device), self.compile)

    def no_sync(self, model, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def step(self, model, optimizer, clip: float) -> float:
        norm = clip_gradients(list(model.parameters()), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def save_checkpoint(self, directory: Path, step: int, model, optimizer,
                        state: dict[str, Any], keep_last: int) -> None:
        save_training_checkpoint(directory, model, optimizer, step, state, keep_last)

    def load_checkpoint(self, directory: Path, model, optimizer) -> dict[str, Any]:
        return load_training_checkpoint(directory, model, optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        return None  # save_pretrained reads the model itself

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class AccelerateSession:
    """Several processes (torchrun / accelerate launch) and/or DeepSpeed ZeRO via accelerate."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DeepSpeedPlugin

        if "WORLD_SIZE" not in os.environ and config.deepspeed:
            # DeepSpeed in one process (no launcher): a world of one on this host
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        world = rank_and_world()[1]
        self.ds_config: dict[str, Any] | None = None
        device = default_device()
        precision = resolve_precision(config.precision, device)
        if config.deepspeed:
            if device.type == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # what `accelerate launch` sets; under plain torchrun accelerate would otherwise
            # start a world of one process per rank
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            self.ds_config = resolve_deepspeed_config(
                read_deepspeed_config(config.deepspeed), batch_size=config.batch_size,
                grad_accum=config.grad_accum, clip=config.clip, world_size=world,
                bf16=precision == "bf16")
            precision = "bf16" if self.ds_config["bf16"]["enabled"] else "fp32"
        if AcceleratorState._shared_state:  # a fresh state per run (tests run several in-process)
            AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cpu" and self.ds_config:
            from accelerate.state import PartialState

            PartialState(backend="gloo")  # accelerate picks no CPU backend for DeepSpeed itself
        try:
            plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config) if self.ds_config else None
            self.accelerator = Accelerator(
                deepspeed_plugin=plugin,
                # CPUs without DeepSpeed: cpu=True is what makes accelerate set up MULTI_CPU
                # (gloo DDP); otherwise it reports a world of one and never averages gradients
                cpu=device.type == "cpu" and plugin is None,
                mixed_precision="bf16" if precision == "bf16" and plugin else "no")
        except (ValueError, TypeError, KeyError) as e:
            raise MinimaError(f"invalid DeepSpeed config {config.deepspeed}: {e}") from None
        self.precision = precision
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.deepspeed_stage = deepspeed_stage(self.ds_config) if self.ds_config else -1

    def prepare(self, model, optimizer):
        try:
            return self.accelerator.prepare(model, optimizer)
        except Exception as e:  # DeepSpeed validates its config here (pydantic errors)
            if self.ds_config is None:
                raise
            raise MinimaError(f"invalid DeepSpeed config: {str(e).splitlines()[0]}") from None

    def prepare_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3 partitions the teacher across ranks too (inference only, as TRL does);
        otherwise every rank holds a replica."""
        if self.deepspeed_stage != 3:
            return teacher.to(self.device)
        import deepspeed

        config = {k: v for k, v in self.ds_config.items()
                  if k in ("bf16", "zero_optimization", "train_micro_batch_size_per_gpu")}
        config["zero_optimization"] = {"stage": 3}
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine

    def no_sync(self, model, last_micro: bool) -> contextlib.AbstractContextManager:
        # DDP: all-reduce gradients only on the last micro-batch (DeepSpeed counts for itself)
        if last_micro or self.ds_config is not None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself (and steps at the boundary)
        self.accelerator.backward(loss if self.ds_config else loss / grad_accum)

    def step(self, model, optimizer, clip: float) -> float:
        if self.ds_config is not None:  # clipped and stepped inside backward at the boundary
            norm = model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        # clip 0: no clipping, only the norm (as in one process and in DeepSpeed)
        norm = self.accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_checkpoint(self, directory: Path, step: int, model, optimizer,
                        state: dict[str, Any], keep_last: int) -> None:
        """Every rank writes its part into one temp dir; rank 0 adds state.json, fsyncs and
        renames it to `step-<step>` (a kill leaves only a temp dir, which resume ignores)."""
        target = directory / f"step-{step:08d}"
        tmp = directory / f".incomplete-step-{step:08d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self.accelerator.save_state(str(tmp))
        self.barrier()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
            fsync_tree(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            for old in list_checkpoints(directory)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_checkpoint(self, directory: Path, model, optimizer) -> dict[str, Any]:
        found = list_checkpoints(directory)
        if not found:
            raise MinimaError(f"no training checkpoint in {directory}")
        state = json.loads((found[-1] / STATE_FILE).read_text())
        self.accelerator.load_state(str(found[-1]))
        return state

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        if self.deepspeed_stage != 3:
            return None  # full weights on every rank: save_pretrained reads the model (ties kept)
        return self.accelerator.get_state_dict(model)  # collective: every rank gathers

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.accelerator.end_training()


def load_teacher(source: Any, session) -> torch.nn.Module:
    """The frozen teacher: eval mode, no grad, bf16 when the run is, and placed (or ZeRO-3
    partitioned) by the session."""
    from minima_cli.model.checkpoint import load_model

    teacher = load_model(source).eval().requires_grad_(False)
    if session.precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    return session.prepare_teacher(teacher)


def training_throughput(session, config: TrainConfig, student: Any,
                        teacher: Any | None = None, head_columns: int | None = None
                        ) -> Throughput:
    """FLOPs per token of a training step (the student's forward and backward, its lm_head
    reduced to `head_columns` rows when the loss computes only those, plus the teacher's
    forward when one runs; ModelShapes) and the peak of all the run's devices: what `train`
    reports MFU against."""
    flops = distill_flops_per_token(student, teacher, config.seq_len, head_columns)
    shapes = [student] + ([teacher] if teacher is not None else [])
    peak, source = resolve_peak(config.peak_tflops, session.device, session.precision, shapes,
                                config.batch_size * config.seq_len)
    return Throughput(flops, peak * session.world_size, source)


def open_session(config: TrainConfig) -> LocalSession | AccelerateSession:
    if config.deepspeed or rank_and_world()[1] > 1:
        if config.compile:  # DDP/ZeRO wrappers around a compiled module are not tested here
            raise MinimaError("--compile runs in one process without DeepSpeed: drop --compile "
                              "or launch one process")
        return AccelerateSession(config)
    return LocalSession(config.precision, compile=config.compile)


class RunLog:
    """log.jsonl (and TensorBoard scalars) on the main rank."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.file = (run_dir / "log.jsonl").open("a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        from minima_cli.fsutil import dumps_json

        self.file.write(dumps_json(record) + "\n")  # strict JSON: a NaN loss is written null
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint (the resumed run redoes
    those steps), atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def autocast(session, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for plain PyTorch runs (DeepSpeed keeps its own bf16 weights)."""
    if not enabled or getattr(session, "ds_config", None) is not None:
        return contextlib.nullcontext()
    return torch.autocast(session.device.type, dtype=torch.bfloat16)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as MiniMA: betas (0.9, 0.95), eps 1e-8, no decay on norms and biases."""
    return adamw(parameter_groups(model, config.weight_decay), config.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class TrainResult:
    model: torch.nn.Module  # the prepared (possibly wrapped) model
    metrics: dict[str, Any]
    steps: int
    tokens: int  # the run's, from step 0
    seconds: float  # this process's: since a resume, not since step 0
    tokens_run: int = 0  # trained in this process (what tokens/s divides by `seconds`)


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or a dict / tuple of tensors (sft's input ids and label masks), on `device`.
    Anything else (a sandwich width's masks) is the loss function's to place."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


class Diverged(MinimaError):
    """Training produced a non-finite loss, gradient norm, validation loss or weight: the run
    stops (exit 2, like any bad setting) and writes no model. `train` adds the step and the
    checkpoint a run can be inspected or restarted from."""


def check_finite(what: str, value: float) -> None:
    if not math.isfinite(value):
        raise Diverged(f"{what} is {value}")


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None. One reduction per tensor,
    run only where a model is about to be written (a checkpoint, the final model)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() and not bool(torch.isfinite(param).all()):
                return name
    return None


@dataclass
class StepStats:
    losses: list[float]  # each micro-batch's loss
    means: dict[str, float]  # "loss" and loss_fn's parts, averaged over the micro-batches
    grad_norm: float  # before clipping


def optimizer_step(session, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   loss_fn: LossFn, micro_batches: Iterable[Any], *, grad_accum: int,
                   lr: float, clip: float) -> StepStats:
    """One optimizer step, the same in every training stage: set `lr`, accumulate the gradient
    of the mean of `loss_fn(model, micro_batch)` over the first `grad_accum` of `micro_batches`
    (each moved to the session's device, run under its autocast and backpropagated at once, so
    one graph is alive at a time), clip the norm to `clip` (0: no clipping), step.

    `micro_batches` is read lazily: a loss function may look at the stream that yields them
    (distill's teacher cache reads the stream's last picks)."""
    set_learning_rate(optimizer, lr)
    bf16 = session.precision == "bf16"
    batches = iter(micro_batches)
    losses: list[float] = []
    means: dict[str, float] = {}
    for micro in range(grad_accum):
        batch = to_device(next(batches), session.device)
        with session.no_sync(model, micro == grad_accum - 1):
            with autocast(session, bf16):
                loss, parts = loss_fn(model, batch)
            session.backward(loss, grad_accum)
        losses.append(loss.item())
        for key, value in {"loss": losses[-1], **parts}.items():
            means[key] = means.get(key, 0.0) + float(value) / grad_accum
    grad_norm = session.step(model, optimizer, clip)
    # after the step, not before backward: with several ranks the gradient norm is the same on
    # all of them (a NaN on one rank reaches all through the all-reduce), so every rank stops
    # at the same step instead of one leaving the others waiting in a collective
    for loss in losses:
        check_finite("the loss", loss)
    if getattr(session, "ds_config", None) is None:  # DeepSpeed may not know its norm (nan)
        check_finite("the gradient norm", grad_norm)
    return StepStats(losses, means, grad_norm)


def train(*, session, model: torch.nn.Module, loss_fn: LossFn, stream: Any,
          valid_blocks: torch.Tensor | None, config: TrainConfig, run_dir: Path,
          run_id: dict[str, Any], resume: bool, progress: bool = True,
          description: str = "train",
          evaluate_fn: Callable[[torch.nn.Module], float] | None = None,
          throughput: Throughput | None = None,
          step_hook: StepHook | None = None) -> TrainResult:
    """Run the loop on an unprepared `model` (the session wraps it); see the module doc.

    `stream` yields batches (a tensor, or a dict/tuple of tensors that `loss_fn` understands) and
    has `state_dict()` / `load_state_dict()`; the validation loss is `evaluate_fn(model)` or, by
    default, the mean next-token loss over `valid_blocks`. Each step counts
    `config.tokens_per_step` tokens. With `throughput` (training_throughput) every log record
    and the progress bar carry the step's model FLOPs per token, TFLOP/s and MFU. A
    `step_hook` is told each step's index before it runs and adds its fields to the record (and
    those named in its `bar_keys` to the progress bar)."""
    if evaluate_fn is None:
        def evaluate_fn(model: torch.nn.Module) -> float:
            return evaluate_loss(model, valid_blocks.to(session.device), config.batch_size)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    optimizer = build_optimizer(model, config)
    model, optimizer = session.prepare(model, optimizer)
    model.train()
    checkpoints = run_dir / "checkpoints"
    total_steps = config.total_steps(session.world_size)
    first_step = 0
    if resume:
        state = session.load_checkpoint(checkpoints, model, optimizer)
        if state.get("run_id") != run_id:
            raise MinimaError("--resume: the checkpoint belongs to a different run (config, data "
                              "or models differ)")
        stream.load_state_dict(state["data"])
        first_step = int(state["step"])
    if session.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(run_dir / "log.jsonl", first_step)
    session.barrier()
    log = RunLog(run_dir, session.is_main, config.tensorboard)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    tokens_per_step = config.tokens_per_step(session.world_size)
    bf16 = session.precision == "bf16"
    metrics: dict[str, Any] = {}
    bar_fields = {"loss": float("nan"), **({"mfu": float("nan")} if throughput else {}),
                  **{key: float("nan") for key in (step_hook.bar_keys if step_hook else ())}}
    start = time.perf_counter()
    done = first_step
    tokens_run = 0  # trained in this process (a hook may count a step's own tokens)
    try:
        with step_progress(description, total_steps, enabled=progress and session.is_main,
                           **bar_fields) as bar:
            for step in range(first_step, total_steps):
                done = step + 1
                step_start = time.perf_counter()
                lr = learning_rate(step, peak=config.lr, total_steps=total_steps,
                                   warmup_steps=warmup, schedule=config.schedule,
                                   min_ratio=config.min_lr_ratio)
                if step_hook is not None:
                    step_hook.begin_step(step)
                stats = optimizer_step(session, model, optimizer, loss_fn, stream,
                                       grad_accum=config.grad_accum, lr=lr, clip=config.clip)
                record = {"step": done, "lr": lr, **stats.means, "grad_norm": stats.grad_norm,
                          "step_s": time.perf_counter() - step_start}
                if step_hook is not None:
                    record.update(step_hook.end_step(record["step_s"]))
                step_tokens = record.get("step_tokens", tokens_per_step)
                tokens_run += step_tokens
                if throughput is not None:
                    record.update(throughput.figures(step_tokens / record["step_s"]))
                if done % config.eval_every == 0 or done == total_steps:
                    with autocast(session, bf16):
                        record["valid_loss"] = evaluate_fn(model)
                    model.train()
                    check_finite("the validation loss", record["valid_loss"])
                    record["valid_perplexity"] = math.exp(min(record["valid_loss"], 50.0))
                    metrics.update(valid_loss=record["valid_loss"],
                                   valid_perplexity=record["valid_perplexity"])
                log.write(record)
                bar.update(step_tokens, **{key: record[key] for key in bar_fields})
                if done % config.save_every == 0 and done < total_steps:
                    # a finite loss does not make the updated weights finite: a checkpoint is
                    # only written of weights a resumed run can use
                    bad = nonfinite_parameter(session.unwrap(model))
                    if bad is not None:
                        raise Diverged(f"the weight {bad} is not finite")
                    session.save_checkpoint(checkpoints, done, model, optimizer,
                                            {"run_id": run_id, "data": stream.state_dict()},
                                            config.keep_last)
    except Diverged as error:
        raise Diverged(diverged_message(error, done, total_steps, config.clip, run_dir)) from None
    finally:
        log.close()
    return TrainResult(model, metrics, total_steps, total_steps * tokens_per_step,
                       time.perf_counter() - start, tokens_run)


def diverged_message(error: BaseException, step: int, total_steps: int, clip: float,
                     run_dir: Path) -> str:
    """One line: where training diverged, that nothing was written, what is left and what to
    change (resuming with the same settings would diverge the same way: runs are deterministic)."""
    found = list_checkpoints(run_dir / "checkpoints")
    kept = (f"the last checkpoint (step {int(found[-1].name.split('-')[-1])}) stays in "
            f"{found[-1].parent}" if found else f"no checkpoint was saved (log: {run_dir})")
    settings = "a lower --lr" + (", --clip 1" if clip == 0 else "")
    return (f"training diverged at step {step} of {total_steps}: {error}; no model "
            f"written; {kept}; delete {run_dir} to start over with other settings "
            f"({settings})")


def training_run_dir(output: Path, *, force: bool, resume: bool) -> Path:
    """`OUTPUT.run`, where a run keeps its checkpoints and logs, after the checks every training
    stage makes before loading anything: OUTPUT may be written (`--force`), an earlier run's
    checkpoints are not silently overwritten, and `--resume` has something to resume."""
    check_output(output, force)
    run_dir = output.with_name(f"{output.name}.run")
    has_checkpoints = bool(list_checkpoints(run_dir / "checkpoints"))
    if has_checkpoints and not resume:
        raise MinimaError(f"{run_dir} holds checkpoints of an earlier run: pass --resume to "
                          "continue it, or delete it")
    if resume and not has_checkpoints:
        raise MinimaError(f"--resume: no training checkpoint in {run_dir / 'checkpoints'}")
    return run_dir


def save_final_model(session, model: torch.nn.Module, output: Path, force: bool,
                     run_dir: Path, write_extra: Callable[[Path], Any]) -> Any:
    """End a run: the trained model as a standard HF directory written atomically by the main
    rank (ZeRO-3: the consolidated state dict, gathered by every rank) with the run's
    `log.jsonl` and TensorBoard events; `write_extra(tmp)` adds tokenizer files and the manifest
    and its result is returned on the main rank (None elsewhere). Then `run_dir` (checkpoints)
    is removed and the session closed."""
    from minima_cli.fsutil import atomic_output_dir
    from minima_cli.model.checkpoint import quiet_transformers

    state_dict = session.full_state_dict(model)  # collective: before the main-rank branch
    # every rank holding the full weights checks them (the same on all), so all stop together;
    # under ZeRO-3 the gathered state dict is the main rank's
    bad = nonfinite_parameter(session.unwrap(model)) if state_dict is None else next(
        (name for name, t in state_dict.items()
         if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise Diverged(f"the trained weight {bad} is not finite: no model written (checkpoints "
                       f"and log stay in {run_dir})")
    result = None
    if session.is_main:
        unwrapped = session.unwrap(model)
        with atomic_output_dir(output, force=force) as tmp:
            with quiet_transformers():
                unwrapped.save_pretrained(tmp, **({} if state_dict is None
                                                  else {"state_dict": state_dict}))
            shutil.copy2(run_dir / "log.jsonl", tmp / "log.jsonl")
            if (run_dir / "tensorboard").is_dir():
                shutil.copytree(run_dir / "tensorboard", tmp / "tensorboard")
            result = write_extra(tmp)
    session.barrier()
    if session.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    session.close()
    return result
