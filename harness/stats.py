"""Bootstrap confidence intervals over generations.

Generations, not steps, are the independent units (steps within a generation
are correlated), so every interval resamples whole generations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def fmt(self, spec: str = ".3g") -> str:
        if not np.isfinite(self.value):
            return "-"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


NAN = Estimate(float("nan"), float("nan"), float("nan"))


def bootstrap(
    columns: dict[str, np.ndarray], statistic: Callable[[dict[str, np.ndarray]], float], seed: int = 0
) -> Estimate:
    """Percentile bootstrap of ``statistic`` over rows of aligned ``columns``.

    Args:
        columns: equal-length arrays (one entry per generation).
        statistic: maps resampled columns to a number.
        seed: the resampling seed (reports are reproducible).
    """
    n = len(next(iter(columns.values())))
    if n == 0:
        return NAN
    value = float(statistic(columns))
    if n == 1:
        return Estimate(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(N_BOOT, n))
    draws = np.array([statistic({k: v[i] for k, v in columns.items()}) for i in idx], dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Estimate(value, float("nan"), float("nan"))
    alpha = (1 - LEVEL) / 2
    return Estimate(value, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)))


def mean_ci(values: np.ndarray, seed: int = 0) -> Estimate:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bootstrap({"x": values}, lambda c: float(np.mean(c["x"])), seed)


def ratio_of_sums_ci(num: np.ndarray, den: np.ndarray, seed: int = 0) -> Estimate:
    """``sum(num) / sum(den)`` (e.g. tokens per second over a set of generations)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ok = np.isfinite(num) & np.isfinite(den)
    return bootstrap({"n": num[ok], "d": den[ok]}, lambda c: float(c["n"].sum() / c["d"].sum()), seed)


def ratio_of_ratios_ci(
    a_num: np.ndarray, a_den: np.ndarray, b_num: np.ndarray, b_den: np.ndarray, seed: int = 0, paired: bool = False
) -> Estimate:
    """``(sum a_num / sum a_den) / (sum b_num / sum b_den)``, e.g. a speedup.

    ``paired`` resamples matched rows together (same prompts and repeats);
    otherwise the two groups are resampled independently.
    """
    if paired:
        cols = {"an": a_num, "ad": a_den, "bn": b_num, "bd": b_den}
        return bootstrap({k: np.asarray(v, dtype=float) for k, v in cols.items()},
                         lambda c: float((c["an"].sum() / c["ad"].sum()) / (c["bn"].sum() / c["bd"].sum())), seed)
    a = ratio_of_sums_ci(a_num, a_den, seed)
    b = ratio_of_sums_ci(b_num, b_den, seed + 1)
    if not (np.isfinite(a.value) and np.isfinite(b.value)):
        return NAN
    rng = np.random.default_rng(seed + 2)
    a_num, a_den, b_num, b_den = (np.asarray(x, dtype=float) for x in (a_num, a_den, b_num, b_den))
    ia = rng.integers(0, len(a_num), size=(N_BOOT, len(a_num)))
    ib = rng.integers(0, len(b_num), size=(N_BOOT, len(b_num)))
    draws = (a_num[ia].sum(1) / a_den[ia].sum(1)) / (b_num[ib].sum(1) / b_den[ib].sum(1))
    alpha = (1 - LEVEL) / 2
    return Estimate(a.value / b.value, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)))


def wilson(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """A proportion with its Wilson score interval (sound at 0 or n successes, unlike the normal one)."""
    if n == 0:
        return NAN
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def pass_rate(passed) -> Estimate:
    """Share of generations that passed, over the scored ones (nulls ignored), Wilson 95%."""
    values = [bool(v) for v in passed if v is not None and v == v]  # drop None and NaN
    return wilson(sum(values), len(values))
