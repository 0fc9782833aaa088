"""The laws behind `minima plan` and `minima density`: pure math, no I/O, no torch.

Capacity gap (MiniMA): the best teacher for a student of S parameters has T* = slope * S +
intercept parameters (paper: T* = 2.498 S - 11.498 in millions, R^2 0.996), so a student keeps
~40 % of its best teacher; a much larger teacher is worse, not better.

Densing law: a model's capacity density is rho = N_hat / N, where N_hat is the size a reference
model would need (trained on D0 tokens) to reach the same score. Two fitted curves give it:
    loss        L(N, D) = a N^-alpha + b D^-beta
    performance S(L)    = c / (1 + exp(-gamma (L - l))) + d
and inverting them maps a score back to an effective size. The best density grows as
ln rho_max = A t + B (A ~ 0.007/day: doubling every ~3.3 months).

All sizes are raw parameter counts (3e9, not 3000); fits run in float64 numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from minima_cli.errors import MinimaError
from minima_cli.units import format_count, parse_size

DAYS_PER_MONTH = 365.25 / 12
DEFAULT_D0 = 1e12  # the densing paper fixes the reference training set at 1T tokens


# --- shared helpers -------------------------------------------------------------------------------


def parse_params(text: str | float | int, what: str = "size") -> float:
    """A positive parameter/token count from '3B', '135M', '1.5e9' or a number."""
    if isinstance(text, str):
        try:
            value = float(parse_size(text))
        except MinimaError:
            raise MinimaError(f"{what} {text!r} is not a size like 3B, 135M or 1.5e9") from None
    else:
        value = float(text)
    return _positive(value, what)


def parse_law_params(text: str, names: Sequence[str]) -> dict[str, float]:
    """'a=406.4,alpha=0.34,b=410.7,beta=0.28' -> dict; every name exactly once."""
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise MinimaError(f"{item!r} in {text!r}: expected name=value with names "
                              f"{', '.join(names)}")
        try:
            values[key] = float(raw)
        except ValueError:
            raise MinimaError(f"{key}={raw.strip()!r} is not a number") from None
        if not math.isfinite(values[key]):  # float() takes 'nan' and 'inf'; no law has them
            raise MinimaError(f"{key}={raw.strip()} in {text!r} must be a finite number")
    missing = [name for name in names if name not in values]
    if missing:
        raise MinimaError(f"{text!r} is missing {', '.join(missing)}")
    return values


def _positive(value: float, what: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise MinimaError(f"{what} must be positive, got {value:g}")
    return value


def _columns(points: Sequence[Sequence[float]], width: int, n_params: int, what: str,
             names: str) -> np.ndarray:
    """(n, width) float64 array; at least as many points as fitted parameters."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != width:
        raise MinimaError(f"{what}: each point must be ({names})")
    if len(array) < n_params:
        raise MinimaError(f"{what}: {len(array)} points are too few to fit {n_params} "
                          f"parameters (need at least {n_params})")
    if not np.isfinite(array).all():
        raise MinimaError(f"{what}: points must be finite numbers")
    return array


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - predicted) ** 2).sum()) / total if total > 0 else 1.0


def _levenberg_marquardt(
    residuals: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    p0: np.ndarray,
    max_iter: int = 500,
) -> tuple[np.ndarray, float]:
    """Minimise ||r(p)||^2 given r and its Jacobian; returns (p, cost). Damping with diag(J^T J)
    (Marquardt's scaling) makes the steps invariant to each parameter's units."""
    p = np.asarray(p0, dtype=np.float64)
    r, jac = residuals(p)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        g, h = jac.T @ r, jac.T @ jac
        scale = np.diag(h) + 1e-12 * (np.diag(h).max() + 1e-300)
        try:
            step = np.linalg.solve(h + lam * np.diag(scale), -g)
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        candidate = p + step
        with np.errstate(all="ignore"):
            r_new, jac_new = residuals(candidate)
        new_cost = float(r_new @ r_new)
        if np.isfinite(new_cost) and np.isfinite(jac_new).all() and new_cost <= cost:
            converged = (cost - new_cost <= 1e-15 * cost
                         or np.abs(step).max() <= 1e-13 * (np.abs(p).max() + 1e-13))
            p, r, jac, cost = candidate, r_new, jac_new, new_cost
            lam = max(lam / 3, 1e-12)
            if converged or cost == 0.0:
                break
        else:
            lam *= 4
            if lam > 1e16:
                break
    return p, cost


# --- capacity gap (MiniMA) ------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityGapLaw:
    """Optimal teacher size T* = slope * S + intercept, in parameters."""

    slope: float
    intercept: float
    r2: float | None = None


PAPER_LAW = CapacityGapLaw(slope=2.498, intercept=-11.498e6, r2=0.996)


def optimal_teacher_size(student_params: float, law: CapacityGapLaw = PAPER_LAW) -> float:
    student = _positive(float(student_params), "student size")
    teacher = law.slope * student + law.intercept
    if teacher <= 0:
        raise MinimaError(f"student size {format_count(student)} is below the range of the "
                          f"capacity-gap law (optimal teacher {teacher:.3g} <= 0)")
    if not teacher > student:  # a teacher no larger than its student is no answer
        raise MinimaError(f"student size {format_count(student)} is outside the range of the "
                          f"capacity-gap law: its optimal teacher ({format_count(teacher)}) "
                          "would not be larger than the student")
    return teacher


def student_size_for_teacher(teacher_params: float, law: CapacityGapLaw = PAPER_LAW) -> float:
    """The student for which this teacher is optimal (the inverse of optimal_teacher_size)."""
    teacher = _positive(float(teacher_params), "teacher size")
    if law.slope <= 0:
        raise MinimaError(f"capacity-gap slope must be positive to invert, got {law.slope:g}")
    student = (teacher - law.intercept) / law.slope
    if student <= 0:
        raise MinimaError(f"teacher size {format_count(teacher)} is below the range of the "
                          f"capacity-gap law (student {student:.3g} <= 0)")
    if not student < teacher:  # e.g. a 1K teacher "keeping 460328 %": pruning cannot grow
        raise MinimaError(f"teacher size {format_count(teacher)} is outside the range of the "
                          f"capacity-gap law: the student it is optimal for "
                          f"({format_count(student)}) would not be smaller than the teacher")
    return student


def choose_teacher(
    student_params: float, available: Sequence[float], law: CapacityGapLaw = PAPER_LAW
) -> tuple[int, list[dict[str, Any]]]:
    """Index of the teacher closest to T* in log-ratio (a 2x miss costs the same either way),
    and one row per teacher explaining the choice. Ties go to the smaller, cheaper teacher."""
    if not available:
        raise MinimaError("no teachers to choose from")
    student = _positive(float(student_params), "student size")
    optimum = optimal_teacher_size(student, law)
    teachers = [_positive(float(t), "teacher size") for t in available]
    distances = [math.log(t / optimum) for t in teachers]
    best = min(range(len(teachers)), key=lambda i: (abs(distances[i]), teachers[i]))
    rows = []
    for i, (teacher, distance) in enumerate(zip(teachers, distances, strict=True)):
        if i == best:
            verdict = "best"
        elif teacher <= student:
            verdict = "too small: not larger than the student"
        elif distance > 0:
            verdict = "too large: capacity gap"
        else:
            verdict = "too small"
        rows.append({
            "teacher": teacher,
            "ratio": teacher / student,          # teacher / student
            "vs_optimum": teacher / optimum,     # teacher / T*
            "log_distance": distance,            # ln(teacher / T*), 0 is optimal
            "student_keeps": student / teacher,  # what pruning the teacher to the student keeps
            "verdict": verdict,
        })
    return best, rows


def plan_student(teacher_params: float, law: CapacityGapLaw = PAPER_LAW) -> dict[str, Any]:
    """Given a teacher: the student size it is optimal for, as a `minima prune` target."""
    teacher = _positive(float(teacher_params), "teacher size")
    student = student_size_for_teacher(teacher, law)
    keep = student / teacher
    return {
        "teacher": teacher,
        "student": student,
        "ratio": teacher / student,
        "keep": keep,
        "prune_params": format_count(student),  # for `minima prune --params`
        "prune_ratio": round(keep, 4) if keep < 1 else None,  # for `minima prune --ratio`
    }


def plan_teacher(
    student_params: float, available: Sequence[float] | None = None,
    law: CapacityGapLaw = PAPER_LAW,
) -> dict[str, Any]:
    """Given a student: the optimal teacher size and, when teachers are listed, the pick."""
    student = _positive(float(student_params), "student size")
    optimum = optimal_teacher_size(student, law)
    result: dict[str, Any] = {"student": student, "optimal_teacher": optimum,
                              "ratio": optimum / student, "law": asdict(law)}
    if available:
        best, rows = choose_teacher(student, available, law)
        result.update(best=best, teacher=rows[best]["teacher"], teachers=rows)
    return result


def fit_capacity_gap(points: Sequence[tuple[float, float]]) -> CapacityGapLaw:
    """Least-squares line through (student size, best teacher size) points, e.g. from a sweep."""
    data = _columns(points, 2, 2, "capacity-gap fit", "student, best teacher")
    if (data <= 0).any():
        raise MinimaError("capacity-gap fit: sizes must be positive")
    students, teachers = data[:, 0], data[:, 1]
    if np.ptp(students) == 0:
        raise MinimaError("capacity-gap fit: needs at least two different student sizes")
    design = np.stack([students, np.ones_like(students)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, teachers, rcond=None)
    return CapacityGapLaw(float(slope), float(intercept),
                          _r2(teachers, design @ np.array([slope, intercept])))


@dataclass(frozen=True)
class CapacityCurve:
    """Student loss against the teacher/student size ratio k, as a parabola in ln k:
    loss(k) = a (ln k)^2 + b ln k + c. Its vertex k* = exp(-b / 2a) is the best teacher ratio
    when the parabola opens upwards (a > 0) and k* lies inside the swept ratios."""

    a: float
    b: float
    c: float
    r2: float
    k_range: tuple[float, float]

    def loss(self, k: float | np.ndarray) -> Any:
        x = np.log(k)
        return self.a * x * x + self.b * x + self.c

    @property
    def optimum(self) -> float | None:
        """k* inside the swept range, or None when the fit has no interior minimum."""
        if self.a <= 0:
            return None
        k = math.exp(-self.b / (2 * self.a))
        return k if self.k_range[0] <= k <= self.k_range[1] else None

    def verdict(self) -> str:
        if self.optimum is not None:
            return f"interior optimum at k* = {self.optimum:.3g}"
        if self.a <= 0:
            return "no minimum: the fitted curve bends downwards (best at an end of the sweep)"
        return (f"the fitted minimum k = {math.exp(-self.b / (2 * self.a)):.3g} lies outside the "
                f"swept ratios {self.k_range[0]:.3g}..{self.k_range[1]:.3g}")


def fit_capacity_curve(points: Sequence[tuple[float, float]]) -> CapacityCurve:
    """Least-squares parabola in ln k through (teacher/student ratio k, student loss) points of
    a capacity-gap sweep (MiniMA's pilot: student quality first rises, then falls with k)."""
    data = _columns(points, 2, 3, "capacity-curve fit", "ratio, loss")
    if (data[:, 0] <= 0).any():
        raise MinimaError("capacity-curve fit: ratios k must be positive")
    if len(np.unique(data[:, 0])) < 3:
        raise MinimaError("capacity-curve fit: needs at least three different ratios")
    x, y = np.log(data[:, 0]), data[:, 1]
    design = np.stack([x * x, x, np.ones_like(x)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    a, b, c = (float(v) for v in coefficients)
    return CapacityCurve(a, b, c, _r2(y, design @ coefficients),
                         (float(data[:, 0].min()), float(data[:, 0].max())))


def sweep_law_point(sweep: dict[str, Any], what: str = "sweep") -> list[float]:
    """The (student size, best teacher size) point a capacity-gap sweep report gives, for
    fit_capacity_gap; one clear line when the sweep found no interior optimum."""
    point = sweep.get("law_point")
    if point is None:
        raise MinimaError(f"{what}: the sweep found no best teacher inside its range "
                          f"({sweep.get('verdict', 'no law_point')}), so it gives no law point")
    if not (isinstance(point, list) and len(point) == 2
            and all(isinstance(v, int | float) for v in point)):
        raise MinimaError(f"{what}: law_point must be [student size, best teacher size]")
    return [float(v) for v in point]


# --- densing law: loss L(N, D) = a N^-alpha + b D^-beta -------------------------------------------


@dataclass(frozen=True)
class LossLaw:
    a: float
    alpha: float
    b: float
    beta: float
    r2: float | None = None

    def loss(self, params: float | np.ndarray, tokens: float | np.ndarray) -> Any:
        return self.a * np.power(params, -self.alpha) + self.b * np.power(tokens, -self.beta)


LOSS_NAMES = ("a", "alpha", "b", "beta")


def _loss_residuals(n: np.ndarray, d: np.ndarray, y: np.ndarray):
    """Residuals in p = (ln a, alpha, ln b, beta): logs keep a, b positive and well scaled."""
    ln_n, ln_d = np.log(n), np.log(d)

    def fn(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model_term = np.exp(p[0] - p[1] * ln_n)
        data_term = np.exp(p[2] - p[3] * ln_d)
        jac = np.stack([model_term, -model_term * ln_n, data_term, -data_term * ln_d], axis=1)
        return model_term + data_term - y, jac

    return fn


def fit_loss_law(points: Sequence[tuple[float, float, float]]) -> LossLaw:
    """Fit on (params, tokens, loss). For fixed exponents the law is linear in (a, b), so a grid
    over (alpha, beta) with exact linear solves gives starting points; LM then refines the best."""
    data = _columns(points, 3, 4, "loss-law fit", "params, tokens, loss")
    if (data[:, :2] <= 0).any():
        raise MinimaError("loss-law fit: sizes and token counts must be positive")
    if np.ptp(data[:, 0]) == 0 or np.ptp(data[:, 1]) == 0:
        raise MinimaError("loss-law fit: needs several different sizes and token counts "
                          "(one is fixed, so its exponent cannot be fitted)")
    n, d, y = data.T
    exponents = np.linspace(0.02, 1.5, 38)
    starts = []
    for alpha in exponents:
        for beta in exponents:
            design = np.stack([n ** -alpha, d ** -beta], axis=1)
            (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
            if a > 0 and b > 0:
                cost = float(((design @ np.array([a, b]) - y) ** 2).sum())
                starts.append((cost, np.array([math.log(a), alpha, math.log(b), beta])))
    if not starts:
        raise MinimaError("loss-law fit: loss does not fall with size and tokens; "
                          "no a, b > 0 fits these points")
    fn = _loss_residuals(n, d, y)
    starts.sort(key=lambda item: item[0])
    best = min((_levenberg_marquardt(fn, p0) for _, p0 in starts[:4]), key=lambda fit: fit[1])[0]
    law = LossLaw(a=math.exp(best[0]), alpha=float(best[1]), b=math.exp(best[2]),
                  beta=float(best[3]))
    return replace(law, r2=_r2(y, law.loss(n, d)))


def effective_params(law: LossLaw, loss: float, d0: float = DEFAULT_D0) -> float:
    """N_hat = ((L - b D0^-beta) / a)^(-1/alpha): the size that reaches `loss` on D0 tokens."""
    _positive(d0, "reference tokens D0")
    floor = law.b * d0 ** -law.beta
    if loss <= floor:
        raise MinimaError(f"loss {loss:.4g} is at or below the data term b*D0^-beta = "
                          f"{floor:.4g}: no finite size reaches it with {format_count(d0)} tokens")
    return ((loss - floor) / law.a) ** (-1.0 / law.alpha)


# --- densing law: performance S(L) = c / (1 + exp(-gamma (L - l))) + d ---------------------------


@dataclass(frozen=True)
class PerformanceLaw:
    c: float
    gamma: float
    l: float  # noqa: E741 — the paper's name for the sigmoid's midpoint loss
    d: float
    r2: float | None = None

    def score(self, loss: float | np.ndarray) -> Any:
        return self.c * _sigmoid(self.gamma * (np.asarray(loss) - self.l)) + self.d

    def score_range(self) -> tuple[float, float]:
        return (self.d, self.c + self.d)


PERFORMANCE_NAMES = ("c", "gamma", "l", "d")


def _sigmoid(z: Any) -> Any:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _performance_residuals(loss: np.ndarray, y: np.ndarray):
    def fn(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, gamma, mid, d = p
        s = _sigmoid(gamma * (loss - mid))
        slope = c * s * (1 - s)
        jac = np.stack([s, slope * (loss - mid), -slope * gamma, np.ones_like(s)], axis=1)
        return c * s + d - y, jac

    return fn


def fit_performance_law(points: Sequence[tuple[float, float]]) -> PerformanceLaw:
    """Fit on (loss, score). Linear in (c, d) for fixed (gamma, l): grid those, solve exactly,
    refine the best few starts with LM."""
    data = _columns(points, 2, 4, "performance-law fit", "loss, score")
    loss, y = data.T
    span = float(np.ptp(loss))
    if span == 0:
        raise MinimaError("performance-law fit: needs several different losses")
    mids = np.linspace(loss.min() - 0.5 * span, loss.max() + 0.5 * span, 25)
    rates = np.concatenate([-np.geomspace(0.5, 60, 14), np.geomspace(0.5, 60, 14)]) / span
    starts = []
    for gamma in rates:
        for mid in mids:
            design = np.stack([_sigmoid(gamma * (loss - mid)), np.ones_like(loss)], axis=1)
            (c, d), *_ = np.linalg.lstsq(design, y, rcond=None)
            cost = float(((design @ np.array([c, d]) - y) ** 2).sum())
            starts.append((cost, np.array([c, gamma, mid, d])))
    fn = _performance_residuals(loss, y)
    starts.sort(key=lambda item: item[0])
    c, gamma, mid, d = min((_levenberg_marquardt(fn, p0) for _, p0 in starts[:4]),
                           key=lambda fit: fit[1])[0]
    if c < 0:  # same curve, canonical form with c > 0: c s(z) + d = -c s(-z) + (c + d)
        c, gamma, d = -c, -gamma, c + d
    law = PerformanceLaw(c=float(c), gamma=float(gamma), l=float(mid), d=float(d))
    return replace(law, r2=_r2(y, law.score(loss)))


def loss_for_score(law: PerformanceLaw, score: float) -> float:
    """L_hat = l - (1/gamma) ln(c / (S - d) - 1); S must lie strictly inside (d, c + d)."""
    low, high = sorted(law.score_range())
    if not low < score < high:
        raise MinimaError(f"score {score:.4g} is outside the fitted range ({low:.4g}, "
                          f"{high:.4g}): cannot invert the performance curve")
    if law.gamma == 0:
        raise MinimaError("performance law has gamma = 0: the score does not depend on loss")
    return law.l - math.log(law.c / (score - law.d) - 1.0) / law.gamma


# --- capacity density and its trend ---------------------------------------------------------------


def capacity_density(params: float, score: float, loss_law: LossLaw,
                     performance_law: PerformanceLaw, d0: float = DEFAULT_D0) -> dict[str, float]:
    """rho = N_hat / N: >1 means the model scores like a larger reference model."""
    size = _positive(float(params), "model size")
    loss_hat = loss_for_score(performance_law, score)
    n_hat = effective_params(loss_law, loss_hat, d0)
    return {"params": size, "score": score, "loss_hat": loss_hat, "effective_params": n_hat,
            "density": n_hat / size}


def density_report(teacher: tuple[float, float], student: tuple[float, float],
                   loss_law: LossLaw, performance_law: PerformanceLaw,
                   d0: float = DEFAULT_D0) -> dict[str, Any]:
    """Density of teacher and student, each given as (params, score). Compression should raise
    density (same knowledge, fewer parameters); a lower student density means it lost more
    capability than the parameters it shed."""
    rows = {name: capacity_density(*model, loss_law, performance_law, d0)
            for name, model in (("teacher", teacher), ("student", student))}
    ratio = rows["student"]["density"] / rows["teacher"]["density"]
    warning = None
    if ratio < 1:
        warning = (f"compression lost density: student rho {rows['student']['density']:.3g} "
                   f"< teacher rho {rows['teacher']['density']:.3g} ({ratio:.2f}x)")
    return {"d0": d0, "teacher": rows["teacher"], "student": rows["student"],
            "density_ratio": ratio, "warning": warning,
            "loss_law": asdict(loss_law), "performance_law": asdict(performance_law)}


@dataclass(frozen=True)
class DensityTrend:
    """ln rho_max = rate * t + intercept (the paper's A and B), t in days."""

    rate: float
    intercept: float
    r2: float | None = None


def fit_density_trend(points: Sequence[tuple[float, float]]) -> DensityTrend:
    """Line through (day, max density) in log space."""
    data = _columns(points, 2, 2, "density-trend fit", "day, density")
    if (data[:, 1] <= 0).any():
        raise MinimaError("density-trend fit: densities must be positive")
    if np.ptp(data[:, 0]) == 0:
        raise MinimaError("density-trend fit: needs at least two different dates")
    t, log_rho = data[:, 0], np.log(data[:, 1])
    design = np.stack([t, np.ones_like(t)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, log_rho, rcond=None)
    return DensityTrend(float(slope), float(intercept),
                        _r2(log_rho, design @ np.array([slope, intercept])))


def doubling_time_days(growth_per_day: float) -> float:
    """ln 2 / A: days for the maximum density to double (A = 0.007 -> ~99 days)."""
    return math.log(2) / _positive(float(growth_per_day), "density growth rate A")


def doubling_time_months(growth_per_day: float) -> float:
    return doubling_time_days(growth_per_day) / DAYS_PER_MONTH
