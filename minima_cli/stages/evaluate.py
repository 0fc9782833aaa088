"""`minima eval`: perplexity, multiple choice, generation and lm-evaluation-harness tasks, for
one model or several side by side (deltas against the first).

Task specs, one `--task` each (`KIND:TARGET[:key=value,...]`):
- `ppl:FILE` perplexity of a text file (`.txt`: a document a line; `.jsonl`/`.json`/`.parquet`
  with a `text` field, `field=NAME` for another).
- `mc:FILE.jsonl[:shots=5,dev=DEV.jsonl,style=cloze|letters]` multiple choice, MMLU-style records
  `{"question": str, "choices": [str, ...], "answer": int}` (optional `category` for a breakdown).
- `gen:FILE.jsonl[:match=exact|contains,max_tokens=32,temperature=0,top_p=1]` generation; records
  `{"prompt": str, "answer": str | [str, ...]}` or chat `{"messages": [...]}` whose last
  (assistant) message is the reference and the rest the prompt, through the chat template.
- `lm-eval:NAME_OR_YAML[:shots=N]` any lm-evaluation-harness task (a hub dataset needs a network)
  or a local task YAML (works offline).

Conventions, so that minima's numbers and the harness's agree:
- Multiple choice follows lm-eval: context = few-shot examples (each `question + " " + answer`,
  joined by a blank line) + the question; continuation = `" " + choice`; `acc` takes the argmax of
  the summed log-likelihood of the continuation tokens, `acc_norm` the argmax of that divided by
  the choice's length in characters. Shots are the first N records of the dev file (MMLU's
  `first_n`). Tokenization as in lm-eval: encode context + continuation and the context alone,
  the continuation's tokens are the difference (trailing context spaces move to it).
- Perplexity is defined in `perplexity_windows`: documents are joined into one stream
  `EOS d1 EOS d2 EOS ... dn EOS` (as in training, every document ends with EOS; the leading EOS
  gives the first document's first token a context), windows of `max_length` tokens start every
  `stride` tokens, and a token is scored in the first window that holds it after that window's
  first token, with the window's earlier tokens as context: with stride < max_length every token
  after the first is scored exactly once; stride == max_length scores independent chunks (each
  chunk's first token has no context and is not scored), as HF's "perplexity of fixed-length
  models" guide. ppl = exp(total NLL / scored tokens), token-weighted over the whole file.
- Throughput (`tokens_per_second`) counts every token the model reads in minima-run tasks
  (windows, contexts with continuations, prompts and generated tokens) over their wall time;
  `throughput` adds its model FLOPs (2 x matmul parameters a token, attention left out: a lower
  bound), TFLOP/s and MFU against --peak-tflops or the measured matmul peak (training/flops.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from minima_cli.data.read import read_documents
from minima_cli.errors import MinimaError
from minima_cli.evaluation.choice import (
    continuation_logliks,
    mc_requests,
    mc_shots,
    read_mc,
    score_mc,
)
from minima_cli.evaluation.generation import generate, match, read_gen
from minima_cli.evaluation.harness import run_lm_eval, uses_harness, yaml_task_name
from minima_cli.evaluation.perplexity import document_stream, perplexity_windows, strided_nll
from minima_cli.evaluation.tasks import BACKENDS, TaskSpec, option_float, option_int, parse_task
from minima_cli.progress import step_progress
from minima_cli.runtime import resolve_device
from minima_cli.stages import RunControl
from minima_cli.stages.configs import EvalConfig

DEFAULT_MAX_LENGTH = 2048  # cap on the default window: a 128k-context model on CPU is no default


# Models this narrow run on one CPU thread: their matrices gain nothing from more, and on a busy
# machine spinning OpenMP threads slow them down.
SMALL_HIDDEN = 256


def model_max_length(model_config: Any, requested: int | None, name: str = "the model") -> int:
    """--max-length for a model (its config): at most its positions (beyond them a perplexity
    or a log-likelihood means nothing); by default its positions, capped at DEFAULT_MAX_LENGTH."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if requested is not None:
        if requested < 2:
            raise MinimaError(f"--max-length must be at least 2, got {requested}")
        if positions and requested > positions:
            raise MinimaError(f"--max-length {requested} exceeds the {positions} positions of "
                              f"{name}")
        return requested
    return min(int(positions or DEFAULT_MAX_LENGTH), DEFAULT_MAX_LENGTH)


def check_finite_metrics(name: str, metrics: Any, where: str = "") -> None:
    """NaN or inf in a result (a model with non-finite weights, an overflow) is no measurement:
    refuse it rather than print or write it."""
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            check_finite_metrics(name, value, f"{where}.{key}" if where else str(key))
    elif isinstance(metrics, float) and not math.isfinite(metrics):
        raise MinimaError(f"model {name}: {where} is {metrics} (non-finite weights or an "
                          "overflow in its dtype?); no results written")


def evaluate_model(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskSpec],
                   config: EvalConfig, *, progress: bool = True,
                   generations: dict[str, list[dict[str, Any]]] | None = None
                   ) -> dict[str, Any]:
    """Every task on one loaded model: {task name: metrics}, plus parameters and throughput.
    Generated texts go to `generations[task name]` when a dict is given."""
    from minima_cli.runtime import torch_threads

    small = next(model.parameters()).device.type == "cpu" and \
        getattr(model.config, "hidden_size", 0) <= SMALL_HIDDEN
    with torch_threads(1) if small else contextlib.nullcontext():
        result = _evaluate_model(model, tokenizer, tasks, config, progress, generations)
        # the peak at the thread count the tasks ran with
        result["throughput"] = eval_throughput(model, config, result["tokens_per_second"])
    return result


def eval_throughput(model: torch.nn.Module, config: EvalConfig,
                    tokens_per_second: float | None) -> dict[str, Any] | None:
    """Model FLOPs per token, TFLOP/s and MFU of the minima-run tasks: a forward's matmuls,
    2 x the matmul parameters. The attention term is left out (sequences differ in length from
    task to task), so the figure is a lower bound. None when no token was counted or the
    architecture has no minima shape."""
    from minima_cli.model.arch import shape_from_config
    from minima_cli.training.flops import Throughput, matmul_parameters, resolve_peak

    if not tokens_per_second:
        return None
    try:
        shape = shape_from_config(model.config)
    except MinimaError:
        return None
    parameter = next(model.parameters())
    peak, source = resolve_peak(config.peak_tflops, parameter.device,
                                str(parameter.dtype).removeprefix("torch."), [shape],
                                config.batch_size * model_max_length(model.config,
                                                                     config.max_length))
    return Throughput(2 * matmul_parameters(shape), peak, source).summary(tokens_per_second)


def _evaluate_model(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[TaskSpec],
                    config: EvalConfig, progress: bool,
                    generations: dict[str, list[dict[str, Any]]] | None) -> dict[str, Any]:
    max_length = model_max_length(model.config, config.max_length)
    stride = config.stride if config.stride is not None else max(1, max_length // 2)
    perplexity_windows(2, max_length, stride)  # validates the pair before any work
    # parameters() yields tied weights once, so a tied lm_head is not counted twice
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                              "max_length": max_length, "tasks": {}}
    tokens, seconds = 0, 0.0
    for spec in tasks:
        started = time.perf_counter()
        counted = [0]

        def count(n: int, counted: list[int] = counted) -> None:
            counted[0] += n

        if uses_harness(spec, config.backend):
            metrics = run_lm_eval(model, tokenizer, spec, batch_size=config.batch_size,
                                  max_length=max_length, limit=config.limit, seed=config.seed,
                                  progress=progress)
            metrics["backend"] = "lm-eval"
        elif spec.kind == "ppl":
            metrics = eval_ppl(model, tokenizer, spec, max_length, stride, config, progress, count)
        elif spec.kind == "mc":
            metrics = eval_mc(model, tokenizer, spec, max_length, config, progress, count)
        else:
            metrics, outputs = eval_gen(model, tokenizer, spec, max_length, config, progress,
                                        count)
            if generations is not None:
                generations[spec.name] = outputs
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        result["tasks"][spec.name] = metrics
        if counted[0]:
            tokens += counted[0]
            seconds += time.perf_counter() - started
    result["tokens"] = tokens
    result["tokens_per_second"] = tokens / seconds if seconds > 0 else None
    return result


@contextlib.contextmanager
def task_progress(description: str, batches: int, enabled: bool, count: Callable[[int], None]
                  ) -> Iterator[Callable[[int], None]]:
    """A progress bar over a task's batches; its callback also counts the tokens toward the
    model's throughput."""
    with step_progress(description, batches, enabled=enabled) as bar:
        def on_batch(tokens: int) -> None:
            count(tokens)
            bar.update(tokens)

        yield on_batch


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def eval_ppl(model, tokenizer, spec: TaskSpec, max_length: int, stride: int, config: EvalConfig,
             progress: bool, count: Callable[[int], None]) -> dict[str, Any]:
    documents = _limit(read_documents(spec.target, spec.options.get("field", "text")),
                       config.limit)
    ids = document_stream(tokenizer, documents)
    n_windows = len(perplexity_windows(len(ids), max_length, stride))
    batches = math.ceil(n_windows / config.batch_size)
    with task_progress(f"{spec.name} ppl", batches, progress, count) as on_batch:
        nll, scored = strided_nll(model, ids, max_length=max_length, stride=stride,
                                  batch_size=config.batch_size, on_batch=on_batch)
    per_token = nll / scored
    # math.exp raises past ~709 nats a token: such a perplexity is inf (refused as a result)
    return {"ppl": math.inf if per_token > 709 else math.exp(per_token),
            "nll_per_token": per_token, "tokens": scored,
            "documents": len(documents), "max_length": max_length, "stride": stride}


def eval_mc(model, tokenizer, spec: TaskSpec, max_length: int, config: EvalConfig,
            progress: bool, count: Callable[[int], None]) -> dict[str, Any]:
    style = spec.options.get("style", "cloze")
    items = _limit(read_mc(spec.target), config.limit)
    shots = mc_shots(spec)
    pairs = mc_requests(items, shots, style, tokenizer)
    batches = math.ceil(len(pairs) / config.batch_size)
    with task_progress(spec.name, batches, progress, count) as on_batch:
        logliks = continuation_logliks(model, pairs, max_length=max_length,
                                       batch_size=config.batch_size, on_batch=on_batch)
    if not all(math.isfinite(ll) for ll, _ in logliks):  # argmax of NaN would score garbage
        raise MinimaError(f"{spec.name}: the model gives non-finite log-likelihoods "
                          "(non-finite weights?)")
    metrics = score_mc(items, [ll for ll, _ in logliks], style)
    metrics["shots"] = len(shots)
    return metrics


def eval_gen(model, tokenizer, spec: TaskSpec, max_length: int, config: EvalConfig,
             progress: bool, count: Callable[[int], None]
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    opts, where = spec.options, f"task {spec.target}"
    mode = opts.get("match", "exact")
    items = _limit(read_gen(spec.target, tokenizer), config.limit)
    batches = math.ceil(len(items) / config.batch_size)
    with task_progress(f"{spec.name} generate", batches, progress, count) as on_batch:
        texts = generate(model, tokenizer, items,
                         max_new_tokens=option_int(opts, "max_tokens", 32, where, least=1),
                         temperature=option_float(opts, "temperature", 0.0, where),
                         top_p=option_float(opts, "top_p", 1.0, where),
                         batch_size=config.batch_size, max_length=max_length,
                         seed=config.seed, on_batch=on_batch)
    rows = [{"prompt": i.prompt, "answers": list(i.answers), "output": t,
             "correct": match(t, i.answers, mode)} for i, t in zip(items, texts, strict=True)]
    metrics = {mode + "_match": sum(r["correct"] for r in rows) / len(rows), "n": len(rows)}
    return metrics, rows


def model_label(text: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (then the name is the path as given)."""
    name, sep, path = text.partition("=")
    if sep and name and path and not Path(text).exists():
        return name, path
    return text, text


_NOT_METRICS = {"n", "tokens", "documents", "max_length", "stride", "shots", "seconds", "chance"}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A task's comparable numbers: its metrics, and per-category ones as `acc/counting`
    (not sizes, counts or settings)."""
    flat = {}
    for name, value in metrics.items():
        if name == "by_category":
            for category, values in value.items():
                flat.update({f"{k}/{category}": v for k, v in values.items()
                             if k not in _NOT_METRICS})
        elif name not in _NOT_METRICS and isinstance(value, int | float) \
                and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def compare(models: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Deltas of every metric against the first model's: [{task: {metric: delta}}, ...]."""
    base = {task: flat_metrics(m) for task, m in models[0]["tasks"].items()}
    deltas = []
    for entry in models:
        delta: dict[str, dict[str, float]] = {}
        for task, metrics in entry["tasks"].items():
            for metric, value in flat_metrics(metrics).items():
                if metric in base.get(task, {}):
                    delta.setdefault(task, {})[metric] = value - base[task][metric]
        deltas.append(delta)
    return deltas


def table_rows(models: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows for the rich table: task, metric, then each model's value (later models with their
    delta against the first)."""
    rows = [["", "parameters"] + [f"{m['parameters']:,}" for m in models],
            ["", "tokens/s"] + [f"{m['tokens_per_second']:,.0f}" if m["tokens_per_second"]
                                else "-" for m in models]]
    deltas = compare(models)
    for task in models[0]["tasks"]:
        for metric, value in flat_metrics(models[0]["tasks"][task]).items():
            cells = [_fmt(value)]
            for entry, delta in zip(models[1:], deltas[1:], strict=True):
                other = flat_metrics(entry["tasks"].get(task, {})).get(metric)
                change = delta.get(task, {}).get(metric)
                cells.append("-" if other is None else f"{_fmt(other)} ({change:+.4f})")
            rows.append([task, metric] + cells)
    return rows


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def run_eval(*, models: Sequence[str], tasks: Sequence[str], config: EvalConfig,
             output: Path | None = None, force: bool = False, dtype: torch.dtype | None = None,
             device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """The `minima eval` stage: parse and check every task and model before any loads, evaluate
    each model in turn, write `results.json` (+ generations/*.jsonl, minima.json) atomically."""
    from minima_cli.fsutil import check_output
    from minima_cli.model.checkpoint import (
        load_config,
        load_model,
        load_tokenizer,
        model_fingerprint,
        resolve_model,
    )
    from minima_cli.training.config import check_peak

    check_peak(config.peak_tflops)
    if not models:
        raise MinimaError("give at least one --model")
    if not tasks:
        raise MinimaError("give at least one --task")
    if config.backend not in BACKENDS:
        raise MinimaError(f"--backend must be one of {', '.join(BACKENDS)}")
    if config.batch_size < 1:
        raise MinimaError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.limit is not None and config.limit < 1:
        raise MinimaError(f"--limit must be at least 1, got {config.limit}")
    if output is not None:
        check_output(Path(output), force)
    specs = [parse_task(t, backend=config.backend) for t in tasks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MinimaError(f"two tasks share the name {next(n for n in names if names.count(n) > 1)}"
                          "; evaluate them in separate runs")
    for spec in specs:  # read task files now: a bad answer index fails before a model loads
        if spec.kind == "mc":
            read_mc(spec.target)
            mc_shots(spec)
        if spec.kind == "lm-eval" and spec.is_yaml:
            yaml_task_name(spec.target)
    if any(uses_harness(s, config.backend) for s in specs) and \
            importlib.util.find_spec("lm_eval") is None:
        raise MinimaError("the lm-eval backend needs lm-evaluation-harness: "
                          "pip install 'lm-eval>=0.4.5'")
    labels = [model_label(m) for m in models]
    model_names = [name for name, _ in labels]
    if len(set(model_names)) != len(model_names):
        raise MinimaError("two --model entries share a name; tell them apart as NAME=PATH")
    sources = [resolve_model(path) for _, path in labels]
    for name, source in zip(model_names, sources, strict=True):  # --max-length fits each
        model_max_length(load_config(source), config.max_length, name)
    device = resolve_device(device)
    tokenizers = [load_tokenizer(source) for source in sources]
    for spec in specs:  # chat prompts need each tokenizer's template: still before the weights
        if spec.kind == "gen":
            for tokenizer in tokenizers:
                read_gen(spec.target, tokenizer)

    started = time.perf_counter()
    entries, generations = [], []
    for name, source, tokenizer in zip(model_names, sources, tokenizers, strict=True):
        model = load_model(source, dtype=dtype).to(device)
        torch.manual_seed(config.seed)
        outputs: dict[str, list[dict[str, Any]]] = {}
        entry = {"name": name, "path": str(source), "fingerprint": model_fingerprint(source),
                 **evaluate_model(model, tokenizer, specs, config, progress=progress,
                                  generations=outputs)}
        check_finite_metrics(name, entry["tasks"])
        entries.append(entry)
        generations.append(outputs)
        del model
    deltas = compare(entries)
    for entry, delta in zip(entries, deltas, strict=True):
        entry["delta_vs_first"] = delta
    results = {
        "models": entries,
        "tasks": [{"name": s.name, "kind": s.kind, "target": s.target, "options": s.options}
                  for s in specs],
        "config": {"backend": config.backend, "max_length": config.max_length,
                   "stride": config.stride, "batch_size": config.batch_size,
                   "limit": config.limit, "seed": config.seed,
                   "dtype": str(dtype).removeprefix("torch.") if dtype else "auto"},
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    if output is not None:
        write_results(Path(output), results, generations, force=force)
    return results


def write_results(output: Path, results: dict[str, Any],
                  generations: list[dict[str, list[dict[str, Any]]]], *, force: bool) -> None:
    """results.json, generations/INDEX-MODEL-TASK.jsonl and minima.json, all or nothing."""
    from minima_cli.fsutil import atomic_output_dir, write_manifest

    with atomic_output_dir(output, force=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for model_index, outputs in enumerate(generations):
            for task, rows in outputs.items():
                folder = tmp / "generations"
                folder.mkdir(exist_ok=True)
                name = results["models"][model_index]["name"]
                slug = re.sub(r"[^\w.-]+", "_", f"{model_index}-{name}-{task}")
                (folder / f"{slug}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_manifest(tmp, "eval",
                       inputs={"models": [{"name": m["name"], "path": m["path"],
                                           "fingerprint": m["fingerprint"]}
                                          for m in results["models"]],
                               "tasks": results["tasks"]},
                       config=results["config"],
                       metrics={m["name"]: m["tasks"] for m in results["models"]},
                       throughput={m["name"]: m.get("throughput") for m in results["models"]},
                       wall_time_s=results["wall_time_s"])


def run(config: EvalConfig, control: RunControl) -> dict[str, Any]:
    from minima_cli.runtime import torch_dtype

    return run_eval(models=config.models, tasks=config.tasks, config=config,
                    output=Path(config.output) if config.output else None, force=control.force,
                    dtype=torch_dtype(config.dtype), device=config.device,
                    progress=control.progress)
