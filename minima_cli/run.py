"""`minima run RECIPE`: every stage of a recipe into `workdir/<stage>/`, redoing only what is stale.

A stage is up to date when its `minima.json` carries the hash this run would give it: the hash of
the stage's options (with `${STAGE}` references, not absolute paths, so a workdir can move) and of
its inputs' contents (model fingerprints, data and file hashes). A finished stage is stamped with
that hash (`"recipe"` in its manifest); anything else is stale and runs again, replacing its output
atomically. A training stage killed mid-way resumes from `workdir/<stage>.run/` when the hash it
started under (`recipe-hash` there) is the current one; otherwise its leftovers are discarded.

`--dry-run` prints the plan instead: each stage's status, the teacher and student shapes with
their parameter counts, per-GPU memory estimates for ZeRO-2 and ZeRO-3 and the token budget.

Memory per GPU (N GPUs, student P and teacher T parameters; bf16: 2-byte weights and grads and
12 bytes of fp32 master weights + Adam moments; fp32: 4 + 4 + 8):
- ZeRO-2: weights replicated, grads and optimizer states partitioned: `2P + (2 + 12)P / N`;
  the teacher's bf16 weights replicated: `2T`.
- ZeRO-3: everything partitioned: `16P / N`, teacher `2T / N`.
- Activations of one micro-batch of b x s tokens (2 bytes a value), per layer and token
  `4h + 3q + 3kv + 4f` values (norm inputs/outputs, q/k/v before and after RoPE, the attention
  context, gate/up/act/product; q = heads x head_dim, kv = kv_heads x head_dim): all layers
  without gradient checkpointing; with it, each layer's input (h) plus one layer recomputed.
  Plus the logits: student logits, their gradient and the teacher's, `3 b s V`.
Not counted: the CUDA context and allocator fragmentation (~1-3 GB), communication buckets, the
teacher's transient activations (no grad, freed layer by layer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.rule import Rule
from rich.table import Table

from minima_cli.arch import ModelShape, count_parameters, format_count
from minima_cli.checkpoint import MANIFEST, file_sha256, read_manifest
from minima_cli.errors import MinimaError
from minima_cli.recipe import STAGES, Recipe, references, training_config

# Per stage: its input keys and what they hold (how they are fingerprinted).
INPUTS = {
    "tiny": {},
    "score": {"model": "model", "data": "data"},
    "prune": {"model": "model", "scores": "dir"},
    "distill": {"teacher": "model", "student": "model", "data": "data", "teacher_cache": "dir"},
    "sft": {"model": "model", "data": "data", "valid_data": "data", "teacher": "model"},
    "eval": {"models": "models", "tasks": "tasks"},
}
TRAINING = ("distill", "sft")
DISTRIBUTED = ("score", "distill", "sft")  # stages that run under torchrun / accelerate launch
HASH_FILE = "recipe-hash"


@dataclass
class StageRun:
    stage: str
    status: str  # ran, resumed, up to date, not selected
    seconds: float | None = None


# --- memory and token budget (pure) ---------------------------------------------------------------

# bytes per parameter: (weights, gradients, optimizer states incl. fp32 master weights)
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


def layer_activation_values(shape: ModelShape) -> int:
    """Values one decoder layer keeps per token for its backward pass (see the module doc)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 4 * shape.hidden + 3 * q + 3 * kv + 4 * shape.ffn


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, checkpointing: bool,
                     value_bytes: int = 2) -> int:
    """Activation memory of one micro-batch of the student, plus student and teacher logits."""
    tokens = micro_batch * seq_len
    layer = layer_activation_values(shape) * value_bytes
    if checkpointing:
        stored = tokens * (shape.layers * shape.hidden * value_bytes + layer)
    else:
        stored = tokens * shape.layers * layer
    return stored + 3 * tokens * shape.vocab * value_bytes


def zero_memory(*, student_params: int, teacher_params: int, world: int, zero_stage: int,
                precision: str, activations: int) -> dict[str, float]:
    """Per-GPU bytes of a distillation step under ZeRO-2 or ZeRO-3 (see the module doc)."""
    if zero_stage not in (2, 3):
        raise ValueError(f"ZeRO stage {zero_stage}: estimates cover stages 2 and 3")
    weights, grads, optimizer = STATE_BYTES[precision]
    if zero_stage == 2:
        states = weights * student_params + (grads + optimizer) * student_params / world
        teacher = weights * teacher_params
    else:
        states = (weights + grads + optimizer) * student_params / world
        teacher = weights * teacher_params / world
    return {"states": states, "teacher": teacher, "activations": float(activations),
            "total": states + teacher + activations}


def token_budget(config: Any, world: int) -> dict[str, int]:
    """Steps, tokens per optimizer step and total tokens of a training config on `world` GPUs."""
    steps = config.total_steps(world)
    per_step = config.tokens_per_step(world)
    return {"steps": steps, "tokens_per_step": per_step, "tokens": steps * per_step}


def gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


# --- hashes and stamps ----------------------------------------------------------------------------


def directory_fingerprint(path: Path) -> str:
    """Every file's relative path and sha256, the manifest (it holds a timestamp) left out."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def input_fingerprint(kind: str, value: Any) -> Any:
    """Content identity of one resolved input (None stays None)."""
    from minima_cli.checkpoint import model_fingerprint, resolve_model
    from minima_cli.data import parse_sources, source_fingerprint

    if value is None:
        return None
    if kind == "model":
        return model_fingerprint(resolve_model(value))
    if kind == "dir":
        return directory_fingerprint(Path(value))
    if kind == "data":
        return [[source_fingerprint(s), s.weight, s.text_field] for s in parse_sources(value)]
    if kind == "models":
        return {name: input_fingerprint("model", path)
                for name, _, path in (m.partition("=") for m in value)}
    if kind == "tasks":
        from minima_cli.evaluate import parse_task

        found = []
        for task in value:
            target = Path(parse_task(task).target)
            found.append(file_sha256(target) if target.is_file() else
                         directory_fingerprint(target) if target.is_dir() else None)
        return found
    raise AssertionError(kind)


def hashed_options(stage: str, options: dict[str, Any]) -> dict[str, Any]:
    """What of a stage's options decides its output: not the input paths (their contents count),
    not training's bookkeeping (checkpoint and eval intervals, logs, the DeepSpeed file)."""
    from minima_cli.train import UNHASHED_FIELDS

    kept = {k: v for k, v in options.items() if k not in INPUTS[stage] or k in ("tasks",)}
    if stage == "eval":
        kept["models"] = [m.partition("=")[0] for m in options["models"]]
    if stage in TRAINING:
        kept = {k: v for k, v in kept.items() if k not in UNHASHED_FIELDS}
    return kept


def stage_hash(stage: str, options: dict[str, Any], fingerprints: dict[str, Any]) -> str:
    text = json.dumps({"stage": stage, "options": options, "inputs": fingerprints},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_options(recipe: Recipe, stage: str) -> dict[str, Any]:
    """A stage's options plus the hardware settings that change its result."""
    options = dict(recipe.stages[stage])
    if stage in TRAINING:
        options["precision"] = recipe.hardware["precision"]
        options["gradient_checkpointing"] = recipe.hardware["gradient_checkpointing"]
        options["world_size"] = recipe.world_size  # the batch per step depends on it
    return options


def current_hash(recipe: Recipe, stage: str) -> str:
    options = stage_options(recipe, stage)
    fingerprints = {key: input_fingerprint(kind, recipe.resolve(options.get(key)))
                    for key, kind in INPUTS[stage].items()}
    return stage_hash(stage, hashed_options(stage, options), fingerprints)


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The pipeline's stamp in a stage output's manifest, or None (no output, or not stamped)."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        return read_manifest(directory).get("recipe")
    except MinimaError:
        return None


def write_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    """Add the stamp to the stage's manifest, atomically (temp file + rename)."""
    manifest = read_manifest(directory)
    manifest["recipe"] = stamp
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST)


# --- stage runners --------------------------------------------------------------------------------


def torch_dtype(name: str) -> Any:
    import torch

    return None if name == "auto" else getattr(torch, name)


def run_tiny(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
             progress: bool) -> None:
    from minima_cli.checkpoint import atomic_output_dir, write_manifest
    from minima_cli.tiny import build_tiny_world

    config = {k: options[k] for k in ("seed", "gqa", "tied", "steps", "documents")}
    with atomic_output_dir(output, force=True) as tmp:
        summary = build_tiny_world(tmp, seed=config["seed"], gqa=config["gqa"],
                                   tied=config["tied"], n_documents=config["documents"],
                                   steps=config["steps"], progress=progress)
        summary = {k: (v.replace(str(tmp), str(output)) if isinstance(v, str) else v)
                   for k, v in summary.items()}
        write_manifest(tmp, "tiny", config=config, metrics=summary,
                       wall_time_s=summary["seconds"])


def run_score_stage(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
                    progress: bool) -> None:
    from minima_cli.score import run_score

    run_score(model_path=options["model"], data=options["data"], output=output,
              batches=options["batches"], seq_len=options["seq_len"],
              batch_size=options["batch_size"], method=options["method"],
              text_field=options["text_field"], seed=options["seed"],
              dtype=torch_dtype(options["dtype"]), device=recipe.hardware["device"], force=True,
              progress=progress)


def run_prune_stage(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
                    progress: bool) -> None:
    from minima_cli.prune import run_prune

    shape = options["shape"]
    run_prune(model_path=options["model"], output=output, scores_path=options["scores"],
              shape=",".join(f"{k}={v}" for k, v in shape.items()) if shape else None,
              params=options["params"], ratio=options["ratio"], priority=options["priority"],
              layer_selection=options["layer_selection"], multiple_of=options["multiple_of"],
              force=True, progress=progress)


def run_distill_stage(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
                      progress: bool) -> None:
    from minima_cli.distill import run_distill

    run_distill(teacher_path=options["teacher"], student_path=options["student"],
                data=options["data"], output=output,
                config=training_config("distill", options, recipe.hardware), resume=resume,
                force=True, progress=progress, text_field=options["text_field"],
                teacher_cache=options["teacher_cache"])


def run_sft_stage(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
                  progress: bool) -> None:
    from minima_cli.sft import run_sft

    run_sft(model_path=options["model"], data=options["data"], output=output,
            config=training_config("sft", options, recipe.hardware),
            teacher_path=options["teacher"], valid_data=options["valid_data"], resume=resume,
            force=True, progress=progress)


def run_eval_stage(recipe: Recipe, options: dict[str, Any], output: Path, resume: bool,
                   progress: bool) -> None:
    from minima_cli.evaluate import EvalConfig, run_eval

    config = EvalConfig(backend=options["backend"], max_length=options["max_length"],
                        stride=options["stride"], batch_size=options["batch_size"],
                        limit=options["limit"], seed=options["seed"])
    run_eval(models=options["models"], tasks=options["tasks"], config=config, output=output,
             force=True, dtype=torch_dtype(options["dtype"]), device=recipe.hardware["device"],
             progress=progress)


RUNNERS: dict[str, Callable[..., None]] = {
    "tiny": run_tiny, "score": run_score_stage, "prune": run_prune_stage,
    "distill": run_distill_stage, "sft": run_sft_stage, "eval": run_eval_stage,
}


# --- the pipeline ---------------------------------------------------------------------------------


def select_stages(recipe: Recipe, start: str | None, stop: str | None) -> list[str]:
    """The recipe's stages from `start` to `stop` (inclusive), in run order."""
    enabled = list(recipe.stages)
    for flag, name in (("--from", start), ("--until", stop)):
        if name is not None and name not in enabled:
            known = ", ".join(enabled)
            raise MinimaError(f"{flag} {name}: not a stage of this recipe ({known})"
                              if name in STAGES else f"{flag} {name}: no such stage ({known})")
    first = enabled.index(start) if start else 0
    last = enabled.index(stop) if stop else len(enabled) - 1
    if first > last:
        raise MinimaError(f"--from {start} comes after --until {stop}")
    return enabled[first:last + 1]


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def preflight(recipe: Recipe, selected: list[str]) -> None:
    """Before any work: what the selected stages read from outside the pipeline must be on disk
    (models locally: minima loads no model from the hub), and the outputs of stages before
    --from must exist."""
    from minima_cli.checkpoint import resolve_model
    from minima_cli.data import parse_sources
    from minima_cli.recipe import looks_like_hub_name, stage_schema

    for stage in selected:
        options, schema = recipe.stages[stage], stage_schema(stage)
        for key in INPUTS[stage]:
            value = options.get(key)
            if value is None:
                continue
            kind = schema[key].kind
            items = [m.partition("=")[2] for m in value] if kind == "models" else \
                [s.path_or_name for s in parse_sources(value)] if kind == "data" else \
                [] if kind == "tasks" else [value]
            for item in items:
                made_by = [r for r in references(item) if r in STAGES]
                for name in made_by:
                    if name not in selected and not (recipe.stage_dir(name) / MANIFEST).is_file():
                        raise MinimaError(f"{stage}.{key}: {recipe.stage_dir(name)} does not "
                                          f"exist yet: run the {name} stage first (it is "
                                          "before --from)")
                if made_by:
                    continue
                path = recipe.resolve(item)
                if kind in ("model", "models"):
                    try:
                        resolve_model(path)
                    except MinimaError as error:
                        hint = " (a hub name? download the model and --set teacher=DIR; dry " \
                            "runs read teacher_config)" if not Path(path).exists() else ""
                        raise MinimaError(f"{recipe.path}: {stage}.{key}: {error}{hint}") \
                            from None
                elif not Path(path).expanduser().exists() and not (
                        kind == "data" and looks_like_hub_name(path)):
                    raise MinimaError(f"{recipe.path}: {stage}.{key}: not found: {path}")


def training_run_dir(recipe: Recipe, stage: str) -> Path:
    return recipe.workdir / f"{stage}.run"


def resume_decision(recipe: Recipe, stage: str, digest: str, is_main: bool) -> bool:
    """Resume a training stage killed under the same hash; otherwise start clean. Every rank
    decides from the same files before the main rank writes anything."""
    from minima_cli.train_state import list_checkpoints

    if stage not in TRAINING:
        return False
    run_dir = training_run_dir(recipe, stage)
    marker = run_dir / HASH_FILE
    started = marker.read_text().strip() if marker.is_file() else None
    has_checkpoints = bool(list_checkpoints(run_dir / "checkpoints"))
    if has_checkpoints and started == digest:
        return True
    if has_checkpoints:
        _, world = rank_and_world()
        if world > 1:
            raise MinimaError(f"{run_dir} holds checkpoints of another configuration: delete "
                              "it before launching")
        if is_main:
            shutil.rmtree(run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest + "\n")
    return False


def run_recipe(recipe: Recipe, *, start: str | None = None, stop: str | None = None,
               force: bool = False, progress: bool = True,
               console: Console | None = None) -> list[StageRun]:
    """Run the selected stages; returns what happened to each stage of the recipe."""
    console = console or Console()
    selected = select_stages(recipe, start, stop)
    rank, world = rank_and_world()
    is_main = rank == 0
    preflight(recipe, selected)
    if recipe.hardware["threads"]:
        import torch

        torch.set_num_threads(recipe.hardware["threads"])
    if is_main:
        save_recipe_copy(recipe)
    runs = {stage: StageRun(stage, "not selected") for stage in recipe.stages}
    for stage in selected:
        output = recipe.stage_dir(stage)
        digest = current_hash(recipe, stage)
        stamp = read_stamp(output)
        if stamp and stamp.get("hash") == digest and not force:
            runs[stage] = StageRun(stage, "up to date", stamp.get("seconds"))
            if is_main:
                console.print(f"[dim]{stage}: up to date ({output})[/dim]")
            continue
        if world > 1 and stage not in DISTRIBUTED:
            raise MinimaError(f"{stage} runs in one process: run `minima run {recipe.path} "
                              f"--until {stage}` before launching {world} processes")
        if is_main and stage in TRAINING and world != recipe.world_size:
            console.print(f"[yellow]warning: the recipe declares {recipe.world_size} GPU(s) "
                          f"(hardware.nodes x gpus_per_node), this launch has {world} "
                          "process(es): each step sees a different batch[/yellow]")
        resume = resume_decision(recipe, stage, digest, is_main)
        reason = "resuming a killed run" if resume else (
            "forced" if force and stamp else "stale" if stamp else "no output yet")
        if is_main:
            console.print(Rule(f"{stage} ({reason}) -> {output}"))
        started = time.perf_counter()
        options = recipe.resolve(recipe.stages[stage])
        RUNNERS[stage](recipe, options, output, resume, progress)
        seconds = time.perf_counter() - started
        if is_main:
            write_stamp(output, {"hash": digest, "recipe": str(recipe.path),
                                 "seconds": round(seconds, 2), "resumed": resume,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        runs[stage] = StageRun(stage, "resumed" if resume else "ran", seconds)
    return list(runs.values())


def save_recipe_copy(recipe: Recipe) -> None:
    """The recipe as run (overrides applied) in workdir/recipe.yaml, for the record."""
    import yaml

    recipe.workdir.mkdir(parents=True, exist_ok=True)
    target = recipe.workdir / "recipe.yaml"
    tmp = target.with_name(f".recipe.yaml.tmp-{os.getpid()}")
    tmp.write_text(f"# {recipe.path} as run by minima\n" +
                   yaml.safe_dump(recipe.raw, sort_keys=False))
    os.replace(tmp, target)


# --- the dry run ----------------------------------------------------------------------------------


def teacher_shape(recipe: Recipe) -> tuple[ModelShape | None, str]:
    """The teacher's shape and where it came from: its config on disk or `teacher_config`."""
    from minima_cli.arch import shape_from_config
    from minima_cli.checkpoint import load_config, resolve_model
    from minima_cli.recipe import model_config

    teacher = recipe.resolve(recipe.teacher) if recipe.teacher else None
    if teacher and Path(teacher).exists():
        return shape_from_config(load_config(resolve_model(teacher))), teacher
    if recipe.teacher_config:
        return shape_from_config(model_config(recipe.teacher_config)), "teacher_config"
    if teacher and references(recipe.teacher):
        return None, f"{recipe.teacher} (written by an earlier stage)"
    return None, "unknown: give teacher_config for a teacher not on disk"


def student_shape(recipe: Recipe, teacher: ModelShape | None) -> ModelShape | None:
    from minima_cli.prune import parse_size, resolve_target

    prune = recipe.stages.get("prune")
    if prune and teacher is not None:
        return resolve_target(teacher, prune["shape"],
                              parse_size(prune["params"]) if prune["params"] else None,
                              prune["ratio"], prune["multiple_of"])
    distill = recipe.stages.get("distill")
    if distill and not references(distill["student"]) and Path(distill["student"]).exists():
        from minima_cli.arch import shape_from_config
        from minima_cli.checkpoint import load_config, resolve_model

        return shape_from_config(load_config(resolve_model(distill["student"])))
    return None


def dry_run_status(recipe: Recipe, stage: str, force: bool) -> str:
    """What `minima run` would do with a stage now."""
    stamp = read_stamp(recipe.stage_dir(stage))
    try:
        digest = current_hash(recipe, stage)
    except (MinimaError, OSError):
        return "run (inputs not built yet)"
    if stamp and stamp.get("hash") == digest:
        return "run (forced)" if force else "up to date"
    run_dir = training_run_dir(recipe, stage)
    if stage in TRAINING and (run_dir / HASH_FILE).is_file() and \
            (run_dir / HASH_FILE).read_text().strip() == digest:
        return "resume"
    return "run (stale)" if stamp else "run"


def stage_summary(recipe: Recipe, stage: str) -> str:
    """A few words on what a stage will do."""
    o = recipe.stages[stage]
    if stage == "tiny":
        return f"{o['documents']} documents, teacher pre-trained {o['steps']} steps"
    if stage == "score":
        return (f"{o['method']} scores over {o['batches']} x {o['batch_size']} x "
                f"{o['seq_len']} tokens")
    if stage == "prune":
        target = ", ".join(f"{k}={v}" for k, v in (o["shape"] or {}).items())
        target += f" params={o['params']}" if o["params"] else ""
        target += f" ratio={o['ratio']}" if o["ratio"] else ""
        return f"{target.strip()} ({o['priority']}, layers: {o['layer_selection']})"
    if stage in TRAINING:
        length = (f"{format_count(o['max_tokens'])} tokens" if o["max_tokens"] else
                  f"{o['max_steps']} steps" if o["max_steps"] else f"{o['epochs']:g} epochs")
        what = f"{o['loss']} KD, alpha {o['alpha']:g}" if stage == "distill" or o["teacher"] \
            else "assistant-token CE"
        return (f"{what}; {length}, micro-batch {o['batch_size']} x accumulation "
                f"{o['grad_accum']} x {o['seq_len']} tokens, lr {o['lr']:g}")
    return f"{len(o['models'])} models x {len(o['tasks'])} tasks"


def dry_run(recipe: Recipe, *, start: str | None = None, stop: str | None = None,
            force: bool = False) -> Group:
    """The plan as rich renderables: stages, shapes, memory per GPU, token budget."""
    from minima_cli.prune import parameter_table

    selected = select_stages(recipe, start, stop)
    parts: list[Any] = []
    plan = Table(title=f"minima run {recipe.path} -> {recipe.workdir} (dry run)")
    for column in ("stage", "status", "what"):
        plan.add_column(column)
    will_run: set[str] = set()
    for stage in recipe.stages:
        upstream = [r for r in references(recipe.stages[stage]) if r in will_run]
        status = "not selected" if stage not in selected else \
            f"run (after {upstream[-1]})" if upstream else dry_run_status(recipe, stage, force)
        if status.startswith(("run", "resume")):
            will_run.add(stage)
        plan.add_row(stage, status, stage_summary(recipe, stage))
    parts.append(plan)
    teacher, origin = teacher_shape(recipe)
    student = student_shape(recipe, teacher)
    if teacher is not None and student is not None:
        shapes = Table(title=f"teacher ({origin}) -> student")
        for column in ("axis", "teacher", "student", "kept"):
            shapes.add_column(column, justify="left" if column == "axis" else "right")
        for row in parameter_table(teacher, student):
            shapes.add_row(*row)
        parts.append(shapes)
    else:
        parts.append(f"teacher shape: {origin}")
    for stage in (s for s in TRAINING if s in recipe.stages):
        parts.extend(training_plan(recipe, stage, teacher, student))
    return Group(*parts)


def training_plan(recipe: Recipe, stage: str, teacher: ModelShape | None,
                  student: ModelShape | None) -> list[Any]:
    """Token budget and memory estimate lines/tables of one training stage."""
    options = recipe.stages[stage]
    config = training_config(stage, options, recipe.hardware)
    world = recipe.world_size
    parts: list[Any] = []
    hw = recipe.hardware
    layout = (f"{hw['nodes']} node(s) x {hw['gpus_per_node']} GPU(s) x micro-batch "
              f"{config.batch_size} x grad-accum {config.grad_accum} x seq {config.seq_len}")
    if stage == "sft" and not config.max_steps:
        parts.append(f"{stage}: {config.epochs:g} epochs over the chat rows; "
                     f"{config.tokens_per_step(world):,} tokens a step ({layout})")
    else:
        budget = token_budget(config, world)
        line = (f"{stage} token budget: {format_count(budget['tokens'])} tokens = "
                f"{budget['steps']:,} steps x {budget['tokens_per_step']:,} tokens ({layout})")
        if student is not None:
            line += f"; {budget['tokens'] / count_parameters(student):,.3g} tokens per student " \
                    "parameter"
        parts.append(line)
    model = student if stage == "distill" else None
    if model is None or teacher is None:
        return parts
    precision = "fp32" if config.precision == "fp32" else "bf16"
    value_bytes = 2 if precision == "bf16" else 4
    activations = activation_bytes(model, micro_batch=config.batch_size, seq_len=config.seq_len,
                                   checkpointing=config.gradient_checkpointing,
                                   value_bytes=value_bytes)
    checkpointing = "on" if config.gradient_checkpointing else "off"
    table = Table(title=f"{stage} memory per GPU, estimated ({world} GPUs, {precision}, "
                        f"gradient checkpointing {checkpointing})")
    columns = ["ZeRO", "student states", "teacher weights", "activations", "total"]
    if hw["gpu_memory"]:
        columns.append(f"fits {gigabytes(hw['gpu_memory'])}")
    for column in columns:
        table.add_column(column, justify="right")
    for zero in (2, 3):
        found = zero_memory(student_params=count_parameters(model),
                            teacher_params=count_parameters(teacher), world=world,
                            zero_stage=zero, precision=precision, activations=activations)
        row = [str(zero), *(gigabytes(found[k]) for k in ("states", "teacher", "activations",
                                                          "total"))]
        if hw["gpu_memory"]:
            row.append("yes" if found["total"] < hw["gpu_memory"] else "no")
        table.add_row(*row)
    parts.append(table)
    chosen = hw["deepspeed"]
    if chosen:
        from minima_cli.train import deepspeed_stage, read_deepspeed_config

        parts.append(f"the recipe's DeepSpeed config {chosen}: ZeRO-"
                     f"{deepspeed_stage(read_deepspeed_config(chosen))}")
    return parts


def summary_table(recipe: Recipe, runs: list[StageRun]) -> Table:
    """The closing table of `minima run`: per stage its status and time, per model its size and
    the eval metrics (report.py reads the same numbers from the workdir)."""
    from minima_cli.report import collect, summary_rows

    header, rows = summary_rows(collect(recipe.workdir),
                                {r.stage: r for r in runs})
    table = Table(title=f"minima run {recipe.path} -> {recipe.workdir}")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index < 4 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def format_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.0f}m"
