"""Student's t without scipy: its upper tail for integer degrees of freedom and the quantile the
adaptive early exit's few-row test uses (``early_exit.ImagePlan``, ``exit_test = "t"``)."""

from __future__ import annotations

import math
from functools import lru_cache


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with integer ``df`` >= 1: the finite series of Abramowitz & Stegun
    26.7.3 (odd df) and 26.7.4 (even df), so the runtime needs no scipy."""
    if t < 0:
        return 1.0 - student_t_sf(-t, df)
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        inner = 0.0
        if df > 1:
            term = inner = math.cos(theta)
            for j in range(1, (df - 1) // 2):
                term *= c2 * (2 * j) / (2 * j + 1)
                inner += term
        a = 2.0 / math.pi * (theta + s * inner)
    else:
        term = inner = 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            inner += term
        a = s * inner
    return (1.0 - a) / 2.0


@lru_cache(maxsize=8192)
def t_threshold(z: float, df: int) -> float:
    """The Student-t quantile (``df`` degrees of freedom) with the one-sided tail a standard normal
    has beyond ``z``: z's level, corrected for a standard error estimated from df + 1 rows."""
    if not math.isfinite(z):
        return z
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    lo, hi = 0.0, max(2.0 * z, 1.0)
    while student_t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(80):  # bisection to double precision on [lo, hi]
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_sf(mid, df) > tail else (lo, mid)
    return 0.5 * (lo + hi)
