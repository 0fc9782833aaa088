"""`minima run RECIPE --dry-run`: the plan, without running anything: each stage's status (up to
date, resume, stale, run), the teacher and student shapes with their parameter counts, the
per-GPU memory under ZeRO-2 and ZeRO-3 (pipeline/memory.py) and each training stage's token
budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from minima_cli.errors import MinimaError
from minima_cli.model.arch import ModelShape, count_parameters
from minima_cli.pipeline.memory import activation_bytes, gigabytes, token_budget, zero_memory
from minima_cli.pipeline.recipe import Recipe, stage_config
from minima_cli.pipeline.run import HASH_FILE, preflight, select_stages, stage_run_dir
from minima_cli.pipeline.stamps import current_hash, read_stamp
from minima_cli.pipeline.values import references
from minima_cli.stages import STAGES, TRAINING
from minima_cli.stages.configs import DEFAULT_SEQ_LEN
from minima_cli.units import format_count


def teacher_shape(recipe: Recipe) -> tuple[ModelShape | None, str]:
    """The teacher's shape and where it came from: its config on disk or `teacher_config`."""
    from minima_cli.model.arch import shape_from_config
    from minima_cli.model.checkpoint import load_config, resolve_model
    from minima_cli.pipeline.values import model_config

    teacher = recipe.resolve(recipe.teacher) if recipe.teacher else None
    if teacher and Path(teacher).exists():
        return shape_from_config(load_config(resolve_model(teacher))), teacher
    if recipe.teacher_config:
        return shape_from_config(model_config(recipe.teacher_config)), "teacher_config"
    if teacher and references(recipe.teacher):
        return None, f"{recipe.teacher} (written by an earlier stage)"
    return None, "unknown: give teacher_config for a teacher not on disk"


def student_shape(recipe: Recipe, teacher: ModelShape | None) -> ModelShape | None:
    from minima_cli.model.shapes import resolve_target
    from minima_cli.units import parse_size

    prune = recipe.stages.get("prune")
    if prune and teacher is not None:
        return resolve_target(teacher, prune["shape"],
                              parse_size(prune["params"]) if prune["params"] else None,
                              prune["ratio"], prune["multiple_of"])
    distill = recipe.stages.get("distill")
    if distill and not references(distill["student"]) and Path(distill["student"]).exists():
        from minima_cli.model.arch import shape_from_config
        from minima_cli.model.checkpoint import load_config, resolve_model

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
    run_dir = stage_run_dir(recipe, stage)
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
                f"{o['seq_len'] or 'auto'} tokens")
    if stage == "prune":
        target = ", ".join(f"{k}={v}" for k, v in (o["shape"] or {}).items())
        target += f" params={o['params']}" if o["params"] else ""
        target += f" ratio={o['ratio']}" if o["ratio"] else ""
        return f"{target.strip()} ({o['priority']}, layers: {o['layer_selection']})"
    if stage in TRAINING:
        length = (f"{format_count(o['max_tokens'])} tokens" if o.get("max_tokens") else
                  f"{o['max_steps']} steps" if o["max_steps"] else f"{o['epochs']:g} epochs")
        what = f"{o['loss']} KD, alpha {o['alpha']:g}" if stage == "distill" or o["teacher"] \
            else "assistant-token CE"
        return (f"{what}; {length}, micro-batch {o['batch_size']} x accumulation "
                f"{o['grad_accum']} x {o['seq_len'] or 'auto'} tokens, lr {o['lr']:g}")
    if stage == "export":
        return f"{o['model']} -> {o['type']} GGUF (llama.cpp)"
    if stage == "eval":
        return f"{len(o['models'])} models x {len(o['tasks'])} tasks"
    return STAGES[stage].help.split(".")[0]  # a stage with no summary of its own


def dry_run(recipe: Recipe, *, start: str | None = None, stop: str | None = None,
            force: bool = False) -> Group:
    """The plan as rich renderables: stages, shapes, memory per GPU, token budget."""
    from minima_cli.model.shapes import parameter_table

    selected = select_stages(recipe, start, stop)
    preflight(recipe, selected, plan_only=True)  # refuse what the real run would refuse
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


def data_lines(stage: str, options: dict[str, Any]) -> list[str]:
    """Each training source of a stage that reads text blocks: a store's size on disk and
    token count, a raw source's estimated tokenisation time (data/store.py: describe_source).
    sft's chat rows are small and read whole, so they are not listed."""
    if stage == "sft" or not options.get("data"):
        return []
    from minima_cli.data.sources import parse_sources
    from minima_cli.data.store import describe_source

    try:
        sources = parse_sources(options["data"], options.get("text_field") or "text")
    except MinimaError:
        return []  # the preflight or the stage says what is wrong with the spec
    return [f"{stage} data: {describe_source(source)}" for source in sources]


def training_plan(recipe: Recipe, stage: str, teacher: ModelShape | None,
                  student: ModelShape | None) -> list[Any]:
    """Token budget and memory estimate lines/tables of one training stage."""
    options = recipe.stages[stage]
    config = stage_config(stage, options, recipe.hardware)
    world = recipe.world_size
    parts: list[Any] = []
    hw = recipe.hardware
    layout = (f"{hw['nodes']} node(s) x {hw['gpus_per_node']} GPU(s) x micro-batch "
              f"{config.batch_size} x grad-accum {config.grad_accum} x seq "
              f"{config.seq_len or 'auto'}")
    if config.seq_len is None:  # sft's default, min(512, the model's positions): at most 512
        config = dataclasses.replace(config, seq_len=DEFAULT_SEQ_LEN)
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
    parts.extend(data_lines(stage, {**options, "data": recipe.resolve(options.get("data"))}))
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
        from minima_cli.training.loop import deepspeed_stage, read_deepspeed_config

        parts.append(f"the recipe's DeepSpeed config {chosen}: ZeRO-"
                     f"{deepspeed_stage(read_deepspeed_config(chosen))}")
    return parts
