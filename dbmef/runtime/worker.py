"""``ClassifierWorker``: a thread-safe submit/future front of a pipeline, for services.

Two threads share the work, so a kept answer never waits for somebody else's rethink:

    submit() --> intake queue --> [fast thread]  decode, backbone, gate (batches of requests)
                                     |  kept answers: future resolved here, at once
                                     v  rethought: VAE latent + negative embeddings
                                  handoff --> [slow thread]  one RowScheduler, one engine call at a
                                                             time; each future resolved when its
                                                             image settles

An encoded image whose header declares more than ``HEAVY_PIXELS`` goes first to a third thread,
the decode lane, which decodes it once and preprocesses it for both models (one such picture in
memory at a time); the fast path then reads no pixels of it. Seconds of decoding one 64 M-pixel PNG
would otherwise hold up every small request in its batch and the batches behind it.

The fast thread batches what is waiting (up to ``batch_size``, waiting at most ``batch_wait_s``
for more after the first request); the slow thread drives one ``SlowPath``: it feeds every engine
call with the rows of all open images and holds a call that would not be full while the fast thread
is producing more, for at most ``fill_wait_s`` (then pads it: under steady load the fast path is
always busy, and an unbounded wait would starve the rows already waiting).
Answers are the runtime's: an image's answer depends on its pixels and its top-k only.

Overload is bounded, never silent: at most ``max_queued`` requests wait for the fast path
(``submit`` raises ``OverloadedError`` beyond) and at most ``max_rethinking`` images wait for or
are in the slow path; past that, or when a request's deadline cannot be met by the slow path,
the request gets its fast answer with ``rethink_skipped`` saying why (or ``OverloadedError``
with ``on_overload="reject"``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from dbmef.runtime.config import WorkerConfig
from dbmef.runtime.pipeline import DBMEFPipeline
from dbmef.runtime.preprocess import ImageInput, Preprocessed, header_pixels
from dbmef.runtime.results import Batch, ImageResult
from dbmef.runtime.worker_stats import OverloadedError, WorkerObserver, WorkerStats

__all__ = ["ClassifierWorker", "OverloadedError", "WorkerConfig", "WorkerObserver", "WorkerStats"]

log = logging.getLogger(__name__)


@dataclass
class _Request:
    index: int
    image: ImageInput | Preprocessed
    name: str
    future: Future
    submitted: float
    deadline: float | None  # clock reading; None: no deadline


@dataclass
class _SlowItem:
    req: _Request
    batch: Batch
    row: int
    latent: np.ndarray
    negatives: np.ndarray | None  # None in zero-shot mode (no negative condition)
    handed: float  # when the fast path handed it over


# Past this many declared pixels (2048 x 2048) an encoded image is decoded in the decode lane: on the
# 2-core machine a 64 M-pixel PNG takes about 1.6 s to decode and preprocess, a digit under 1 ms.
HEAVY_PIXELS = 4 << 20
class ClassifierWorker:
    """``submit(image) -> Future[ImageResult]`` over ``pipeline`` (a ``DBMEFPipeline``; a
    ``DBMEFRuntime``'s is ``runtime.pipeline``) with ``config`` (``WorkerConfig``). Starts on
    construction; ``close`` drains. observer: per-stage hooks (the service's metrics). clock: a
    monotonic clock in seconds for every latency, deadline and wait (tests pass a fake one).
    """

    def __init__(self, pipeline: DBMEFPipeline, config: WorkerConfig | None = None, *,
                 observer: WorkerObserver | None = None, clock: Callable[[], float] = time.perf_counter):
        self.pipe = pipeline
        self.config = c = config or WorkerConfig()
        self.clock = clock
        self.observer = observer or WorkerObserver()
        self.stats = WorkerStats()
        mutex = threading.RLock()  # one lock, two wait sets: the decode lane is not woken by every request
        self._lock = threading.Condition(mutex)
        self._intake: deque[_Request] = deque()
        self._heavy: deque[_Request] = deque()  # for the decode lane
        self._heavy_ready = threading.Condition(mutex)
        self._lane_req: _Request | None = None  # the one the decode lane is decoding (taken from _heavy)
        self._handoff: deque[_SlowItem] = deque()
        self._fast_busy = False
        self._closing = False
        self._count = 0
        self._fast_done = False
        self._open_items: dict[int, _SlowItem] = {}  # in the slow path, by request index (slow thread only)
        self._row_seconds = math.nan  # recent engine seconds per row (deadline estimates)
        self.slow = pipeline.slow_path(fill_wait_s=c.fill_wait_s, clock=clock)
        self._threads = [threading.Thread(target=self._guard(loop), name=f"dbmef-{name}", daemon=True)
                         for name, loop in (("fast", self._fast_loop), ("slow", self._slow_loop),
                                            ("decode", self._decode_loop))]
        for t in self._threads:
            t.start()

    # -- the caller's side -------------------------------------------------------------------------
    def submit(self, image: ImageInput, name: str | None = None, deadline_s: float | None = None) -> Future:
        """Queue one image; the future resolves to its ``ImageResult`` (``error`` set when it cannot
        be read). ``deadline_s``: seconds from now the caller will wait (overrides the default)."""
        now = self.clock()
        limit = deadline_s if deadline_s is not None else self.config.deadline_s
        heavy = header_pixels(image) > HEAVY_PIXELS
        with self._lock:
            if self._closing:
                raise OverloadedError("the worker is shutting down; send the request to another replica")
            if len(self._intake) + self._decoding >= self.config.max_queued:
                self.stats.rejected += 1
                raise OverloadedError(f"{len(self._intake) + self._decoding} requests already wait for the fast "
                                      "path (max_queued); retry later or add replicas")
            fut: Future = Future()
            req = _Request(self._count, image, name or f"request {self._count}", fut, now,
                           None if limit is None else now + limit)
            self._count += 1
            self.stats.submitted += 1
            if heavy:
                self._heavy.append(req)
                self._heavy_ready.notify()
            else:
                self._intake.append(req)
            self.stats.fast_queue, self.stats.decode_queue = len(self._intake), self._decoding
            self._lock.notify_all()
        return fut

    def submit_many(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                    deadline_s: float | None = None) -> list[Future]:
        return [self.submit(im, names[j] if names else None, deadline_s) for j, im in enumerate(images)]

    @property
    def alive(self) -> bool:
        """Whether both threads run (a dead one is a bug: ``_guard`` failed every waiting request)."""
        return all(t.is_alive() for t in self._threads)

    @property
    def _decoding(self) -> int:
        """Requests the decode lane holds: queued, and the one it is decoding. Read under the lock."""
        return len(self._heavy) + (self._lane_req is not None)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing being computed."""
        with self._lock:
            return not (self._intake or self._decoding or self._handoff or self._fast_busy or self.slow.busy)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, answer every one already taken, stop the threads."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            self._heavy_ready.notify_all()
        for t in self._threads:
            t.join(timeout)
        self.slow.close()

    def __enter__(self) -> ClassifierWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the threads -------------------------------------------------------------------------------
    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as exc:  # a bug must not leave callers waiting forever
                log.exception("dbmef worker thread %s died", threading.current_thread().name)
                self._fail_all(exc)

        return run

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._closing = True
            lane = [self._lane_req] if self._lane_req is not None else []
            pending = [r.future for r in (*self._intake, *self._heavy, *lane)] + [i.req.future for i in self._handoff]
            self._intake.clear()
            self._heavy.clear()
            self._lane_req = None
            self._handoff.clear()
            self._lock.notify_all()
            self._heavy_ready.notify_all()
        for f in pending + [item.req.future for item in list(self._open_items.values())]:
            if not f.done():
                f.set_exception(exc)

    def _take_batch(self) -> list[_Request] | None:
        with self._lock:
            while not self._intake:
                if self._closing and not self._decoding:  # the decode lane may still hand some over
                    return None
                self._lock.wait()
            size, wait = self.config.batch_size, self.config.batch_wait_s
            if len(self._intake) < size and wait > 0:
                end = self.clock() + wait
                while len(self._intake) < size and not self._closing and (left := end - self.clock()) > 0:
                    self._lock.wait(left)
            reqs = [self._intake.popleft() for _ in range(min(size, len(self._intake)))]
            self._fast_busy = True
            self.stats.fast_queue = len(self._intake)
            return reqs

    def _decode_loop(self) -> None:
        """The decode lane: large images one at a time, decoded and preprocessed, then queued for
        the fast path in arrival order among themselves."""
        while True:
            with self._lock:
                while not self._heavy:
                    if self._closing:
                        return
                    self._heavy_ready.wait()
                req = self._lane_req = self._heavy.popleft()
            t0 = self.clock()
            req.image = self.pipe.preprocess(req.image, req.name)  # type: ignore[arg-type]
            lane = self.stats.stage_seconds
            lane["decode_lane"] = lane.get("decode_lane", 0.0) + self.clock() - t0
            with self._lock:
                if self._lane_req is not req:  # _fail_all answered it meanwhile
                    continue
                self._lane_req = None
                self._intake.append(req)
                self.stats.fast_queue, self.stats.decode_queue = len(self._intake), self._decoding
                self._lock.notify_all()

    def _fast_loop(self) -> None:
        while (reqs := self._take_batch()) is not None:
            try:
                self._fast(reqs)
            finally:
                with self._lock:
                    self._fast_busy = False
                    self._lock.notify_all()
        with self._lock:  # nothing more will come: the slow thread may finish
            self._fast_done = True
            self._lock.notify_all()

    def _fast(self, reqs: list[_Request]) -> None:
        pipe = self.pipe
        started = self.clock()  # on the worker's clock, like every request's submission
        try:
            batch = pipe.fast_path([r.image for r in reqs], [r.name for r in reqs])
        except Exception as exc:
            for r in reqs:
                r.future.set_exception(exc)
            return
        batch.submitted[:] = [r.submitted for r in reqs]
        batch.index[:] = [r.index for r in reqs]
        self.stats.fast_batches += 1
        self.observer.fast_batch(len(reqs), [started - r.submitted for r in reqs])
        idx = pipe.to_rethink(batch)
        slow = set(int(i) for i in idx)
        now = self.clock()
        for i, r in enumerate(reqs):
            if i not in slow:
                batch.latency[i] = now - r.submitted
                self._answer(r, batch.result(i, pipe.class_names))
        keep: list[int] = []
        for i in map(int, idx):
            if self._admit_slow(reqs[i], batch, i, len(keep)):
                keep.append(i)
        if keep:
            latents, neg = pipe.slow_inputs(batch, np.array(keep, np.int64))
            with self._lock:
                for j, i in enumerate(keep):
                    self._handoff.append(_SlowItem(reqs[i], batch, i, latents[j], None if neg is None else neg[j],
                                                   self.clock()))
                self.stats.slow_queue = len(self._handoff)
                self._lock.notify_all()

    def _admit_slow(self, req: _Request, batch: Batch, row: int, also: int) -> bool:
        """Whether the slow path takes this image (``also``: images of its batch taken before it);
        if not, it is answered now with its fast label."""
        reason = None
        with self._lock:
            waiting = len(self._handoff) + self.slow.open + also
        if waiting >= self.config.max_rethinking:
            reason = "overloaded"
        elif req.deadline is not None and self._finish_estimate(waiting) > req.deadline:
            reason = "deadline"
        if reason is None:
            return True
        self._refuse(req, batch, row, reason, f"the slow path cannot rethink this image ({reason}: {waiting} images "
                                              "ahead); retry later")
        return False

    def _refuse(self, req: _Request, batch: Batch, row: int, reason: str, message: str) -> None:
        """A rethink the service will not finish: ``OverloadedError`` (503) under ``on_overload =
        "reject"``, else the fast answer with ``rethink_skipped``."""
        if self.config.on_overload == "reject":
            self.stats.rejected += 1
            req.future.set_exception(OverloadedError(message))
        else:
            self._skip(req, batch, row, reason)

    def _skip(self, req: _Request, batch: Batch, row: int, reason: str) -> None:
        """Answer a rethought image with its fast label, saying why it was not rethought."""
        self.stats.rethink_skipped[reason] = self.stats.rethink_skipped.get(reason, 0) + 1
        batch.latency[row] = self.clock() - req.submitted
        res = batch.result(row, self.pipe.class_names)
        res.rethought, res.rethink_skipped = False, reason
        self._answer(req, res)

    def _finish_estimate(self, images_ahead: int) -> float:
        """When a rethink submitted now would end, served oldest first: the rows of the images
        ahead and its own (the mean rows per settled image so far, else the full method's) at the
        recent engine seconds per row."""
        if math.isnan(self._row_seconds):
            return -math.inf  # nothing measured yet: admit
        st = self.slow.stats
        per_image = st.rows_needed / st.images if st.images else self.pipe.config.unet_evaluations_per_image / 2
        return self.clock() + (images_ahead + 1) * per_image * self._row_seconds

    def _slow_loop(self) -> None:
        slow = self.slow
        while True:
            with self._lock:
                while not self._handoff and not slow.busy:
                    if self._closing and self._fast_done:
                        return
                    self._lock.wait()
                for it in self._handoff:  # under the lock: the fast thread counts what waits
                    self._open_items[it.req.index] = it
                    slow.submit(it.req.index, it.latent, it.batch.top[it.row], it.negatives,
                                submitted=float(it.batch.submitted[it.row]), probs=it.batch.top_p[it.row])
                self._handoff.clear()
                coming = bool(self._intake or self._fast_busy)  # the fast thread may be about to hand over rows
            self.stats.slow_queue, self.stats.slow_open = 0, slow.open
            self._drop_late()
            if slow.busy:
                self._step(coming)

    def _step(self, coming: bool) -> None:
        """One step of the slow path; if it held its call back for the rows ``coming``, wait for
        them (or for its fill deadline) instead."""
        slow = self.slow
        t0, calls = self.clock(), slow.stats.engine_calls
        settled = slow.step(more_coming=coming)
        for s in settled:
            item = self._open_items.pop(s.key)  # type: ignore[call-overload]
            item.batch.settle(item.row, s)
            self.observer.slow_wait(s.first_sent - item.handed)
            self.stats.rethought += 1
            self.stats.unet_evals += s.unet_evals
            self._answer(item.req, item.batch.result(item.row, self.pipe.class_names))
        done = slow.stats.engine_calls - calls
        if done:
            secs = (self.clock() - t0) / (done * slow.scheduler.rows_per_call)
            self._row_seconds = secs if math.isnan(self._row_seconds) else 0.8 * self._row_seconds + 0.2 * secs
        self.stats.scheduler = slow.stats.to_dict()
        self.stats.slow_open = slow.open
        deadline = slow.fill_deadline
        if deadline is not None and not settled and not done:
            with self._lock:  # held back: sleep until the fast thread hands rows over, or the deadline
                if not self._handoff and (left := deadline - self.clock()) > 0:
                    self._lock.wait(left)

    def _drop_late(self) -> None:
        """Answer the open images whose deadline has passed with their fast label (their callers
        would time out otherwise) and drop them from the scheduler."""
        now = self.clock()
        for key, it in list(self._open_items.items()):
            if it.req.deadline is not None and now > it.req.deadline and self.slow.cancel(key):
                del self._open_items[key]
                self._refuse(it.req, it.batch, it.row, "deadline", "the rethink did not finish before the request's "
                             "deadline; retry later, or with a longer timeout")

    def _answer(self, req: _Request, result: ImageResult) -> None:
        self.observer.answered(result)
        self.stats.answered += 1
        if result.error:
            self.stats.failed += 1
        for stage, secs in result.timings.items():
            self.stats.stage_seconds[stage] = self.stats.stage_seconds.get(stage, 0.0) + secs
        if not req.future.done():
            req.future.set_result(result)
