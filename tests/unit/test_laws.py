"""The laws' math: fits recover the parameters that generated their data, inversions invert,
and the MiniMA and densing-paper numbers come out as published."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minima_cli.errors import MinimaError
from minima_cli.laws import (
    PAPER_LAW,
    CapacityGapLaw,
    LossLaw,
    PerformanceLaw,
    capacity_density,
    choose_teacher,
    density_report,
    doubling_time_days,
    doubling_time_months,
    effective_params,
    fit_capacity_curve,
    fit_capacity_gap,
    fit_density_trend,
    fit_loss_law,
    fit_performance_law,
    loss_for_score,
    optimal_teacher_size,
    parse_law_params,
    parse_params,
    plan_student,
    plan_teacher,
    student_size_for_teacher,
    sweep_law_point,
)

LOSS = LossLaw(a=406.4, alpha=0.34, b=410.7, beta=0.28)  # Chinchilla-like magnitudes
PERF = PerformanceLaw(c=0.7, gamma=-4.0, l=2.5, d=0.25)  # chance 0.25, ceiling 0.95
SIZES = np.geomspace(1e8, 7e10, 6)
TOKENS = np.geomspace(1e10, 2e12, 5)
LOSSES = np.linspace(1.5, 3.5, 20)


def loss_points(noise: float = 0.0, seed: int = 0) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    return [(n, d, float(LOSS.loss(n, d)) * (1 + noise * rng.standard_normal()))
            for n in SIZES for d in TOKENS]


def score_points(noise: float = 0.0, seed: int = 0) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [(loss, float(PERF.score(loss)) * (1 + noise * rng.standard_normal()))
            for loss in LOSSES]


def assert_params(fitted, true, names, rel):
    for name in names:
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=rel), name


# --- capacity gap ---------------------------------------------------------------------------------


def test_minima_case_picks_llama2_7b():
    assert optimal_teacher_size(3e9) == pytest.approx(7.4825e9, rel=1e-4)
    best, rows = choose_teacher(parse_params("3B"), [parse_params(t) for t in ("7B", "13B", "70B")])
    assert best == 0
    assert [row["verdict"] for row in rows] == ["best", "too large: capacity gap",
                                                "too large: capacity gap"]
    assert rows[0]["ratio"] == pytest.approx(7 / 3)


def test_choose_teacher_explains_small_teachers():
    best, rows = choose_teacher(3e9, [1.1e9, 5e9, 7e9, 13e9])
    assert best == 2
    assert [row["verdict"] for row in rows] == ["too small: not larger than the student",
                                                "too small", "best", "too large: capacity gap"]
    assert rows[2]["log_distance"] == pytest.approx(math.log(7e9 / optimal_teacher_size(3e9)))


def test_large_students_want_teachers_about_2_5x():
    assert optimal_teacher_size(70e9) / 70e9 == pytest.approx(2.5, abs=0.01)


@pytest.mark.parametrize("student", [135e6, 3e9, 70e9])
def test_student_size_inverts_optimal_teacher(student):
    assert student_size_for_teacher(optimal_teacher_size(student)) == pytest.approx(student)


def test_plan_student_gives_a_prune_target():
    plan = plan_student(7e9)
    assert plan["student"] == pytest.approx((7000 + 11.498) / 2.498 * 1e6)
    assert plan["keep"] == pytest.approx(0.401, abs=1e-3)  # the student keeps ~40 % of the teacher
    assert parse_params(plan["prune_params"]) == pytest.approx(plan["student"], rel=1e-3)


def test_plan_teacher_without_and_with_teachers():
    assert "teachers" not in plan_teacher(3e9)
    assert plan_teacher(3e9, [13e9, 7e9])["teacher"] == 7e9


def test_fit_capacity_gap_recovers_the_paper_line():
    students = np.array([10e6, 30e6, 60e6, 120e6, 350e6])
    exact = [(s, PAPER_LAW.slope * s + PAPER_LAW.intercept) for s in students]
    law = fit_capacity_gap(exact)
    assert law.slope == pytest.approx(2.498, rel=1e-9)
    assert law.intercept == pytest.approx(-11.498e6, rel=1e-6)
    assert law.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = fit_capacity_gap([(s, t * (1 + 0.01 * rng.standard_normal())) for s, t in exact])
    assert noisy.slope == pytest.approx(2.498, rel=0.02)
    assert noisy.r2 > 0.99


def test_a_fitted_law_drives_the_plan():
    law = fit_capacity_gap([(1e9, 3e9), (2e9, 6e9)])
    assert optimal_teacher_size(4e9, law) == pytest.approx(12e9)


def test_capacity_curve_fit_finds_the_best_teacher_ratio():
    ks = [1, 1.5, 2, 2.5, 3, 4, 6, 8]
    # student loss lowest at k* = 2.5: 0.3 (ln k - ln 2.5)^2 + 1.2
    exact = [(k, 0.3 * (math.log(k) - math.log(2.5)) ** 2 + 1.2) for k in ks]
    curve = fit_capacity_curve(exact)
    assert curve.optimum == pytest.approx(2.5, rel=1e-9)
    assert curve.a == pytest.approx(0.3) and curve.r2 == pytest.approx(1.0)
    assert float(curve.loss(2.5)) == pytest.approx(1.2)
    assert "interior optimum at k* = 2.5" in curve.verdict()
    rng = np.random.default_rng(1)
    noisy = fit_capacity_curve([(k, y + 0.005 * rng.standard_normal()) for k, y in exact])
    assert noisy.optimum == pytest.approx(2.5, rel=0.1)


def test_capacity_curve_without_an_interior_optimum_says_so():
    falling = fit_capacity_curve([(k, 2.0 - 0.1 * math.log(k) - 0.01 * math.log(k) ** 2)
                                  for k in (1, 2, 4, 8)])
    assert falling.optimum is None and "bends downwards" in falling.verdict()
    beyond = fit_capacity_curve([(k, 0.2 * (math.log(k) - math.log(20)) ** 2) for k in (1, 2, 4)])
    assert beyond.optimum is None and "outside the swept ratios 1..4" in beyond.verdict()


def test_sweep_law_point_feeds_the_capacity_gap_fit():
    law = fit_capacity_gap([sweep_law_point({"law_point": [1e6, 2.5e6]}),
                            sweep_law_point({"law_point": [2e6, 5e6]})])
    assert law.slope == pytest.approx(2.5) and law.intercept == pytest.approx(0, abs=1e-3)


# --- densing law ----------------------------------------------------------------------------------


def test_loss_fit_recovers_exact_parameters():
    law = fit_loss_law(loss_points())
    assert_params(law, LOSS, ("a", "alpha", "b", "beta"), rel=1e-6)
    assert law.r2 == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_fit_with_one_percent_noise(seed):
    # Tolerances hold over 30 seeds (worst: exponents 7 %, ln a / ln b 8 %, curve 1.9 %). The
    # prefactors themselves move most: a small change in alpha is a large one in a at N ~ 1e9.
    law = fit_loss_law(loss_points(noise=0.01, seed=seed))
    assert_params(law, LOSS, ("alpha", "beta"), rel=0.1)
    assert math.log(law.a) == pytest.approx(math.log(LOSS.a), rel=0.1)
    assert math.log(law.b) == pytest.approx(math.log(LOSS.b), rel=0.1)
    for n, d, _ in loss_points():
        assert law.loss(n, d) == pytest.approx(LOSS.loss(n, d), rel=0.03)


def test_performance_fit_recovers_exact_parameters():
    law = fit_performance_law(score_points())
    assert_params(law, PERF, ("c", "gamma", "l", "d"), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_performance_fit_with_one_percent_noise(seed):
    # holds over 30 seeds (worst: gamma 5.5 %, c and d 3 %, l 1 %)
    law = fit_performance_law(score_points(noise=0.01, seed=seed))
    assert_params(law, PERF, ("c", "l", "d"), rel=0.05)
    assert law.gamma == pytest.approx(PERF.gamma, rel=0.1)


def test_performance_fit_keeps_c_positive_for_rising_curves():
    rising = PerformanceLaw(c=0.5, gamma=3.0, l=1.0, d=0.1)
    law = fit_performance_law([(x, float(rising.score(x))) for x in np.linspace(-1, 3, 15)])
    assert_params(law, rising, ("c", "gamma", "l", "d"), rel=1e-6)


@pytest.mark.parametrize("loss", [1.6, 2.5, 3.4])
def test_loss_for_score_inverts_the_performance_curve(loss):
    assert loss_for_score(PERF, float(PERF.score(loss))) == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("params", [1e8, 3e9, 7e10])
def test_effective_params_inverts_the_loss_curve(params):
    assert effective_params(LOSS, float(LOSS.loss(params, 1e12)), d0=1e12) == pytest.approx(
        params, rel=1e-9)


def test_a_reference_model_has_density_one():
    # a model on the reference curve (trained on D0 tokens) is its own effective size
    score = float(PERF.score(LOSS.loss(3e9, 1e12)))
    assert capacity_density(3e9, score, LOSS, PERF)["density"] == pytest.approx(1.0, rel=1e-9)


def test_density_report_warns_when_compression_loses_density():
    teacher = (7e9, float(PERF.score(LOSS.loss(7e9, 1e12))))  # density 1
    dense = (3e9, float(PERF.score(LOSS.loss(5e9, 1e12))))   # scores like 5B: density 5/3
    sparse = (3e9, float(PERF.score(LOSS.loss(1e9, 1e12))))  # scores like 1B: density 1/3
    good = density_report(teacher, dense, LOSS, PERF)
    assert good["warning"] is None
    assert good["density_ratio"] == pytest.approx(5 / 3, rel=1e-6)
    bad = density_report(teacher, sparse, LOSS, PERF)
    assert bad["density_ratio"] == pytest.approx(1 / 3, rel=1e-6)
    assert "lost density" in bad["warning"]


def test_doubling_time_of_the_densing_law():
    assert doubling_time_days(0.007) == pytest.approx(99.0, abs=0.1)
    assert doubling_time_months(0.007) == pytest.approx(3.3, abs=0.1)


def test_density_trend_fit_recovers_the_growth_rate():
    days = np.arange(0, 700, 50.0)
    trend = fit_density_trend([(t, math.exp(0.007 * t - 2.0)) for t in days])
    assert trend.rate == pytest.approx(0.007, rel=1e-9)
    assert trend.intercept == pytest.approx(-2.0, rel=1e-9)


def test_parse_law_params():
    assert parse_law_params("c=0.7, gamma=-4, l=2.5,d=0.25", ("c", "gamma", "l", "d")) == {
        "c": 0.7, "gamma": -4.0, "l": 2.5, "d": 0.25}


# --- bad inputs: one clear MinimaError each -------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: optimal_teacher_size(0), "student size must be positive"),
    (lambda: optimal_teacher_size(-3e9), "student size must be positive"),
    (lambda: optimal_teacher_size(1e6), "below the range"),
    (lambda: student_size_for_teacher(0), "teacher size must be positive"),
    (lambda: choose_teacher(3e9, [7e9, -1]), "teacher size must be positive"),
    (lambda: choose_teacher(3e9, []), "no teachers"),
    (lambda: parse_params("three", "--student"), "--student 'three' is not a size"),
    (lambda: parse_params("0B", "--student"), "--student must be positive"),
    (lambda: fit_capacity_gap([(1e9, 3e9)]), "too few to fit 2"),
    (lambda: fit_capacity_gap([(1e9, 3e9), (1e9, 4e9)]), "two different student sizes"),
    (lambda: fit_capacity_curve([(1, 2.0), (2, 1.9)]), "2 points are too few to fit 3"),
    (lambda: fit_capacity_curve([(1, 2.0), (2, 1.9), (2, 1.8)]), "three different ratios"),
    (lambda: fit_capacity_curve([(0, 2.0), (2, 1.9), (3, 1.8)]), "ratios k must be positive"),
    (lambda: sweep_law_point({"law_point": None, "verdict": "no minimum"}), "no best teacher"),
    (lambda: sweep_law_point({"law_point": [1e6]}), "law_point must be"),
    (lambda: fit_loss_law(loss_points()[:3]), "3 points are too few to fit 4"),
    (lambda: fit_loss_law([(0, 1e9, 2.0)] + loss_points()), "must be positive"),
    (lambda: fit_loss_law([(n, 1e12, 2.0) for n in SIZES]), "different sizes and token counts"),
    (lambda: fit_loss_law([(1e9, 1e12)] * 5), "each point must be"),
    (lambda: fit_performance_law(score_points()[:3]), "too few to fit 4"),
    (lambda: fit_density_trend([(0, 1.0)]), "too few"),
    (lambda: fit_density_trend([(0, 1.0), (1, 0.0)]), "densities must be positive"),
    (lambda: loss_for_score(PERF, 0.25), "outside the fitted range"),
    (lambda: loss_for_score(PERF, 0.95), "outside the fitted range"),
    (lambda: loss_for_score(PERF, 0.1), "cannot invert"),
    (lambda: effective_params(LOSS, 0.01), "below the data term"),
    (lambda: capacity_density(0, 0.5, LOSS, PERF), "model size must be positive"),
    (lambda: doubling_time_days(0), "growth rate A must be positive"),
    (lambda: parse_law_params("a=1,alpha=x", ("a", "alpha")), "'x' is not a number"),
    (lambda: parse_law_params("a=1", ("a", "alpha")), "missing alpha"),
    (lambda: parse_law_params("a=1,z=2", ("a", "alpha")), "expected name=value"),
])
def test_bad_inputs_raise_one_clear_line(call, message):
    with pytest.raises(MinimaError) as error:
        call()
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_capacity_gap_law_is_a_plain_record():
    assert CapacityGapLaw(2.5, 0.0).r2 is None
