"""The row scheduler (issue 22): whatever the arrival order, the company, the engine batch or the
window, every image gets the rows and the answer the frozen pre-scheduler planner gives it on the
same errors; engine calls are full but at the end; rows evaluated ahead are only ever used when
asked for; the accounting adds up."""

import numpy as np
import pytest

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ImagePlan, replay
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.scheduler import RowScheduler
from dbmef.runtime.scorer import DiffusionScorer, HostRows
from tests.runtime.planner_v1 import replay_v1
from tests.runtime.test_early_exit import close_call_engine, problem
from tests.runtime.test_scorer import LATENT

MODES = ("off", "exact", "adaptive")


def config(mode: str, batch: int = 7) -> ScoringConfig:
    return ScoringConfig(k=4, n_timesteps=6, votes=5, unet_batch=batch, early_exit=mode, exit_z=1.0,
                         exit_interval=2, exit_min_rows=4)


def full_errors(cfg, cands, pos, neg):
    """Every row's error under ``close_call_engine``, computed directly (M, V, n, k)."""
    eps = NoiseBank(cfg.votes, cfg.n_timesteps, LATENT, cfg.seed).eps  # (V, n, 4, h, w)
    g = pos[cands].mean(axis=(2, 3)) - neg.mean(axis=(2, 3))  # (M, k)
    return ((eps[None, :, :, None] - g[:, None, None, :, None, None, None]) ** 2).mean(axis=(4, 5, 6)).astype(
        np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_the_planner_makes_the_frozen_planners_decisions(mode):
    """Property test on error tensors full of ties (a handful of levels) and on smooth ones."""
    rng = np.random.default_rng(11)
    for trial in range(30):
        k, n, votes = int(rng.integers(2, 6)), int(rng.integers(1, 7)), int(rng.integers(1, 6))
        levels = int(rng.integers(2, 5))
        e = (rng.integers(0, levels, size=(12, votes, n, k)) / levels).astype(np.float32)
        if trial % 2:
            e += rng.standard_normal(e.shape).astype(np.float32) * 1e-2
        policy = config(mode).exit_policy
        new, old = replay(e, policy), replay_v1(e, policy)
        np.testing.assert_array_equal(new.winner, old.winner)
        np.testing.assert_array_equal(new.rows, old.rows)
        assert new.stage_rows == old.stage_rows
        np.testing.assert_array_equal(new.per_vote_errors(), old.per_vote_errors())
        np.testing.assert_array_equal(new.vote_counts(), old.vote_counts())


@pytest.mark.parametrize("mode", MODES)
def test_any_arrival_order_company_batch_and_window_gives_the_same_answers(mode):
    M = 20
    lat, cands, pos, neg = problem(M=M, seed=4)
    full = full_errors(config(mode), cands, pos, neg)
    want = replay_v1(full, config(mode).exit_policy)
    rng = np.random.default_rng(5)
    for trial in range(8):
        batch = int(rng.choice([1, 3, 7, 16, 64]))
        cfg = config(mode, batch)
        capacity = int(rng.integers(1, M + 1))
        sc = DiffusionScorer(cfg, close_call_engine(calls := []), LATENT)
        sched = RowScheduler(HostRows(sc, pos, capacity), cfg, speculate=trial % 2 == 0)
        arrivals = list(rng.permutation(M))
        got = {}
        while arrivals or sched.busy:
            for _ in range(int(rng.integers(0, 4))):  # a few new images between engine calls
                if arrivals:
                    m = int(arrivals.pop(0))
                    sched.submit(m, lat[m], cands[m], neg[m])
            for s in sched.step(flush=not arrivals or bool(rng.random() < 0.3)):
                assert s.key not in got
                got[s.key] = s
        assert sorted(got) == list(range(M))
        assert [got[m].winner for m in range(M)] == list(want.winner), (trial, batch, capacity)
        assert [got[m].rows for m in range(M)] == list(want.rows)
        np.testing.assert_array_equal(np.stack([got[m].errors for m in range(M)]), want.per_vote_errors())
        np.testing.assert_array_equal(np.stack([got[m].votes for m in range(M)]), want.vote_counts())
        st = sched.stats
        assert set(calls) == {batch} and st.engine_calls == len(calls)  # one shape for every call
        # every row sent is a row asked for (sent then or ahead), a row ahead never asked for, or padding
        assert st.rows_sent == st.rows_needed - st.rows_speculative_used + st.rows_speculative + st.rows_padding
        assert st.rows_needed == want.rows.sum() and st.images == M
        if trial % 2:
            assert st.rows_speculative == 0


def test_calls_are_full_until_the_stream_ends():
    """Submitting everything up front: only the last calls (the stream's tail) can hold padding or
    rows ahead; the lockstep schedule pads every stage."""
    lat, cands, pos, neg = problem(M=30, seed=9)
    cfg = config("adaptive", 16)
    want = replay(full_errors(cfg, cands, pos, neg), cfg.exit_policy)
    for lockstep in (False, True):
        sc = DiffusionScorer(cfg, close_call_engine([]), LATENT)
        sched = RowScheduler(HostRows(sc, pos, 30), cfg, lockstep=lockstep)
        fill, got = [], {}
        for m in range(30):
            sched.submit(m, lat[m], cands[m], neg[m])
        while sched.busy:
            before = sched.stats.rows_padding + sched.stats.rows_speculative
            got.update((s.key, s) for s in sched.step(flush=True))
            fill.append(sched.stats.rows_padding + sched.stats.rows_speculative - before)
        assert sched.stats.rows_needed == want.rows.sum()
        np.testing.assert_array_equal(np.stack([got[m].errors for m in range(30)]), want.per_vote_errors())
        if lockstep:
            assert sched.stats.engine_calls == sum(-(-r // 16) for r in want.stage_rows)
            assert sched.stats.rows_speculative == 0
        else:
            first_gap = next(j for j, f in enumerate(fill) if f)
            assert first_gap >= len(fill) - want.stages  # only the tail, where fewer images are left
            assert sched.stats.engine_calls < sum(-(-r // 16) for r in want.stage_rows)
            assert sched.stats.rows_speculative_used > 0  # rows ahead were asked for later, and taken as they were


def test_rows_evaluated_ahead_are_the_rows_asked_for_next():
    """``upcoming`` lists exactly the rows later stages ask for while no candidate is dropped."""
    rng = np.random.default_rng(2)
    e = rng.gamma(2.0, 0.1, size=(1, 5, 8, 3)).astype(np.float32)
    for mode, z in (("adaptive", float("inf")), ("exact", 2.5), ("off", 2.5)):
        cfg = ScoringConfig(k=3, n_timesteps=8, votes=5, early_exit=mode, exit_z=z, exit_interval=2, exit_min_rows=4)
        plan = ImagePlan(5, 8, 3, cfg.exit_policy)
        later = []
        first = plan.next_rows()
        probe = ImagePlan(5, 8, 3, cfg.exit_policy)
        ahead = probe.upcoming(10_000)
        rows = first
        while not plan.done:
            plan.feed(rows, e[0][tuple(rows.T)])
            rows = plan.next_rows()
            later.extend(map(tuple, rows.tolist()))
        assert later == [tuple(r) for r in ahead.tolist()][: len(later)], mode
        assert len(ahead) == 5 * 8 * 3 - len(first)  # up to the last row of the last vote


def test_an_image_settled_early_leaves_at_once_and_its_slot_is_reused():
    lat, cands, pos, neg = problem(M=6, seed=1)
    cfg = config("exact", 7)
    sc = DiffusionScorer(cfg, close_call_engine([]), LATENT)
    sched = RowScheduler(HostRows(sc, pos, 2), cfg)  # two slots for six images
    order = []
    for m in range(6):
        sched.submit(m, lat[m], cands[m], neg[m])
    assert sched.open == 6 and not sched.has_room
    for s in sched.drain():
        order.append(s.key)
        assert s.latency_s >= 0 and s.unet_seconds > 0
    assert sorted(order) == list(range(6)) and sched.open == 0
