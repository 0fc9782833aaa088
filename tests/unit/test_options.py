"""Options are declared once: for every stage, the CLI flags, the `--config` YAML keys, the recipe
keys and the adapter's config fields are the same set, derived from the config dataclass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from minima_cli.cli import app
from minima_cli.cli.stage_commands import CONTROLS
from minima_cli.errors import MinimaError
from minima_cli.options import OptionError, option, options_of, validate
from minima_cli.pipeline.recipe import HARDWARE, load_recipe, stage_config, stage_schema
from minima_cli.stages import PIPELINE, STAGES, TRAINING


def command_params(name: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[name].params}


@pytest.mark.parametrize("name", list(STAGES))
def test_cli_flags_are_the_config_fields(name):
    fields = {f.name for f in dataclasses.fields(STAGES[name].config)}
    flags = set(command_params(name)) - set(CONTROLS)
    assert flags == fields
    assert ("resume" in command_params(name)) == (name in TRAINING)


@pytest.mark.parametrize("name", PIPELINE)
def test_recipe_keys_are_the_config_fields_a_recipe_sets(name):
    options = options_of(STAGES[name].config)
    from_pipeline = {f.name for f, spec in options if spec.source is not None}
    assert set(stage_schema(name)) == {f.name for f, _ in options} - from_pipeline
    # what the pipeline sets instead: the output dir, the hardware section, CLI-only switches
    for field, spec in options:
        if spec.source == "hardware":
            assert field.name in HARDWARE
        assert spec.source in (None, "hardware", "output", "cli")


@pytest.mark.parametrize("name", PIPELINE)
def test_the_adapter_builds_the_config_from_a_section(name):
    schema = stage_schema(name)
    hardware = {key: default for key, (_, default) in HARDWARE.items()}
    config = stage_config(name, {k: d for k, (_, d) in schema.items()}, hardware, "out")
    assert isinstance(config, STAGES[name].config)
    for field, spec in options_of(STAGES[name].config):
        if spec.source == "output":
            assert getattr(config, field.name) == "out"


def test_sft_has_the_kd_options_and_no_distill_only_ones():
    params = command_params("sft")
    assert "topk_mode" in params  # a recipe's sft.topk_mode is a flag too
    for distill_only in ("hidden_weight", "hidden_layers", "max_tokens", "teacher_cache"):
        assert distill_only not in params and distill_only not in stage_schema("sft")


def recipe(tmp_path: Path, body: str) -> Path:
    (tmp_path / "train.txt").write_text("hello world\n")
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"workdir: {tmp_path}/work\nteacher: org/teacher\n"
                    f"data: {tmp_path}/train.txt\n" + body)
    return path


def test_set_of_a_key_the_stage_lacks_names_that_key(tmp_path):
    path = recipe(tmp_path, f"sft: {{data: {tmp_path}/chat.jsonl}}\n")
    with pytest.raises(MinimaError, match=r"^--set: sft\.hidden_weight: unknown key"):
        load_recipe(path, ["sft.hidden_weight=1"])
    assert load_recipe(path, ["sft.topk_mode=tail"]).stages["sft"]["topk_mode"] == "tail"


@pytest.mark.parametrize("override, key", [
    ("distill.temperature=0", "distill.temperature"),
    ("distill.warmup_ratio=1", "distill.warmup_ratio"),
    ("distill.lr=0", "distill.lr"),
    ("hardware.precision=fp16", "hardware.precision"),
])
def test_a_config_check_is_reported_against_its_own_key(tmp_path, override, key):
    path = recipe(tmp_path, "distill: {student: org/student, max_steps: 1}\n")
    with pytest.raises(MinimaError, match=rf"^--set: {key}: "):
        load_recipe(path, [override])


@dataclasses.dataclass(frozen=True)
class Example:
    rate: float = option(0.5, "A rate.", high=1)
    count: int = option(3, "A count.")
    mode: str = option("a", "A mode.", choices=("a", "b"))


def test_declared_bounds_and_choices_are_checked():
    validate(Example())
    for bad, message in ((Example(rate=2.0), "--rate must be <= 1"),
                         (Example(rate=-1.0), "--rate must be >= 0"),
                         (Example(rate=float("nan")), "--rate must be a finite number"),
                         (Example(count=0), "--count must be positive"),
                         (Example(mode="c"), "--mode: 'c' is not one of a, b")):
        with pytest.raises(OptionError, match=message) as caught:
            validate(bad)
        assert caught.value.option in ("rate", "count", "mode")
