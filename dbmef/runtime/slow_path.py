"""``SlowPath``: the one driver of the slow path. A ``RowScheduler`` decides each engine call, an
``Executor`` runs it; this loop joins them, and every caller uses it: ``DBMEFPipeline.rethink``
(``classify`` of a batch, ``eval --ray``'s rethink actors, the export's decision check),
``DBMEFPipeline.stream`` (``classify``, ``eval``, ``calibrate``) and the ``ClassifierWorker``'s slow
thread (``dbmef serve``).

    submit(key, latent, candidates, negatives)        an image's inputs, held until it has a slot
    step(more_coming) -> [Settled]                    plan calls (scheduler.schedule), load the images
                                                      they name, launch them (executor), collect the
                                                      oldest, apply its errors (scheduler.update)
    drain() -> Iterator[Settled]                      step until every submitted image is settled
    run(latents, candidates, negatives) -> [Settled]  M images together: submit each, drain
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.row_scheduler import EngineCall, RowScheduler, SchedulerStats, Settled
from dbmef.runtime.scorer import Executor

__all__ = ["SlowPath"]


class SlowPath:
    """Rethinks images on ``executor`` under ``config``, through one ``RowScheduler`` sized from the
    executor (its slots, its calls in flight, its rows per call).

    rows_ahead, fill_wait_s, clock: the scheduler's (``RowScheduler``). progress: called with the
    real rows of each call as it completes. Single-threaded; close it (or use it as a context
    manager) to release the executor's tables.
    """

    def __init__(self, executor: Executor, config: ScoringConfig, *, rows_ahead: bool = True,
                 fill_wait_s: float = math.inf, progress: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.executor = executor
        self.scheduler = RowScheduler(config, executor.capacity, depth=executor.depth,
                                      evals_per_row=executor.evals_per_row, rows_ahead=rows_ahead,
                                      fill_wait_s=fill_wait_s, clock=clock)
        self.progress = progress
        self._inputs: dict[Hashable, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}  # until loaded into a slot
        self._inflight: deque[tuple[EngineCall, Any]] = deque()

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    @stats.setter
    def stats(self, stats: SchedulerStats) -> None:
        """Count into ``stats`` (a caller's object that outlives this driver)."""
        self.scheduler.stats = stats

    @property
    def open(self) -> int:
        return self.scheduler.open

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def wants_images(self) -> bool:
        """Submit more images before the next step, if any are at hand (``RowScheduler.wants_images``)."""
        return self.scheduler.wants_images

    @property
    def fill_deadline(self) -> float | None:
        """While a call is held back for coming images, when it goes anyway (``RowScheduler``)."""
        return self.scheduler.fill_deadline

    def submit(self, key: Hashable, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None,
               submitted: float | None = None, probs: np.ndarray | None = None) -> None:
        """Queue one image: latent (4,h,w), candidates (k,) class ids, negatives (k,L,D) (None in
        zero-shot mode); ``submitted``: its clock reading for latency (default now); ``probs``: the
        candidates' (k,) backbone probabilities (the fused decision needs them)."""
        self._inputs[key] = (latent, candidates, negatives)
        self.scheduler.submit(key, candidates, submitted, probs)

    def cancel(self, key: Hashable) -> bool:
        """Drop an open image (see ``RowScheduler.cancel``)."""
        self._inputs.pop(key, None)
        return self.scheduler.cancel(key)

    def step(self, more_coming: bool = False) -> list[Settled]:
        """Launch the calls the scheduler plans now and collect the oldest one in flight: the images
        it settled ([] when nothing ran: a call is held back for the images ``more_coming``)."""
        sched, ex = self.scheduler, self.executor
        while (call := sched.schedule(more_coming)) is not None:
            for slot, key in call.loads:
                ex.load(slot, *self._inputs.pop(key))
            self._inflight.append((call, ex.launch(call.rows)))
        if not self._inflight:
            return []
        call, ticket = self._inflight.popleft()
        errors = ex.collect(ticket)  # (rows_per_call,)
        sched.stats.host_syncs = ex.syncs
        settled = sched.update(call, errors)
        if self.progress is not None:
            self.progress(call.real)
        return settled

    def drain(self) -> Iterator[Settled]:
        """Run until every submitted image is settled, yielding each as it settles."""
        while self.busy:
            yield from self.step()

    def run(self, latents: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None,
            submitted: np.ndarray | None = None, probs: np.ndarray | None = None) -> list[Settled]:
        """M images together (latents (M,4,h,w), candidates (M,k), negatives (M,k,L,D) or None,
        ``submitted`` (M,) clock readings, ``probs`` (M,k) the candidates' backbone probabilities):
        ``submit`` each (keyed by its position) and ``drain``. Their ``Settled``, in input order."""
        m_count = len(latents)
        for m in range(m_count):
            self.submit(m, latents[m], candidates[m], None if negatives is None else negatives[m],
                        None if submitted is None else float(submitted[m]), None if probs is None else probs[m])
        out: list[Settled | None] = [None] * m_count
        for s in self.drain():
            out[s.key] = s  # type: ignore[call-overload]
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Collect the calls still in flight (their answers are dropped) and release the executor."""
        while self._inflight:
            self.executor.collect(self._inflight.popleft()[1])
        self.executor.close()

    def __enter__(self) -> SlowPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
