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


def log_student_t_sf(t: float, df: int) -> float:
    """log P(T > t) for t >= 0, accurate however small the tail: ``P(T > t) = I_x(df/2, 1/2) / 2``
    with ``x = df / (df + t^2)``, the incomplete beta by its continued fraction (Lentz), in logs.
    ``student_t_sf``'s series loses every digit once the tail is under about 1e-16 (1 - a cancels)."""
    a, b, x = df / 2.0, 0.5, df / (df + t * t)
    if x >= (a + 1) / (a + b + 2):  # the fraction converges slowly here; the tail is not small
        return math.log(student_t_sf(t, df))
    log_x = math.log(df) - 2 * math.log(t) - math.log1p(df / (t * t))  # x itself underflows for huge t
    log_front = a * log_x + b * math.log1p(-x) - math.log(a) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.log(0.5) + log_front + math.log(frac)


def log_normal_sf(z: float) -> float:
    """log P(Z > z), also where ``erfc`` underflows (z > 37: the Mills-ratio expansion)."""
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    if tail > 0:
        return math.log(tail)
    return -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-1 / (z * z) + 3 / z**4)


# Below this tail the threshold is found on log_student_t_sf; above it on the series, as before
# (the two agree there to double precision, and the adaptive defaults were chosen with the series).
SERIES_TAIL = 1e-12


@lru_cache(maxsize=8192)
def t_threshold(z: float, df: int) -> float:
    """The Student-t quantile (``df`` degrees of freedom) with the one-sided tail a standard normal
    has beyond ``z``: z's level, corrected for a standard error estimated from df + 1 rows. Never
    below z (a t tail is heavier than the normal's) and increasing in z, for any z."""
    if not math.isfinite(z):
        return z
    log_tail = log_normal_sf(z)
    if log_tail > math.log(SERIES_TAIL):
        tail = math.exp(log_tail)
        def above(t: float) -> bool:
            return student_t_sf(t, df) > tail
    else:
        def above(t: float) -> bool:
            return log_student_t_sf(t, df) > log_tail
    lo, hi = 0.0, max(2.0 * z, 1.0)
    while above(hi):
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection to double precision on [lo, hi]
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if above(mid) else (lo, mid)
    return max(z, 0.5 * (lo + hi))
