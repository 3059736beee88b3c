"""Intervals over seeds: the mean of a few per-seed values with its 95% Student t-interval, and
the paired difference of two methods run with the same seeds."""
from __future__ import annotations

import math

from scipy.stats import t as student_t

LEVEL = 0.95


def t_interval(values: list[float | None], level: float = LEVEL) -> dict:
    """{n_seeds, mean, sd, ci_low, ci_high} of the finite values: mean +- t_{(1+level)/2, n-1} sd /
    sqrt(n). With fewer than 2 values sd and the interval are None (no interval from one seed)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    out = {"n_seeds": n, "mean": sum(xs) / n if n else None, "sd": None, "ci_low": None, "ci_high": None}
    if n >= 2:
        mean = out["mean"]
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = student_t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
    return out


def paired(a: list[float | None], b: list[float | None], level: float = LEVEL) -> dict:
    """The t-interval of the per-seed differences a_i - b_i (seeds where either is missing are
    left out)."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    return t_interval(diffs, level)


def direction(st: dict) -> str:
    """'higher' when the interval lies above 0, 'lower' below, else 'inconclusive'."""
    if st.get("ci_low") is None:
        return "inconclusive"
    if st["ci_low"] > 0:
        return "higher"
    if st["ci_high"] < 0:
        return "lower"
    return "inconclusive"
