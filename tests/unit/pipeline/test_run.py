"""`minima run` on the shipped tiny recipe (shrunk with --set so it stays fast): the whole chain
runs, the distilled student beats the just-pruned one, a second run redoes nothing, a run killed in
the middle of distill resumes to the same weights without redoing finished stages, a changed
setting re-runs only what it makes stale, and `minima report` writes the table and plots."""

from __future__ import annotations

import json

from conftest import RECIPE, run_args, run_cli, statuses

from minima_cli.pipeline.recipe import load_recipe
from minima_cli.pipeline.run import HASH_FILE, resume_decision
from minima_cli.training.state import STATE_FILE


def test_tiny_recipe_end_to_end_distilled_beats_pruned(finished):
    workdir, stdout = finished
    assert statuses(stdout) == dict.fromkeys(["tiny", "score", "prune", "distill", "sft",
                                              "eval"], "ran")
    results = json.loads((workdir / "eval" / "results.json").read_text())
    ppl = {m["name"]: m["tasks"]["ppl:valid"]["ppl"] for m in results["models"]}
    assert list(ppl) == ["teacher", "pruned", "distilled", "sft", "exported"]
    assert ppl["distilled"] < ppl["pruned"], ppl
    assert abs(ppl["exported"] / ppl["sft"] - 1) < 0.01, ppl  # the sft model as a q8_0 GGUF
    assert (workdir / "export" / "model.gguf").read_bytes()[:4] == b"GGUF"
    params = {m["name"]: m["parameters"] for m in results["models"]}
    assert params["pruned"] == params["distilled"] < params["teacher"]
    for stage in ("tiny", "score", "prune", "distill", "sft", "eval"):
        stamp = json.loads((workdir / stage / "minima.json").read_text())["recipe"]
        assert len(stamp["hash"]) == 16 and stamp["seconds"] > 0
    assert not (workdir / "distill.run").exists() and (workdir / "recipe.yaml").is_file()
    assert f"{ppl['distilled']:.2f}" in stdout and f"{ppl['pruned']:.2f}" in stdout


def test_report_writes_table_and_plots(finished, capsys):
    workdir, _ = finished
    code, out, err = run_cli(["report", workdir], capsys)
    assert code == 0, err
    report = workdir / "report" / "report.md"
    assert str(report) in out
    text = report.read_text()
    assert "| distill | done |" in text and "distilled" in text and "ppl valid" in text
    for image in ("loss.png", "scores.png", "params_ppl.png"):
        assert f"]({image})" in text
        assert (workdir / "report" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_cli(["report", workdir / "nowhere"], capsys)
    assert code == 2 and "workdir not found" in err


def test_second_run_redoes_nothing(finished, capsys):
    workdir, _ = finished
    weights = workdir / "distill" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    code, out, err = run_cli(run_args(workdir), capsys)
    assert code == 0, err
    assert set(statuses(out).values()) == {"up to date"}
    assert weights.stat().st_mtime_ns == before
    code, out, err = run_cli(run_args(workdir, "--dry-run", "--set", "sft.lr=5e-3"), capsys)
    assert code == 0, err
    plan = {cells[0]: cells[1] for cells in (
        [c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines())
        if len(cells) > 1}
    assert plan["distill"] == "up to date" and plan["sft"] == "run (stale)"
    assert plan["export"] == "run (after sft)" and plan["eval"] == "run (after export)"
    assert weights.stat().st_mtime_ns == before


def test_resume_only_under_the_same_hash(tmp_path):
    recipe = load_recipe(RECIPE, workdir=tmp_path / "w")
    run_dir = tmp_path / "w" / "distill.run"
    step = run_dir / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / STATE_FILE).write_text("{}")
    (run_dir / HASH_FILE).write_text("aaaa\n")
    assert resume_decision(recipe, "distill", "aaaa", is_main=True)
    assert not resume_decision(recipe, "distill", "bbbb", is_main=True)
    assert not step.exists() and (run_dir / HASH_FILE).read_text() == "bbbb\n"
    assert not resume_decision(recipe, "score", "bbbb", is_main=True)
