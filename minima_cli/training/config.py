"""The training loop shared by `distill` and `sft`: one process, or many under torchrun /
`accelerate launch` with DeepSpeed ZeRO-2/3.

Per optimizer step: set the learning rate (warmup, then cosine/linear decay), run `grad_accum`
micro-batches of `loss_fn(model, batch)` (bf16 autocast when asked), clip, step. Every
`eval_every` steps the validation loss; every `save_every` steps an atomic checkpoint in
`run_dir/checkpoints/` (the newest `keep_last` kept); every step a line in `run_dir/log.jsonl` and
a TensorBoard scalar. A resumed run continues from the newest checkpoint exactly where it stopped:
weights, optimizer, RNGs and the data position (identical on all ranks, see data.py).

Two sessions drive the same loop:
- `LocalSession` (one process, no DeepSpeed): plain PyTorch; checkpoints in minima's safetensors
  format (train_state.py), which resume bitwise on CPU.
- `AccelerateSession` (several processes or a DeepSpeed config): `accelerate` with a
  `DeepSpeedPlugin`; checkpoints through `accelerator.save_state` (DeepSpeed's own files, since
  ZeRO partitions the optimizer across ranks) written into a temp dir that rank 0 renames.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from minima_cli.errors import MinimaError

PRECISIONS = ("auto", "fp32", "bf16")
KD_LOSSES = ("fkl", "rkl", "jsd", "topk")
TOPK_MODES = ("renorm", "tail")


# Fields that change no weights: a resumed run may alter them.
UNHASHED_FIELDS = ("keep_last", "save_every", "eval_every", "tensorboard", "deepspeed")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and checkpointing of a run (MiniMA's defaults where they apply)."""

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
    max_tokens: int = 0  # > 0: overrides max_steps (tokens / tokens per step, rounded up)
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 50
    valid_fraction: float = 0.05
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    tensorboard: bool = True

    def check(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every",
                     "eval_every"):
            if getattr(self, name) <= 0:
                raise MinimaError(f"--{name.replace('_', '-')} must be positive, "
                                  f"got {getattr(self, name)}")
        if self.max_tokens < 0:
            raise MinimaError(f"--max-tokens must be positive, got {self.max_tokens}")
        if not self.lr > 0:
            raise MinimaError(f"--lr must be positive, got {self.lr}")
        if not self.clip >= 0:
            raise MinimaError(f"--clip must be >= 0 (0: no clipping), got {self.clip}")
        if self.schedule not in SCHEDULES:
            raise MinimaError(f"unknown schedule {self.schedule!r}: choose "
                              f"{', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise MinimaError(f"unknown precision {self.precision!r}: choose "
                              f"{', '.join(PRECISIONS)}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise MinimaError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")
        if self.keep_last < 1:
            raise MinimaError(f"--keep-last must be at least 1, got {self.keep_last}")

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_tokens > 0:
            return math.ceil(self.max_tokens / self.tokens_per_step(world_size))
        return self.max_steps

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * self.seq_len * world_size

    def fingerprint(self) -> str:
        import hashlib

        changing = {k: v for k, v in asdict(self).items() if k not in UNHASHED_FIELDS}
        return hashlib.sha256(json.dumps(changing, sort_keys=True).encode()).hexdigest()[:16]


SCHEDULES = ("cosine", "linear", "constant")
