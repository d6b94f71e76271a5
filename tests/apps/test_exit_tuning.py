"""The zero-shot early-exit choice (dbmef/apps/exit_tuning.py): the calibrated timestep order by hand, the rule."""

from __future__ import annotations

import numpy as np

from dbmef.apps.exit_tuning import calibrated_order


def test_the_order_puts_the_separating_timesteps_first():
    """Two images, 3 candidates, n = 4. Each image's winner (least mean error) is candidate 0 for
    image 0 and candidate 1 for image 1. The losers' paired excess over the winner: at position 2
    it is +2 for every loser (mean 2, sd 0: the best), at 0 it is +1 or +3 (mean 2, sd 1), at 1 it
    is +0.5 everywhere but one -0.5 (mean 0.25), at 3 it is 0 (no separation: last)."""
    e = np.ones((2, 1, 4, 3))
    loser_excess = {0: [1, 3, 1, 3], 1: [0.5, 0.5, 0.5, -0.5], 2: [2, 2, 2, 2], 3: [0, 0, 0, 0]}
    for i, ex in loser_excess.items():
        e[0, 0, i, 1:] += ex[:2]   # image 0: winner 0, losers 1 and 2
        e[1, 0, i, [0, 2]] += ex[2:]  # image 1: winner 1, losers 0 and 2
    assert e[0, 0].mean(axis=0).argmin() == 0 and e[1, 0].mean(axis=0).argmin() == 1
    # snr: position 2: inf (2 / ~0), 0: 2 / 1 = 2, 1: 0.25 / 0.433 = 0.58, 3: 0
    assert calibrated_order(e) == (2, 0, 1, 3)


def test_the_adaptive_choice_is_the_cheapest_admissible_point_on_calibration():
    """choose_adaptive's rule, checked over its own grid: the chosen van der Corput point is within
    0.5 points of the exhaustive accuracy and no admissible van der Corput point is cheaper; the
    normal-threshold pick obeys the same rule among z-test points only, the own-variance pick among
    the points whose standard error is each candidate's own."""
    from dbmef.apps.exit_tuning import choose_adaptive

    rng = np.random.default_rng(0)
    m, n, c = 30, 20, 4
    labels = rng.integers(0, c, m)
    e = 1.0 + 0.3 * rng.standard_normal((m, 1, n, c))
    e[np.arange(m), 0, :, labels] -= 0.25  # the true class predicts the noise a little better
    exhaustive = float((e[:, 0].mean(axis=1).argmin(axis=1) == labels).mean())
    sel = choose_adaptive(e.astype(np.float32), labels, n, exhaustive)
    both = ("candidate", "pooled")
    for key, tests, variances in (("chosen", ("z", "t"), both), ("chosen_z_test", ("z",), both),
                                  ("chosen_own_variance", ("z", "t"), ("candidate",))):
        pts = [g for g in sel["grid"] if g["order"] == "van der Corput" and g["test"] in tests
               and g["variance"] in variances]
        ok = [g for g in pts if g["accuracy"] >= exhaustive - 0.005]
        assert ok and sel[key] in ok and sel[key]["test"] in tests
        assert sel[key]["unet_evals_per_image"] == min(g["unet_evals_per_image"] for g in ok)
    assert {g["test"] for g in sel["grid"]} == {"z", "t"} and {g["min_rows"] for g in sel["grid"]} == {2, 3, 6}
