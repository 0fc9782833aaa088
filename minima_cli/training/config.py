"""What a training run can be asked for: `TrainConfig` (optimisation, schedule, checkpoints,
precision), `KDOptions` (the distillation losses) and `OnPolicyOptions` (on-policy generation),
shared by distill and sft. Each field is an option declared once (options.py): flag, YAML key
and recipe key. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from minima_cli.options import OptionError, option, unhashed

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
KD_LOSSES = ("fkl", "rkl", "jsd", "topk")
TOPK_MODES = ("renorm", "tail")


PEAK_HELP = ("Peak TFLOP/s that MFU (model FLOPs utilisation) is reported against; default: "
             "a listed GPU's bf16 peak, else a short matmul benchmark at the model's shapes in "
             "the run's precision, measured once per machine and cached.")


def peak_option():
    """--peak-tflops, the same option on distill, sft, score and eval (changes no result)."""
    return option(None, PEAK_HELP, kind="float", hashed=False)


def check_peak(peak_tflops: float | None) -> None:
    if peak_tflops is not None and not peak_tflops > 0:
        raise OptionError("peak_tflops", f"--peak-tflops must be positive, got {peak_tflops}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and checkpointing of a run (MiniMA's defaults where they apply)."""

    seq_len: int = option(512, "Tokens per packed sequence.", low=2)
    batch_size: int = option(4, "Sequences per micro-batch (per process).", low=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", low=1)
    lr: float = option(3e-4, "Peak learning rate (AdamW betas 0.9/0.95).")
    min_lr_ratio: float = option(0.1, "Final lr as a fraction of the peak.", low=0, high=1)
    warmup_ratio: float = option(0.01, "Fraction of steps warming up.")
    schedule: str = option("cosine", "Learning-rate decay after warmup.", choices=SCHEDULES)
    weight_decay: float = option(0.1, "AdamW weight decay (none on norms and biases).", low=0)
    clip: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).")
    max_steps: int = option(100, "Optimizer steps.", low=1)
    save_every: int = option(50, "Checkpoint every N steps.", low=1, hashed=False)
    keep_last: int = option(2, "Checkpoints kept.", low=1, hashed=False)
    eval_every: int = option(50, "Validation loss every N steps.", low=1, hashed=False)
    valid_fraction: float = option(0.05, "Documents held out for validation.")
    seed: int = option(0, "Seed for data order and the validation split.", low=0)
    precision: str = option("auto", "fp32, bf16 (autocast; DeepSpeed: bf16 weights) or auto: "
                            "bf16 where the hardware has it (GPU, CPUs with AVX512-BF16/AMX).",
                            choices=PRECISIONS, source="hardware")
    gradient_checkpointing: bool = option(False, "Trade compute for activation memory.",
                                          source="hardware")
    # Not hashed: like the thread count, compiling changes how the same math runs (inductor
    # fuses and reorders float ops: results within rounding of eager), not what is computed;
    # a finished stage is not re-run and a run may resume with it switched.
    compile: bool = option(False, "torch.compile the student (and the teacher's forward): "
                           "faster steps after a compile of minutes, results within rounding "
                           "of eager. One process only: refused with --deepspeed or several "
                           "processes, and with --on-policy (a recompile per generated "
                           "length).", hashed=False, source="hardware")
    deepspeed: str | None = option(None, "DeepSpeed JSON config (e.g. "
                                   "recipes/deepspeed/zero3.json); launch with torchrun or "
                                   "accelerate launch for several processes.", kind="file",
                                   hashed=False, source="hardware")
    tensorboard: bool = option(True, "TensorBoard scalars next to log.jsonl.",
                               flags=("--tensorboard/--no-tensorboard",), hashed=False)
    peak_tflops: float | None = peak_option()

    def check(self) -> None:
        if self.seq_len is not None and self.seq_len < 2:  # sft's None: the model's positions
            raise OptionError("seq_len", f"--seq-len must be at least 2 (a next-token loss "
                              f"needs two tokens), got {self.seq_len}")
        for name in ("batch_size", "grad_accum", "max_steps", "save_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise OptionError(name, f"--{name.replace('_', '-')} must be positive, "
                                  f"got {getattr(self, name)}")
        if not self.lr > 0:
            raise OptionError("lr", f"--lr must be positive, got {self.lr}")
        if not self.clip >= 0:
            raise OptionError("clip", f"--clip must be >= 0 (0: no clipping), got {self.clip}")
        if self.schedule not in SCHEDULES:
            raise OptionError("schedule", f"unknown schedule {self.schedule!r}: choose "
                              f"{', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"unknown precision {self.precision!r}: choose "
                              f"{', '.join(PRECISIONS)}")
        if not 0 <= self.warmup_ratio < 1:
            raise OptionError("warmup_ratio", "--warmup-ratio must be in [0, 1) and "
                              "--min-lr-ratio in [0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionError("min_lr_ratio", "--warmup-ratio must be in [0, 1) and "
                              "--min-lr-ratio in [0, 1]")
        if self.keep_last < 1:
            raise OptionError("keep_last", f"--keep-last must be at least 1, got {self.keep_last}")
        check_peak(self.peak_tflops)
        if self.compile and self.deepspeed:
            raise OptionError("compile", "--compile runs in one process without DeepSpeed: "
                              "drop --compile or --deepspeed")

    def total_steps(self, world_size: int = 1) -> int:
        return self.max_steps

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * self.seq_len * world_size

    def fingerprint(self) -> str:
        """What decides the weights (guards --resume): every option but inputs, outputs and
        bookkeeping."""
        skip = unhashed(type(self))
        changing = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(changing, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KDOptions:
    """The distillation loss: alpha * CE + (1 - alpha) * KD (docs/losses.md)."""

    loss: str = option("fkl", "fkl (forward KL, MiniMA), rkl, jsd (GKD), or topk (forward KL on "
                       "the teacher's top-k).", choices=KD_LOSSES)
    temperature: float = option(1.0, "Softmax temperature T (losses scaled by T^2).")
    alpha: float = option(0.5, "Weight of the LM cross-entropy; 1 - alpha on KD. 1 (without "
                          "--hidden-weight): the LM loss alone, a CE-only baseline; the teacher "
                          "is not loaded.", high=1)
    beta: float = option(0.5, "JSD interpolation weight (jsd only).", high=1)
    topk: int = option(64, "Teacher tokens per position for --loss topk (online).")
    topk_mode: str = option("renorm", "renorm (top-k renormalised) or tail (one bucket for the "
                            "rest of the mass).", choices=TOPK_MODES)

    def check_kd(self) -> None:
        if self.loss not in KD_LOSSES:
            raise OptionError("loss", f"unknown loss {self.loss!r}: choose "
                              f"{', '.join(KD_LOSSES)}")
        if self.topk_mode not in TOPK_MODES:
            raise OptionError("topk_mode", f"unknown top-k mode {self.topk_mode!r}: choose "
                              f"{', '.join(TOPK_MODES)}")
        if not self.temperature > 0:
            raise OptionError("temperature",
                              f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise OptionError("alpha", f"--alpha {self.alpha} must be in [0, 1]")
        if not 0 <= self.beta <= 1:
            raise OptionError("beta", f"--beta {self.beta} must be in [0, 1]")
        if self.topk < 1:
            raise OptionError("topk", f"--topk must be positive, got {self.topk}")


@dataclass(frozen=True)
class OnPolicyOptions:
    """On-policy distillation (GKD; docs/losses.md): on a lambda fraction of optimizer steps the
    student continues prompts by sampling and the teacher scores the continuation."""

    on_policy: float = option(0.0, "GKD's lambda: the fraction of optimizer steps on which the "
                              "student samples continuations of prompts and learns from the "
                              "teacher on its own tokens (KD only on those steps); 0: off.",
                              high=1)
    gen_tokens: int = option(32, "Tokens sampled per sequence on on-policy steps (fewer where "
                             "every sequence ends early).", low=1)
    gen_temperature: float = option(1.0, "Sampling temperature of on-policy generation (0: "
                                    "greedy).")
    gen_top_p: float = option(1.0, "Nucleus sampling: keep the most likely tokens up to this "
                              "probability mass, in (0, 1].", high=1)
    seq_kd: bool = option(False, "Sequence-level KD: on those steps the teacher generates "
                          "instead of the student.")

    @property
    def generates(self) -> bool:
        """Whether any step of the run generates."""
        return self.on_policy > 0

    def check_on_policy(self) -> None:
        if not 0 <= self.on_policy <= 1:
            raise OptionError("on_policy", f"--on-policy {self.on_policy} must be in [0, 1]")
        if self.gen_tokens < 1:
            raise OptionError("gen_tokens", f"--gen-tokens must be at least 1, got "
                              f"{self.gen_tokens}")
        if not self.gen_temperature >= 0:
            raise OptionError("gen_temperature", f"--gen-temperature must be >= 0 (0: greedy), "
                              f"got {self.gen_temperature}")
        if not 0 < self.gen_top_p <= 1:
            raise OptionError("gen_top_p", f"--gen-top-p {self.gen_top_p} must be in (0, 1]")
        if self.on_policy > 0 and getattr(self, "compile", False):
            raise OptionError("compile", "--compile with --on-policy would recompile the models "
                              "for every generated length: drop one of them")
        if self.seq_kd and not self.on_policy > 0:
            raise OptionError("seq_kd", "--seq-kd needs --on-policy > 0: the fraction of steps "
                              "on which the teacher generates")
