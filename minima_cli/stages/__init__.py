"""The stage registry: each stage is a config dataclass (stages/configs.py) plus
`run(config, control) -> manifest` in its own module. The CLI commands, `--config` YAML, the
recipe schema, `minima run`'s adapters and the Makefile's stage list are derived from this table
(docs/stages.md). Adding a stage: its config class, its module with `run`, one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minima_cli.stages import configs

EVAL_HELP = (
    "Evaluate models: perplexity, multiple choice, generation and lm-evaluation-harness tasks, "
    "with parameters and tokens/s per model; several models side by side, deltas against the "
    "first. Tasks:\n\n"
    "ppl:FILE - perplexity of a .txt (a document a line) or .jsonl/.json/.parquet (text field, "
    "or field=NAME); documents joined with EOS, strided windows (--max-length, --stride).\n\n"
    "mc:FILE.jsonl\\[:shots=5,dev=DEV.jsonl,style=cloze|letters] - multiple choice from "
    "{question, choices, answer} records: log-likelihood of ' ' + choice after the question "
    "(cloze) or of the letter after an MMLU-style listing (letters); acc and length-normalised "
    "acc_norm as lm-eval; the shots are the first N dev records.\n\n"
    "gen:FILE.jsonl\\[:match=exact|contains,max_tokens=32,temperature=0,top_p=1] - generation "
    "from {prompt, answer} or chat {messages} records (the last message is the reference); "
    "temperature 0 is greedy; outputs saved under --output.\n\n"
    "lm-eval:NAME_OR_YAML\\[:shots=N] - any lm-evaluation-harness task (online), or a local "
    "task YAML (offline)."
)


@dataclass(frozen=True)
class RunControl:
    """How to run, not what: never part of a result's hash."""

    force: bool = False
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    module: str  # minima_cli.stages.<module> holds `run(config, control)`
    help: str
    pipeline: bool = False  # a section of recipes (run in the order of this table)
    training: bool = False  # checkpoints in OUTPUT.run/, --resume
    distributed: bool = False  # may run under torchrun / accelerate launch
    model_name: str | None = None  # its output is a model, named so in summaries

    @property
    def run(self) -> Callable[..., Any]:
        return importlib.import_module(f"minima_cli.stages.{self.module}").run


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("tiny", configs.TinyConfig, "tiny", pipeline=True,
          help="Build the tiny world in seconds: a small LLaMA teacher pre-trained on a generated "
          "corpus with a locally trained byte-level BPE tokenizer. Everything offline."),
    Stage("score", configs.ScoreConfig, "score", pipeline=True, distributed=True,
          help="Score heads, kv groups, FFN neurons, hidden dims and layers by the gradient of "
          "the LM loss w.r.t. masks on them (parameters frozen), accumulated over data."),
    Stage("prune", configs.PruneConfig, "prune", pipeline=True, model_name="pruned",
          help="Structured pruning on layers, hidden dims, heads (GQA-aware), kv groups and FFN "
          "neurons, into a standard HF checkpoint that plain "
          "`AutoModelForCausalLM.from_pretrained` loads."),
    Stage("distill", configs.DistillConfig, "distill", pipeline=True, training=True,
          distributed=True, model_name="distilled",
          help="Distil the teacher into the student: alpha * CE + (1 - alpha) * KD (+ "
          "hidden-state MSE), the KD loss computed in token chunks so the full float32 (tokens x "
          "vocab) tensors never coexist. Runs on one process, or many under torchrun / "
          "accelerate launch with DeepSpeed."),
    Stage("cache-teacher", configs.CacheTeacherConfig, "cache_teacher",
          help="Run the teacher once over the training data and store its top-k log-probs per "
          "token, so `minima distill --teacher-cache DIR --loss topk` trains without the "
          "teacher in memory."),
    Stage("tokenize", configs.TokenizeConfig, "tokenize",
          help="Tokenise text once into a token store (memory-mapped uint16/uint32 shards, "
          "document offsets, store.json) that --data of distill, cache-teacher and schedule "
          "reads without holding it in memory; N worker processes; a killed build resumes."),
    Stage("schedule", configs.ScheduleConfig, "schedule",
          help="MiniDisc's teacher-assistant schedule: nested candidates pruned from the "
          "teacher, one sandwich run for every candidate's dev metric P, the assistant "
          "maximising P + lambda * s, then teacher -> assistant -> student (or teacher -> "
          "student when the teacher wins)."),
    Stage("sft", configs.SftConfig, "sft", pipeline=True, training=True, distributed=True,
          model_name="sft",
          help="Instruction-tune on chat data with the loss on assistant tokens only: the "
          "tokenizer's chat template (or ChatML, then saved with the model), optional packing, "
          "optional distillation from a teacher. Checkpoints, --resume, logs and DeepSpeed as "
          "distill."),
    Stage("export", configs.ExportConfig, "export", pipeline=True, model_name="exported",
          help="Export a model as one GGUF file for llama.cpp-family runtimes: llama metadata, "
          "q/k rows permuted as llama.cpp expects, tokenizer and chat template, tensors "
          "streamed and encoded f32, f16, bf16, q8_0 or q4_0; written atomically."),
    Stage("eval", configs.EvalConfig, "evaluate", pipeline=True,
          help=EVAL_HELP),
)}

PIPELINE = tuple(name for name, stage in STAGES.items() if stage.pipeline)
TRAINING = tuple(name for name, stage in STAGES.items() if stage.training)
DISTRIBUTED = tuple(name for name, stage in STAGES.items() if stage.distributed)
MODEL_STAGES = tuple(name for name, stage in STAGES.items() if stage.pipeline and stage.model_name)
MODEL_NAMES = {"teacher": "teacher",
               **{name: STAGES[name].model_name for name in MODEL_STAGES}}


def run_stage(name: str, config: Any, control: RunControl | None = None) -> Any:
    """Run one stage through the registry (how `minima run` and `minima schedule` call other
    stages without importing them)."""
    return STAGES[name].run(config, control or RunControl())
