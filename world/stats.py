"""Pooled statistics over seeds with 95% bootstrap intervals (seeds and samples resampled).

Invariant: a statistic is a function of per-seed measurements; its interval resamples the seeds
with replacement and, inside each drawn seed, every rate binomially from its own sample count,
so the interval covers both seed-to-seed spread and sampling noise. Draws come from a fixed seed.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

RATE_KEYS = ("leak_rate", "neutral_rate", "paraphrase_leak_rate", "paraphrase_neutral_rate", "empty_prompt_rate",
             "allowed_leak_rate", "new_content_rate", "public_fidelity", "preset_paraphrase_rate", "no_word_rate",
             "public_protected_rate", "inversion_rate", "custom_rate")
Runs = Mapping[str, Sequence[Mapping[str, float]]]  # method -> per-seed measurements (same seed order)
Statistic = Callable[[Mapping[str, list[Mapping[str, float]]]], float]


def _resample(runs: Runs, counts: Mapping[str, int], rng: np.random.Generator) -> dict[str, list[dict]]:
    n_seeds = len(next(iter(runs.values())))
    pick = rng.integers(0, n_seeds, n_seeds)
    out: dict[str, list[dict]] = {}
    for method, per_seed in runs.items():
        drawn = []
        for i in pick:
            m = dict(per_seed[i])
            for key in RATE_KEYS:
                n = counts.get(key, 0)
                if key in m and n > 0 and m[key] is not None:
                    m[key] = rng.binomial(n, min(max(float(m[key]), 0.0), 1.0)) / n
            drawn.append(m)
        out[method] = drawn
    return out


def bootstrap(statistic: Statistic, runs: Runs, counts: Mapping[str, int], draws: int = 2000, seed: int = 0
              ) -> tuple[float, float, float]:
    """(point estimate, 2.5th, 97.5th percentile); the interval is (nan, nan) when fewer than 2 seeds."""
    point = statistic({k: list(v) for k, v in runs.items()})
    if len(next(iter(runs.values()))) < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [statistic(_resample(runs, counts, rng)) for _ in range(draws)]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return point, float(lo), float(hi)


def mean(per_seed: Sequence[Mapping[str, float]], key: str) -> float:
    vals = [float(m[key]) for m in per_seed if m.get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def excess(per_seed: Sequence[Mapping[str, float]], rate: str, neutral: str) -> float:
    """Mean over seeds of ``rate`` minus ``neutral``."""
    return mean(per_seed, rate) - mean(per_seed, neutral)


def reduction(method: str, rate: str, neutral: str, reference: str = "plain") -> Statistic:
    """1 - excess(method) / excess(reference), pooled over seeds (nan when the reference has no excess)."""
    def stat(runs):
        ref = excess(runs[reference], rate, neutral)
        return 1.0 - excess(runs[method], rate, neutral) / ref if ref > 0 else float("nan")
    return stat


def ratio(method: str, key: str, reference: str = "plain") -> Statistic:
    """mean(method) / mean(reference) over seeds."""
    def stat(runs):
        ref = mean(runs[reference], key)
        return mean(runs[method], key) / ref if ref > 0 else float("nan")
    return stat


def difference(method: str, key: str, reference: str) -> Statistic:
    """mean(method) - mean(reference) over seeds."""
    return lambda runs: mean(runs[method], key) - mean(runs[reference], key)


def pct(v: float | None) -> str:
    """A rate as a whole percentage ("n/a" for a missing or undefined one)."""
    return "n/a" if v is None or math.isnan(v) else f"{v:.0%}"
