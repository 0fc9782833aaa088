"""The stage commands, derived from the registry: every option of a stage's config dataclass is a
flag (options.py), every command takes `--config YAML` (flags given on the command line win),
and after the run a printer shows the stage's result. Nothing here decides what a stage does.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from minima_cli.errors import MinimaError
from minima_cli.options import Spec, flag_of, missing_required, options_of, validate
from minima_cli.stages import STAGES, RunControl, Stage

try:  # typer >= 0.26 vendors its own click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_errors

out = Console(soft_wrap=True)  # long messages stay one line, for logs and grep
CONTROLS = ("config", "resume", "force", "quiet")


def python_type(spec: Spec) -> type:
    if spec.multiple:
        return list[str]
    return {"int": int, "float": float, "fraction": float, "bool": bool}.get(spec.kind, str)


def typer_parameters(stage: Stage) -> list[inspect.Parameter]:
    """The command's parameters: ctx, one per config option, then the run controls."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context)]
    options = options_of(stage.config)
    # inputs and the output first in --help, then the settings, each in declaration order
    options.sort(key=lambda item: not (item[1].input or item[1].source == "output"))
    for field, spec in options:
        decls = spec.flags or (flag_of(field.name),)
        # required options default to None so `--config` may supply them (checked after merging)
        default = typer.Option(field.default, *decls, help=spec.help,
                               show_default=field.default not in (None, False))
        params.append(inspect.Parameter(field.name, keyword, default=default,
                                        annotation=python_type(spec)))
    controls: list[tuple[str, Any]] = [
        ("config", typer.Option(None, "--config", "-c", help="YAML file with any of these "
                                "options (keys as the long flags, at top level or under the "
                                "command's name); flags given on the command line win.")),
        ("force", typer.Option(False, "--force", help="Replace an existing output directory.")),
        ("quiet", typer.Option(False, "--quiet", "-q", help="No progress bar.")),
    ]
    if stage.training:
        controls.insert(1, ("resume", typer.Option(False, "--resume", help="Continue "
                                                   "OUTPUT.run/ from its newest checkpoint, "
                                                   "exactly.")))
    for name, default in controls:
        annotation = Path | None if name == "config" else bool
        params.append(inspect.Parameter(name, keyword, default=default, annotation=annotation))
    return params


def merged_params(ctx: typer.Context, config_file: Path | None, section: str) -> dict:
    """The command's parameters with a YAML file's values filled in where the command line left
    the default (flags win). The file may hold the keys at top level or under `section:`."""
    import yaml

    from minima_cli.pipeline.recipe import safe_load_unique

    params = dict(ctx.params)
    if config_file is None:
        return params
    try:
        loaded = safe_load_unique(Path(config_file).read_text())
    except FileNotFoundError:
        raise MinimaError(f"--config: file not found: {config_file}") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise MinimaError(f"--config: {config_file} is not a YAML text file") from None
    except yaml.YAMLError as error:
        raise MinimaError(f"{config_file}: not valid YAML ({str(error).splitlines()[0]})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get(section), dict):
        loaded = loaded[section]
    if not isinstance(loaded, dict):
        raise MinimaError(f"{config_file}: expected a mapping of {section} options")
    by_name = {p.name: p for p in ctx.command.params}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name in CONTROLS:
            switches = ", ".join(f"--{c}" for c in CONTROLS if c in by_name)
            raise MinimaError(f"{config_file}: {section}.{key}: --{name.replace('_', '-')} is a "
                              f"command-line switch, not a config key ({switches} are given "
                              "on the command line)")
        if name not in by_name:
            close = difflib.get_close_matches(name, [n for n in by_name if n not in CONTROLS],
                                              n=1)
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


def config_from_params(stage: Stage, params: dict[str, Any]) -> Any:
    """The stage's validated config from the merged command parameters."""
    values = {}
    for field, spec in options_of(stage.config):
        value = params[field.name]
        values[field.name] = list(value) if spec.multiple and value is not None else value
    config = stage.config(**values)
    missing = missing_required(config)
    if missing:
        raise MinimaError(f"missing option {missing} (on the command line or in --config)")
    return validate(config)


def make_command(stage: Stage) -> Any:
    def command(ctx: typer.Context, **_: Any) -> None:
        params = merged_params(ctx, ctx.params.get("config"), stage.name)
        config = config_from_params(stage, params)
        control = RunControl(force=params["force"], resume=params.get("resume", False),
                             progress=not params["quiet"])
        from minima_cli.pipeline.guard import guarded

        with guarded(config, training=stage.training):
            result = stage.run(config, control)
        if result is not None:  # None: not the main rank
            PRINTERS.get(stage.name, print_output)(config, result)

    params = typer_parameters(stage)
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = stage.name.replace("-", "_")
    command.__doc__ = stage.help
    return command


def register(app: typer.Typer) -> None:
    for stage in STAGES.values():
        app.command(stage.name, help=stage.help)(make_command(stage))


# --- what each stage prints after its run ---------------------------------------------------------


def print_output(config: Any, result: Any) -> None:
    """A stage without a printer of its own: where it wrote."""
    out.print(f"done -> {getattr(config, 'output', None)}")


def print_tiny(config: Any, manifest: dict[str, Any]) -> None:
    table = Table(title=f"tiny world in {config.output}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in manifest["metrics"].items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


def print_score(config: Any, manifest: dict[str, Any]) -> None:
    metrics = manifest["metrics"]
    out.print(f"scored {metrics['tokens']:,} tokens in {manifest['wall_time_s']:.1f}s "
              f"({metrics['tokens_per_second']:,.0f} tok/s, mean loss "
              f"{metrics['mean_loss']:.4f}) -> {config.output}")


def print_prune(config: Any, result: dict[str, Any]) -> None:
    table = Table(title="prune plan" if config.dry_run else f"pruned -> {config.output}")
    for column in ("axis", "teacher", "student", "kept"):
        table.add_column(column, justify="left" if column == "axis" else "right")
    for row in result["table"]:
        table.add_row(*row)
    out.print(table)
    if "plan" in result:
        out.print(f"layers kept: {result['plan']['layers']}")


def print_distill(config: Any, manifest: dict[str, Any]) -> None:
    metrics = manifest["metrics"]
    out.print(f"distilled {metrics['tokens']:,} tokens in {manifest['wall_time_s']:.1f}s "
              f"({metrics['tokens_per_s']:,.0f} tok/s): valid perplexity "
              f"{metrics.get('valid_perplexity', float('nan')):.3f} -> {config.output}")


def print_cache_teacher(config: Any, manifest: dict[str, Any]) -> None:
    out.print(f"cached the top-{config.k} of {manifest['metrics']['tokens']:,} tokens in "
              f"{len(manifest['shards'])} shards ({manifest['wall_time_s']:.1f}s) -> "
              f"{config.output}")


def print_schedule(config: Any, report: dict[str, Any]) -> None:
    from minima_cli.stages.schedule import describe
    from minima_cli.units import format_count

    output = Path(config.output)
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


def print_sft(config: Any, manifest: dict[str, Any]) -> None:
    metrics, summary = manifest["metrics"], manifest["inputs"]["data"]
    out.print(f"tuned on {summary['train_examples']:,} conversations ({metrics['steps']} steps, "
              f"{metrics['tokens']:,} tokens) in {manifest['wall_time_s']:.1f}s: valid loss "
              f"{metrics.get('valid_loss', float('nan')):.4f} per assistant token -> "
              f"{config.output}")
    cut = summary["train_truncated"] + summary["valid_truncated"]
    if cut:
        Console(stderr=True).print(f"[yellow]warning: {cut} conversations were longer than "
                                   f"--seq-len {summary['seq_len']} and cut "
                                   f"({summary['train_dropped'] + summary['valid_dropped']} "
                                   "dropped: no assistant token left)[/yellow]")


def print_eval(config: Any, results: dict[str, Any]) -> None:
    from minima_cli.stages.evaluate import table_rows

    names = [m["name"] for m in results["models"]]
    table = Table(title="minima eval" + (f" -> {config.output}" if config.output else ""))
    table.add_column("task")
    table.add_column("metric")
    for index, name in enumerate(names):
        table.add_column(name if index == 0 else f"{name} (vs first)", justify="right")
    for row in table_rows(results["models"]):
        table.add_row(*row)
    out.print(table)


def print_export(config: Any, manifest: dict[str, Any]) -> None:
    m = manifest["metrics"]
    fallback = f", {len(m['fallback_f16'])} tensors f16 (rows not blocks of 32)" \
        if m["fallback_f16"] else ""
    out.print(f"{config.type} GGUF -> {config.output}: {m['file_bytes'] / 1e6:.2f} MB, "
              f"{m['parameters']:,} parameters, {m['bits_per_weight']:.2f} bits/weight, "
              f"{m['tensors']} tensors{fallback}, {manifest['wall_time_s']:.1f}s")


PRINTERS = {"tiny": print_tiny, "score": print_score, "prune": print_prune,
            "distill": print_distill, "cache-teacher": print_cache_teacher,
            "schedule": print_schedule, "sft": print_sft, "eval": print_eval,
            "export": print_export}
