"""Choosing zero-shot early exit on a calibration split, and nothing else: a grid of adaptive
settings replayed over a rethink-all pass's errors (no UNet work), and the rule that picks among them
(``benchmarks/digits/zero_shot.py`` runs it on the committed bundle; ``ZERO_SHOT.md`` reports it)."""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.replay import replay

Z_GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
INTERVALS = (1, 2, 4)
# Paired rows before a candidate may be dropped, and the threshold's distribution. With the normal
# threshold alone, 3 rows were tried once and lost 0.84 points on the test split (199 evaluations,
# 97.15 % against the exhaustive 97.99 %): the standard error of 3 rows is itself a guess. Student's
# t with rows - 1 degrees of freedom prices that in; both tests and both minimums are in the grid and
# the calibration split alone chooses among them.
# Issue 39 adds 2 rows and the variance pooled over the surviving candidates (10 of them at first:
# (rows - 1) * 9 degrees of freedom where a candidate's own differences have rows - 1), and looking
# after every timestep (interval 1).
MIN_ROWS = (2, 3, 6)
TESTS = ("z", "t")
VARIANCES = ("candidate", "pooled")


def zero_shot_config(n: int, **policy: Any) -> ScoringConfig:
    return ScoringConfig(k=10, n_timesteps=n, votes=1, lam=1.0, zero_shot=True, unet_batch=128, **policy)


def li_schedule(n: int) -> dict[str, Any]:
    return {"early_exit": "keep_best", "exit_keep": (5, 1), "exit_samples": (max(1, n // 10), n)}


def evaluate_policy(errors: np.ndarray, labels: np.ndarray, cfg: ScoringConfig) -> dict[str, Any]:
    p = replay(errors, cfg.exit_policy)
    pred = p.winner  # candidates in class order: the winning position is the class
    return {"accuracy": float((pred == labels).mean()), "unet_evals_per_image": float(p.rows.mean()),
            "winners": pred.tolist(), "rows": p.rows.tolist()}


def calibrated_order(errors: np.ndarray) -> tuple[int, ...]:
    """Timestep grid positions, the best separating first: at each position, the signal-to-noise
    ratio (mean / sd over images and losing candidates) of the paired excess error of every other
    candidate over the image's exhaustive winner. Uses no labels: only a rethink-all pass's errors."""
    e = errors[:, 0].astype(np.float64)  # (M, n, C)
    m_count, _, c_count = e.shape
    winner = e.mean(axis=1).argmin(axis=1)
    d = e - e[np.arange(m_count), :, winner][:, :, None]  # (M, n, C), 0 at the winner
    losers = np.ones((m_count, c_count), bool)
    losers[np.arange(m_count), winner] = False
    d = d.transpose(1, 0, 2)[:, losers]  # (n, M * (C - 1))
    snr = d.mean(axis=1) / np.maximum(d.std(axis=1), 1e-12)
    return tuple(int(i) for i in np.argsort(-snr, kind="stable"))


def choose_adaptive(errors: np.ndarray, labels: np.ndarray, n: int, exhaustive_acc: float) -> dict[str, Any]:
    """The cheapest (z, interval, min_rows, test, order) on the calibration split whose accuracy is within
    0.5 points of the exhaustive method's there."""
    grid = []
    orders = {"van der Corput": (), "calibrated": calibrated_order(errors)}
    for z, interval, min_rows, test, variance, (order_name, order) in product(
            Z_GRID, INTERVALS, MIN_ROWS, TESTS, VARIANCES, orders.items()):
        cfg = zero_shot_config(n, early_exit="adaptive", exit_z=z, exit_interval=interval, exit_min_rows=min_rows,
                               exit_test=test, exit_variance=variance, exit_order=order)
        r = evaluate_policy(errors, labels, cfg)
        grid.append({"z": z, "interval": interval, "min_rows": min_rows, "test": test, "variance": variance,
                     "order": order_name, "exit_order": list(order), "accuracy": r["accuracy"],
                     "unet_evals_per_image": r["unet_evals_per_image"]})
    def best(order: str, tests: tuple[str, ...] = TESTS, variances: tuple[str, ...] = VARIANCES) -> dict[str, Any]:
        pts = [g for g in grid if g["order"] == order and g["test"] in tests and g["variance"] in variances]
        ok = [g for g in pts if g["accuracy"] >= exhaustive_acc - 0.005]
        return min(ok or pts, key=lambda g: (g["unet_evals_per_image"], -g["accuracy"]))

    # The runtime's order (van der Corput) is what the benchmark adopts; the calibrated order is
    # chosen by the same rule and reported beside it: on the test split it lost 2.2 points (its
    # ranking is fitted on the very digits the rule then judges it on), a measured negative result.
    # The normal threshold's own pick is reported too: what Student's t changes, on the test split.
    return {"grid": grid, "chosen": best("van der Corput"), "chosen_calibrated_order": best("calibrated"),
            "chosen_z_test": best("van der Corput", ("z",)),
            "chosen_own_variance": best("van der Corput", TESTS, ("candidate",)),
            "calibrated_order": list(orders["calibrated"])}
