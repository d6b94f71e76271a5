"""benchmarks/digits/zero_shot.py's calibrated timestep order, by hand."""

from __future__ import annotations

import numpy as np

from benchmarks.digits.zero_shot import calibrated_order


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
