"""The statistics of adaptive early exit's paired test (``early_exit.ImagePlan._eliminate``): the
standard error of a candidate's mean excess error over the leader, and the threshold it is held to
(issue 39). Numpy and the standard library only: the runtime has no scipy."""

from __future__ import annotations

import math

import numpy as np

from dbmef.runtime.student_t import t_threshold


def paired_standard_error(e: np.ndarray, lead: int, variance: str,
                          strata: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Standard error of each candidate's mean paired excess over candidate ``lead``, from rows
    ``e`` (r, a) that all a candidates have, and its degrees of freedom.

    "candidate": the sample sd of that candidate's own differences (r - 1 df; 0 for the leader).
    "pooled": every row is a block, e[j, c] = row_j + cand_c + residual; the residual variance s2
    over all candidates has (r - 1)(a - 1) df, and a difference of two candidates' means has
    variance 2 s2 / r. "stratified": the same with a candidate effect per stratum (``strata`` (r,),
    timestep blocks), e[j, c] = row_j + cell_{b(j), c} + residual, (r - B)(a - 1) df: what the
    stratum means explain (a candidate better at mid timesteps than at late ones) is no longer
    counted as noise, which is right when every stage samples each stratum alike. With fewer rows
    than that needs it is "pooled"."""
    r, a = e.shape
    if variance == "candidate":
        d = e - e[:, [lead]]
        return d.std(axis=0, ddof=1) / math.sqrt(r), r - 1
    inv, b = np.zeros(r, np.int64), 1  # "pooled": one block (no np.unique sort: a hot loop in replays)
    if variance == "stratified" and strata is not None:
        names, blocks = np.unique(strata, return_inverse=True)
        if (r - len(names)) * (a - 1) > 0:  # else too few rows for the strata: pooled
            inv, b = blocks.reshape(-1), len(names)
    cell = np.zeros((b, a))
    np.add.at(cell, inv, e)
    cell /= np.bincount(inv, minlength=b)[:, None]  # stratum x candidate means
    res = e - e.mean(axis=1, keepdims=True) - cell[inv] + cell.mean(axis=1, keepdims=True)[inv]
    df = (r - b) * (a - 1)
    s2 = float((res**2).sum()) / df
    return np.full(a, math.sqrt(2.0 * s2 / r)), df


def mixture_threshold(z: float, rows: int, rho: float) -> float:
    """The normal-mixture confidence sequence's boundary in standard errors after ``rows`` rows
    (Robbins; Howard et al. 2021, eq. 14): with S the sum of r paired differences of variance s2,
    P(some r has |S_r| >= sqrt((r + rho) s2 (2 ln(1/alpha) + ln((r + rho) / rho)))) <= alpha under
    the null of no difference, however often one looks. alpha is z's one-sided normal tail, rho
    (in rows) the mixture's scale: the boundary is tightest near r = rho (``min_rows``)."""
    alpha = 0.5 * math.erfc(z / math.sqrt(2.0))
    return math.sqrt((1.0 + rho / rows) * (2.0 * math.log(1.0 / alpha) + math.log(1.0 + rows / rho)))


def threshold(test: str, z: float, rows: int, df: int, min_rows: int) -> float:
    """The elimination threshold in standard errors after ``rows`` paired rows whose standard error
    has ``df`` degrees of freedom: z itself, Student's t at z's level, or the mixture boundary
    (``min_rows`` its scale)."""
    if test == "t":
        return t_threshold(z, df)
    if test == "mixture":
        return mixture_threshold(z, rows, min_rows)
    return z
