"""The lm-evaluation-harness bridge: minima's loaded model wrapped as the harness's HFLM, and a
local task YAML generated for a minima multiple-choice file, so both backends score the same
requests offline."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from minima_cli.errors import MinimaError, first_line
from minima_cli.evaluation.choice import FEWSHOT_DELIMITER, TARGET_DELIMITER
from minima_cli.evaluation.tasks import TaskSpec


def mc_task_config(task_name: str, test_file: Path, dev_file: Path | None, style: str
                   ) -> dict[str, Any]:
    """A harness task YAML (as a dict) for a minima MC file, offline: the `json` dataset builder
    reads the local files; `first_n` shots from the dev split, like MMLU and like minima."""
    files = {"test": str(Path(test_file).resolve())}
    if dev_file is not None:
        files["validation"] = str(Path(dev_file).resolve())
    if style == "cloze":
        doc_to_text, doc_to_choice = "question", "choices"
    else:
        doc_to_text = ("{{question.strip()}}{% for c in choices %}\n{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'"
                       "[loop.index0] }}. {{c}}{% endfor %}\nAnswer:")
        doc_to_choice = "{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[:choices|length]|list }}"
    config: dict[str, Any] = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": doc_to_choice,
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "fewshot_delimiter": FEWSHOT_DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
    }
    if dev_file is not None:
        config["fewshot_split"] = "validation"
        config["fewshot_config"] = {"sampler": "first_n"}
    return config


def lm_eval_task(spec: TaskSpec, workdir: Path) -> tuple[str, list[str] | None, int | None]:
    """(harness task name, include paths or None for the built-in registry, shots) for a spec:
    an mc file becomes a generated YAML in `workdir`; a YAML path is included from its folder."""
    import yaml

    shots = int(spec.options["shots"]) if "shots" in spec.options else None
    if spec.kind == "mc":
        name = "minima_" + re.sub(r"\W", "_", Path(spec.target).stem)
        dev = Path(spec.options["dev"]) if "dev" in spec.options else None
        config = mc_task_config(name, Path(spec.target), dev, spec.options.get("style", "cloze"))
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return name, [str(workdir)], shots or 0
    if spec.is_yaml:
        return yaml_task_name(spec.target), [str(Path(spec.target).resolve().parent)], shots
    return spec.target, None, shots


def yaml_task_name(path: str | Path) -> str:
    """The `task:` a harness YAML defines (the harness includes its whole folder)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise MinimaError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise MinimaError(f"{path}: a harness task YAML needs a 'task: NAME' field")
    return config["task"]


def uses_harness(spec: TaskSpec, backend: str) -> bool:
    return spec.kind == "lm-eval" or (spec.kind == "mc" and backend == "lm-eval")


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, spec: TaskSpec, *, batch_size: int,
                max_length: int, limit: int | None, seed: int, progress: bool = True
                ) -> dict[str, Any]:
    """One task through `lm_eval.simple_evaluate` with an HFLM around the loaded model. The
    harness shows its own tqdm bars; without `progress` they (on stderr) are swallowed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MinimaError("the lm-eval backend needs lm-evaluation-harness: "
                          "pip install 'lm-eval>=0.4.5'") from None
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO lines would bury the table
    with tempfile.TemporaryDirectory(prefix="minima-lm-eval-") as workdir:
        name, include, shots = lm_eval_task(spec, Path(workdir))
        manager = TaskManager(include_path=include, include_defaults=include is None)
        if name not in manager.all_tasks:
            raise MinimaError(f"unknown lm-eval task {name!r}" + (
                f" (not defined in {spec.target})" if include else
                " (see `lm-eval ls tasks`, or pass a task YAML path)"))
        device = next(model.parameters()).device
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       max_length=max_length, device=str(device))
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        try:
            with quiet:
                output = lm_eval.simple_evaluate(
                    model=harness, tasks=[name], num_fewshot=shots, limit=limit,
                    task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                    bootstrap_iters=0, verbosity="ERROR")
        except (ValueError, KeyError, FileNotFoundError, ConnectionError) as error:
            raise MinimaError(f"lm-eval task {name!r} failed: {first_line(error)}") from error
    results = output["results"]
    metrics: dict[str, Any] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")  # harness keys: "acc,none"
            if comma and isinstance(value, int | float) and not metric.endswith("_stderr"):
                label = metric if filter_name == "none" else f"{metric}/{filter_name}"
                metrics[label if len(results) == 1 else f"{task}/{label}"] = float(value)
    counts = output.get("n-samples", {}).get(name, {})
    if "effective" in counts:
        metrics["n"] = counts["effective"]
    return metrics
