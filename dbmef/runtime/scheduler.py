"""The row scheduler: the open images' next rows, oldest image first, onto full engine calls.

Every rethought image has its own plan (``early_exit.ImagePlan``): the rows of its current stage,
then, once they are all back, the rows of the next. The scheduler holds the open images in the
executor's slots and fills every engine call with ``unet_batch`` rows taken from any of them,
oldest first; after each call it hands each image the errors of its rows, and an image whose
stage is complete moves on (or settles and leaves at once, freeing its slot for a new image).

    call 1: [ img0 stage0 ........................ | img1 stage0 ..... ]   64 rows, all real
    call 2: [ img1 stage0 ... | img2 stage0 .......................... ]
    call 3: [ img0 stage1 ......... | img2 stage0 ... | img3 stage0 .. ]   img0 moved on after call 1
    ...
    last:   [ img9 stage4 .... | img9 ahead (speculative) ... | pad  ]   nothing else is coming

A call is padded only when fewer than ``unet_batch`` rows wait and the caller says nothing else
is coming (``flush``: the end of a stream, a lone request, a full window). Before padding, the
free places take rows an image's plan will ask for next if no candidate is dropped (``upcoming``):
they are kept per image and used only when its plan asks for exactly those rows, so no decision
changes; unused ones cost what padding would have.

An image's rows and answer depend on its own errors only (its plan never sees another image), so
answers are those of ``early_exit.replay`` whatever the arrival order, the company or the engine
batch. ``lockstep=True`` gives the earlier batch-synchronous schedule for comparison: every open
image's stage s, then every stage s+1, each stage's last call padded, nothing ahead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ImagePlan

__all__ = ["RowScheduler", "SchedulerStats", "Settled"]


@dataclass
class SchedulerStats:
    """Engine-level cost of what a scheduler ran, in rows (machine-independent)."""

    images: int = 0  # images settled
    engine_calls: int = 0
    rows_sent: int = 0  # engine_calls x unet_batch
    rows_needed: int = 0  # rows the settled images' plans asked for (their UNet evaluations / 2)
    rows_padding: int = 0  # repeated rows that fill a call nothing else could
    rows_speculative: int = 0  # rows sent before their plan asked for them
    rows_speculative_used: int = 0  # of those, asked for later (the rest cost what padding would)
    host_syncs: int = 0  # waits for the device (0 on the host path)

    @property
    def rows_sent_per_row_needed(self) -> float:
        return self.rows_sent / self.rows_needed if self.rows_needed else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_sent_per_row_needed": self.rows_sent_per_row_needed}


@dataclass
class Settled:
    """One image's answer. winner: candidate position; label: its class id; errors (V, k) per-vote
    mean errors (NaN where nothing was evaluated); votes (k,); rows: rows its plan asked for;
    stages: its plan's stages; unet_seconds / vote_seconds: its share of the engine calls / the
    time its plan took; submitted / settled: clock readings."""

    key: Any
    candidates: np.ndarray
    winner: int
    label: int
    errors: np.ndarray
    votes: np.ndarray
    rows: int
    stages: int
    unet_seconds: float
    vote_seconds: float
    submitted: float
    settled: float
    first_sent: float  # when its first row went into an engine call
    unet_evals: int  # rows x UNet evaluations per row (2: positive and negative; 1 at lam = 1)

    @property
    def latency_s(self) -> float:
        return self.settled - self.submitted


class _Job:
    """An image in the scheduler: its plan, its current stage and its rows evaluated ahead."""

    def __init__(self, key: Any, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None,
                 plan: ImagePlan, submitted: float):
        self.key, self.plan, self.submitted = key, plan, submitted
        self.candidates = np.asarray(candidates, np.int64)
        self.inputs: tuple[np.ndarray, np.ndarray | None] | None = (latent, negatives)  # until loaded
        self.slot = -1
        self.stage = np.empty((0, 3), np.int64)  # (S, 3) rows (v, i, c): to send first, then known
        self.err = np.empty(0, np.float32)  # (S,)
        self.n_send = self.sent = self.back = 0
        self.wave = 0
        self.ahead: dict[tuple[int, int, int], float] = {}  # rows evaluated before being asked for
        self.ahead_out: set[tuple[int, int, int]] = set()  # ... and still in flight
        self.unet_s = self.vote_s = 0.0
        self.cancelled = False
        self.first_sent = float("nan")

    @property
    def unsent(self) -> int:
        return self.n_send - self.sent


@dataclass
class _Call:
    ticket: Any
    owners: list[tuple[_Job, str, Any]]  # (job, "stage", (start, count)) or (job, "ahead", [keys])
    real: int
    launched: float


class RowScheduler:
    """Continuous row scheduling over one ``RowExecutor`` (see the module docstring).

    submit(key, latent (4,h,w), candidates (k,), negatives (k,L,D)) queues an image; ``step``
    runs one engine call (two in flight on a pipelined executor) and returns the images it
    settled; ``drain`` runs until every submitted image is settled. Single-threaded: a service
    drives it from one thread (``dbmef.runtime.worker``).
    """

    def __init__(self, executor: Any, config: ScoringConfig, *, speculate: bool = True, lockstep: bool = False,
                 progress: Callable[[int], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.executor = executor
        self.config = config
        self.B = config.unet_batch
        self.evals_per_row = executor.scorer.evals_per_row
        self.lockstep = lockstep
        self.speculate = speculate and not lockstep
        self.progress = progress
        self.clock = clock
        self.stats = SchedulerStats()
        self._free = list(range(executor.capacity))[::-1]
        self._open: list[_Job] = []  # in slots, oldest first
        self._queue: deque[_Job] = deque()  # submitted, waiting for a slot
        self._inflight: deque[_Call] = deque()
        self._wave = 0
        self._t_last = 0.0

    # -- intake ------------------------------------------------------------------------------------
    def submit(self, key: Any, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None,
               submitted: float | None = None) -> None:
        """Queue one image; it enters a slot at once if one is free, else when an image leaves."""
        cfg = self.config
        plan = ImagePlan(cfg.votes, cfg.n_timesteps, cfg.k, cfg.exit_policy)
        self._queue.append(_Job(key, latent, candidates, negatives, plan,
                                self.clock() if submitted is None else submitted))
        self._admit()

    def _admit(self) -> None:
        while self._queue and self._free:
            job = self._queue.popleft()
            job.slot = self._free.pop()
            assert job.inputs is not None
            self.executor.load(job.slot, job.inputs[0], job.candidates, job.inputs[1])
            job.inputs = None  # the executor holds them now
            job.wave = self._wave
            self._open.append(job)
            self._next_stage(job)

    @property
    def open(self) -> int:
        """Images submitted and not settled."""
        return len(self._open) + len(self._queue)

    @property
    def in_flight(self) -> int:
        """Engine calls launched and not yet collected."""
        return len(self._inflight)

    def cancel(self, key: Any) -> bool:
        """Drop an open image (its caller gave up): it leaves at once and is never settled; rows of
        it still in flight are discarded when they return. False if it is not open."""
        for job in self._open:
            if job.key == key:
                self._open.remove(job)
                self._free.append(job.slot)
                job.cancelled = True
                return True
        for job in self._queue:
            if job.key == key:
                self._queue.remove(job)
                return True
        return False

    @property
    def busy(self) -> bool:
        """Whether images are open or calls in flight."""
        return bool(self.open or self._inflight)

    @property
    def has_room(self) -> bool:
        """Whether a new image would get a slot at once."""
        return self.open < self.executor.capacity

    @property
    def waiting_rows(self) -> int:
        """Rows that could go into the next call now."""
        return sum(j.unsent for j in self._open if j.wave <= self._wave)

    # -- running -----------------------------------------------------------------------------------
    def step(self, flush: bool = True) -> list[Settled]:
        """Launch what should run and collect the oldest call: the images it settled. With
        ``flush`` False a call is launched only if it is full of rows that were asked for."""
        self._admit()
        if self.lockstep and not self._inflight and self.waiting_rows == 0:
            self._wave += 1  # every image's stage of this wave is back: the next wave
        while len(self._inflight) < self.executor.depth:
            if self._inflight:  # a second call in flight only if it is full of rows asked for
                call = self._assemble(pad=False) if self.waiting_rows >= self.B else None
            else:
                call = self._assemble(pad=flush or self.lockstep)
            if call is None:
                break
            self._inflight.append(call)
        if not self._inflight:
            if flush and self._open:  # open images yet nothing to run: a plan that asks for nothing
                raise ConfigError("row scheduler: open images but no rows to run (an inconsistent plan)")
            return []
        return self._collect(self._inflight.popleft())

    def drain(self) -> Iterator[Settled]:
        """Run until every submitted image is settled, yielding each as it settles."""
        while self.busy:
            yield from self.step(flush=True)

    def close(self) -> None:
        """Release the executor's tables (calls still in flight are collected first)."""
        while self._inflight:
            self.executor.collect(self._inflight.popleft().ticket)
        self.executor.close()

    def _assemble(self, pad: bool) -> _Call | None:
        if not pad and self.waiting_rows < self.B:
            return None
        B = self.B
        parts: list[np.ndarray] = []
        owners: list[tuple[_Job, str, Any]] = []
        count = 0
        for job in self._open:
            if count == B:
                break
            take = min(B - count, job.unsent)
            if take <= 0 or job.wave > self._wave:
                continue
            if math.isnan(job.first_sent):
                job.first_sent = self.clock()
            parts.append(np.column_stack([np.full(take, job.slot), job.stage[job.sent : job.sent + take]]))
            owners.append((job, "stage", (job.sent, take)))
            job.sent += take
            count += take
        if count < B and self.speculate:
            count += self._ahead(B - count, parts, owners)
        if count == 0:
            return None
        rows = np.concatenate(parts).astype(np.int64)  # (count, 4): slot, v, i, c
        if count < B:  # pad by repeating the last row: every call has the engine's one shape
            rows = rows[np.minimum(np.arange(B), count - 1)]
            self.stats.rows_padding += B - count
        self.stats.engine_calls += 1
        self.stats.rows_sent += B
        t = self.clock()
        return _Call(self.executor.launch(rows), owners, count, t)

    def _ahead(self, room: int, parts: list[np.ndarray], owners: list[tuple[_Job, str, Any]]) -> int:
        """Fill ``room`` places with rows the open images' plans will ask for next."""
        used = 0
        for job in self._open:
            if used == room:
                break
            skip = job.ahead.keys() | job.ahead_out
            up = job.plan.upcoming(room - used + len(skip))
            keys = [k for k in map(tuple, up.tolist()) if k not in skip][: room - used]
            if not keys:
                continue
            arr = np.array(keys, np.int64).reshape(-1, 3)
            parts.append(np.column_stack([np.full(len(arr), job.slot), arr]))
            owners.append((job, "ahead", keys))
            job.ahead_out.update(keys)  # type: ignore[arg-type]
            used += len(keys)
        self.stats.rows_speculative += used
        return used

    def _collect(self, call: _Call) -> list[Settled]:
        err = self.executor.collect(call.ticket)  # (B,)
        now = self.clock()
        per_row = (now - max(call.launched, self._t_last)) / call.real  # this call's time over its real rows
        self._t_last = now
        self.stats.host_syncs = self.executor.syncs
        off = 0
        touched: list[_Job] = []
        for job, kind, what in call.owners:
            if kind == "stage":
                start, n = what
                job.err[start : start + n] = err[off : off + n]
                job.back += n
            else:
                n = len(what)
                for key, e in zip(what, err[off : off + n].tolist()):
                    job.ahead[key] = e
                    job.ahead_out.discard(key)
            job.unet_s += per_row * n
            off += n
            if not touched or touched[-1] is not job:
                touched.append(job)
        if self.progress is not None:
            self.progress(call.real)
        settled = [self._settle(job) for job in dict.fromkeys(touched)
                   if not job.cancelled and job.back == len(job.stage) and not job.unsent and self._next_stage(job)]
        self._admit()
        return settled

    def _next_stage(self, job: _Job) -> bool:
        """Feed the job's complete stage (if any) to its plan, then set up the next one; rows
        evaluated ahead are used here. True once the job is settled."""
        while True:
            if len(job.stage):
                t = self.clock()
                job.plan.feed(job.stage, job.err)
                job.vote_s += self.clock() - t
                job.stage = np.empty((0, 3), np.int64)
            if job.plan.done:
                return True
            rows = job.plan.next_rows()
            if not len(rows):
                raise ConfigError("early-exit plan asked for no rows while its image is still open")
            known = np.zeros(len(rows), bool)
            err = np.full(len(rows), np.nan, np.float32)
            if job.ahead:
                for j, key in enumerate(map(tuple, rows.tolist())):
                    if key in job.ahead:
                        known[j], err[j] = True, job.ahead.pop(key)  # type: ignore[call-overload]
                self.stats.rows_speculative_used += int(known.sum())
            order = np.concatenate([np.flatnonzero(~known), np.flatnonzero(known)])
            job.stage, job.err = rows[order], err[order]
            job.n_send, job.sent, job.back = int((~known).sum()), 0, int(known.sum())
            job.wave = self._wave + 1 if self.lockstep and self._started() else self._wave
            if job.n_send:
                return False

    def _started(self) -> bool:
        return self.stats.engine_calls > 0

    def _settle(self, job: _Job) -> Settled:
        self._open.remove(job)
        self._free.append(job.slot)
        p = job.plan
        self.stats.images += 1
        self.stats.rows_needed += p.rows
        return Settled(job.key, job.candidates, p.winner, int(job.candidates[p.winner]), p.per_vote_errors(),
                       p.vote_counts(), p.rows, p.stages, job.unet_s, job.vote_s, job.submitted, self.clock(),
                       job.first_sent, p.rows * self.evals_per_row)
