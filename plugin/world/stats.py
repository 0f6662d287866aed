"""Small statistics over seeds: mean and a 95% Student-t interval (no SciPy needed)."""

from __future__ import annotations

import math
from typing import Sequence

# two-sided 95% Student-t critical values by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width is nan for a single value."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m, t95(len(vals) - 1) * sd / math.sqrt(len(vals))


def fmt(mean: float, half: float, digits: int = 2, pct: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    d = 0 if pct else digits
    text = f"{mean * scale:.{d}f}{unit}"
    if not math.isnan(half):
        text += f" ± {half * scale:.{d}f}"
    return text
