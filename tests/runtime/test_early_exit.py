"""Early exit (issue 13): exact equals the full method decision for decision, adaptive with z = inf
equals exact, row counts are exact, and stage-wise batching does not depend on the batch."""

import math

import numpy as np
import pytest

from dbmef.apps.lockstep import score_lockstep
from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy, van_der_corput_order
from dbmef.runtime.method import vote, vote_means
from dbmef.runtime.replay import replay
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.student_t import t_threshold
from tests.runtime.conftest import LATENT, close_call_engine, full_errors, score
from tests.runtime.conftest import make_problem as problem

EXACT = ExitPolicy("exact")
OFF = ExitPolicy("off")


def full_method(errors: np.ndarray) -> np.ndarray:
    """The paper's decision, written without the planner: every vote, majority, tie-break."""
    return np.array([vote(vote_means(e))[0] for e in errors])


def test_van_der_corput_order_by_hand():
    assert list(van_der_corput_order(8)) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert list(van_der_corput_order(5)) == [0, 4, 2, 1, 3]  # 8-point order with 5, 6, 7 left out
    order = van_der_corput_order(30)
    assert sorted(order) == list(range(30))
    assert order[:4].max() - order[:4].min() >= 15  # any prefix spreads over the grid


def test_exact_rounds_by_hand():
    """V = 5, n = 2, k = 3. Image 0: candidate 1 wins votes 0-2 -> settled after the first round
    (3 votes x 2 timesteps x 3 candidates = 18 rows). Image 1: votes go 0, 1, 0, then 0 -> 3 of
    5 after 4 votes (24 rows). Image 2: 0, 1, 2, 0, 1 -> all 5 votes, tie 2-2 broken by mean error."""
    e = np.ones((3, 5, 2, 3), np.float32)
    for v in range(5):
        e[0, v, :, 1] = 0.5
    for v, c in enumerate([0, 1, 0, 0, 1]):
        e[1, v, :, c] = 0.5
    for v, c in enumerate([0, 1, 2, 0, 1]):
        e[2, v, :, c] = 0.5
    e[2, 1, :, 1] = 0.1  # candidate 1's winning votes have the lower errors -> wins the 2-2 tie
    p = replay(e, EXACT)
    assert list(p.winner) == [1, 0, 1]
    assert list(p.rows) == [18, 24, 30]
    assert list(p.winner) == list(full_method(e))
    assert list(p.vote_counts()[1]) == [3, 1, 0]
    assert np.isnan(p.per_vote_errors()[0, 3:]).all()  # votes 3 and 4 of image 0 never ran
    off = replay(e, OFF)
    assert list(off.rows) == [30, 30, 30] and off.stages == 1


@pytest.mark.parametrize("votes", [1, 2, 3, 4, 5, 7])
def test_exact_equals_off_on_random_errors_with_ties(votes):
    """Property test: errors drawn from a handful of values, so ties inside votes, vote-count ties
    and mean-error ties are all frequent."""
    rng = np.random.default_rng(votes)
    for trial in range(40):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 5))
        levels = rng.integers(2, 5)
        e = (rng.integers(0, levels, size=(25, votes, n, k)) / levels).astype(np.float32)
        if trial % 2:
            e += rng.standard_normal(e.shape).astype(np.float32) * 1e-3
        p = replay(e, EXACT)
        assert list(p.winner) == list(full_method(e)), trial
        assert (p.rows <= votes * n * k).all()
        assert (p.rows % (n * k) == 0).all()  # whole votes only


def test_adaptive_with_infinite_z_equals_exact():
    rng = np.random.default_rng(7)
    e = rng.gamma(2.0, 0.1, size=(60, 5, 6, 4)).astype(np.float32)
    exact = replay(e, EXACT)
    inf = replay(e, ExitPolicy("adaptive", z=float("inf"), interval=2, min_rows=4, votes_open="rounds"))
    assert list(inf.winner) == list(exact.winner)
    np.testing.assert_array_equal(inf.rows, exact.rows)  # the same votes, visited in another order
    every = replay(e, ExitPolicy("adaptive", z=float("inf"), interval=2, min_rows=4, votes_open="all"))
    assert list(every.winner) == list(exact.winner) and (every.rows == 5 * 6 * 4).all()  # all votes, always


def test_adaptive_drops_a_clear_loser_and_keeps_a_close_call():
    """k = 3, one vote of n = 8, checkpoints every 2 timesteps, min 2 rows, z = 2. The first stage
    visits grid positions 0 and 4 (van der Corput). Candidate 2's paired excess over the leader is
    +1 on every row (mean 1, sd 0): dropped at the first checkpoint. Candidate 1 is 0.01 above
    candidate 0 at positions 0-3 and 0.01 below at 4-7, so every checkpoint pairs a + with a -:
    mean excess 0, never separated."""
    e = np.zeros((1, 1, 8, 3), np.float32)
    e[0, 0, :, 0] = 1.0
    e[0, 0, :, 1] = 1.0 + 0.01 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
    e[0, 0, :, 2] = 2.0
    p = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2))
    assert not p.alive[0, 2] and p.alive[0, :2].all()
    # the two survivors ran every timestep, candidate 2 only the first checkpoint's two
    assert p.rows[0] == 3 * 2 + 2 * 6
    assert p.winner[0] in (0, 1) and p.winner[0] == full_method(e)[0]


def test_adaptive_decides_with_one_survivor_before_any_vote_completes():
    e = np.zeros((1, 5, 30, 4), np.float32)
    e[..., 0] = 1.0
    e[..., 1:] = 3.0 + np.random.default_rng(0).standard_normal((1, 5, 30, 3)).astype(np.float32) * 0.1
    p = replay(e, ExitPolicy("adaptive", z=3.0, interval=3, min_rows=6, votes_open="rounds"))
    assert p.winner[0] == 0
    assert p.rows[0] == 3 * 3 * 4  # one checkpoint: 3 votes x 3 timesteps x 4 candidates
    assert p.stages == 1
    every = replay(e, ExitPolicy("adaptive", z=3.0, interval=3, min_rows=6, votes_open="all"))
    assert (every.winner[0], every.rows[0], every.stages) == (0, 5 * 3 * 4, 1)  # all 5 votes' first 3 timesteps


def test_a_calibrated_order_visits_the_informative_timesteps_first():
    """The same errors as above but candidate 1 separates from 0 only at grid positions 6 and 7
    (+1 there, 0 elsewhere). Van der Corput visits 0, 4 | 2, 6 | 1, 5 | 3, 7: candidate 1's excess
    rows are (0, 0) at the first checkpoint (sd 0, mean 0: kept), then (0, 0, 0, 1), (.., 0, 0),
    never above z = 2 standard errors, so it runs all 8. Visiting 6, 7 first gives (1, 1): mean 1,
    sd 0, dropped at once. Candidate 2 (+1 everywhere) goes at the first checkpoint either way."""
    e = np.zeros((1, 1, 8, 3), np.float32)
    e[0, 0, :, 0] = 1.0
    e[0, 0, :, 1] = 1.0 + np.array([0, 0, 0, 0, 0, 0, 1, 1])
    e[0, 0, :, 2] = 2.0
    spread = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2))
    assert spread.rows[0] == 3 * 2 + 2 * 6 and spread.winner[0] == 0
    first = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2, order=(6, 7, 0, 1, 2, 3, 4, 5)))
    assert first.rows[0] == 3 * 2 and first.winner[0] == 0  # settled after one checkpoint of 2 rows x 3
    with pytest.raises(ConfigError, match="permutation"):
        replay(e, ExitPolicy("adaptive", order=(0, 1, 2)))
    with pytest.raises(ConfigError, match="exit_order"):
        ScoringConfig(n_timesteps=4, exit_order=(0, 1, 1, 2))
    assert ScoringConfig.from_dict(ScoringConfig(n_timesteps=3, exit_order=(2, 0, 1)).to_dict()).exit_order == (2, 0, 1)


def test_t_threshold_against_printed_tables_and_closed_forms():
    """Student's t quantiles at z's one-sided level: printed table values (two-sided 95 % with 5 df,
    99 % with 10 df, one-sided 95 % with 30 df), the Cauchy (1 df) in closed form, and z itself as
    the degrees of freedom grow (Cornish-Fisher: t = z + (z^3 + z) / (4 df) + ...)."""
    assert t_threshold(1.959964, 5) == pytest.approx(2.5706, abs=1e-4)
    assert t_threshold(2.575829, 10) == pytest.approx(3.1693, abs=1e-4)
    assert t_threshold(1.644854, 30) == pytest.approx(1.6973, abs=1e-4)
    for z in (1.0, 2.0, 3.0):
        tail = 0.5 * math.erfc(z / math.sqrt(2))
        assert t_threshold(z, 1) == pytest.approx(math.tan(math.pi * (0.5 - tail)), rel=1e-9)
        assert t_threshold(z, 20000) == pytest.approx(z + (z**3 + z) / 80000, abs=1e-6)
    assert t_threshold(float("inf"), 4) == float("inf")


def test_t_test_waits_for_rows_a_normal_threshold_would_not():
    """k = 2, one vote of n = 8, checkpoints of 2, min 2 rows, z = 2. Candidate 1's paired excess
    rows are 1.0, 0.6 at the first checkpoint (grid positions 0, 4): mean 0.8, se 0.2, 4 standard
    errors: the normal threshold (2) drops it there (2 x 2 rows). Student's t with 1 df needs
    tan(pi (1/2 - Phi(-2))) = 13.97: kept. The second checkpoint adds 0.9, 0.7 (positions 2, 6):
    mean 0.8, se sqrt(0.1 / 3 / 4) = 0.0913, 8.76 standard errors, above t's 3.31 at 3 df: dropped
    then (2 x 4 rows)."""
    e = np.zeros((1, 1, 8, 2), np.float32)
    e[0, 0, :, 0] = 1.0
    e[0, 0, [0, 4, 2, 6, 1, 5, 3, 7], 1] = 1.0 + np.array([1.0, 0.6, 0.9, 0.7, 1, 1, 1, 1])
    z = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2))
    t = replay(e, ExitPolicy("adaptive", z=2.0, interval=2, min_rows=2, test="t"))
    assert (z.rows[0], z.winner[0]) == (4, 0)
    assert (t.rows[0], t.winner[0]) == (8, 0)
    # 3 df in closed form: P(T > t) = 1/2 - (x / (1 + x^2) + atan x) / pi, x = t / sqrt(3)
    x = t_threshold(2.0, 3) / math.sqrt(3)
    tail = 0.5 * math.erfc(2 / math.sqrt(2))
    assert 0.5 - (x / (1 + x * x) + math.atan(x)) / math.pi == pytest.approx(tail, rel=1e-9)
    assert 3.30 < t_threshold(2.0, 3) < 3.31 < 8.76 < 13.96 < t_threshold(2.0, 1) < 13.97
    with pytest.raises(ConfigError, match="exit_test"):
        ScoringConfig(exit_test="bayes")
    assert ScoringConfig.from_dict(ScoringConfig(exit_test="t").to_dict()).exit_policy.test == "t"


def test_policy_and_config_validation():
    with pytest.raises(ConfigError, match="early_exit"):
        ScoringConfig(early_exit="sometimes")
    with pytest.raises(ConfigError, match="exit_z"):
        ScoringConfig(exit_z=0.0)
    assert ScoringConfig(exit_z=float("inf")).exit_policy.z == float("inf")
    assert ScoringConfig().early_exit == "exact"


@pytest.mark.parametrize("mode", ["exact", "adaptive"])
def test_stagewise_scorer_equals_replay_of_the_full_errors(mode):
    """The scorer's stages, on real engine calls, make the decisions and row counts that replaying
    the planner over the full per-row errors (computed here directly) predicts; rows counted
    exclude padding."""
    lat, cands, pos, neg = problem()
    cfg = ScoringConfig(k=4, n_timesteps=6, votes=5, unet_batch=7, early_exit=mode, exit_z=1.0, exit_interval=2,
                        exit_min_rows=4)
    want = replay(full_errors(cfg, cands, pos, neg), cfg.exit_policy)
    calls: list[int] = []
    r = score(cfg, close_call_engine(calls), lat, cands, pos, neg)
    assert list(r.labels) == list(cands[np.arange(len(cands)), want.winner])
    np.testing.assert_array_equal(r.rows, want.rows)
    assert r.rows.sum() == want.rows.sum() < 6 * 5 * 6 * 4
    assert want.stages > 1 and set(calls) == {7} and r.stats.engine_calls == len(calls)
    # the batch-synchronous baseline (dbmef bench's): every stage of every image, each stage's tail padded
    calls.clear()
    sc = DiffusionScorer(cfg, close_call_engine(calls), LATENT)
    sync, stats = score_lockstep(sc, pos, lat, cands, neg)
    assert [s.label for s in sync] == list(r.labels) and [s.rows for s in sync] == list(r.rows)
    assert stats.engine_calls == len(calls) == sum(-(-n // 7) for n in want.stage_rows) >= r.stats.engine_calls


@pytest.mark.parametrize("mode", ["off", "exact", "adaptive"])
def test_stagewise_batching_does_not_depend_on_the_batch(mode):
    lat, cands, pos, neg = problem(seed=3)
    cfg = ScoringConfig(k=4, n_timesteps=6, votes=5, unet_batch=5, early_exit=mode, exit_z=1.0, exit_interval=2,
                        exit_min_rows=4)
    engine = close_call_engine([])
    together = score(cfg, engine, lat, cands, pos, neg)
    for m in range(len(lat)):
        alone = score(cfg, engine, lat[m : m + 1], cands[m : m + 1], pos, neg[m : m + 1])
        assert alone.labels[0] == together.labels[m]
        assert alone.rows[0] == together.rows[m]
        np.testing.assert_array_equal(alone.errors[0], together.errors[m])


def test_exact_equals_off_on_the_scorer():
    lat, cands, pos, neg = problem(M=12, seed=5)
    cfg = ScoringConfig(k=4, n_timesteps=4, votes=5, unet_batch=8)
    off = score(cfg.replace(early_exit="off"), close_call_engine([]), lat, cands, pos, neg)
    ex = score(cfg, close_call_engine([]), lat, cands, pos, neg)
    assert list(ex.labels) == list(off.labels)
    assert ex.rows.sum() < off.rows.sum()
    done = ~np.isnan(ex.errors).any(axis=2)
    np.testing.assert_array_equal(ex.errors[done], off.errors[done])
