"""`minima distill`: knowledge distillation from a full teacher into a (pruned) student.

Per micro-batch: the teacher's logits (forward under no_grad, or its top-k read from an offline
`minima cache-teacher` directory), the student's forward, and the chunked loss
`alpha * CE + (1 - alpha) * KD` (losses.py) plus, optionally, `hidden_weight` times the MSE of
mapped hidden states (for a pruned student: against the teacher's states on the kept hidden dims,
which the prune manifest records). The loop itself (schedule, accumulation, checkpoints, exact
resume, DeepSpeed ZeRO, logs) is train.py's. The final student is written atomically to OUTPUT as
a standard HF directory; `OUTPUT.run/` (checkpoints, log, token cache) is removed on success.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minima_cli.errors import MinimaError
from minima_cli.training.config import KD_LOSSES, TOPK_MODES, TrainConfig

LOSSES = KD_LOSSES


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Everything that defines a distillation run (its hash guards --resume)."""

    loss: str = "fkl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    topk: int = 64  # teacher tokens kept per position by --loss topk (online)
    topk_mode: str = "renorm"
    hidden_weight: float = 0.0
    hidden_layers: str = "auto"

    def check(self) -> None:
        super().check()
        if self.loss not in LOSSES:
            raise MinimaError(f"unknown loss {self.loss!r}: choose {', '.join(LOSSES)}")
        if self.topk_mode not in TOPK_MODES:
            raise MinimaError(f"unknown top-k mode {self.topk_mode!r}: choose "
                              f"{', '.join(TOPK_MODES)}")
        if not self.temperature > 0:
            raise MinimaError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise MinimaError(f"--alpha {self.alpha} must be in [0, 1]")
        if not 0 <= self.beta <= 1:
            raise MinimaError(f"--beta {self.beta} must be in [0, 1]")
        if self.topk < 1:
            raise MinimaError(f"--topk must be positive, got {self.topk}")
        if not self.hidden_weight >= 0:
            raise MinimaError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")


@dataclass
class EvalConfig:
    backend: str = "minima"
    max_length: int | None = None  # default: the model's context, at most DEFAULT_MAX_LENGTH
    stride: int | None = None  # default: max_length // 2
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class SftConfig(DistillConfig):
    """An sft run (its hash guards --resume): distill's optimisation and (teacher) losses with
    MiniChat's defaults, plus packing and epochs. `max_steps` 0 means `epochs` passes."""

    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_steps: int = 0
    epochs: float = 3.0
    packing: bool = False

    def check(self) -> None:
        DistillConfig.check(dataclasses.replace(self, max_steps=self.max_steps or 1))
        if self.max_steps < 0:
            raise MinimaError(f"--max-steps must be positive, got {self.max_steps}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise MinimaError(f"--epochs must be positive, got {self.epochs}")
        if self.max_tokens:
            raise MinimaError("sft counts --epochs or --max-steps, not --max-tokens")
        if self.hidden_weight:
            raise MinimaError("sft has no hidden-state loss")

    def steps_for(self, n_rows: int, world_size: int) -> int:
        """`max_steps`, or the optimizer steps of `epochs` passes over `n_rows` rows."""
        if self.max_steps:
            return self.max_steps
        per_step = self.batch_size * self.grad_accum * world_size
        return max(1, math.ceil(self.epochs * n_rows / per_step))
