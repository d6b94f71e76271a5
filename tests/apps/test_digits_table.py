"""Table 1's early-exit columns (dbmef/apps/digits_table.py) on a hand-made error tensor."""

from __future__ import annotations

import numpy as np

from dbmef.apps.digits_table import early_exit_columns


def test_the_adaptive_column_is_the_adaptive_policy():
    """Two rethought images, V = 1, n = 30, k = 3: candidate 0 is 1.0 everywhere, candidates 1 and 2
    are 3.0 plus small noise. off and exact (V = 1) run all 90 rows (180 evaluations); adaptive at the
    runtime's defaults must drop both losers at its first checkpoint with at least min_rows
    paired rows, so it costs far fewer and agrees with off. (The column once
    replayed ``ScoringConfig().exit_policy``, whose mode is the default ``exact``.)"""
    from dbmef.runtime.config import ScoringConfig

    rng = np.random.default_rng(0)
    e = np.ones((2, 1, 30, 3), np.float32)
    e[..., 1:] = 3.0 + 0.1 * rng.standard_normal((2, 1, 30, 2))
    top = np.array([[4, 7, 1], [2, 3, 9]])
    cols = early_exit_columns(e, top, np.arange(2), np.array([4, 2]))
    assert cols["off"]["unet_evals_per_rethought_image"] == cols["exact"]["unet_evals_per_rethought_image"] == 180
    d = ScoringConfig(early_exit="adaptive")
    # V = 1: checkpoints every `interval` timesteps; the first with at least min_rows paired rows decides
    first = -(-d.exit_min_rows // d.exit_interval) * d.exit_interval
    assert cols["adaptive"]["unet_evals_per_rethought_image"] == 2 * 3 * first < 180
    assert cols["adaptive"]["agreement_with_off"] == 1.0 and cols["adaptive"]["accuracy"] == 1.0
