"""ClassifierWorker (issues 22, 23, 33): the submit/future form gives classify's answers, a kept
answer never waits for a rethink, overload and deadlines are answered (never lost), close drains, a
rethink is answered while the fast path is busy. Every timing claim is checked on a fake clock, or
by holding one path and watching the other: no assertion reads the wall clock."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
from dbmef.errors import ConfigError
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.worker import ClassifierWorker, OverloadedError, WorkerConfig
from tests.conftest import needs_ort
from tests.runtime.conftest import FakeClock

pytestmark = needs_ort
WAIT = 120  # seconds a test waits for a future before it calls the worker stuck


@pytest.fixture(scope="module")
def digits():
    """48 test digits, their rethink flags at the bundle's protector, and a runtime at k = 5, V = 5
    (rethinks of a few hundred milliseconds each)."""
    split = demo_test_split()
    images = [np.asarray(render(a)) for a in split.images[:48]]
    rt = RuntimeSpec(str(demo_bundle_dir()), scoring={"k": 5, "votes": 5}, batch_size=8).build()
    want = rt.classify(images)
    yield rt, images, want
    rt.close()


def hold(monkeypatch, obj, name: str) -> tuple[threading.Event, threading.Event]:
    """Make ``obj.name`` wait for the returned ``release`` event; ``entered`` is set once it is called."""
    release, entered = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(WAIT), f"{name} was held for {WAIT} s"
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, held)
    return release, entered


def test_futures_give_classifys_answers_and_kept_answers_do_not_wait(digits, monkeypatch):
    """With the slow path's engine calls held, every kept answer arrives and no rethought one does;
    once released, every answer is classify's (labels, UNet evaluations, rethink flags)."""
    rt, images, want = digits
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=8), clock=FakeClock(tick=1e-4)) as w:
        release, entered = hold(monkeypatch, w.slow.executor, "launch")
        futures = w.submit_many(images)
        kept = [f for f, r in zip(futures, want) if not r.rethought]
        rethought = [f for f, r in zip(futures, want) if r.rethought]
        assert 0 < len(rethought) < len(futures)
        for f in kept:
            assert not f.result(timeout=WAIT).rethought
        assert entered.wait(WAIT) and not any(f.done() for f in rethought)  # held: none could be answered
        release.set()
        got = [f.result(timeout=WAIT) for f in futures]
    assert [g.label for g in got] == [r.label for r in want]
    assert [g.unet_evals for g in got] == [r.unet_evals for r in want]
    assert [g.rethought for g in got] == [r.rethought for r in want]
    assert w.stats.answered == len(images) and w.stats.rethought == len(rethought)


def test_overload_and_reject_are_answered_never_lost(digits, monkeypatch):
    """Batches of exactly the submitted images (a frozen clock: the fast path waits for a full batch)."""
    rt, images, want = digits
    slow = [im for im, r in zip(images, want) if r.rethought]
    fast_label = [r.backbone_label for r in want if r.rethought]
    one_batch = {"batch_wait_s": 1.0, "max_rethinking": 1}
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=4, **one_batch), clock=FakeClock()) as w:
        got = [f.result(timeout=WAIT) for f in w.submit_many(slow[:4])]  # one batch: only one may rethink
    assert sum(g.rethought for g in got) == 1
    assert [g.rethink_skipped for g in got if not g.rethought] == ["overloaded"] * 3
    assert all(g.label == b for g, b in zip(got, fast_label) if not g.rethought)  # the fast answer
    assert w.stats.rethink_skipped == {"overloaded": 3}

    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=3, on_overload="reject", **one_batch),
                          clock=FakeClock()) as w:
        outcomes = []
        for f in w.submit_many(slow[:3]):
            try:
                outcomes.append(f.result(timeout=WAIT).rethought)
            except OverloadedError:
                outcomes.append("rejected")
    assert sorted(map(str, outcomes)) == ["True", "rejected", "rejected"]

    w = ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=1, max_queued=2), clock=FakeClock(tick=1e-4))
    release, entered = hold(monkeypatch, rt.pipeline, "fast_path")
    try:
        first = w.submit(slow[0])
        assert entered.wait(WAIT)  # the fast thread holds the first request
        w.submit(slow[0])
        w.submit(slow[0])  # two wait: the queue is full
        with pytest.raises(OverloadedError, match="max_queued"):
            w.submit(slow[0])
        release.set()
        assert first.result(timeout=WAIT).label == next(r.label for r in want if r.rethought)
    finally:
        release.set()
        w.close()


def test_a_deadline_the_slow_path_cannot_meet_gets_the_fast_answer(digits, monkeypatch):
    """On a fake clock where every engine call takes one second: a rethink needs hundreds of rows at
    1/64 s each, so a deadline of 0.5 s is skipped at admission and one of an hour is met."""
    rt, images, want = digits
    slow = [im for im, r in zip(images, want) if r.rethought]
    clock = FakeClock()
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=1), clock=clock) as w:
        launch = w.slow.executor.launch

        def one_second_call(rows):
            clock.advance(1.0)
            return launch(rows)

        monkeypatch.setattr(w.slow.executor, "launch", one_second_call)
        first = w.submit(slow[0]).result(timeout=WAIT)  # one measured rethink: the worker knows its speed
        late = [w.submit(im, deadline_s=0.5).result(timeout=WAIT) for im in slow[:3]]
        met = w.submit(slow[1], deadline_s=3600.0).result(timeout=WAIT)
    assert first.rethought and met.rethought and met.label == [r.label for r in want if r.rethought][1]
    assert [g.rethink_skipped for g in late] == ["deadline"] * 3 and not any(g.rethought for g in late)
    assert [g.label for g in late] == [r.backbone_label for r in want if r.rethought][:3]
    assert w.stats.rethink_skipped == {"deadline": 3}


def test_reject_mode_refuses_a_rethink_that_runs_past_its_deadline(digits, monkeypatch):
    """Issue 35's probe: under on_overload="reject" a rethink admitted (no speed measured yet) that
    then runs past its deadline was answered 200 with rethink_skipped "deadline"; the contract is
    OverloadedError (503)."""
    rt, images, want = digits
    slow = [im for im, r in zip(images, want) if r.rethought]
    clock = FakeClock()
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=1, on_overload="reject"), clock=clock) as w:
        launch = w.slow.executor.launch

        def one_second_call(rows):
            clock.advance(1.0)
            return launch(rows)

        monkeypatch.setattr(w.slow.executor, "launch", one_second_call)
        late = w.submit(slow[0], deadline_s=2.0)
        with pytest.raises(OverloadedError, match="deadline"):
            late.result(timeout=WAIT)
    assert w.stats.rejected == 1 and w.stats.rethink_skipped == {}


def test_metrics_say_not_ready_before_the_worker_exists():
    pytest.importorskip("prometheus_client")
    from dbmef.cluster.metrics import ServiceMetrics

    text = ServiceMetrics().render().decode()
    assert "dbmef_ready 0.0" in text


def test_close_answers_everything_already_taken(digits):
    rt, images, want = digits
    w = ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=8), clock=FakeClock(tick=1e-4))
    futures = w.submit_many(images[:16])
    w.close()
    assert all(f.done() for f in futures)
    assert [f.result().label for f in futures] == [r.label for r in want[:16]]
    with pytest.raises(OverloadedError, match="shutting down"):
        w.submit(images[0])


def test_a_rethink_is_answered_while_the_fast_path_is_busy(digits, monkeypatch):
    """Liveness: the fast thread is held inside a batch (so more rows are always 'coming'), and the
    one rethought image must still be answered: its last engine call, which would not be full, waits
    for the fast path at most fill_wait_s (on a fake clock that moves 1 ms per reading), then goes
    padded. With an unbounded fill wait this test fails: the rethink waits for the held fast path."""
    rt, images, want = digits
    slow_i = next(j for j, r in enumerate(want) if r.rethought)
    kept = next(im for im, r in zip(images, want) if not r.rethought)
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=1, fill_wait_s=0.05),
                          clock=FakeClock(tick=1e-3)) as w:
        rethink = w.submit(images[slow_i])
        while w.stats.fast_batches < 1:  # its fast path has run: the image is on the slow path
            threading.Event().wait(0.01)
        release, entered = hold(monkeypatch, rt.pipeline, "fast_path")
        busy = w.submit(kept)
        assert entered.wait(WAIT)
        try:
            answer = rethink.result(timeout=WAIT)
            fast_still_held = not busy.done()
        finally:
            release.set()
        busy.result(timeout=WAIT)
    assert fast_still_held and answer.rethought and answer.label == want[slow_i].label
    assert w.stats.scheduler["rows_padding"] + w.stats.scheduler["rows_ahead"] > 0  # the held call went padded


def test_worker_config_refuses_bad_values():
    for bad in ({"batch_size": 0}, {"max_queued": 0}, {"fill_wait_s": math.inf}, {"batch_wait_s": -1.0},
                {"deadline_s": 0.0}, {"on_overload": "drop"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            WorkerConfig(**bad)


def _png(a: np.ndarray, side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).resize((side, side), Image.Resampling.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def test_a_large_image_is_decoded_in_its_lane_and_small_ones_do_not_wait(digits, monkeypatch):
    """An image over HEAVY_PIXELS is decoded by the decode lane: while its decoding is held back,
    small requests submitted after it are answered; once released, its answer is classify's for
    the same bytes (the fast path read no pixels of it), and a truncated large PNG gets an error."""
    import threading

    import dbmef.runtime.worker as worker_mod

    rt, images, want = digits
    monkeypatch.setattr(worker_mod, "HEAVY_PIXELS", 40 * 40)
    rethought = next(im for im, r in zip(images, want) if r.rethought)
    big = [_png(rethought, 64), _png(images[0], 48)]
    truncated = big[0][: len(big[0]) // 2]
    release = threading.Event()
    real = rt.pipeline.preprocess

    def held(src, name=None):
        release.wait(120)
        return real(src, name)

    monkeypatch.setattr(rt.pipeline, "preprocess", held)
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=8), clock=FakeClock(tick=1e-4)) as w:
        large = w.submit_many([*big, truncated])
        small = w.submit_many(images[:8])
        got = [f.result(timeout=300) for f in small]  # answered while the large ones are held
        held_back = [f.done() for f in large]
        queued = w.stats.decode_queue
        release.set()
        got_large = [f.result(timeout=300) for f in large]
    assert held_back == [False, False, False] and queued == 3
    assert [g.label for g in got] == [r.label for r in want[:8]]
    monkeypatch.undo()
    ref = rt.classify(big)
    assert ref[0].rethought  # the rethought digit, upscaled, is still rethought: the VAE input came from the lane
    for g, r in zip(got_large, ref):
        assert (g.label, g.rethought, g.unet_evals, g.topk) == (r.label, r.rethought, r.unet_evals, r.topk)
        assert g.noise_errors == r.noise_errors
    assert got_large[2].error and "not a readable image" in got_large[2].error
