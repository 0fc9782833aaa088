"""Every stage's options, declared once (options.py): each config dataclass below is at the same
time the stage's CLI flags, its `--config` YAML keys, its recipe section and the argument of its
`run(config)`. The registry (stages/__init__.py) ties each to its command. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from minima_cli.options import OptionError, option
from minima_cli.training.config import (
    PRECISIONS,
    KDOptions,
    OnPolicyOptions,
    TrainConfig,
    peak_option,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCORE_METHODS = ("grad", "activation")
PRIORITIES = ("local", "global")
LAYER_SELECTIONS = ("auto", "score", "units", "middle")
EVAL_BACKENDS = ("minima", "lm-eval")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
SANDWICH_LOSSES = ("fkl", "rkl", "jsd")
DEFAULT_SEQ_LEN = 512  # score's and sft's --seq-len when the model has at least this many positions

TEACHER_HELP = "The full teacher: HF directory or .gguf file."
TEXT_FIELD_HELP = "Field with the text in jsonl/json/parquet data."
DEVICE_HELP = "cpu, cuda, cuda:1, ... (auto: cuda if available)."


def resolve_seq_len(seq_len: int | None, max_positions: int | None, whose: str = "model") -> int:
    """The --seq-len a stage runs at: an explicit value must fit the model's positions; None
    (score's and sft's default) is the smaller of DEFAULT_SEQ_LEN and them."""
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
        if seq_len < 2:
            raise OptionError("seq_len", f"the {whose} has {max_positions} position: a "
                              "next-token loss needs two tokens")
        return seq_len
    if max_positions and seq_len > max_positions:
        raise OptionError("seq_len", f"--seq-len {seq_len} exceeds the {whose}'s "
                          f"{max_positions} positions")
    return seq_len


def check_valid_split(valid_fraction: float, valid_tokens: int = 0,
                      other: str = "--valid-tokens") -> None:
    """The validation split of distill, sft and cache-teacher: a fraction in [0, 1), and not 0
    unless `other` gives the validation set instead. Decided: no validation is refused rather than
    run without, because every training run reports (and `minima run` compares) a validation
    loss; an empty split used to be a ZeroDivisionError."""
    if not 0 <= valid_fraction < 1:
        raise OptionError("valid_fraction", f"--valid-fraction must be in [0, 1), got "
                          f"{valid_fraction:g}")
    if valid_fraction == 0 and not valid_tokens:
        raise OptionError("valid_fraction", f"--valid-fraction 0 leaves no validation set: give "
                          f"a fraction > 0 or {other}")


def output_option(help: str, required: bool = True):
    return option(None, help, flags=("--output", "-o"), kind="path", required=required,
                  source="output")


def device_option():
    return option("auto", DEVICE_HELP, source="hardware")


@dataclass(frozen=True)
class TinyConfig:
    output: str | None = output_option(
        "Directory to create: teacher/ (HF model + tokenizer), data/train.txt, data/valid.txt, "
        "data/facts.jsonl, multiple-choice sets for `minima eval` (data/eval_mc.jsonl, "
        "data/eval_facts_mc.jsonl, each with a _dev file of shots) and chat data "
        "(data/chat_train.jsonl, data/chat_eval.jsonl).")
    seed: int = option(0, "Seed for the corpus, the initial weights and batching.", low=0)
    gqa: bool = option(True, "Grouped-query attention (2 query heads per kv head) or plain "
                       "multi-head attention.", flags=("--gqa/--no-gqa",))
    tied: bool = option(True, "Tie lm_head to the embeddings.", flags=("--tied/--untied",))
    steps: int = option(200, "Pre-training steps for the teacher.", low=0)
    documents: int = option(2000, "Documents in the generated corpus.", low=10)


@dataclass(frozen=True)
class ScoreConfig:
    model: str | None = option(None, "Teacher: an HF directory (safetensors) or a .gguf file.",
                               flags=("--model", "-m"), kind="model", required=True,
                               input="model")
    data: str | None = option(None, "Text to score on: .txt (a document a line), .jsonl/.json, "
                              ".parquet, a directory of them, or a dataset name on the hub "
                              "(online only).", flags=("--data", "-d"), kind="data",
                              required=True, input="data")
    output: str | None = output_option("Directory to write (scores.safetensors + minima.json).")
    batches: int = option(16, "Batches to accumulate scores over (fewer if the data runs out).",
                          low=1)
    seq_len: int | None = option(None, "Tokens per sequence (documents are packed with EOS "
                                 "separators); default: the smaller of 512 and the model's "
                                 "positions.", kind="int", low=2)
    batch_size: int = option(4, "Sequences per batch.", low=1)
    method: str = option("grad", "grad: mean |dLoss/dmask| (MiniMA); activation: mean "
                         "activation magnitude (Minitron).", choices=SCORE_METHODS)
    text_field: str = option("text", TEXT_FIELD_HELP)
    seed: int = option(0, "Seed for sampling the scored sequences.", low=0)
    dtype: str = option("auto", "Weights dtype (auto: as stored).", choices=DTYPES)
    device: str = device_option()
    peak_tflops: float | None = peak_option()


@dataclass(frozen=True)
class PruneConfig:
    model: str | None = option(None, "Teacher: an HF directory (safetensors) or a .gguf file.",
                               flags=("--model", "-m"), kind="model", required=True,
                               input="model")
    scores: str | None = option(None, "Output directory of `minima score` for this model "
                                "(optional with --dry-run).", flags=("--scores", "-s"),
                                kind="dir", input="dir")
    output: str | None = output_option("Directory for the pruned standard HF model.",
                                       required=False)
    shape: str | None = option(None, "Target shape, e.g. layers=24,hidden=3072,heads=24,"
                               "kv-heads=24,ffn=8192. Missing axes keep the teacher's value, or "
                               "are solved from --params/--ratio.", kind="shape")
    params: str | None = option(None, "Target parameter count (3B, 60M, 1.5e9): free width axes "
                                "are scaled together (symmetric shaping).", kind="size")
    ratio: float | None = option(None, "Target as the fraction of parameters kept, in (0, 1), "
                                 "e.g. 0.45.", kind="fraction")
    priority: str = option("local", "local: each layer keeps its own top units; global: units "
                           "compete across layers, which decides the layers removed.",
                           choices=PRIORITIES)
    layer_selection: str = option("auto", "Layers kept when fewer are asked: score (layer-mask "
                                  "score), units (most globally surviving units), middle "
                                  "(MiniMA: drop equally from both ends); auto = units with "
                                  "--priority global, else score.", choices=LAYER_SELECTIONS)
    multiple_of: int = option(8, "Round solved hidden/FFN widths to this multiple.", low=1)
    dry_run: bool = option(False, "Print the planned shape and parameters; write nothing.",
                           source="cli")

    def check(self) -> None:
        if not self.dry_run and self.output is None:
            raise OptionError("output", "missing option --output (or --dry-run)")


@dataclass(frozen=True)
class DistillConfig(TrainConfig, OnPolicyOptions, KDOptions):
    """Everything that defines a distillation run (its hash guards --resume)."""

    teacher: str | None = option(None, "The full teacher: HF directory or .gguf file (or give "
                                 "--teacher-cache).", flags=("--teacher", "-t"), kind="model",
                                 input="model")
    student: str | None = option(None, "The student to train (usually `minima prune` output); "
                                 "same tokenizer as the teacher.", flags=("--student", "-s"),
                                 kind="model", required=True, input="model")
    data: str | None = option(None, "Training text: a file, a directory, 'a.txt:0.7,b.jsonl:0.3' "
                              "to mix by weight, or a hub dataset name.", flags=("--data", "-d"),
                              kind="data", required=True, input="data")
    output: str | None = output_option("Directory for the distilled student (standard HF "
                                       "model); OUTPUT.run/ holds checkpoints.")
    teacher_cache: str | None = option(None, "`minima cache-teacher` output: train on the cached "
                                       "top-k without loading the teacher (needs --loss topk).",
                                       kind="dir", input="dir")
    text_field: str = option("text", TEXT_FIELD_HELP)
    max_tokens: int = option(0, "Train on this many tokens instead of --max-steps (0: use "
                             "--max-steps).", low=0)
    hidden_weight: float = option(0.0, "Weight of the hidden-state MSE (0: off); a pruned "
                                  "student is compared on the teacher's kept hidden dims.")
    hidden_layers: str = option("auto", "STUDENT:TEACHER layer pairs, e.g. '0:1,1:3' (auto: a "
                                "pruned layer to its origin, else the same relative depth).")
    valid_tokens: int = option(0, "A validation set of this many tokens (seeded random held-out "
                               "documents), the same cost whatever the corpus size; overrides "
                               "--valid-fraction (0: use --valid-fraction).", low=0)
    prompt_tokens: int | None = option(None, "On-policy steps: the first N tokens of each block "
                                       "are the prompt the student continues (default: half "
                                       "of --seq-len).", kind="int", low=1)

    def check(self) -> None:
        TrainConfig.check(self)
        self.check_kd()
        self.check_on_policy()
        if self.prompt_tokens is not None and not 1 <= self.prompt_tokens <= self.seq_len:
            raise OptionError("prompt_tokens", f"--prompt-tokens must be in [1, --seq-len "
                              f"{self.seq_len}], got {self.prompt_tokens}")
        if self.generates and self.teacher_cache:
            raise OptionError("on_policy", "--on-policy with --teacher-cache: the cache cannot "
                              "score new text; give the live teacher with --teacher")
        if self.generates and self.hidden_weight > 0:
            raise OptionError("on_policy", "--on-policy with --hidden-weight: the hidden-state "
                              "loss is not defined on generated text; use one or the other")
        if self.max_tokens < 0:
            raise OptionError("max_tokens", f"--max-tokens must be positive, got "
                              f"{self.max_tokens}")
        if not self.hidden_weight >= 0:
            raise OptionError("hidden_weight",
                              f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        check_valid_split(self.valid_fraction, getattr(self, "valid_tokens", 0))

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_tokens > 0:
            return math.ceil(self.max_tokens / self.tokens_per_step(world_size))
        return self.max_steps

    def prompt_length(self) -> int:
        """On-policy steps' prompt: the first `prompt_tokens` of a block (default seq_len // 2)."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.seq_len // 2


@dataclass(frozen=True)
class SftConfig(TrainConfig, OnPolicyOptions, KDOptions):
    """An sft run (its hash guards --resume): the shared optimisation and (teacher) losses with
    MiniChat's defaults, plus packing and epochs. `max_steps` 0 means `epochs` passes."""

    model: str | None = option(None, "The model to tune: HF directory or .gguf file (usually "
                               "`minima distill` output).", flags=("--model", "-m"),
                               kind="model", required=True, input="model")
    data: str | None = option(None, "Chat data: .jsonl/.json/.parquet or a directory of them; "
                              "records with 'messages', 'conversations' (ShareGPT), 'prompt' + "
                              "'response'/'completion', or 'instruction' (+ 'input') + "
                              "'output'.", flags=("--data", "-d"), kind="chat", required=True,
                              input="data")
    output: str | None = output_option("Directory for the chat model (standard HF model, chat "
                                       "template included); OUTPUT.run/ holds checkpoints.")
    valid_data: str | None = option(None, "Held-out chat data for the validation loss "
                                    "(default: --valid-fraction of --data).", kind="chat",
                                    input="data")
    teacher: str | None = option(None, "Optional teacher (same tokenizer): distil on the same "
                                 "chat data, assistant tokens only (--loss and the KD options "
                                 "as distill).", flags=("--teacher", "-t"), kind="model",
                                 input="model")
    lr: float = option(2e-5, "Peak learning rate (MiniChat: 2e-5; the tiny world needs ~1e-3).")
    warmup_ratio: float = option(0.1, "Fraction of steps warming up.")
    max_steps: int = option(0, "Optimizer steps; overrides --epochs (0: from --epochs).", low=0)
    eval_every: int = option(50, "Validation loss (assistant tokens of held-out conversations) "
                             "every N steps.", low=1, hashed=False)
    valid_fraction: float = option(0.05, "Conversations held out for validation.")
    seq_len: int | None = option(None, "Tokens per row (longer conversations are cut); default: "
                                 "the smaller of 512 and the model's positions.", kind="int",
                                 low=2)
    epochs: float = option(3.0, "Passes over the training rows (MiniChat: 3).")
    packing: bool = option(False, "Pack whole examples into --seq-len rows (they never attend "
                           "to each other), or one example per row.",
                           flags=("--packing/--no-packing",))

    def check(self) -> None:
        TrainConfig.check(dataclasses.replace(self, max_steps=self.max_steps or 1))
        self.check_kd()
        self.check_on_policy()
        if self.generates and self.teacher is None:
            raise OptionError("on_policy", "--on-policy needs --teacher: the teacher scores the "
                              "student's generations")
        if self.max_steps < 0:
            raise OptionError("max_steps", f"--max-steps must be positive, got {self.max_steps}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise OptionError("epochs", f"--epochs must be positive, got {self.epochs}")
        check_valid_split(self.valid_fraction, bool(self.valid_data), "--valid-data")

    def steps_for(self, n_rows: int, world_size: int) -> int:
        """`max_steps`, or the optimizer steps of `epochs` passes over `n_rows` rows."""
        if self.max_steps:
            return self.max_steps
        per_step = self.batch_size * self.grad_accum * world_size
        return max(1, math.ceil(self.epochs * n_rows / per_step))


@dataclass(frozen=True)
class CacheTeacherConfig:
    teacher: str | None = option(None, TEACHER_HELP, flags=("--teacher", "-t"), kind="model",
                                 required=True, input="model")
    data: str | None = option(None, "The training data exactly as distill will get it.",
                              flags=("--data", "-d"), kind="data", required=True, input="data")
    output: str | None = output_option("Directory for the cache shards.")
    k: int = option(64, "Top tokens kept per position.", flags=("--k", "-k"), low=1)
    seq_len: int = option(512, "As distill's --seq-len.", low=2)
    seed: int = option(0, "As distill's --seed (it decides the validation split).", low=0)
    valid_fraction: float = option(0.05, "As distill's.")
    valid_tokens: int = option(0, "As distill's.", low=0)
    batch_size: int = option(8, "Sequences per teacher forward.", low=1)
    blocks_per_shard: int = option(1024, "Sequences per safetensors shard.", low=1)
    dtype: str = option("float16", "Log-prob storage.", choices=CACHE_DTYPES)
    text_field: str = option("text", "As distill's.")

    def check(self) -> None:
        check_valid_split(self.valid_fraction, getattr(self, "valid_tokens", 0))


@dataclass(frozen=True)
class ScheduleConfig:
    teacher: str | None = option(None, TEACHER_HELP, flags=("--teacher", "-t"), kind="model",
                                 required=True, input="model")
    scores: str | None = option(None, "`minima score` output for the teacher: one ranking for "
                                "every nested candidate.", flags=("--scores", "-s"), kind="dir",
                                required=True, input="dir")
    data: str | None = option(None, "Training text for the sandwich and every distillation (as "
                              "for `minima distill`).", flags=("--data", "-d"), kind="data",
                              required=True, input="data")
    output: str | None = output_option("Directory to write: schedule.json, student/ and "
                                       "assistant/ (when one is used).")
    student_ratio: float | None = option(None, "Student as the fraction of the teacher's "
                                         "parameters kept, in (0, 1).", kind="fraction")
    student_params: str | None = option(None, "Student size (60M, 1.5e9) instead of "
                                        "--student-ratio.", kind="size")
    lam: float = option(0.2, "Trade-off weight in P + lambda * s, in \\[0, 1] (MiniDisc: 0.2); "
                        "larger favours sparser assistants.", flags=("--lambda",), low=0,
                        high=1)
    sparsities: str | None = option(None, "Candidate sparsities in percent (default "
                                    "0,10,...,90,85,95); those at least as sparse as the "
                                    "student are skipped; 0 (the teacher) is always one.")
    sandwich_steps: int = option(100, "Steps of the one shared-weight sandwich run.", low=1)
    sandwich_widths: int = option(0, "Widths per sandwich step: 0 = every candidate, else "
                                  "largest + smallest + random.", low=0)
    distill_steps: int = option(100, "Optimizer steps of each distillation (teacher -> "
                                "assistant, then -> student).", low=1)
    dev_data: str | None = option(None, "Text the dev metric P = 1 / perplexity is measured on "
                                  "(default: distill's held-out split of --data).", kind="data",
                                  input="data")
    exhaustive: bool = option(False, "Also distil every candidate and its student (brute "
                              "force) and report how the sandwich's ranking agrees.")
    plan_only: bool = option(False, "Stop after the choice: write schedule.json, distil "
                             "nothing.")
    loss: str = option("fkl", "fkl (forward KL, MiniMA), rkl, or jsd.", choices=SANDWICH_LOSSES)
    alpha: float = option(0.5, "Weight of the LM cross-entropy; 1 - alpha on KD.", low=0, high=1)
    seq_len: int = option(512, "Tokens per packed sequence.", low=2)
    batch_size: int = option(4, "Sequences per step.", low=1)
    lr: float = option(3e-4, "Peak learning rate (AdamW, warmup then cosine).")
    clip: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).", low=0)
    seed: int = option(0, "Seed for data order and the validation split.", low=0)
    text_field: str = option("text", TEXT_FIELD_HELP)
    precision: str = option("auto", "fp32, bf16 (autocast) or auto: bf16 where the hardware has "
                            "it; the sandwich and every distillation run in it.",
                            choices=PRECISIONS)

    def distill_config(self) -> DistillConfig:
        """The distillation settings of every chain link (and of the sandwich's loss)."""
        return DistillConfig(loss=self.loss, alpha=self.alpha, seq_len=self.seq_len,
                             batch_size=self.batch_size, lr=self.lr, clip=self.clip,
                             max_steps=self.distill_steps, seed=self.seed,
                             text_field=self.text_field, precision=self.precision)


@dataclass(frozen=True)
class EvalConfig:
    models: list[str] | None = option(None, "Model to evaluate: HF directory or .gguf file, "
                                      "optionally NAME=PATH; repeat to compare models side by "
                                      "side (deltas against the first).",
                                      flags=("--model", "-m"), kind="models", required=True,
                                      input="models", multiple=True)
    tasks: list[str] | None = option(None, "Repeatable: KIND:TARGET with optional "
                                     ":key=value,... (the kinds are listed above).",
                                     flags=("--task", "-t"), kind="tasks", required=True,
                                     input="tasks", multiple=True)
    output: str | None = output_option("Directory to write results.json, generations/*.jsonl "
                                       "and minima.json (atomically).", required=False)
    backend: str = option("minima", "minima, or lm-eval: mc tasks run through "
                          "lm-evaluation-harness (a generated local task) and a bare --task NAME "
                          "is a harness task. ppl and gen always run in minima.",
                          choices=EVAL_BACKENDS)
    max_length: int | None = option(None, "Tokens the model reads at once (default: its "
                                    "max_position_embeddings, at most 2048).", kind="int",
                                    low=2)
    stride: int | None = option(None, "Perplexity window step in tokens, 1..max-length (default:"
                                " max-length / 2): each token is scored once, with the context "
                                "of the first window that holds it after its start; stride = "
                                "max-length scores independent chunks.", kind="int", low=1)
    batch_size: int = option(8, "Sequences per forward pass.", low=1)
    limit: int | None = option(None, "Evaluate only the first N items (documents for ppl) of "
                               "each task.", kind="int", low=1)
    seed: int = option(0, "Seed for sampled generation and the harness.", low=0)
    dtype: str = option("auto", "Weights dtype (auto: as stored).", choices=DTYPES)
    device: str = device_option()
    peak_tflops: float | None = peak_option()


@dataclass(frozen=True)
class TokenizeConfig:
    data: str | None = option(None, "Text to tokenise: .jsonl/.json, .txt (a document a line), "
                              ".parquet, .arrow, a directory of them, a hub dataset name "
                              "(streamed), or several as 'a.jsonl,b.txt'.",
                              flags=("--data", "-d"), kind="data", required=True, input="data")
    tokenizer: str | None = option(None, "The tokenizer: a model directory (or one holding only "
                                   "tokenizer files) or a .gguf file; the store only works with "
                                   "models of this tokenizer.", kind="model", required=True,
                                   input="model")
    output: str | None = output_option("The token store directory to create (shards, offsets, "
                                       "store.json); a killed build continues from "
                                       "OUTPUT.tmp-build/.")
    workers: int = option(1, "Tokeniser processes (each loads the tokenizer itself).", low=1)
    max_tokens: int = option(0, "Stop after this many tokens (0: the whole corpus).", low=0)
    text_field: str = option("text", TEXT_FIELD_HELP)
    shard_tokens: int = option(1 << 26, "Tokens per shard (the unit of resume).", low=1)


EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


@dataclass(frozen=True)
class ExportConfig:
    model: str | None = option(None, "The model to export (LLaMA or Mistral layout, byte-level "
                               "BPE tokenizer): HF directory or .gguf file.",
                               flags=("--model", "-m"), kind="model", required=True,
                               input="model")
    output: str | None = output_option("FILE.gguf to write (its directory must exist); a path "
                                       "not ending in .gguf is a directory that gets model.gguf "
                                       "and minima.json (what `minima run` gives the stage).")
    type: str = option("f16", "Tensor encoding: f32, f16, bf16 (norms stay f32), q8_0 or q4_0 "
                       "(ggml's 32-value blocks; rows that are not a multiple of 32 fall back to "
                       "f16; q4_0 keeps the output projection in q8_0).", choices=EXPORT_TYPES,
                       flags=("--type",))

    def check(self) -> None:
        # a FILE.gguf goes into an existing directory (checked before anything creates one)
        if self.output and self.output.endswith(".gguf") and \
                not Path(self.output).expanduser().parent.is_dir():
            raise OptionError("output", f"output directory {Path(self.output).parent} does not "
                              "exist")
