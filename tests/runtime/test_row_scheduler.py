"""The row scheduler (issues 22, 33): whatever the arrival order, the company, the engine batch or the
window, every image gets the rows and the answer the frozen pre-scheduler planner gives it on the
same errors; engine calls are full but at the end; rows evaluated ahead are only ever used when
asked for; the accounting adds up. The scheduler is pure (it never calls an engine), so most of
this runs it alone on errors computed in the test; its launch-or-pad policy runs on a fake clock."""

import math

import numpy as np
import pytest

from dbmef.apps.lockstep import score_lockstep
from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ImagePlan
from dbmef.runtime.replay import replay
from dbmef.runtime.row_scheduler import RowScheduler
from dbmef.runtime.scorer import DiffusionScorer, HostRows
from dbmef.runtime.slow_path import SlowPath
from tests.runtime.conftest import LATENT, FakeClock, close_call_engine, full_errors
from tests.runtime.conftest import make_problem as problem
from tests.runtime.planner_v1 import replay_v1

# "adaptive" is the family the frozen planner knows (vote rounds, each candidate's own variance);
# "adaptive-all" is issue 39's (every vote at once, spread orders, stratified variance), whose
# reference is the per-image plan replayed over the full errors (checked by hand in
# test_sequential_tests.py).
FROZEN_MODES = ("off", "exact", "adaptive")
MODES = (*FROZEN_MODES, "adaptive-all")


def config(mode: str, batch: int = 7) -> ScoringConfig:
    family = ({"exit_votes_open": "all", "exit_variance": "stratified"} if mode == "adaptive-all" else
              {"exit_votes_open": "rounds", "exit_variance": "candidate"})
    return ScoringConfig(k=4, n_timesteps=6, votes=5, unet_batch=batch, early_exit=mode.split("-")[0], exit_z=1.0,
                         exit_interval=2, exit_min_rows=4, **family)


def reference(full: np.ndarray, mode: str):
    return replay_v1(full, config(mode).exit_policy) if mode in FROZEN_MODES else replay(full, config(mode).exit_policy)


def errors_of(call, slot_image: dict[int, int], full: np.ndarray) -> np.ndarray:
    """A call's errors read off the full error tensor (M, V, n, k): what an engine would return."""
    s, v, i, c = call.rows.T
    return full[[slot_image[x] for x in s], v, i, c]


@pytest.mark.parametrize("mode", FROZEN_MODES)
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
def test_the_scheduler_alone_any_arrival_order_company_batch_window_and_depth(mode):
    """No engine: each call's errors come from the error tensor. Images arrive a few between calls,
    the caller says randomly whether more are coming, the executor holds 1 or 2 calls in flight."""
    M = 20
    rng = np.random.default_rng(5)
    full = rng.gamma(2.0, 0.1, size=(M, 5, 6, 4)).astype(np.float32)
    ties = rng.random(M) < 0.3
    full[ties] = np.round(full[ties] * 4) / 4  # some images full of ties
    want = reference(full, mode)
    for trial in range(12):
        batch = int(rng.choice([1, 3, 7, 16, 64]))
        sched = RowScheduler(config(mode, batch), int(rng.integers(1, M + 1)), depth=int(rng.integers(1, 3)),
                             rows_ahead=trial % 2 == 0)
        arrivals, got, slot_image, inflight = list(rng.permutation(M)), {}, {}, []
        while arrivals or sched.busy:
            for _ in range(int(rng.integers(0, 4))):  # a few new images between engine calls
                if arrivals:
                    sched.submit(int(arrivals.pop(0)), np.arange(4))
            more = bool(arrivals) and bool(rng.random() < 0.7)
            while (call := sched.schedule(more_coming=more)) is not None:
                assert len(call.rows) == batch and 0 < call.real <= batch
                slot_image.update(call.loads)  # an image is loaded before any call that holds its rows
                assert set(call.rows[:, 0].tolist()) <= set(slot_image)
                inflight.append(call)
            assert len(inflight) <= sched.depth
            if inflight:
                call = inflight.pop(0)
                for s in sched.update(call, errors_of(call, slot_image, full)):
                    assert s.key not in got
                    got[s.key] = s
        assert sorted(got) == list(range(M))
        assert [got[m].winner for m in range(M)] == list(want.winner), (trial, batch)
        assert [got[m].rows for m in range(M)] == list(want.rows)
        np.testing.assert_array_equal(np.stack([got[m].errors for m in range(M)]), want.per_vote_errors())
        np.testing.assert_array_equal(np.stack([got[m].votes for m in range(M)]), want.vote_counts())
        st = sched.stats
        # every row sent is a row asked for (sent then or ahead), a row ahead never asked for, or padding
        assert st.rows_sent == st.rows_needed - st.rows_ahead_used + st.rows_ahead + st.rows_padding
        assert st.rows_sent == st.engine_calls * batch and st.rows_needed == want.rows.sum() and st.images == M
        if trial % 2:
            assert st.rows_ahead == 0


@pytest.mark.parametrize("mode", MODES)
def test_the_slow_path_on_an_engine_gives_the_frozen_planners_answers(mode):
    """The driver over a real executor and engine: same answers, every call of the engine's one shape."""
    M = 20
    lat, cands, pos, neg = problem(M=M, seed=4)
    want = reference(full_errors(config(mode), cands, pos, neg), mode)
    rng = np.random.default_rng(5)
    for trial in range(4):
        batch = int(rng.choice([1, 7, 64]))
        cfg = config(mode, batch)
        sc = DiffusionScorer(cfg, close_call_engine(calls := []), LATENT)
        slow = SlowPath(HostRows(sc, pos, int(rng.integers(1, M + 1))), cfg, rows_ahead=trial % 2 == 0)
        arrivals, got = list(rng.permutation(M)), {}
        while arrivals or slow.busy:
            for _ in range(int(rng.integers(0, 4))):
                if arrivals:
                    m = int(arrivals.pop(0))
                    slow.submit(m, lat[m], cands[m], neg[m])
            got.update((s.key, s) for s in slow.step(more_coming=bool(arrivals) and bool(rng.random() < 0.7)))
        slow.close()
        assert [got[m].winner for m in range(M)] == list(want.winner)
        assert [got[m].rows for m in range(M)] == list(want.rows)
        assert set(calls) == {batch} and slow.stats.engine_calls == len(calls)


def test_calls_are_full_until_the_stream_ends_and_fewer_than_the_batch_synchronous_baseline():
    """Submitting everything up front: only the last calls (the stream's tail) can hold padding or
    rows ahead; the batch-synchronous baseline pads every stage, so it makes more calls."""
    lat, cands, pos, neg = problem(M=30, seed=9)
    cfg = config("adaptive", 16)
    want = replay(full_errors(cfg, cands, pos, neg), cfg.exit_policy)
    sc = DiffusionScorer(cfg, close_call_engine([]), LATENT)
    slow = SlowPath(sc.executor(pos, 30), cfg)
    for m in range(30):
        slow.submit(m, lat[m], cands[m], neg[m])
    fill, got = [], {}
    while slow.busy:
        before = slow.stats.rows_padding + slow.stats.rows_ahead
        got.update((s.key, s) for s in slow.step())
        fill.append(slow.stats.rows_padding + slow.stats.rows_ahead - before)
    assert slow.stats.rows_needed == want.rows.sum()
    np.testing.assert_array_equal(np.stack([got[m].errors for m in range(30)]), want.per_vote_errors())
    first_gap = next(j for j, f in enumerate(fill) if f)
    assert first_gap >= len(fill) - want.stages  # only the tail, where fewer images are left
    assert slow.stats.rows_ahead_used > 0  # rows ahead were asked for later, and taken as they were
    sync, sync_stats = score_lockstep(sc, pos, lat, cands, neg)
    assert [s.winner for s in sync] == list(want.winner) and sync_stats.rows_needed == want.rows.sum()
    assert sync_stats.engine_calls == sum(-(-r // 16) for r in want.stage_rows) > slow.stats.engine_calls


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
    """Two slots, six images: each image is loaded once, into a slot another image has left."""
    rng = np.random.default_rng(1)
    full = rng.gamma(2.0, 0.1, size=(6, 5, 6, 4)).astype(np.float32)
    clock = FakeClock(tick=0.25)
    sched = RowScheduler(config("exact", 7), 2, clock=clock)
    for m in range(6):
        sched.submit(m, np.arange(4))
    assert sched.open == 6 and not sched.has_room
    slot_image, loads, order = {}, [], []
    while sched.busy:
        call = sched.schedule()
        slot_image.update(call.loads)
        loads += [key for _, key in call.loads]
        for s in sched.update(call, errors_of(call, slot_image, full)):
            order.append(s.key)
            assert s.latency_s > 0 and s.unet_seconds > 0 and s.first_sent >= s.submitted
    assert sorted(order) == list(range(6)) and sorted(loads) == list(range(6)) and sched.open == 0
    assert order[:2] == [0, 1]  # the oldest images leave first


def test_a_call_that_would_not_be_full_waits_for_coming_images_at_most_fill_wait_s():
    """The launch-or-pad policy, on a fake clock: a full call goes at once; a call that would not be
    full is held while the caller says images are coming and one would get a slot, until fill_wait_s
    has passed; with no room, or nothing coming, it is padded at once."""
    clock = FakeClock()
    sched = RowScheduler(config("off", 64), 4, fill_wait_s=0.05, clock=clock)
    sched.submit("a", np.arange(4))  # off: 5 votes x 6 timesteps x 4 candidates = 120 rows
    assert sched.waiting_rows == 120 and not sched.wants_images
    first = sched.schedule(more_coming=True)
    assert first is not None and first.real == 64  # full: no reason to wait
    sched.update(first, np.zeros(64, np.float32))
    assert sched.wants_images  # 56 rows wait and there is room
    assert sched.schedule(more_coming=True) is None
    assert sched.fill_deadline == pytest.approx(clock.now + 0.05)
    clock.advance(0.049)
    assert sched.schedule(more_coming=True) is None  # still within the wait
    clock.advance(0.002)
    call = sched.schedule(more_coming=True)
    assert call is not None and call.real == 56 and sched.stats.rows_padding == 8  # off: one stage, nothing ahead
    assert sched.fill_deadline is None
    # nothing coming: padded at once; no room: padded at once, however long the fill wait
    lone = RowScheduler(config("off", 256), 2, fill_wait_s=math.inf, clock=clock)
    lone.submit("b", np.arange(4))
    assert lone.wants_images and lone.schedule(more_coming=False).real == 120
    full = RowScheduler(config("off", 256), 1, fill_wait_s=math.inf, clock=clock)
    full.submit("c", np.arange(4))
    assert not full.has_room and full.schedule(more_coming=True).real == 120
    with pytest.raises(ConfigError, match="fill_wait_s"):
        RowScheduler(config("off"), 1, fill_wait_s=-1.0)


def test_a_second_call_in_flight_only_when_full_of_rows_asked_for():
    sched = RowScheduler(config("off", 50), 4, depth=2)
    sched.submit("a", np.arange(4))  # 120 rows
    one, two = sched.schedule(), sched.schedule()
    assert one.real == two.real == 50 and sched.schedule() is None  # depth 2 reached
    sched.update(one, np.zeros(50, np.float32))
    assert sched.schedule() is None  # 20 rows wait: the next call would be padded while one is in flight
    sched.update(two, np.zeros(50, np.float32))
    three = sched.schedule()
    assert three.real == 20 and sched.stats.rows_padding == 30  # off has one stage: nothing ahead to take
    with pytest.raises(ConfigError, match="oldest call in flight"):
        sched.update(one, np.zeros(50, np.float32))


def test_a_cancelled_image_frees_its_slot_and_its_rows_are_dropped():
    sched = RowScheduler(config("off", 16), 1)
    sched.submit("a", np.arange(4))
    sched.submit("b", np.arange(4))
    call = sched.schedule()
    assert call.loads == ((0, "a"),)
    assert sched.cancel("a") and not sched.cancel("zzz")
    assert sched.update(call, np.zeros(16, np.float32)) == []  # a's rows come back and are dropped
    nxt = sched.schedule()
    assert nxt.loads == ((0, "b"),)  # b took a's slot
