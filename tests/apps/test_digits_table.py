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


def test_fused_columns_and_their_done_when_check():
    """Three images by hand: the fused rule keeps the backbone's confident answer where the paper's
    rule would break it, and takes the diffusion model's where the backbone is unsure."""
    from dbmef.apps.digits_report import fused_markdown
    from dbmef.apps.digits_table import fused_columns

    top = np.array([[0, 1], [1, 0], [2, 3]])
    top_p = np.array([[0.9, 0.1], [0.55, 0.45], [0.5, 0.5]])
    y = np.array([0, 0, 3])
    # vote-0 mean errors: image 0's second candidate is slightly better (the paper breaks it), image
    # 1's true label (candidate 1) is far better, image 2's candidate 1 (label 3) better
    e1 = np.array([[0.1010, 0.1000], [0.1200, 0.1000], [0.1010, 0.1000]])
    per_vote = np.stack([e1, e1, e1], axis=1)  # three identical votes (M = N = 3: all rethought)
    beta = 1000.0  # log(0.9/0.1) / 1000 = 0.0022 > 0.001: image 0 keeps label 0; image 1: 0.0002 < 0.02
    cols = fused_columns(e1, per_vote, np.arange(3), top, top_p, y, {"V1": beta, "V3": beta})["accuracy"]
    assert cols["paper_prot0"] == cols["paper_V1"] == cols["paper_V3"] == 2 / 3  # image 0 broken
    assert cols["fused_prot0"] == cols["fused_V1"] == cols["fused_V3"] == 1.0
    assert cols["top1"] == 1 / 3
    row = {"backbone": "weak", "k": 2, "seed": 0, "fused": {"beta": {"V1": beta, "V3": beta}, "accuracy": cols},
           "rethink_rate": 0.125, "unet_evals_per_image": {"combined": 7.5, "combined_votes": 22.5}}
    text = "\n".join(fused_markdown([row]))
    assert "| yes |" in text and "weak +33.33 points" in text
    assert "| 12.5%, 7.5 / 22.5 |" in text
    bad = {**row, "fused": {**row["fused"], "accuracy": {**cols, "fused_V3": 0.5}}}
    assert "| NO |" in "\n".join(fused_markdown([bad]))
