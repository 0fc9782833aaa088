"""Numerical health (issue 17, class A): a non-finite loss, gradient norm or weight stops training
with one line and writes no model; non-finite hyper-parameters, seq_len < 2 and a --max-length
beyond the model's positions are refused; scores and metrics are checked before they are
written."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from conftest import distill_args, run_cli, tiny_random_model

from minima_cli.errors import MinimaError
from minima_cli.options import OptionError
from minima_cli.stages.configs import (
    DEFAULT_SEQ_LEN,
    CacheTeacherConfig,
    ScheduleConfig,
    ScoreConfig,
    SftConfig,
    resolve_seq_len,
)
from minima_cli.stages.evaluate import check_finite_metrics, model_max_length
from minima_cli.stages.score import check_finite_scores
from minima_cli.training.config import TrainConfig
from minima_cli.training.loop import (
    Diverged,
    LocalSession,
    nonfinite_parameter,
    optimizer_step,
    train,
)
from minima_cli.training.state import adamw, list_checkpoints, parameter_groups


class Blocks:
    """A resumable stream of fixed random blocks (what `train` needs of a data stream)."""

    def __init__(self):
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.served += 1
        return torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(self.served))

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch, use_cache=False).loss, {}


def poisoned_at(call: int, how: str):
    """A loss function that goes bad on its `call`-th micro-batch: a NaN loss, or (with a finite
    loss) an infinite gradient."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, parts = lm_loss(model, batch)
        if calls[0] == call:
            if how == "loss":
                loss = loss * math.nan
            else:
                weight = model.get_input_embeddings().weight
                weight.register_hook(lambda grad: grad * math.inf)
        return loss, parts

    return loss_fn


def train_run(tmp_path: Path, loss_fn, *, resume: bool = False, steps: int = 8):
    config = TrainConfig(seq_len=8, batch_size=2, max_steps=steps, save_every=2, eval_every=100,
                         lr=1e-3, precision="fp32", tensorboard=False)
    return train(session=LocalSession("fp32", "cpu"), model=tiny_random_model(), loss_fn=loss_fn,
                 stream=Blocks(), valid_blocks=None, config=config, run_dir=tmp_path / "out.run",
                 run_id={"test": 1}, resume=resume, progress=False,
                 evaluate_fn=lambda model: 1.0)


@pytest.mark.parametrize("how, what", [("loss", "the loss is nan"),
                                       ("grad", "the gradient norm is inf")])
def test_a_non_finite_step_stops_training_and_keeps_the_last_checkpoint(tmp_path, how, what):
    with pytest.raises(Diverged) as caught:
        train_run(tmp_path, poisoned_at(5, how))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"training diverged at step 5 of 8: {what}; no model written")
    assert "the last checkpoint (step 4)" in message and "a lower --lr" in message
    found = list_checkpoints(tmp_path / "out.run" / "checkpoints")
    assert [p.name for p in found] == ["step-00000002", "step-00000004"]
    # the last good checkpoint resumes (to the end, with a healthy loss)
    result = train_run(tmp_path, lm_loss, resume=True)
    assert result.steps == 8 and nonfinite_parameter(result.model) is None


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(Diverged, match=r"step 1 of 8: the loss is nan; .*no checkpoint was saved"):
        train_run(tmp_path, poisoned_at(1, "loss"))


def test_optimizer_step_refuses_a_nan_loss_on_every_training_path():
    # the sandwich and the tiny world's pre-training call optimizer_step without train()
    model = tiny_random_model()
    optimizer = adamw(parameter_groups(model, 0.0), 1e-3)
    with pytest.raises(Diverged, match="the loss is nan"):
        optimizer_step(LocalSession("fp32", "cpu"), model, optimizer, poisoned_at(1, "loss"),
                       Blocks(), grad_accum=1, lr=1e-3, clip=1.0)


def test_nonfinite_parameter_names_the_first_bad_weight():
    model = tiny_random_model()
    assert nonfinite_parameter(model) is None
    name, param = list(model.named_parameters())[3]
    with torch.no_grad():
        param.view(-1)[0] = math.inf
    assert nonfinite_parameter(model) == name


def digest(directory: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.rglob("*"))
                                   if p.is_file())).hexdigest()


def test_a_diverging_distill_exits_2_writes_no_model_and_spares_the_old_one(
        tiny_world, pruned, tmp_path, capsys):
    out = tmp_path / "student"
    diverging = [*distill_args(tiny_world, pruned, out, steps=8), "--lr", "1e6", "--clip", "0"]
    code, _, err = run_cli(diverging, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "training diverged at step" in lines[0], err
    assert not out.exists()
    assert (tmp_path / "student.run" / "checkpoints").is_dir()  # kept for inspection
    # a good output, then the diverging run with --force: the good one stays as it was
    good = tmp_path / "good"
    assert run_cli(distill_args(tiny_world, pruned, good, steps=2), capsys)[0] == 0
    before = digest(good)
    diverging[diverging.index("-o") + 1] = str(good)
    code, _, err = run_cli([*diverging, "--force"], capsys)
    assert code == 2 and "training diverged" in err and err.count("\n") == 1
    assert digest(good) == before


@pytest.mark.parametrize("args, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--hidden-weight", "inf"], "--hidden-weight must be a finite number"),
    (["--seq-len", "1"], "--seq-len must be at least 2 (a next-token loss needs two tokens)"),
])
def test_non_finite_and_degenerate_distill_options_are_refused(tiny_world, pruned, tmp_path,
                                                               capsys, args, message):
    out = tmp_path / "out"
    code, _, err = run_cli([*distill_args(tiny_world, pruned, out), *args], capsys)
    assert code == 2 and err.strip() == f"error: {message}" or message in err, err
    assert err.count("\n") == 1 and not out.exists()
    assert not (tmp_path / "out.run").exists()


def test_a_recipe_infinity_is_refused_naming_the_key(tmp_path, capsys):
    config = tmp_path / "distill.yaml"
    config.write_text("distill:\n  lr: .inf\n")
    code, _, err = run_cli(["distill", "--config", config, "-t", tmp_path, "-s", tmp_path, "-d",
                            tmp_path, "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "lr" in err and "finite" in err, err


@pytest.mark.parametrize("stage", ["score", "sft", "cache-teacher", "schedule"])
def test_seq_len_1_is_refused_by_every_next_token_stage(tiny_world, tmp_path, capsys, stage):
    teacher, data = tiny_world / "teacher", tiny_world / "data"
    args = {"score": ["-m", teacher, "-d", data / "train.txt"],
            "sft": ["-m", teacher, "-d", data / "chat_train.jsonl"],
            "cache-teacher": ["-t", teacher, "-d", data / "train.txt"],
            "schedule": ["-t", teacher, "-s", tmp_path, "-d", data / "train.txt",
                         "--student-ratio", "0.5"]}[stage]
    out = tmp_path / "out"
    code, _, err = run_cli([stage, *args, "-o", out, "--seq-len", "1", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--seq-len must be" in err and "2" in err, err
    assert not out.exists()


def test_seq_len_fields_declare_their_lower_bound():
    from minima_cli.options import check_bounds

    for config in (ScoreConfig(seq_len=1), SftConfig(seq_len=1), CacheTeacherConfig(seq_len=1),
                   ScheduleConfig(seq_len=1), TrainConfig(seq_len=1)):
        with pytest.raises(OptionError) as caught:
            check_bounds(config)
        assert caught.value.option == "seq_len"


def test_default_seq_len_is_the_smaller_of_512_and_the_positions():
    assert resolve_seq_len(None, 256) == 256
    assert resolve_seq_len(None, 4096) == DEFAULT_SEQ_LEN == 512
    assert resolve_seq_len(None, None) == 512
    assert resolve_seq_len(300, 4096) == 300  # an explicit value is kept as it is
    with pytest.raises(OptionError, match="--seq-len 1000 exceeds the model's 256 positions"):
        resolve_seq_len(1000, 256)
    with pytest.raises(OptionError, match="next-token loss needs two tokens"):
        resolve_seq_len(None, 1)


def test_score_defaults_to_the_models_positions_and_says_so(tiny_world, tmp_path, capsys):
    import json

    out = tmp_path / "scores"
    code, _, err = run_cli(["score", "-m", tiny_world / "teacher", "-d",
                            tiny_world / "data" / "train.txt", "-o", out, "--batches", "1",
                            "--batch-size", "1", "-q"], capsys)
    assert code == 0, err
    assert "--seq-len 256 (default: the smaller of 512" in err
    config = json.loads((out / "minima.json").read_text())["config"]
    assert config["seq_len"] == 256 and config["seq_len_auto"] is True


def test_eval_max_length_beyond_the_positions_is_refused_before_loading(tiny_world, tmp_path,
                                                                         capsys):
    out = tmp_path / "results"
    code, _, err = run_cli(["eval", "-m", f"t={tiny_world / 'teacher'}", "-t",
                            f"ppl:{tiny_world / 'data' / 'valid.txt'}", "--max-length", "100000",
                            "-o", out, "-q"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--max-length 100000 exceeds the 256 positions of t" in err
    assert not out.exists()
    config = tiny_random_model().config  # 128 positions
    assert model_max_length(config, None) == 128 and model_max_length(config, 128) == 128
    with pytest.raises(MinimaError, match="exceeds the 128 positions"):
        model_max_length(config, 129)


def test_non_finite_scores_and_metrics_are_not_written():
    check_finite_scores({"heads": torch.ones(2, 2)}, 3.0)
    with pytest.raises(MinimaError, match="loss on the data is nan"):
        check_finite_scores({"heads": torch.ones(2, 2)}, math.nan)
    with pytest.raises(MinimaError, match="the ffn scores are not finite"):
        check_finite_scores({"heads": torch.ones(2), "ffn": torch.tensor([1.0, math.nan])}, 3.0)
    check_finite_metrics("m", {"ppl": {"ppl": 3.0, "tokens": 10}, "gen": {"n": 3}})
    with pytest.raises(MinimaError, match=r"model m: ppl\.ppl is nan"):
        check_finite_metrics("m", {"ppl": {"ppl": math.nan, "tokens": 10}})
