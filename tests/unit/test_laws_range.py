"""The capacity-gap law outside its range (issue 17): non-finite law parameters, a teacher too
small to have an optimal student smaller than itself, a student whose "optimal teacher" would
not be larger; each one line from `minima plan`, exit 2."""

from __future__ import annotations

import pytest
from conftest import run_cli

from minima_cli.errors import MinimaError
from minima_cli.laws import (
    LOSS_NAMES,
    CapacityGapLaw,
    parse_law_params,
    plan_student,
    plan_teacher,
)


@pytest.mark.parametrize("text", ["slope=nan,intercept=0", "slope=2.5,intercept=inf",
                                  "slope=-inf,intercept=0"])
def test_law_parameters_must_be_finite(text):
    with pytest.raises(MinimaError, match="must be a finite number"):
        parse_law_params(text, ("slope", "intercept"))
    with pytest.raises(MinimaError, match="must be a finite number"):
        parse_law_params("a=1,alpha=nan,b=1,beta=1", LOSS_NAMES)


def test_sizes_outside_the_law_are_refused():
    with pytest.raises(MinimaError, match=r"teacher size 1K .* would not be smaller"):
        plan_student(1e3)
    with pytest.raises(MinimaError, match=r"student size 5M .* would not be larger"):
        plan_teacher(5e6)
    with pytest.raises(MinimaError, match="would not be larger"):
        plan_teacher(3e9, law=CapacityGapLaw(slope=0.5, intercept=0.0))
    assert plan_student(7e9)["keep"] < 1 and plan_teacher(3e9)["ratio"] > 1


@pytest.mark.parametrize("args, message", [
    (["--teacher", "1K"], "would not be smaller than the teacher"),
    (["--student", "5M"], "would not be larger than the student"),
    (["--student", "3B", "--law", "slope=nan,intercept=0"], "slope=nan"),
])
def test_plan_refuses_in_one_line(capsys, args, message):
    code, out, err = run_cli(["plan", *args], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
