"""The `minima` command line: one thin subcommand per stage over the stage modules.

A user error prints one line, `error: ...`, and exits 2; never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from minima_cli import __version__
from minima_cli.cli.stage_commands import register
from minima_cli.errors import MinimaError, first_line

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


QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


register(app)


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
    from minima_cli.runtime import rank_and_world

    if rank_and_world()[0] == 0:
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

    loss = law_from(loss_law, loss_points, laws.LOSS_NAMES, laws.fit_loss_law, laws.LossLaw,
                    "loss")
    perf = law_from(perf_law, perf_points, laws.PERFORMANCE_NAMES, laws.fit_performance_law,
                    laws.PerformanceLaw, "perf")
    check_density_laws(loss, perf)
    try:
        report = laws.density_report(model(teacher, "--teacher"), model(student, "--student"),
                                     loss, perf, laws.parse_params(d0, "--d0"))
    except (ZeroDivisionError, OverflowError):  # e.g. a size of 0 or 1e400 from valid laws
        raise MinimaError("these laws give no finite effective size for the teacher or the "
                          "student (check the laws and the scores)") from None
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


def check_density_laws(loss_law: object, perf_law: object) -> None:
    """Laws `density` can invert: finite parameters, a > 0 and alpha > 0 (N_hat divides by
    them), b >= 0 and beta >= 0, c and gamma non-zero (L_hat divides by them). A law of zeros
    would otherwise be a ZeroDivisionError traceback."""
    import math

    rules = (("--loss-law", loss_law, "a", "positive", lambda v: v > 0),
             ("--loss-law", loss_law, "alpha", "positive", lambda v: v > 0),
             ("--loss-law", loss_law, "b", ">= 0", lambda v: v >= 0),
             ("--loss-law", loss_law, "beta", ">= 0", lambda v: v >= 0),
             ("--perf-law", perf_law, "c", "non-zero", lambda v: v != 0),
             ("--perf-law", perf_law, "gamma", "non-zero", lambda v: v != 0),
             ("--perf-law", perf_law, "l", "finite", lambda v: True),
             ("--perf-law", perf_law, "d", "finite", lambda v: True))
    for flag, law, key, want, holds in rules:
        value = getattr(law, key)
        if not (math.isfinite(value) and holds(value)):
            raise MinimaError(f"{flag}: {key} must be {want} and finite, got {value:g}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one `error:` line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = typer.main.get_command(app)
    args = argv if argv is not None else sys.argv[1:]
    try:
        code = command.main(args=args, prog_name="minima", standalone_mode=False)
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
        print(interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as error:
        message = environment_fault(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit code 130
        print(interrupted_message(args), file=sys.stderr)
    return code if isinstance(code, int) else 0


def interrupted_message(args: list[str]) -> str:
    """One line after Ctrl-C that says how to go on from where the run stopped."""
    from minima_cli.stages import TRAINING

    command = next((a for a in args if not a.startswith("-")), "")
    if command in TRAINING:
        return (f"error: interrupted: `minima {command} ... --resume` (the same options) "
                "continues from the newest checkpoint")
    if command == "run":
        return ("error: interrupted: run the same `minima run` again; finished stages are "
                "kept and a training stage resumes")
    return "error: interrupted: nothing was written; run the command again"


# errnos that mean the machine, not the command, is at fault: one line and exit 1
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted", errno.ENOTDIR: "not a directory",
                      errno.EIO: "input/output error"}
ENVIRONMENT_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                     "Permission denied")


def environment_fault(error: BaseException) -> str | None:
    """One line for an environment fault (disk full, read-only or unwritable output, a parent
    that is a file), found on the error or its causes; None for anything else (a bug: the
    traceback is kept). Libraries that write in native code (safetensors) report the OS error
    in their message only."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in ENVIRONMENT_ERRNOS:
            what = seen.strerror or ENVIRONMENT_ERRNOS[seen.errno]
            where = f"{seen.filename}: " if seen.filename else ""
            return f"{where}{what}"
        text = str(seen)
        for known in ENVIRONMENT_TEXTS:
            if known in text:
                return first_line(seen)
        seen = seen.__cause__ or seen.__context__
    return None
