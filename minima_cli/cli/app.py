"""The `minima` command line: one thin subcommand per stage over the stage modules.

A user error prints one line, `error: ...`, and exits 2; never a traceback.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from minima_cli import __version__
from minima_cli.errors import MinimaError

try:  # typer >= 0.26 vendors its own click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_errors


app = typer.Typer(
    name="minima",
    help="Compress LLaMA-family language models: score -> prune -> distill -> sft -> eval.\n\n"
    "Every stage reads and writes ordinary Hugging Face checkpoint directories, atomically, "
    "with a minima.json manifest. Start with `minima tiny --output demo` for a teacher to try.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


out = Console(soft_wrap=True)  # long messages stay one line, for logs and grep


class Method(str, Enum):
    grad = "grad"
    activation = "activation"


class Priority(str, Enum):
    local = "local"
    global_ = "global"


class LayerSelection(str, Enum):
    auto = "auto"
    score = "score"
    units = "units"
    middle = "middle"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def torch_dtype(name: DType):
    import torch

    return None if name == DType.auto else getattr(torch, name.value)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"minima {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """minima: teacher in, smaller standard Hugging Face student out."""


FORCE = typer.Option(False, "--force", help="Replace an existing output directory.")


QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


@app.command()
def tiny(
    output: Path = typer.Option(..., "--output", "-o", help="Directory to create: teacher/ "
                                "(HF model + tokenizer), data/train.txt, data/valid.txt, "
                                "data/facts.jsonl, multiple-choice sets for `minima eval` "
                                "(data/eval_mc.jsonl, data/eval_facts_mc.jsonl, each with a "
                                "_dev file of shots) and chat data (data/chat_train.jsonl, "
                                "data/chat_eval.jsonl)."),
    seed: int = typer.Option(0, help="Seed for the corpus, the initial weights and batching."),
    gqa: bool = typer.Option(True, "--gqa/--no-gqa", help="Grouped-query attention (2 query "
                             "heads per kv head) or plain multi-head attention."),
    tied: bool = typer.Option(True, "--tied/--untied", help="Tie lm_head to the embeddings."),
    steps: int = typer.Option(200, min=0, help="Pre-training steps for the teacher."),
    documents: int = typer.Option(2000, min=10, help="Documents in the generated corpus."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Build the tiny world in seconds: a small LLaMA teacher pre-trained on a generated corpus
    with a locally trained byte-level BPE tokenizer. Everything offline."""
    from minima_cli.fsutil import atomic_output_dir, write_manifest
    from minima_cli.stages.tiny import build_tiny_world

    with atomic_output_dir(output, force=force) as tmp:
        summary = build_tiny_world(tmp, seed=seed, gqa=gqa, tied=tied, n_documents=documents,
                                   steps=steps, progress=not quiet)
        summary = {k: (v.replace(str(tmp), str(output)) if isinstance(v, str) else v)
                   for k, v in summary.items()}
        write_manifest(tmp, "tiny", config={"seed": seed, "gqa": gqa, "tied": tied,
                                            "steps": steps, "documents": documents},
                       metrics=summary)
    table = Table(title=f"tiny world in {output}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
def score(
    model: str = typer.Option(..., "--model", "-m", help="Teacher: an HF directory "
                              "(safetensors) or a .gguf file."),
    data: str = typer.Option(..., "--data", "-d", help="Text to score on: .txt (a document a "
                             "line), .jsonl/.json, .parquet, a directory of them, or a dataset "
                             "name on the hub (online only)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write "
                                "(scores.safetensors + minima.json)."),
    batches: int = typer.Option(16, help="Batches to accumulate scores over (fewer if the data "
                                "runs out)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence (documents are "
                                "packed with EOS separators)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per batch."),
    method: Method = typer.Option(Method.grad, help="grad: mean |dLoss/dmask| (MiniMA); "
                                  "activation: mean activation magnitude (Minitron)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in "
                                   "jsonl/json/parquet data."),
    seed: int = typer.Option(0, help="Seed for sampling the scored sequences."),
    dtype: DType = typer.Option(DType.auto, help="Weights dtype (auto: as stored)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Score heads, kv groups, FFN neurons, hidden dims and layers by the gradient of the LM loss
    w.r.t. masks on them (parameters frozen), accumulated over data."""
    from minima_cli.stages.score import run_score

    manifest = run_score(model_path=model, data=data, output=output, batches=batches,
                         seq_len=seq_len, batch_size=batch_size, method=method.value,
                         text_field=text_field, seed=seed, dtype=torch_dtype(dtype),
                         device=device, force=force, progress=not quiet)
    metrics = manifest["metrics"]
    out.print(f"scored {metrics['tokens']:,} tokens in {manifest['wall_time_s']:.1f}s "
              f"({metrics['tokens_per_second']:,.0f} tok/s, mean loss "
              f"{metrics['mean_loss']:.4f}) -> {output}")


@app.command()
def prune(
    model: str = typer.Option(..., "--model", "-m", help="Teacher: an HF directory "
                              "(safetensors) or a .gguf file."),
    scores: str = typer.Option(None, "--scores", "-s", help="Output directory of `minima "
                               "score` for this model (optional with --dry-run)."),
    output: Path = typer.Option(None, "--output", "-o", help="Directory for the pruned "
                                "standard HF model."),
    shape: str = typer.Option(None, help="Target shape, e.g. layers=24,hidden=3072,heads=24,"
                              "kv-heads=24,ffn=8192. Missing axes keep the teacher's value, or "
                              "are solved from --params/--ratio."),
    params: str = typer.Option(None, help="Target parameter count (3B, 60M, 1.5e9): free width "
                               "axes are scaled together (symmetric shaping)."),
    ratio: float = typer.Option(None, help="Target as the fraction of parameters kept, in "
                                "(0, 1), e.g. 0.45."),
    priority: Priority = typer.Option(Priority.local, help="local: each layer keeps its own "
                                      "top units; global: units compete across layers, which "
                                      "decides the layers removed."),
    layer_selection: LayerSelection = typer.Option(
        LayerSelection.auto, "--layer-selection",
        help="Layers kept when fewer are asked: score (layer-mask score), units (most globally "
        "surviving units), middle (MiniMA: drop equally from both ends); auto = units with "
        "--priority global, else score."),
    multiple_of: int = typer.Option(8, "--multiple-of", help="Round solved hidden/FFN widths "
                                    "to this multiple."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the planned shape and "
                                 "parameters; write nothing."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Structured pruning on layers, hidden dims, heads (GQA-aware), kv groups and FFN neurons,
    into a standard HF checkpoint that plain `AutoModelForCausalLM.from_pretrained` loads."""
    from minima_cli.stages.prune import run_prune

    result = run_prune(model_path=model, output=output, scores_path=scores, shape=shape,
                       params=params, ratio=ratio, priority=priority.value,
                       layer_selection=layer_selection.value, multiple_of=multiple_of,
                       dry_run=dry_run, force=force, progress=not quiet)
    table = Table(title="prune plan" if dry_run else f"pruned -> {output}")
    for column in ("axis", "teacher", "student", "kept"):
        table.add_column(column, justify="left" if column == "axis" else "right")
    for row in result["table"]:
        table.add_row(*row)
    out.print(table)
    if "plan" in result:
        out.print(f"layers kept: {result['plan']['layers']}")


def merged_params(ctx: typer.Context, config_file: Path | None, section: str) -> dict:
    """The command's parameters with a YAML recipe's values filled in where the command line left
    the default (flags win). The file may hold the keys at top level or under `section:`."""
    import difflib

    import yaml

    params = dict(ctx.params)
    if config_file is None:
        return params
    try:
        loaded = yaml.safe_load(Path(config_file).read_text())
    except FileNotFoundError:
        raise MinimaError(f"--config: file not found: {config_file}") from None
    except yaml.YAMLError as error:
        raise MinimaError(f"{config_file}: not valid YAML ({str(error).splitlines()[0]})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get(section), dict):
        loaded = loaded[section]
    if not isinstance(loaded, dict):
        raise MinimaError(f"{config_file}: expected a mapping of {section} options")
    by_name = {p.name: p for p in ctx.command.params}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in by_name or name in ("config", "resume", "force", "quiet"):
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MinimaError(f"{config_file}: {section}.{key}: unknown key{hint}")
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            continue  # given on the command line
        try:
            param = by_name[name]
            params[name] = None if value is None else param.process_value(ctx, value)
        except (click_errors.ClickException, TypeError, ValueError) as error:
            message = getattr(error, "message", str(error))
            raise MinimaError(f"{config_file}: {section}.{key}: {message}") from None
    return params


CONFIG = typer.Option(None, "--config", "-c", help="YAML file with any of these options "
                      "(keys as the long flags, at top level or under the command's name); "
                      "flags given on the command line win.")


# training options shared by distill and sft
GRAD_ACCUM = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step.")


SCHEDULE = typer.Option("cosine", help="cosine, linear or constant after warmup.")


MIN_LR_RATIO = typer.Option(0.1, "--min-lr-ratio", help="Final lr as a fraction of "
                            "the peak.")


WEIGHT_DECAY = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (none on "
                            "norms and biases).")


CLIP = typer.Option(1.0, help="Clip the global gradient norm to this (0: no clipping).")


SAVE_EVERY = typer.Option(50, "--save-every", help="Checkpoint every N steps.")


KEEP_LAST = typer.Option(2, "--keep-last", help="Checkpoints kept.")


GRADIENT_CHECKPOINTING = typer.Option(False, "--gradient-checkpointing", help="Trade "
                                      "compute for activation memory.")


TENSORBOARD = typer.Option(True, "--tensorboard/--no-tensorboard", help="TensorBoard "
                           "scalars next to log.jsonl.")


RESUME = typer.Option(False, "--resume", help="Continue OUTPUT.run/ from its newest "
                      "checkpoint, exactly.")


PRECISION = typer.Option("auto", help="fp32, bf16 (autocast; DeepSpeed: bf16 weights) or auto: "
                         "bf16 where the hardware has it (GPU, CPUs with AVX512-BF16/AMX).")


DEEPSPEED = typer.Option(None, "--deepspeed", help="DeepSpeed JSON config (e.g. "
                         "recipes/deepspeed/zero3.json); launch with torchrun or accelerate "
                         "launch for several processes.")


@app.command()
def distill(
    ctx: typer.Context,
    teacher: str = typer.Option(None, "--teacher", "-t", help="The full teacher: HF directory "
                                "or .gguf file (or give --teacher-cache)."),
    student: str = typer.Option(None, "--student", "-s", help="The student to train (usually "
                                "`minima prune` output); same tokenizer as the teacher."),
    data: str = typer.Option(None, "--data", "-d", help="Training text: a file, a directory, "
                             "'a.txt:0.7,b.jsonl:0.3' to mix by weight, or a hub dataset name."),
    output: Path = typer.Option(None, "--output", "-o", help="Directory for the distilled "
                                "student (standard HF model); OUTPUT.run/ holds checkpoints."),
    teacher_cache: str = typer.Option(None, "--teacher-cache", help="`minima cache-teacher` "
                                      "output: train on the cached top-k without loading the "
                                      "teacher (needs --loss topk)."),
    loss: str = typer.Option("fkl", help="fkl (forward KL, MiniMA), rkl, jsd (GKD), or topk "
                             "(forward KL on the teacher's top-k)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature T (losses scaled by T^2)."),
    alpha: float = typer.Option(0.5, help="Weight of the LM cross-entropy; 1 - alpha on KD. "
                                "1 (without --hidden-weight): the LM loss alone, a CE-only "
                                "baseline; the teacher is not loaded."),
    beta: float = typer.Option(0.5, help="JSD interpolation weight (jsd only)."),
    topk: int = typer.Option(64, help="Teacher tokens per position for --loss topk (online)."),
    topk_mode: str = typer.Option("renorm", "--topk-mode", help="renorm (top-k renormalised) "
                                  "or tail (one bucket for the rest of the mass)."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Weight of the hidden-state"
                                        " MSE (0: off); a pruned student is compared on the "
                                        "teacher's kept hidden dims."),
    hidden_layers: str = typer.Option("auto", "--hidden-layers", help="STUDENT:TEACHER layer "
                                      "pairs, e.g. '0:1,1:3' (auto: a pruned layer to its "
                                      "origin, else the same relative depth)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per micro-batch (per "
                                   "process)."),
    grad_accum: int = GRAD_ACCUM,
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW betas 0.9/0.95)."),
    schedule: str = SCHEDULE,
    min_lr_ratio: float = MIN_LR_RATIO,
    weight_decay: float = WEIGHT_DECAY,
    clip: float = CLIP,
    max_steps: int = typer.Option(100, "--max-steps", help="Optimizer steps."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="Train on this many tokens instead "
                                   "of --max-steps (0: use --max-steps)."),
    warmup_ratio: float = typer.Option(0.01, "--warmup-ratio", help="Fraction of steps warming "
                                       "up."),
    save_every: int = SAVE_EVERY,
    keep_last: int = KEEP_LAST,
    eval_every: int = typer.Option(50, "--eval-every", help="Validation loss every N steps."),
    valid_fraction: float = typer.Option(0.05, "--valid-fraction", help="Documents held out for"
                                         " validation."),
    seed: int = typer.Option(0, help="Seed for data order and the validation split."),
    precision: str = PRECISION,
    gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
    deepspeed: str = DEEPSPEED,
    tensorboard: bool = TENSORBOARD,
    text_field: str = typer.Option("text", "--text-field", help="Field with the text in "
                                   "jsonl/json/parquet data."),
    config: Path = CONFIG,
    resume: bool = RESUME,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Distil the teacher into the student: alpha * CE + (1 - alpha) * KD (+ hidden-state MSE),
    the KD loss computed in token chunks so the full float32 (tokens x vocab) tensors never
    coexist. Runs on one process, or many under torchrun / accelerate launch with DeepSpeed."""
    import dataclasses

    from minima_cli.stages.configs import DistillConfig
    from minima_cli.stages.distill import run_distill

    params = merged_params(ctx, config, "distill")
    for required in ("student", "data", "output"):
        if params[required] is None:
            raise MinimaError(f"missing option --{required} (on the command line or in --config)")
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    settings = DistillConfig(**{k: v for k, v in params.items() if k in fields})
    manifest = run_distill(teacher_path=params["teacher"], student_path=params["student"],
                           data=params["data"], output=Path(params["output"]), config=settings,
                           resume=resume, force=force, progress=not quiet,
                           text_field=params["text_field"], teacher_cache=params["teacher_cache"])
    if manifest is None:  # not the main rank
        return
    metrics = manifest["metrics"]
    out.print(f"distilled {metrics['tokens']:,} tokens in {manifest['wall_time_s']:.1f}s "
              f"({metrics['tokens_per_s']:,.0f} tok/s): valid perplexity "
              f"{metrics.get('valid_perplexity', float('nan')):.3f} -> {params['output']}")


@app.command("cache-teacher")
def cache_teacher(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The teacher: HF directory or "
                                ".gguf file."),
    data: str = typer.Option(..., "--data", "-d", help="The training data exactly as distill "
                             "will get it."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the cache shards."),
    k: int = typer.Option(64, "--k", "-k", help="Top tokens kept per position."),
    seq_len: int = typer.Option(512, "--seq-len", help="As distill's --seq-len."),
    seed: int = typer.Option(0, help="As distill's --seed (it decides the validation split)."),
    valid_fraction: float = typer.Option(0.05, "--valid-fraction", help="As distill's."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per teacher forward."),
    blocks_per_shard: int = typer.Option(1024, "--blocks-per-shard", help="Sequences per "
                                         "safetensors shard."),
    dtype: str = typer.Option("float16", help="Log-prob storage: float16, bfloat16, float32."),
    text_field: str = typer.Option("text", "--text-field", help="As distill's."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Run the teacher once over the training data and store its top-k log-probs per token, so
    `minima distill --teacher-cache DIR --loss topk` trains without the teacher in memory."""
    from minima_cli.stages.cache_teacher import run_cache_teacher

    manifest = run_cache_teacher(teacher_path=teacher, data=data, output=output, seq_len=seq_len,
                                 k=k, seed=seed, valid_fraction=valid_fraction,
                                 batch_size=batch_size, blocks_per_shard=blocks_per_shard,
                                 dtype=dtype, text_field=text_field, force=force,
                                 progress=not quiet)
    out.print(f"cached the top-{k} of {manifest['metrics']['tokens']:,} tokens in "
              f"{len(manifest['shards'])} shards ({manifest['wall_time_s']:.1f}s) -> {output}")


@app.command()
def schedule(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The full teacher: HF directory "
                                "or .gguf file."),
    scores: str = typer.Option(..., "--scores", "-s", help="`minima score` output for the "
                               "teacher: one ranking for every nested candidate."),
    data: str = typer.Option(..., "--data", "-d", help="Training text for the sandwich and "
                             "every distillation (as for `minima distill`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write: "
                                "schedule.json, student/ and assistant/ (when one is used)."),
    student_ratio: float = typer.Option(None, "--student-ratio", help="Student as the fraction "
                                        "of the teacher's parameters kept, in (0, 1)."),
    student_params: str = typer.Option(None, "--student-params", help="Student size (60M, "
                                       "1.5e9) instead of --student-ratio."),
    lam: float = typer.Option(0.2, "--lambda", help="Trade-off weight in P + lambda * s, in "
                              "\\[0, 1] (MiniDisc: 0.2); larger favours sparser assistants."),
    sparsities: str = typer.Option(None, help="Candidate sparsities in percent (default "
                                   "0,10,...,90,85,95); those at least as sparse as the student "
                                   "are skipped; 0 (the teacher) is always one."),
    sandwich_steps: int = typer.Option(100, "--sandwich-steps", help="Steps of the one "
                                       "shared-weight sandwich run."),
    sandwich_widths: int = typer.Option(0, "--sandwich-widths", help="Widths per sandwich step: "
                                        "0 = every candidate, else largest + smallest + random."),
    distill_steps: int = typer.Option(100, "--distill-steps", help="Optimizer steps of each "
                                      "distillation (teacher -> assistant, then -> student)."),
    dev_data: str = typer.Option(None, "--dev-data", help="Text the dev metric P = 1 / "
                                 "perplexity is measured on (default: distill's held-out split "
                                 "of --data)."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Also distil every candidate "
                                    "and its student (brute force) and report how the "
                                    "sandwich's ranking agrees."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Stop after the choice: write "
                                   "schedule.json, distil nothing."),
    loss: str = typer.Option("fkl", help="fkl (forward KL, MiniMA), rkl, or jsd."),
    alpha: float = typer.Option(0.5, help="Weight of the LM cross-entropy; 1 - alpha on KD."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW, warmup then cosine)."),
    seed: int = typer.Option(0, help="Seed for data order and the validation split."),
    text_field: str = typer.Option("text", "--text-field", help="Field with the text in "
                                   "jsonl/json/parquet data."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """MiniDisc's teacher-assistant schedule: nested candidates pruned from the teacher, one
    sandwich run for every candidate's dev metric P, the assistant maximising P + lambda * s,
    then teacher -> assistant -> student (or teacher -> student when the teacher wins)."""
    from minima_cli.stages.configs import DistillConfig
    from minima_cli.stages.schedule import describe, parse_sparsities, run_schedule
    from minima_cli.units import format_count

    config = DistillConfig(loss=loss, alpha=alpha, seq_len=seq_len, batch_size=batch_size,
                           lr=lr, max_steps=distill_steps, seed=seed)
    report = run_schedule(
        teacher_path=teacher, scores_path=scores, data=data, output=output,
        student_ratio=student_ratio, student_params=student_params, lam=lam,
        sparsities=parse_sparsities(sparsities) if sparsities is not None else (),
        sandwich_steps=sandwich_steps, widths_per_step=sandwich_widths, config=config,
        dev_data=dev_data, exhaustive=exhaustive, plan_only=plan_only, force=force,
        progress=not quiet, text_field=text_field)
    table = Table(title=f"assistant candidates (lambda {report['lambda']:g}, P = 1 / dev ppl)")
    columns = ["asked", "sparsity", "params", "P", "P + lambda*s", "chosen"]
    rows = describe(report["candidates"])
    if "exhaustive" in report:
        columns += ["assistant P", "student P"]
        rows = [(*row, f"{r['assistant_P']:.4f}", f"{r['student_P']:.4f}")
                for row, r in zip(rows, report["exhaustive"]["rows"], strict=True)]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    student = report["student"]
    out.print(f"student {format_count(student['params'])} (s={100 * student['sparsity']:.1f}%); "
              f"schedule: {' -> '.join(report['schedule'])}")
    if "exhaustive" in report:
        found = report["exhaustive"]
        agree = found["tradeoff_vs_student"]
        out.print(f"exhaustive: best student P {found['best_student_P']:.4f} (candidate "
                  f"{found['best']}), chosen {found['chosen_student_P']:.4f}; Spearman "
                  f"{agree['spearman']}, Kendall {agree['kendall']}; {found['runs']} runs in "
                  f"{found['seconds']:.0f}s vs sandwich 1 run in "
                  f"{report['sandwich']['seconds']:.0f}s")
    if "result" in report:
        out.print(f"student P {report['result']['student_P']:.4f} -> {output / 'student'}")
    else:
        out.print(f"plan only -> {output / 'schedule.json'}")


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


@app.command("eval", help=EVAL_HELP)
def eval_command(
    model: list[str] = typer.Option(..., "--model", "-m", help="Model to evaluate: HF directory "
                                    "or .gguf file, optionally NAME=PATH; repeat to compare "
                                    "models side by side (deltas against the first)."),
    task: list[str] = typer.Option(..., "--task", "-t", help="Repeatable: KIND:TARGET with "
                                   "optional :key=value,... (the kinds are listed above)."),
    output: Path = typer.Option(None, "--output", "-o", help="Directory to write results.json, "
                                "generations/*.jsonl and minima.json (atomically)."),
    backend: str = typer.Option("minima", help="minima, or lm-eval: mc tasks run through "
                                "lm-evaluation-harness (a generated local task) and a bare "
                                "--task NAME is a harness task. ppl and gen always run in "
                                "minima."),
    max_length: int = typer.Option(None, "--max-length", help="Tokens the model reads at once "
                                   "(default: its max_position_embeddings, at most 2048)."),
    stride: int = typer.Option(None, help="Perplexity window step in tokens, 1..max-length "
                               "(default: max-length / 2): each token is scored once, with the "
                               "context of the first window that holds it after its start; "
                               "stride = max-length scores independent chunks."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    limit: int = typer.Option(None, help="Evaluate only the first N items (documents for ppl) "
                              "of each task."),
    seed: int = typer.Option(0, help="Seed for sampled generation and the harness."),
    dtype: DType = typer.Option(DType.auto, help="Weights dtype (auto: as stored)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Evaluate models side by side (the task syntax is in EVAL_HELP)."""
    from minima_cli.stages.configs import EvalConfig
    from minima_cli.stages.evaluate import run_eval, table_rows

    config = EvalConfig(backend=backend, max_length=max_length, stride=stride,
                        batch_size=batch_size, limit=limit, seed=seed)
    results = run_eval(models=model, tasks=task, config=config, output=output, force=force,
                       dtype=torch_dtype(dtype), device=device, progress=not quiet)
    names = [m["name"] for m in results["models"]]
    table = Table(title="minima eval" + (f" -> {output}" if output else ""))
    table.add_column("task")
    table.add_column("metric")
    for index, name in enumerate(names):
        table.add_column(name if index == 0 else f"{name} (vs first)", justify="right")
    for row in table_rows(results["models"]):
        table.add_row(*row)
    out.print(table)


@app.command()
def sft(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help="The model to tune: HF directory or "
                              ".gguf file (usually `minima distill` output)."),
    data: str = typer.Option(None, "--data", "-d", help="Chat data: .jsonl/.json/.parquet or a "
                             "directory of them; records with 'messages', 'conversations' "
                             "(ShareGPT), 'prompt' + 'response'/'completion', or 'instruction' "
                             "(+ 'input') + 'output'."),
    output: Path = typer.Option(None, "--output", "-o", help="Directory for the chat model "
                                "(standard HF model, chat template included); OUTPUT.run/ "
                                "holds checkpoints."),
    valid_data: str = typer.Option(None, "--valid-data", help="Held-out chat data for the "
                                   "validation loss (default: --valid-fraction of --data)."),
    teacher: str = typer.Option(None, "--teacher", "-t", help="Optional teacher (same "
                                "tokenizer): distil on the same chat data, assistant tokens "
                                "only."),
    loss: str = typer.Option("fkl", help="With --teacher: fkl, rkl, jsd or topk (as distill)."),
    temperature: float = typer.Option(1.0, help="With --teacher: softmax temperature T."),
    alpha: float = typer.Option(0.5, help="With --teacher: weight of the CE; 1 - alpha on KD."),
    beta: float = typer.Option(0.5, help="With --teacher: JSD interpolation weight."),
    topk: int = typer.Option(64, help="With --teacher --loss topk: teacher tokens kept."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per row: longer examples are "
                                "cut (counted in minima.json), packed rows hold several."),
    packing: bool = typer.Option(False, "--packing/--no-packing", help="Pack whole examples "
                                 "into --seq-len rows (they never attend to each other), or "
                                 "one example per row."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per micro-batch (per "
                                   "process)."),
    grad_accum: int = GRAD_ACCUM,
    lr: float = typer.Option(2e-5, help="Peak learning rate (MiniChat: 2e-5; the tiny world "
                             "needs ~1e-3)."),
    epochs: float = typer.Option(3.0, help="Passes over the training rows (MiniChat: 3)."),
    max_steps: int = typer.Option(0, "--max-steps", help="Optimizer steps; overrides --epochs "
                                  "(0: from --epochs)."),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio", help="Fraction of steps warming "
                                       "up."),
    schedule: str = SCHEDULE,
    min_lr_ratio: float = MIN_LR_RATIO,
    weight_decay: float = WEIGHT_DECAY,
    clip: float = CLIP,
    save_every: int = SAVE_EVERY,
    keep_last: int = KEEP_LAST,
    eval_every: int = typer.Option(50, "--eval-every", help="Validation loss (assistant tokens "
                                   "of held-out conversations) every N steps."),
    valid_fraction: float = typer.Option(0.05, "--valid-fraction", help="Conversations held out "
                                         "for validation."),
    seed: int = typer.Option(0, help="Seed for data order and the validation split."),
    precision: str = PRECISION,
    gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
    deepspeed: str = DEEPSPEED,
    tensorboard: bool = TENSORBOARD,
    config: Path = CONFIG,
    resume: bool = RESUME,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Instruction-tune on chat data with the loss on assistant tokens only: the tokenizer's chat
    template (or ChatML, then saved with the model), optional packing, optional distillation from
    a teacher. Checkpoints, --resume, logs and DeepSpeed as distill."""
    import dataclasses

    from minima_cli.stages.configs import SftConfig
    from minima_cli.stages.sft import run_sft

    params = merged_params(ctx, config, "sft")
    for required in ("model", "data", "output"):
        if params[required] is None:
            raise MinimaError(f"missing option --{required} (on the command line or in --config)")
    fields = {f.name for f in dataclasses.fields(SftConfig)}
    settings = SftConfig(**{k: v for k, v in params.items() if k in fields})
    manifest = run_sft(model_path=params["model"], data=params["data"],
                       output=Path(params["output"]), config=settings,
                       teacher_path=params["teacher"], valid_data=params["valid_data"],
                       resume=resume, force=force, progress=not quiet)
    if manifest is None:  # not the main rank
        return
    metrics, summary = manifest["metrics"], manifest["inputs"]["data"]
    out.print(f"tuned on {summary['train_examples']:,} conversations ({metrics['steps']} steps, "
              f"{metrics['tokens']:,} tokens) in {manifest['wall_time_s']:.1f}s: valid loss "
              f"{metrics.get('valid_loss', float('nan')):.4f} per assistant token -> "
              f"{params['output']}")
    cut = summary["train_truncated"] + summary["valid_truncated"]
    if cut:
        Console(stderr=True).print(f"[yellow]warning: {cut} conversations were longer than "
                                   f"--seq-len {params['seq_len']} and cut "
                                   f"({summary['train_dropped'] + summary['valid_dropped']} "
                                   "dropped: no assistant token left)[/yellow]")


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (e.g. recipes/tiny.yaml): teacher, "
                                  "data, hardware and a section per stage."),
    start: str = typer.Option(None, "--from", help="First stage to run (earlier ones must "
                              "have their outputs)."),
    until: str = typer.Option(None, "--until", help="Last stage to run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan: stage status, "
                                 "shapes and parameter counts, memory per GPU under ZeRO-2/3, "
                                 "token budget. Runs nothing."),
    workdir: Path = typer.Option(None, "--workdir", "-w", help="Override the recipe's workdir."),
    overrides: list[str] = typer.Option(None, "--set", help="Override a recipe value: KEY=VALUE "
                                        "with a dotted key and a YAML value, e.g. --set "
                                        "distill.max_steps=50 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Re-run the selected stages even when "
                               "they are up to date."),
    quiet: bool = QUIET,
) -> None:
    """Run a recipe: every stage into WORKDIR/<stage>/, skipping the ones whose outputs match
    their inputs and settings, re-running stale ones, resuming a killed training stage; ends
    with a summary table (`minima report WORKDIR` adds plots)."""
    from minima_cli.pipeline.dryrun import dry_run as plan_of
    from minima_cli.pipeline.recipe import load_recipe
    from minima_cli.pipeline.run import run_recipe, summary_table

    loaded = load_recipe(recipe, overrides or [], workdir)
    wide = out if out.is_terminal else Console(soft_wrap=True, width=160)  # not a pipe's 80
    if dry_run:
        wide.print(plan_of(loaded, start=start, stop=until, force=force))
        return
    runs = run_recipe(loaded, start=start, stop=until, force=force, progress=not quiet,
                      console=out)
    if os.environ.get("RANK", "0") == "0":
        wide.print(summary_table(loaded, runs))


@app.command()
def report(
    workdir: Path = typer.Argument(..., help="The workdir of a `minima run`, or its recipe "
                                   "(then the recipe's workdir)."),
) -> None:
    """Write WORKDIR/report/report.md: the summary table and PNG plots (loss curves, per-layer
    score heatmaps, parameters vs perplexity)."""
    from minima_cli.pipeline.report import write_report

    if workdir.is_file() and workdir.suffix in (".yaml", ".yml"):
        from minima_cli.pipeline.recipe import load_recipe

        workdir = load_recipe(workdir).workdir
    out.print(f"report: {write_report(workdir)}")


def read_points(path: Path, what: str, *, sweeps: bool = False) -> list[list[float]]:
    """A JSON list of numeric rows, e.g. [[3e9, 7.5e9], ...]; one clear line if it is not. With
    `sweeps`, a capacity-gap sweep report (bench/capacity_gap_sweep.py) is its one law point."""
    import json

    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MinimaError(f"{what}: file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise MinimaError(f"{what}: {path} is not JSON ({error})") from None
    if sweeps and isinstance(rows, dict) and "law_point" in rows:
        from minima_cli.laws import sweep_law_point

        rows = [sweep_law_point(rows, f"{what} {path}")]
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and all(isinstance(v, int | float) for v in r) for r in rows):
        raise MinimaError(f"{what}: {path} must hold a JSON list of numeric rows")
    return rows


def print_json(result: object) -> None:
    import json

    print(json.dumps(result, indent=2))


@app.command()
def plan(
    student: str = typer.Option(None, help="Student size (3B, 135M, 1.5e9): recommend its "
                                "teacher."),
    teacher: str = typer.Option(None, help="Teacher size: propose the student size it is "
                                "optimal for, as a `minima prune` target."),
    teachers: str = typer.Option(None, help="Available teachers, comma-separated (1.1B,7B,13B):"
                                 " pick one for --student and say why."),
    law: str = typer.Option(None, help="Capacity-gap law 'slope=2.498,intercept=-11.498e6' "
                            "(sizes in parameters; default: MiniMA's fit, R^2 0.996)."),
    law_points: str = typer.Option(None, "--law-points", help="Fit the law instead from JSON "
                                   "files, comma-separated: lists of \\[student, best teacher] "
                                   "pairs, or capacity-gap sweep reports (one pair each)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The capacity-gap law (MiniMA): the best teacher is about 2.5x the student, not the
    biggest one. Recommends a teacher for a student, or a student for a teacher."""
    from minima_cli import laws
    from minima_cli.units import format_count

    if teachers and student is None:
        raise MinimaError("--teachers needs --student")
    if student is None and teacher is None:
        raise MinimaError("give --student and/or --teacher")
    if law and law_points:
        raise MinimaError("give --law or --law-points, not both")
    gap = laws.PAPER_LAW
    if law:
        gap = laws.CapacityGapLaw(**laws.parse_law_params(law, ("slope", "intercept")))
    elif law_points:
        gap = laws.fit_capacity_gap([row for path in law_points.split(",")
                                     for row in read_points(Path(path.strip()), "--law-points",
                                                            sweeps=True)])
    result = {}
    if student is not None:
        available = [laws.parse_params(t, "--teachers") for t in teachers.split(",")] \
            if teachers else None
        result["for_student"] = laws.plan_teacher(laws.parse_params(student, "--student"),
                                                  available, gap)
    if teacher is not None:
        result["for_teacher"] = laws.plan_student(laws.parse_params(teacher, "--teacher"), gap)
    if as_json:
        print_json(result)
        return
    if "for_student" in result:
        found = result["for_student"]
        out.print(f"student {format_count(found['student'])}: optimal teacher "
                  f"{format_count(found['optimal_teacher'])} ({found['ratio']:.2f}x the student)")
        if "teachers" in found:
            table = Table(title="available teachers")
            for column in ("teacher", "x student", "x optimum", "verdict"):
                table.add_column(column, justify="left" if column == "verdict" else "right")
            for row in found["teachers"]:
                table.add_row(format_count(row["teacher"]), f"{row['ratio']:.2f}",
                              f"{row['vs_optimum']:.2f}", row["verdict"])
            out.print(table)
            out.print(f"use the {format_count(found['teacher'])} teacher")
    if "for_teacher" in result:
        found = result["for_teacher"]
        out.print(f"teacher {format_count(found['teacher'])}: optimal student "
                  f"{found['prune_params']} (keeps {100 * found['keep']:.0f}% of the teacher): "
                  f"minima prune --params {found['prune_params']}")


@app.command()
def density(
    teacher: str = typer.Option(..., help="Teacher as SIZE:SCORE, e.g. 7B:0.46 (score in the "
                                "performance law's units)."),
    student: str = typer.Option(..., help="Student as SIZE:SCORE, e.g. 3B:0.28."),
    loss_law: str = typer.Option(None, "--loss-law", help="L(N, D) = a N^-alpha + b D^-beta "
                                 "as 'a=..,alpha=..,b=..,beta=..'."),
    loss_points: Path = typer.Option(None, "--loss-points", help="Fit L(N, D) instead from a "
                                     "JSON list of \\[params, tokens, loss] rows."),
    perf_law: str = typer.Option(None, "--perf-law", help="S(L) = c / (1 + exp(-gamma (L - l)))"
                                 " + d as 'c=..,gamma=..,l=..,d=..'."),
    perf_points: Path = typer.Option(None, "--perf-points", help="Fit S(L) instead from a JSON "
                                     "list of \\[loss, score] rows."),
    d0: str = typer.Option("1T", "--d0", help="Training tokens D0 at which effective sizes are "
                           "compared (the paper: 1T)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The densing law: effective parameter size N_hat (the size a reference model needs for the
    same score) and capacity density N_hat / N of teacher and student; warns when compression
    lost density."""
    from minima_cli import laws
    from minima_cli.units import format_count

    def model(text: str, what: str) -> tuple[float, float]:
        size, sep, score = text.partition(":")
        try:
            return laws.parse_params(size, what), float(score)
        except ValueError:
            raise MinimaError(f"{what} {text!r} is not SIZE:SCORE (e.g. 7B:0.46)") from None

    def law_from(params: str | None, points: Path | None, names, fit, make, what: str):
        if (params is None) == (points is None):
            raise MinimaError(f"give exactly one of --{what}-law and --{what}-points")
        if params is not None:
            return make(**laws.parse_law_params(params, names))
        return fit(read_points(points, f"--{what}-points"))

    report = laws.density_report(
        model(teacher, "--teacher"), model(student, "--student"),
        law_from(loss_law, loss_points, laws.LOSS_NAMES, laws.fit_loss_law, laws.LossLaw, "loss"),
        law_from(perf_law, perf_points, laws.PERFORMANCE_NAMES, laws.fit_performance_law,
                 laws.PerformanceLaw, "perf"),
        laws.parse_params(d0, "--d0"),
    )
    if as_json:
        print_json(report)
    else:
        table = Table(title=f"capacity density at D0 = {format_count(report['d0'])} tokens")
        for column in ("model", "N", "score", "L_hat", "N_hat", "density"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for name in ("teacher", "student"):
            row = report[name]
            table.add_row(name, format_count(row["params"]), f"{row['score']:.4g}",
                          f"{row['loss_hat']:.4g}", format_count(row["effective_params"]),
                          f"{row['density']:.3g}")
        out.print(table)
        out.print(f"student / teacher density: {report['density_ratio']:.2f}x")
    if report["warning"]:
        Console(stderr=True).print(f"[yellow]warning: {report['warning']}[/yellow]")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one `error:` line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = typer.main.get_command(app)
    try:
        command.main(args=argv if argv is not None else sys.argv[1:], prog_name="minima",
                     standalone_mode=False)
    except MinimaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except click_errors.NoArgsIsHelpError as error:
        print(error.ctx.get_help())
        return 0
    except click_errors.UsageError as error:
        print(f"error: {error.format_message()}", file=sys.stderr)
        return 2
    except (typer.Exit, click_errors.ClickException) as error:
        if isinstance(error, typer.Exit):
            return error.exit_code
        print(f"error: {error.format_message()}", file=sys.stderr)
        return 1
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
