"""Training-loop pieces shared by every training stage (`distill`, `sft`, the schedule's sandwich,
the tiny world's pre-training): AdamW parameter groups, clipping, the learning-rate schedule, and
training checkpoints that resume exactly.

A training checkpoint is a directory written atomically (fsutil.atomic_output_dir; docs/formats.md):
- `model.safetensors`: the trainable weights,
- `optimizer.safetensors`: every optimizer state tensor, keyed `<param index>.<name>`,
- `state.json`: step, optimizer scalars and hyper-parameters, the Python/NumPy RNG states, the
  data stream position and anything the loop adds; `rng.safetensors`: torch's RNG state.
Everything is safetensors or JSON: resuming never unpickles a file. (Checkpoints of accelerate /
DeepSpeed runs are those libraries' own format: training/loop.py.)
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minima_cli.errors import MinimaError, first_line
from minima_cli.fsutil import atomic_output_dir
from minima_cli.training.config import SCHEDULES


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy of `model` over all `blocks` (every block the same length)."""
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
    return total / len(blocks)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms and biases (1-D), as MiniMA trains.
    Tied weights appear once (named_parameters de-duplicates them)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict[str, Any]], lr: float, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as MiniMA trains (betas 0.9/0.95, eps 1e-8) with PyTorch's fused kernel where the
    parameters allow it: one pass over each tensor instead of a dozen per-tensor ops, and the
    kernel HF's Trainer uses by default. `fused=False`: PyTorch's default kernel, which rounds
    differently (the tiny world's teacher is pinned bitwise to it)."""
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        except RuntimeError:  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def check_clip(max_norm: float) -> None:
    """0 means no clipping; a negative (or NaN) limit is a mistake, not a way to turn it off."""
    if not max_norm >= 0:
        raise MinimaError(f"--clip must be >= 0 (0: no clipping), got {max_norm}")


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients' global L2 norm to `max_norm` (0: no clipping) and return the norm
    before clipping. Unlike `clip_grad_norm_`, which always multiplies (by 1 when under the
    limit), the gradients are only touched when the norm is over it: one pass over them fewer."""
    check_clip(max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """The schedule, as a multiple of the peak learning rate, for optimizer step `step`
    (0-based): linear warmup from 1/warmup to 1, then cosine or linear decay to `min_ratio` at
    `total_steps` (or constant)."""
    if schedule not in SCHEDULES:
        raise MinimaError(f"unknown schedule {schedule!r}: choose {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def learning_rate(step: int, *, peak: float, total_steps: int, warmup_steps: int,
                  schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """`peak * lr_factor(...)`: the learning rate of `distill`, `sft` and the sandwich.
    In warmup it is rounded as `(peak * (step + 1)) / warmup`, as these stages always have:
    `peak * ((step + 1) / warmup)` can differ in the last bit (3e-3 * 3 / 3 != 3e-3), which would
    change their trained weights; the tiny world's pre-training multiplies by `lr_factor`."""
    factor = lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps,
                       schedule=schedule, min_ratio=min_ratio)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * factor


STATE_FILE = "state.json"


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a CPU training step may touch: (tensors, JSON-able)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_checkpoint(directory: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, step: int,
                             extra: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
    """Write `directory/step-<step>` atomically, then delete all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:08d}"
    with atomic_output_dir(target, force=True) as tmp:
        trainable = {name: p.detach().cpu().contiguous()
                     for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_json = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {"step": step, "optimizer": opt_meta, "rng": rng_json, **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(state))
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


CHECKPOINT_NAME = re.compile(r"step-\d+")


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step-<digits>` only, never the `.tmp-*` of a killed
    write or the `.old-PID` a replacement interrupted by a kill leaves behind."""
    return sorted(p for p in Path(directory).glob("step-*")
                  if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)
                  and (p / STATE_FILE).is_file())


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None. Checkpoints are renamed into
    place only when complete, but a disk fault, a copy cut short or a hand edit can still damage
    one: state.json must parse and every safetensors file be whole (headers only are read)."""
    from minima_cli.model.tensors import read_safetensors_specs

    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{STATE_FILE}: {first_line(error)}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        try:
            read_safetensors_specs(path / name)
        except MinimaError as error:
            return str(error).removeprefix(f"{path / name}: ")
    return None


def newest_good_checkpoint(directory: Path) -> Path:
    """The newest checkpoint under `directory` that is whole; each damaged newer one is skipped
    with a warning line (resume then repeats the steps since the good one, to the same weights).
    None whole is one error line."""
    found = list_checkpoints(directory)
    if not found:
        raise MinimaError(f"no training checkpoint in {directory}")
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"warning: skipping damaged checkpoint {path.name} ({problem}); resuming from "
              "the one before", file=sys.stderr)
    raise MinimaError(f"every training checkpoint in {directory} is damaged (the newest: "
                      f"{checkpoint_problem(found[-1])}): delete it to start the run again")


def load_training_checkpoint(path: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNGs from a checkpoint dir (or the newest one under a run
    dir); returns its state.json for the loop (step, data position, ...)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise MinimaError(f"{path}: damaged training checkpoint ({problem})")
    else:
        path = newest_good_checkpoint(path)
    state = json.loads((path / STATE_FILE).read_text())
    weights = load_file(path / "model.safetensors")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise MinimaError(f"{path}: checkpoint weights do not match this model (another run?)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    load_optimizer_state(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    set_rng_state(load_file(path / "rng.safetensors"), state["rng"])
    return state
