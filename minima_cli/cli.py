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
                                "data/facts.jsonl."),
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
    from minima_cli.checkpoint import atomic_output_dir, write_manifest
    from minima_cli.tiny import build_tiny_world

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
    from minima_cli.score import run_score

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
    from minima_cli.prune import run_prune

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


@app.command()
def distill(
    teacher: str = typer.Option(..., "--teacher", "-t", help="The full teacher: HF directory "
                                "or .gguf file."),
    student: str = typer.Option(..., "--student", "-s", help="The student to train (usually "
                                "`minima prune` output); same tokenizer as the teacher."),
    data: str = typer.Option(..., "--data", "-d", help="Training text: a file, a directory, "
                             "'a.txt:0.7,b.jsonl:0.3' to mix by weight, or a hub dataset name."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the distilled "
                                "student (standard HF model); OUTPUT.run/ holds checkpoints."),
    loss: str = typer.Option("fkl", help="fkl (forward KL, MiniMA), rkl, or jsd (GKD)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature T (losses scaled by T^2)."),
    alpha: float = typer.Option(0.5, help="Weight of the LM cross-entropy; 1 - alpha on KD."),
    beta: float = typer.Option(0.5, help="JSD interpolation weight (jsd only)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW, warmup then cosine)."),
    max_steps: int = typer.Option(100, "--max-steps", help="Optimizer steps."),
    warmup_ratio: float = typer.Option(0.01, "--warmup-ratio", help="Fraction of steps warming "
                                       "up."),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps."),
    eval_every: int = typer.Option(50, "--eval-every", help="Validation loss every N steps."),
    seed: int = typer.Option(0, help="Seed for data order and the validation split."),
    text_field: str = typer.Option("text", "--text-field", help="Field with the text in "
                                   "jsonl/json/parquet data."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUTPUT.run/ from its newest "
                                "checkpoint, exactly."),
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Distil the teacher into the student: alpha * CE + (1 - alpha) * KD, the KD loss computed
    in token chunks so the full float32 (tokens x vocab) tensors never coexist."""
    from minima_cli.distill import DistillConfig, run_distill

    config = DistillConfig(loss=loss, temperature=temperature, alpha=alpha, beta=beta,
                           seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                           max_steps=max_steps, warmup_ratio=warmup_ratio, save_every=save_every,
                           eval_every=eval_every, seed=seed)
    manifest = run_distill(teacher_path=teacher, student_path=student, data=data, output=output,
                           config=config, resume=resume, force=force, progress=not quiet,
                           text_field=text_field)
    metrics = manifest["metrics"]
    out.print(f"distilled {metrics['tokens']:,} tokens in {manifest['wall_time_s']:.1f}s: "
              f"valid perplexity {metrics.get('valid_perplexity', float('nan')):.3f} -> {output}")


def read_points(path: Path, what: str) -> list[list[float]]:
    """A JSON list of numeric rows, e.g. [[3e9, 7.5e9], ...]; one clear line if it is not."""
    import json

    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MinimaError(f"{what}: file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise MinimaError(f"{what}: {path} is not JSON ({error})") from None
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
    law_points: Path = typer.Option(None, "--law-points", help="Fit the law instead from a "
                                    "JSON list of \\[student, best teacher] pairs (a sweep)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The capacity-gap law (MiniMA): the best teacher is about 2.5x the student, not the
    biggest one. Recommends a teacher for a student, or a student for a teacher."""
    from minima_cli import laws
    from minima_cli.arch import format_count

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
        gap = laws.fit_capacity_gap(read_points(law_points, "--law-points"))
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
    from minima_cli.arch import format_count

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


if __name__ == "__main__":
    sys.exit(main())
