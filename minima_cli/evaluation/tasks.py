"""Task specs of `minima eval` (`KIND:TARGET[:key=value,...]`): parsing and option checks, before
any model loads. The task kinds are listed in the stage's --help (stages/__init__.py)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from minima_cli.data.read import read_records
from minima_cli.errors import MinimaError

TASK_KINDS = ("ppl", "mc", "gen", "lm-eval")


BACKENDS = ("minima", "lm-eval")


# Accepted `key=value` options per task kind (anything else is a typo worth one clear line).
TASK_OPTIONS = {
    "ppl": ("field",),
    "mc": ("shots", "dev", "style"),
    "gen": ("match", "max_tokens", "temperature", "top_p"),
    "lm-eval": ("shots",),
}


MC_STYLES = ("cloze", "letters")


MATCH_MODES = ("exact", "contains")


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    target: str  # a file path, or a harness task name / YAML path for lm-eval
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short key for tables and results.json: kind, file stem and the shot count."""
        stem = Path(self.target).stem if self.kind != "lm-eval" or self.is_yaml else self.target
        shots = self.options.get("shots")
        return f"{self.kind}:{stem}" + (f":{shots}-shot" if shots not in (None, "0") else "")

    @property
    def is_yaml(self) -> bool:
        return self.target.endswith((".yaml", ".yml"))


_OPTIONS = re.compile(r"^[a-z_]+=[^,]*(,[a-z_]+=[^,]*)*$")


def parse_task(text: str, *, backend: str = "minima") -> TaskSpec:
    """Parse one `--task`. A bare name is a harness task under `--backend lm-eval`; a bare
    existing file is typed by its content (text -> ppl, choices -> mc, prompt/messages -> gen)."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in TASK_KINDS:
        if backend == "lm-eval" and not Path(text).is_file():
            return TaskSpec("lm-eval", text)
        if Path(text).is_file():
            return TaskSpec(infer_kind(Path(text)), text)
        if sep and not Path(kind).exists():
            raise MinimaError(f"unknown task kind {kind!r} in {text!r}: use one of "
                              f"{', '.join(TASK_KINDS)} (e.g. mc:questions.jsonl:shots=5)")
        raise MinimaError(f"unknown task {text!r}: not a file; give KIND:FILE with KIND one of "
                          f"{', '.join(TASK_KINDS)} (e.g. ppl:valid.txt, mc:q.jsonl:shots=5), or "
                          "a harness task name with --backend lm-eval")
    target, options = rest, {}
    head, sep, tail = rest.rpartition(":")
    if sep and _OPTIONS.match(tail):
        target = head
        for item in tail.split(","):
            key, _, value = item.partition("=")
            if key not in TASK_OPTIONS[kind]:
                raise MinimaError(f"task {text!r}: unknown option {key!r} for {kind} tasks "
                                  f"(options: {', '.join(TASK_OPTIONS[kind])})")
            options[key] = value
    if not target:
        raise MinimaError(f"task {text!r}: nothing after '{kind}:'")
    spec = TaskSpec(kind, target, options)
    check_options(spec)
    return spec


def check_options(spec: TaskSpec) -> None:
    """Validate option values and that the task's files exist, before any model loads."""
    opts = spec.options
    where = f"task {spec.kind}:{spec.target}"
    if "shots" in opts:
        option_int(opts, "shots", 0, where)
    if spec.kind == "mc":
        if opts.get("style", "cloze") not in MC_STYLES:
            raise MinimaError(f"{where}: style must be one of {', '.join(MC_STYLES)}")
        if option_int(opts, "shots", 0, where) and "dev" not in opts:
            raise MinimaError(f"{where}: shots={opts['shots']} needs dev=FILE (the examples)")
    if spec.kind == "gen":
        if opts.get("match", "exact") not in MATCH_MODES:
            raise MinimaError(f"{where}: match must be one of {', '.join(MATCH_MODES)}")
        option_int(opts, "max_tokens", 32, where, least=1)
        option_float(opts, "temperature", 0.0, where)
        top_p = option_float(opts, "top_p", 1.0, where)
        if not 0 < top_p <= 1:
            raise MinimaError(f"{where}: top_p must be in (0, 1], got {top_p}")
    files = [spec.target] if spec.kind != "lm-eval" or spec.is_yaml else []
    files += [opts["dev"]] if "dev" in opts else []
    for name in files:
        if not Path(name).is_file():
            raise MinimaError(f"{where}: file not found: {name}")


def option_int(opts: dict[str, str], key: str, default: int, where: str, least: int = 0) -> int:
    try:
        value = int(opts.get(key, default))
    except ValueError:
        raise MinimaError(f"{where}: {key}={opts[key]!r} is not an integer") from None
    if value < least:
        raise MinimaError(f"{where}: {key} must be at least {least}, got {value}")
    return value


def option_float(opts: dict[str, str], key: str, default: float, where: str) -> float:
    try:
        value = float(opts.get(key, default))
    except ValueError:
        raise MinimaError(f"{where}: {key}={opts[key]!r} is not a number") from None
    if value < 0 or not math.isfinite(value):
        raise MinimaError(f"{where}: {key} must be a finite number >= 0, got {value}")
    return value


def infer_kind(path: Path) -> str:
    if path.suffix in (".txt", ".md", ".parquet"):
        return "ppl"
    if path.suffix in (".yaml", ".yml"):
        return "lm-eval"
    if path.suffix in (".jsonl", ".json"):
        try:
            records = read_records(path)
        except MinimaError:  # a .json array, say: only an explicit kind tells
            records = []
        first = records[0][1] if records else {}
        if isinstance(first, dict):
            if "choices" in first:
                return "mc"
            if "prompt" in first or "messages" in first:
                return "gen"
            if "text" in first:
                return "ppl"
    raise MinimaError(f"cannot tell what task {path} is: prefix it with ppl:, mc: or gen:")
