"""bf16 on every training path (issue 17, class F): `--precision auto` is bf16 on CPUs with
AVX512-BF16/AMX and on GPUs, and bf16 autocast runs (slower) on any CPU. Each path trains two
steps under `--precision bf16` and must give finite losses and a model transformers loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import distill_args, run_cli, sft_args


def finite_log(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records
    for record in records:
        for key in ("loss", "ce", "kd", "hidden_mse", "grad_norm", "valid_loss"):
            if key in record:
                assert math.isfinite(record[key]), (key, record)
    return records


def assert_loads(out) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert json.loads((out / "minima.json").read_text())["metrics"]["precision"] == "bf16"


def bf16(args: list) -> list:
    args = list(args)
    args[args.index("--precision") + 1] = "bf16"
    return args


@pytest.mark.parametrize("extra", [
    ["--loss", "fkl"], ["--loss", "rkl"], ["--loss", "jsd"], ["--loss", "topk", "--topk", "8"],
    ["--loss", "fkl", "--hidden-weight", "1.0"],
], ids=["fkl", "rkl", "jsd", "topk", "hidden"])
def test_distill_online_under_bf16(tiny_world, pruned, tmp_path, capsys, extra):
    out = tmp_path / "student"
    code, _, err = run_cli([*bf16(distill_args(tiny_world, pruned, out, steps=2)), *extra],
                           capsys)
    assert code == 0, err
    finite_log(out)
    assert_loads(out)


def test_distill_from_a_teacher_cache_under_bf16(tiny_world, pruned, tmp_path, capsys):
    # the cache's float16 rows once crashed CPU autocast ("Unexpected floating ScalarType")
    cache = tmp_path / "cache"
    code, _, err = run_cli(["cache-teacher", "-t", tiny_world / "teacher", "-d",
                            tiny_world / "data" / "train.txt", "-o", cache, "--seq-len", "32",
                            "-k", "8", "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "student"
    args = bf16(distill_args(tiny_world, pruned, out, steps=2))
    at = args.index("-t")
    del args[at:at + 2]
    code, _, err = run_cli([*args, "--teacher-cache", cache, "--loss", "topk", "--topk", "8"],
                           capsys)
    assert code == 0, err
    finite_log(out)
    assert_loads(out)
    capsys.readouterr()  # transformers' loading bar
    # a cache of k = 8 does not stand in for --topk 16: refused, naming both
    code, _, err = run_cli([*args, "--teacher-cache", cache, "--loss", "topk", "--topk", "16",
                            "--force"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "holds the teacher's top 8 tokens but --topk is 16" in err


@pytest.mark.parametrize("teacher", [False, True], ids=["sft", "sft-teacher"])
def test_sft_under_bf16(chat_world, tmp_path, capsys, teacher):
    # with a teacher, the gathered assistant rows once failed an index_put of fp32 into bf16
    out = tmp_path / "chat"
    extra = ["-t", chat_world / "teacher"] if teacher else []
    code, _, err = run_cli([*bf16(sft_args(chat_world, out, "--max-steps", "2")), *extra],
                           capsys)
    assert code == 0, err
    records = finite_log(out)
    assert ("kd" in records[-1]) == teacher
    assert_loads(out)
