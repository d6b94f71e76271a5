"""Issue 39: adaptive's statistics, each against an independent computation: the pooled and
stratified standard errors against a least-squares fit of their linear models, the mixture boundary
against its closed form and against simulated random walks, and the all-votes-at-once schedule
against rows written out by hand."""

import math

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy, ImagePlan, van_der_corput_order
from dbmef.runtime.method import vote, vote_means
from dbmef.runtime.paired_test import mixture_threshold, paired_standard_error
from dbmef.runtime.replay import replay
from dbmef.runtime.student_t import t_threshold


def lstsq_residual_variance(e: np.ndarray, design: np.ndarray) -> tuple[float, int]:
    """Residual variance and df of the flattened errors regressed on ``design`` (numpy's lstsq)."""
    y = e.reshape(-1)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    res = y - design @ beta
    df = len(y) - np.linalg.matrix_rank(design)
    return float(res @ res) / df, df


def dummies(labels: np.ndarray) -> np.ndarray:
    return (labels[:, None] == np.unique(labels)[None, :]).astype(float)


def test_pooled_standard_error_is_the_two_way_anova_residual():
    rng = np.random.default_rng(0)
    r, a = 9, 4
    e = rng.standard_normal((r, a)) + rng.standard_normal((r, 1)) * 3 + np.arange(a)
    rows, cands = np.repeat(np.arange(r), a), np.tile(np.arange(a), r)
    s2, df = lstsq_residual_variance(e, np.hstack([dummies(rows), dummies(cands)]))
    se, got_df = paired_standard_error(e, 0, "pooled")
    assert got_df == df == (r - 1) * (a - 1)
    np.testing.assert_allclose(se, math.sqrt(2 * s2 / r), rtol=1e-10)
    # two candidates: the pooled standard error is the paired one
    two = e[:, :2]
    d = two[:, 1] - two[:, 0]
    assert paired_standard_error(two, 0, "pooled")[0][1] == pytest.approx(d.std(ddof=1) / math.sqrt(r))
    assert paired_standard_error(two, 0, "candidate")[0][1] == pytest.approx(d.std(ddof=1) / math.sqrt(r))


def test_stratified_standard_error_fits_a_candidate_effect_per_stratum():
    rng = np.random.default_rng(1)
    r, a = 12, 3
    strata = np.repeat([0, 1, 2], 4)
    shift = np.array([[0, 2, -1], [0, -2, 1], [0, 0, 3]])  # the candidates' effects differ by stratum
    e = rng.standard_normal((r, a)) + rng.standard_normal((r, 1)) * 5 + shift[strata]
    rows, cands = np.repeat(np.arange(r), a), np.tile(np.arange(a), r)
    cells = strata[rows] * a + cands
    s2, df = lstsq_residual_variance(e, np.hstack([dummies(rows), dummies(cells)]))
    se, got_df = paired_standard_error(e, 0, "stratified", strata)
    assert got_df == df == (r - 3) * (a - 1)
    np.testing.assert_allclose(se, math.sqrt(2 * s2 / r), rtol=1e-10)
    # the strata's effects are no longer noise: smaller than pooled on these rows
    assert se[0] < paired_standard_error(e, 0, "pooled")[0][0]
    # one row per stratum leaves no residual: it is pooled then
    one = e[[0, 4, 8]]
    np.testing.assert_allclose(paired_standard_error(one, 0, "stratified", strata[[0, 4, 8]])[0],
                               paired_standard_error(one, 0, "pooled")[0])


def test_mixture_threshold_closed_form_and_validity():
    # by hand: z = 2 -> alpha = Phi(-2) = 0.0227501; r = rho = 4: sqrt(2 (2 ln(1/alpha) + ln 2))
    alpha = 0.5 * math.erfc(2 / math.sqrt(2))
    assert alpha == pytest.approx(0.0227501, abs=1e-7)
    assert mixture_threshold(2.0, 4, 4) == pytest.approx(math.sqrt(2 * (2 * math.log(1 / alpha) + math.log(2))))
    assert mixture_threshold(2.0, 4, 4) == pytest.approx(4.0644, abs=1e-4)  # ln(1/alpha) = 3.7833
    # valid under continuous monitoring: simulated null random walks of known variance cross the
    # boundary (one-sided) at some r <= 400 in at most alpha of paths; a fixed z = 2 looked at after
    # every row crosses far more often
    rng = np.random.default_rng(2)
    steps = rng.standard_normal((4000, 400))
    r = np.arange(1, 401)
    z_stat = steps.cumsum(axis=1) / np.sqrt(r)
    bound = np.array([mixture_threshold(2.0, int(x), 4) for x in r])
    crossed = (z_stat >= bound).any(axis=1).mean()
    assert crossed <= alpha
    assert (z_stat >= 2.0).any(axis=1).mean() > 5 * alpha


def test_all_votes_open_at_once_with_their_orders_spread():
    """V = 3, n = 6, k = 2, interval 1: the first stage serves every vote, vote v at the van der
    Corput order shifted by 2 v positions: vdC(6) = 0, 4, 2, 1, 5, 3 -> positions 0, 2, 4."""
    assert list(van_der_corput_order(6)) == [0, 4, 2, 1, 5, 3]
    plan = ImagePlan(3, 6, 2, ExitPolicy("adaptive", z=2.0, interval=1, min_rows=3, votes_open="all"))
    assert plan.next_rows().tolist() == [[0, 0, 0], [0, 0, 1], [1, 2, 0], [1, 2, 1], [2, 4, 0], [2, 4, 1]]
    rounds = ImagePlan(3, 6, 2, ExitPolicy("adaptive", z=2.0, interval=1, min_rows=3, votes_open="rounds"))
    assert rounds.next_rows().tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]  # V//2 + 1 votes, unshifted
    assert plan.upcoming(4).tolist() == [[0, 4, 0], [0, 4, 1], [1, 0, 0], [1, 0, 1]]  # next: vdC[1] = 4, +2, +4


@pytest.mark.parametrize("votes", [1, 2, 5])
def test_all_votes_without_elimination_is_the_full_method(votes):
    rng = np.random.default_rng(votes)
    e = (rng.integers(0, 3, size=(40, votes, 4, 3)) / 3 + rng.standard_normal((40, votes, 4, 3)) * 1e-3)
    e = e.astype(np.float32)
    p = replay(e, ExitPolicy("adaptive", z=float("inf"), interval=1, min_rows=2, votes_open="all"))
    assert list(p.winner) == [vote(vote_means(x))[0] for x in e]
    assert (p.rows == votes * 4 * 3).all()


def test_pooled_variance_drops_a_loser_from_fewer_rows():
    """k = 3, one vote, n = 8, interval 2, min rows 2, Student's t at z = 2. The first checkpoint
    has grid positions 0 and 4 (van der Corput): errors (5, 6, 6) and (6, 7, 7.2). Own differences:
    candidate 1 (1, 1), sd 0: dropped; candidate 2 (1, 1.2): mean 1.1, se 0.1, 11 standard errors
    under t's 1 df threshold 13.97: kept, so a second checkpoint runs (positions 2, 6: 4 more rows).
    Pooled: the 2 x 3 layout's residuals are +-(1/30, 1/30, -2/30), s2 = (12/900) / 2 df, se of a
    difference sqrt(2 s2 / 2) = 0.0816: candidate 2 is 13.5 and candidate 1 12.2 standard errors
    behind, above t's 2 df threshold 4.53: both dropped after 6 rows."""
    e = np.zeros((1, 1, 8, 3), np.float32)
    row = np.array([5.0, 3.0, 4.0, 2.0, 6.0, 1.0, 7.0, 0.5])
    e[0, 0, :, 0] = row
    e[0, 0, :, 1] = row + 1.0
    e[0, 0, :, 2] = row + 1.1
    e[0, 0, 0, 2] = row[0] + 1.0
    e[0, 0, 4, 2] = row[4] + 1.2
    first = e[0, 0, [0, 4]].astype(np.float64)
    se, df = paired_standard_error(first, 0, "pooled")
    assert df == 2 and se[2] == pytest.approx(math.sqrt(2 * (12 / 900 / 2) / 2))
    assert 1.0 / se[1] > t_threshold(2.0, 2) == pytest.approx(4.527, abs=1e-3)
    assert 1.1 / 0.1 < t_threshold(2.0, 1)
    own = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2, test="t", variance="candidate"))
    pooled = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2, test="t", variance="pooled"))
    assert (pooled.rows[0], pooled.winner[0]) == (6, 0)
    assert (own.rows[0], own.winner[0]) == (10, 0)


def test_new_fields_are_checked_and_round_trip():
    with pytest.raises(ConfigError, match="exit_votes_open"):
        ScoringConfig(exit_votes_open="some")
    with pytest.raises(ConfigError, match="exit_variance"):
        ScoringConfig(exit_variance="robust")
    with pytest.raises(ConfigError, match="exit_test"):
        ScoringConfig(exit_test="bayes")
    cfg = ScoringConfig(early_exit="adaptive", exit_votes_open="all", exit_variance="stratified", exit_test="mixture")
    back = ScoringConfig.from_dict(cfg.to_dict()).exit_policy
    assert (back.votes_open, back.variance, back.test) == ("all", "stratified", "mixture")


def test_t_threshold_for_any_z_matches_scipy_and_never_falls_below_z():
    """Issue 35's probe: --exit-test t --exit-z 20 at 30 degrees of freedom gave a threshold below
    z, and not increasing in z (the series' 1 - a cancels once the tail is under 1e-16)."""
    from scipy import stats

    for df in (1, 2, 5, 30, 200):
        previous = 0.0
        for z in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0):
            t = t_threshold(z, df)
            ref = stats.t.isf(stats.norm.sf(z), df)
            assert t == pytest.approx(ref, rel=1e-9), (z, df)
            assert t >= z and t > previous
            previous = t
    assert t_threshold(20.0, 30) == pytest.approx(4492.84, rel=1e-5)
    assert t_threshold(45.0, 1000) > 45.0  # where the normal tail itself underflows (erfc = 0)
