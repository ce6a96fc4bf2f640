"""The gate's statistics, pure and stdlib only: how sure can it be that a change is real?

Every figure the gate weighs is a *paired* change: one example's mean loss per token under the
candidate minus the same under the champion (nats/token; positive = worse). Three tools:

- :func:`bound_check` — one group of changes against an allowance, three ways: ``fail`` when the
  change is beyond the allowance at the given confidence (its lower bound is above it), ``pass``
  when it is within (its upper bound is at or below it), ``thin`` when the evidence cannot tell.
  With ``min_examples`` or more the spread is the group's own (Student's t); with fewer it cannot
  be measured, and ``noise_floor`` is taken for it (a normal bound). The spread is never taken
  smaller than ``noise_floor``: a zero spread would make 0.0501 "certainly" worse than 0.05.
- :func:`group_pvalue` — the evidence that a history group (one earlier batch's examples in the
  evaluation memory, or a standing suite) regressed beyond the allowance. A group with
  ``min_examples`` or more: Student's t on its own spread. A smaller group (at N = 10,000 batches
  most have one example): its spread cannot be measured, so it borrows the memory's, measured
  robustly (the median absolute deviation, so one contradicted batch does not widen it), and the
  changes are taken as Laplace-distributed — exponential tails, heavier than the normal's: per-
  example changes are heavy-tailed, and a normal model of them refuses benign chains (measured in
  tests/test_gate.py).
- :func:`holm` — Holm–Bonferroni: which of ``m`` p-values are significant with the family-wise
  error held at ``alpha`` whatever ``m`` is, so the chance that any unharmed batch is flagged
  does not grow with the chain, and one contradicted batch is still found among thousands.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

__all__ = ["Bound", "bound_check", "group_pvalue", "holm", "robust_scale", "t_quantile", "t_sf"]

_NORMAL = NormalDist()


# --- Student's t, from the regularized incomplete beta function (Numerical Recipes 6.4) ---


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t: the Cornish–Fisher expansion from 30 degrees of freedom
    on (within 1e-4 there), bisection on :func:`t_sf` below (exact to ~1e-9)."""
    if df >= 30:
        z = _NORMAL.inv_cdf(p)
        z3, z5, z7 = z ** 3, z ** 5, z ** 7
        return (z + (z3 + z) / (4 * df) + (5 * z5 + 16 * z3 + 3 * z) / (96 * df ** 2)
                + (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / (384 * df ** 3))
    lo, hi = -1e4, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


# --- checks ----------------------------------------------------------------------------


def robust_scale(xs: Sequence[float]) -> float:
    """The median absolute deviation around the median (0 for fewer than two values)."""
    if len(xs) < 2:
        return 0.0
    med = statistics.median(xs)
    return statistics.median(abs(x - med) for x in xs)


@dataclass(frozen=True)
class Bound:
    """One group of paired changes against an allowance (see :func:`bound_check`)."""

    status: str          # pass | fail | thin | none
    n: int
    mean: float | None
    lower: float | None  # the one-sided bounds at the confidence asked
    upper: float | None
    allowed: float

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "examples": self.n, "change": self.mean, "lower": self.lower,
                "upper": self.upper, "allowed": self.allowed}


def bound_check(changes: Sequence[float], allowed: float, confidence: float, *, min_examples: int,
                noise_floor: float) -> Bound:
    """``fail`` / ``pass`` / ``thin`` (``none`` without a change); see the module docstring."""
    n = len(changes)
    if n == 0:
        return Bound("none", 0, None, None, None, allowed)
    mean = statistics.fmean(changes)
    if n >= max(2, min_examples):
        se = max(statistics.stdev(changes), noise_floor) / math.sqrt(n)
        q = t_quantile(confidence, n - 1)
    else:
        se = max(statistics.stdev(changes) if n >= 2 else 0.0, noise_floor) / math.sqrt(n)
        q = _NORMAL.inv_cdf(confidence)
    lower, upper = mean - q * se, mean + q * se
    status = "fail" if lower > allowed else "pass" if upper <= allowed else "thin"
    return Bound(status, n, mean, lower, upper, allowed)


def group_pvalue(changes: Sequence[float], allowed: float, *, min_examples: int, pooled_mad: float | None,
                 noise_floor: float) -> float:
    """One-sided p-value of "this group's mean change is beyond ``allowed``" (module docstring).
    ``pooled_mad``: the memory's robust spread, None where too few examples measure it."""
    n = len(changes)
    if n == 0:
        return 1.0
    x = statistics.fmean(changes) - allowed
    if n >= max(2, min_examples):
        se = max(statistics.stdev(changes), noise_floor) / math.sqrt(n)
        return t_sf(x / se, n - 1)
    # Laplace scale b: its MAD is b ln 2, its standard deviation b sqrt 2.
    b = max(pooled_mad / math.log(2) if pooled_mad is not None else 0.0, noise_floor / math.sqrt(2))
    b /= math.sqrt(n)
    return 0.5 * math.exp(-x / b) if x > 0 else 1.0 - 0.5 * math.exp(x / b)


def holm(pvalues: Sequence[float], alpha: float) -> list[int]:
    """Indexes of the p-values Holm–Bonferroni rejects at family-wise error ``alpha``, smallest first."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    m, out = len(order), []
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        out.append(i)
    return out
