"""Small statistics for benchmark figures: percentiles, summaries and growth fits.

Invariants: pure functions of their arguments (no clock, no I/O); percentiles interpolate
linearly between closest ranks (numpy's default method), so p50 of an even count is the mean
of the two middle values; an empty sample is a ValueError, never a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Fit",
    "Spread",
    "linear_fit",
    "loglog_exponent",
    "median",
    "paired_ratios",
    "percentile",
    "summarize_ms",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, interpolating between ranks."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(values: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(values, 50.0)


@dataclass(frozen=True)
class Spread:
    """The median of per-round values and the lowest and highest round."""

    median: float
    low: float
    high: float


def paired_ratios(pairs: Iterable[tuple[float, float]]) -> Spread | None:
    """Each round's `numerator / denominator`, summarised: None when no round has a positive,
    finite denominator (and finite numerator).

    The two sides of a pair are measured back to back, so a change of the machine's speed
    between rounds (on the benchmark VM a fixed loop's CPU time moves by up to 2x within
    seconds) divides out of each round's ratio; a ratio of two medians over rounds keeps it.
    """
    ratios = [
        numerator / denominator
        for numerator, denominator in pairs
        if math.isfinite(numerator) and math.isfinite(denominator) and denominator > 0
    ]
    if not ratios:
        return None
    return Spread(median=median(ratios), low=min(ratios), high=max(ratios))


def summarize_ms(latencies_ns: Sequence[int], prefix: str) -> dict[str, float]:
    """p50, p95, p99, mean and max of latencies given in nanoseconds, as `<prefix>_p50_ms`..."""
    if not latencies_ns:
        raise ValueError(f"no latencies measured for {prefix}")
    ms = [v / 1e6 for v in latencies_ns]
    return {
        f"{prefix}_p50_ms": percentile(ms, 50),
        f"{prefix}_p95_ms": percentile(ms, 95),
        f"{prefix}_p99_ms": percentile(ms, 99),
        f"{prefix}_mean_ms": sum(ms) / len(ms),
        f"{prefix}_max_ms": max(ms),
    }


@dataclass(frozen=True)
class Fit:
    """y = slope * x + intercept, with the coefficient of determination r2."""

    slope: float
    intercept: float
    r2: float


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Least-squares straight line through the points (at least two distinct x values)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a fit needs at least two (x, y) points")
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a fit needs at least two distinct x values")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(slope=slope, intercept=intercept, r2=r2)


def loglog_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The exponent b of y = a * x**b fitted on log-log axes: 1 is linear growth, 2 quadratic."""
    if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        raise ValueError("a log-log fit needs positive values")
    return linear_fit([math.log(x) for x in xs], [math.log(y) for y in ys]).slope
