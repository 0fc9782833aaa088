"""Options declared once: a field of a stage's config dataclass, with its help, kind and bounds in
the field's metadata, is at the same time a CLI flag, a `--config` YAML key, a recipe key and an
input of `minima run`'s adapter (docs/stages.md, "Options"). Nothing here imports torch, so the
CLI starts fast.

    @dataclass(frozen=True)
    class ScoreConfig:
        model: str | None = option(None, "Teacher: an HF directory or a .gguf file.",
                                   flags=("--model", "-m"), kind="model", required=True,
                                   input="model")
        batches: int = option(16, "Batches to accumulate scores over.", low=1)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from minima_cli.errors import MinimaError

# How a value is read and checked (pipeline/recipe.py's `check_value` knows each kind).
KINDS = ("int", "float", "fraction", "bool", "str", "choice", "path", "model", "data", "chat",
         "dir", "file", "shape", "size", "tasks", "models", "memory", "config")


@dataclass(frozen=True)
class Spec:
    """Everything minima knows about one option besides its name, type and default.

    flags: the CLI declarations when they differ from `--field-name` (short names, `--a/--no-a`).
    required: the CLI (or `--config`) must give it; in a recipe the pipeline may fill it in.
    input: how `minima run` fingerprints the value's content (model, data, dir, models, tasks):
        input values are paths, so their content, not their spelling, decides a stage's hash.
    hashed: False for bookkeeping that changes no result (checkpoint intervals, logs).
    source: where a recipe takes the value from instead of the stage's section:
        "output" (workdir/<stage>), "hardware" (the recipe's `hardware:` section), "cli"
        (a command-line-only switch such as prune's --dry-run).
    """

    help: str
    kind: str = "str"
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    required: bool = False
    input: str | None = None
    hashed: bool = True
    source: str | None = None
    multiple: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AssertionError(f"unknown option kind {self.kind!r}")


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its Spec; `kind` defaults from the default's type."""
    if "kind" not in spec:
        spec["kind"] = "choice" if spec.get("choices") else \
            {bool: "bool", int: "int", float: "float"}.get(type(default), "str")
    if "low" not in spec and spec["kind"] == "float":
        spec["low"] = 0  # rates, weights and fractions; negative ones are never meant
    if "low" not in spec and spec["kind"] == "int" and isinstance(default, int):
        spec["low"] = 1 if default >= 1 else 0
    return dataclasses.field(default=default, metadata={"minima": Spec(help=help, **spec)})


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata["minima"]


def options_of(config_class: type) -> list[tuple[dataclasses.Field, Spec]]:
    """Every declared option of a config class, in declaration order."""
    return [(f, spec_of(f)) for f in dataclasses.fields(config_class) if "minima" in f.metadata]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def long_flag(name: str, spec: Spec) -> str:
    """The option's long flag as users type it (`--model`, `--lambda`, `--gqa`)."""
    for flag in spec.flags:
        if flag.startswith("--"):
            return flag.split("/")[0]
    return flag_of(name)


class OptionError(MinimaError):
    """A bad option value; `option` is the field it is about (recipes name the key with it)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def did_you_mean(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_bounds(config: Any) -> None:
    """The declared choices and bounds of every option of a config instance; numbers must be
    finite. The first problem raises OptionError naming the flag."""
    for field, spec in options_of(type(config)):
        value = getattr(config, field.name)
        if value is None:
            continue
        flag = long_flag(field.name, spec)
        if spec.choices and value not in spec.choices:
            raise OptionError(field.name, f"{flag}: {value!r} is not one of "
                              f"{', '.join(spec.choices)}{did_you_mean(str(value), spec.choices)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise OptionError(field.name, f"{flag} must be a finite number, got {value}")
        if spec.low is not None and value < spec.low:
            bound = "positive" if spec.low == 1 and spec.kind == "int" else f">= {spec.low:g}"
            raise OptionError(field.name, f"{flag} must be {bound}, got {value:g}")
        if spec.high is not None and value > spec.high:
            raise OptionError(field.name, f"{flag} must be <= {spec.high:g}, got {value:g}")


def validate(config: Any) -> Any:
    """The config's own `check()` (its specific messages first), then the declared choices and
    bounds; returns the config."""
    check = getattr(config, "check", None)
    if check is not None:
        check()
    check_bounds(config)
    return config


def missing_required(config: Any) -> str | None:
    """The flag of the first required option left unset, or None."""
    for field, spec in options_of(type(config)):
        if spec.required and getattr(config, field.name) in (None, [], ()):
            return long_flag(field.name, spec)
    return None


def unhashed(config_class: type) -> set[str]:
    """Options that never change a result: inputs (their content is hashed instead), outputs,
    bookkeeping, command-line switches."""
    return {f.name for f, s in options_of(config_class)
            if s.input or not s.hashed or s.source in ("output", "cli")}
