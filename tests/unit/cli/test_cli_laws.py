"""`minima plan` and `minima density` on the command line: answers and one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as run

LOSS = "a=406.4,alpha=0.34,b=410.7,beta=0.28"
PERF = "c=0.7,gamma=-5,l=2.5,d=0.25"


def test_plan_picks_llama2_7b_for_the_minima_3b_student(capsys):
    code, out, _ = run(["plan", "--student", "3B", "--teachers", "7B,13B,70B", "--json"], capsys)
    assert code == 0
    found = json.loads(out)["for_student"]
    assert found["teacher"] == 7e9 and 7e9 < found["optimal_teacher"] < 8e9
    verdicts = [row["verdict"] for row in found["teachers"]]
    assert verdicts == ["best", "too large: capacity gap", "too large: capacity gap"]
    code, out, _ = run(["plan", "--student", "3B", "--teachers", "7B,13B,70B"], capsys)
    assert code == 0 and "use the 7B teacher" in out


def test_plan_for_a_teacher_gives_a_prune_target_and_a_fitted_law_is_used(tmp_path, capsys):
    code, out, _ = run(["plan", "--teacher", "7B"], capsys)
    assert code == 0 and "minima prune --params 2.807B" in out
    points = tmp_path / "sweep.json"
    points.write_text(json.dumps([[1e8, 3e8], [2e8, 6e8], [4e8, 12e8]]))  # T* = 3 S exactly
    code, out, _ = run(["plan", "--student", "1B", "--law-points", points, "--json"], capsys)
    assert code == 0
    assert json.loads(out)["for_student"]["optimal_teacher"] == pytest.approx(3e9)


def test_plan_fits_the_law_from_sweep_reports(tmp_path, capsys):
    files = []
    for student, best in ((1e6, 2.6e6), (4e6, 10.1e6)):  # what two sweeps would report
        files.append(tmp_path / f"sweep-{student:g}.json")
        files[-1].write_text(json.dumps({"law_point": [student, best], "rows": []}))
    code, out, err = run(["plan", "--student", "2M", "--law-points",
                          f"{files[0]},{files[1]}", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["for_student"]["optimal_teacher"] == pytest.approx(5.1e6)
    files[1].write_text(json.dumps({"law_point": None, "verdict": "no minimum"}))
    code, _, err = run(["plan", "--student", "2M", "--law-points", f"{files[0]},{files[1]}"],
                       capsys)
    assert code == 2 and "no best teacher inside its range" in err and len(err.splitlines()) == 1


def test_density_table_and_warning(capsys):
    code, out, err = run(["density", "--teacher", "7B:0.55", "--student", "3B:0.45",
                          "--loss-law", LOSS, "--perf-law", PERF], capsys)
    assert code == 0 and "student / teacher density" in out and not err
    code, out, err = run(["density", "--teacher", "7B:0.55", "--student", "6B:0.30",
                          "--loss-law", LOSS, "--perf-law", PERF, "--json"], capsys)
    assert code == 0 and json.loads(out)["density_ratio"] < 1
    assert "compression lost density" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["plan"], "give --student and/or --teacher"),
     (["plan", "--student", "0"], "--student"),
     (["plan", "--student", "-3B"], "not a size"),
     (["plan", "--teachers", "7B"], "--teachers needs --student"),
     (["plan", "--student", "3B", "--law", "slope=2"], "intercept"),
     (["density", "--teacher", "7B:0.99", "--student", "3B:0.45", "--loss-law", LOSS,
       "--perf-law", PERF], "outside the fitted range"),
     (["density", "--teacher", "7B", "--student", "3B:0.45", "--loss-law", LOSS,
       "--perf-law", PERF], "not SIZE:SCORE"),
     (["density", "--teacher", "7B:0.5", "--student", "3B:0.45", "--perf-law", PERF],
      "exactly one of --loss-law and --loss-points"),
     (["density", "--teacher", "-7B:0.5", "--student", "3B:0.45", "--loss-law", LOSS,
       "--perf-law", PERF], "not a size")],
)
def test_bad_law_inputs(args, message, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_too_few_points_to_fit(tmp_path, capsys):
    points = tmp_path / "p.json"
    points.write_text(json.dumps([[1e9, 1e12, 2.5], [2e9, 1e12, 2.4]]))
    code, _, err = run(["density", "--teacher", "7B:0.5", "--student", "3B:0.45",
                        "--loss-points", points, "--perf-law", PERF], capsys)
    assert code == 2 and "error:" in err
    points.write_text("not json")
    code, _, err = run(["plan", "--student", "1B", "--law-points", points], capsys)
    assert code == 2 and "is not JSON" in err
