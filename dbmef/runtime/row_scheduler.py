"""The row scheduler: which rows of the open images share each engine call. It decides and never
runs an engine (vLLM's split of ``schedule() -> SchedulerOutput`` from ``update_from_output``):
``schedule`` returns the next ``EngineCall`` (its rows, whose rows they are, the padding, the images
to load first), ``update`` applies that call's errors and returns the images it settled. The one
driver that runs the calls on an executor is ``slow_path.SlowPath``.

Every rethought image has its own plan (``early_exit.ImagePlan``): the rows of its current stage,
then, once they are all back, the rows of the next. The scheduler holds the open images in
``capacity`` slots and fills every call with ``rows_per_call`` rows taken from any of them, oldest
first; when a call's errors come back each image gets its own, and an image whose stage is complete
moves on (or settles and leaves at once, freeing its slot for a new image).

    call 1: [ img0 stage0 ........................ | img1 stage0 ..... ]   64 rows, all asked for
    call 2: [ img1 stage0 ... | img2 stage0 .......................... ]
    call 3: [ img0 stage1 ......... | img2 stage0 ... | img3 stage0 .. ]   img0 moved on after call 1
    ...
    last:   [ img9 stage4 .... | img9 rows ahead ......... | padding  ]   nothing else is coming

The launch-or-pad policy lives here and nowhere else. A call is full when enough rows wait. When
fewer wait, the call is held back while the caller says more images are coming and a new one would
get a slot (``wants_images``), but for at most ``fill_wait_s`` (a service whose fast path is always
busy must still answer the rethinks it holds); otherwise it is padded. Before padding, the free
places take *rows ahead*: rows an image's plan will ask for next if no candidate is dropped, kept
per image and used only when its plan asks for exactly those rows, so no decision changes; unused
ones cost what padding would have. With ``depth`` 2 (an executor that runs one call while the host
prepares the next) a second call is planned only if it is full of rows asked for.

An image's rows and answer depend on its own errors only (its plan never sees another image), so
answers are those of ``replay.replay`` whatever the arrival order, the company or the engine
batch.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ImagePlan

__all__ = ["EngineCall", "RowScheduler", "SchedulerStats", "Settled"]

RowKey = tuple[int, int, int]  # (vote v, grid position i, candidate position c)


@dataclass
class SchedulerStats:
    """Engine-level cost of what a scheduler ran, in rows (machine-independent)."""

    images: int = 0  # images settled
    engine_calls: int = 0
    rows_sent: int = 0  # engine_calls x rows_per_call
    rows_needed: int = 0  # rows the settled images' plans asked for (their UNet evaluations / 2)
    rows_padding: int = 0  # repeated rows that fill a call nothing else could
    rows_ahead: int = 0  # rows sent before their plan asked for them
    rows_ahead_used: int = 0  # of those, asked for later (the rest cost what padding would)
    host_syncs: int = 0  # waits for the device (0 on the host path); set by the driver

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

    key: Hashable
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

    def __init__(self, key: Hashable, candidates: np.ndarray, plan: ImagePlan, submitted: float):
        self.key, self.plan, self.submitted = key, plan, submitted
        self.candidates = np.asarray(candidates, np.int64)
        self.slot = -1
        self.stage = np.empty((0, 3), np.int64)  # (S, 3) rows (v, i, c): to send first, then known
        self.err = np.empty(0, np.float32)  # (S,)
        self.n_send = self.sent = self.back = 0
        self.ahead: dict[RowKey, float] = {}  # rows evaluated before being asked for
        self.ahead_out: set[RowKey] = set()  # ... and still in flight
        self.unet_s = self.vote_s = 0.0
        self.cancelled = False
        self.first_sent = math.nan

    @property
    def unsent(self) -> int:
        return self.n_send - self.sent


@dataclass(frozen=True)
class _Part:
    """A run of one call's rows that belongs to one image: rows of its stage from ``start``, or
    rows ahead (``keys``)."""

    job: _Job
    kind: Literal["stage", "ahead"]
    count: int
    start: int = 0
    keys: tuple[RowKey, ...] = ()


@dataclass(frozen=True)
class EngineCall:
    """One engine call as the scheduler decided it (its ``SchedulerOutput``).

    rows: (rows_per_call, 4) int64 (slot, vote v, grid position i, candidate position c); the last
    ``rows_per_call - real`` repeat the last real row (padding: every call has the engine's one
    shape). loads: (slot, key) of the images the executor must load into their slots before it runs
    this call. parts: whose rows are where (``update`` reads them). launched: the clock when planned.
    """

    rows: np.ndarray
    real: int
    loads: tuple[tuple[int, Hashable], ...]
    parts: tuple[_Part, ...] = field(repr=False)
    launched: float


class RowScheduler:
    """Continuous row scheduling of the images in ``capacity`` slots (see the module docstring).

    config: the scoring config (each image's plan, ``unet_batch`` rows per call). depth: calls the
    executor may have in flight. evals_per_row: UNet evaluations one row costs (2; 1 at lam = 1).
    rows_ahead: fill a call that would be padded with rows the plans will ask for next. fill_wait_s:
    how long a call may be held back for images the caller says are coming (inf: as long as they
    come). clock: a monotonic clock in seconds (tests pass a fake one). Single-threaded.
    """

    def __init__(self, config: ScoringConfig, capacity: int, *, depth: int = 1, evals_per_row: int = 2,
                 rows_ahead: bool = True, fill_wait_s: float = math.inf,
                 clock: Callable[[], float] = time.perf_counter):
        if capacity < 1 or depth < 1:
            raise ConfigError(f"row scheduler: capacity {capacity} and depth {depth} must be at least 1")
        if math.isnan(fill_wait_s) or fill_wait_s < 0:
            raise ConfigError(f"fill_wait_s = {fill_wait_s} must be >= 0 seconds (inf: no bound)")
        self.config = config
        self.rows_per_call = config.unet_batch
        self.capacity, self.depth, self.evals_per_row = int(capacity), int(depth), int(evals_per_row)
        self.rows_ahead, self.fill_wait_s, self.clock = rows_ahead, fill_wait_s, clock
        self.stats = SchedulerStats()
        self._free = list(range(self.capacity))[::-1]
        self._open: list[_Job] = []  # in slots, oldest first
        self._queue: deque[_Job] = deque()  # submitted, waiting for a slot
        self._loads: list[tuple[int, Hashable]] = []  # admitted since the last call, not yet loaded
        self._inflight: deque[EngineCall] = deque()
        self._held_since: float | None = None  # when a call was first held back for more images
        self._t_last = 0.0

    # -- intake ------------------------------------------------------------------------------------
    def submit(self, key: Hashable, candidates: np.ndarray, submitted: float | None = None,
               probs: np.ndarray | None = None) -> None:
        """Queue one image (its ``key`` unique among the open ones, its k candidates and, for the
        fused decision, their (k,) backbone probabilities); it takes a slot at once if one is free,
        else when an image leaves. The next ``EngineCall`` lists it under ``loads`` once it has a slot."""
        cfg = self.config
        plan = ImagePlan(cfg.votes, cfg.n_timesteps, cfg.k, cfg.exit_policy, cfg.decision_offsets(probs))
        self._queue.append(_Job(key, candidates, plan, self.clock() if submitted is None else submitted))
        self._admit()

    def cancel(self, key: Hashable) -> bool:
        """Drop an open image (its caller gave up): it leaves at once and is never settled; rows of
        it still in flight are discarded when they come back. False if it is not open."""
        for job in self._open:
            if job.key == key:
                self._open.remove(job)
                self._loads = [(s, k) for s, k in self._loads if k != key]
                self._free.append(job.slot)
                job.cancelled = True
                self._admit()
                return True
        for job in self._queue:
            if job.key == key:
                self._queue.remove(job)
                return True
        return False

    def _admit(self) -> None:
        while self._queue and self._free:
            job = self._queue.popleft()
            job.slot = self._free.pop()
            self._loads.append((job.slot, job.key))
            self._open.append(job)
            self._next_stage(job)

    # -- state -------------------------------------------------------------------------------------
    @property
    def open(self) -> int:
        """Images submitted and not settled."""
        return len(self._open) + len(self._queue)

    @property
    def in_flight(self) -> int:
        """Engine calls planned and not yet updated."""
        return len(self._inflight)

    @property
    def busy(self) -> bool:
        """Whether images are open or calls in flight."""
        return bool(self.open or self._inflight)

    @property
    def has_room(self) -> bool:
        """Whether a new image would get a slot at once."""
        return self.open < self.capacity

    @property
    def waiting_rows(self) -> int:
        """Rows asked for that could go into the next call now."""
        return sum(j.unsent for j in self._open)

    @property
    def wants_images(self) -> bool:
        """Whether the next call would not be full and a new image would get a slot: a caller with
        more images at hand should submit them before asking for the next call."""
        return self.waiting_rows < self.rows_per_call and self.has_room

    @property
    def fill_deadline(self) -> float | None:
        """While a call is held back for more images: the clock reading at which it is padded and
        sent anyway (a waiting caller sleeps until then at most). None when nothing is held."""
        return None if self._held_since is None else self._held_since + self.fill_wait_s

    # -- deciding ----------------------------------------------------------------------------------
    def schedule(self, more_coming: bool = False) -> EngineCall | None:
        """The next engine call, or None when none should start now: ``depth`` calls are in flight;
        or one is and the next would not be full; or the next would not be full, ``more_coming``
        (the caller will submit more images soon) and it has been held back for less than
        ``fill_wait_s``. Without ``more_coming`` a call is padded rather than held."""
        if len(self._inflight) >= self.depth:
            return None
        if self._inflight:
            call = self._assemble() if self.waiting_rows >= self.rows_per_call else None
        elif more_coming and self.wants_images and not self._fill_wait_over():
            return None
        else:
            call = self._assemble()
            if call is None and self._open:  # open images yet nothing to run: a plan that asks for nothing
                raise ConfigError("row scheduler: open images but no rows to run (an inconsistent plan)")
        if call is not None:
            self._held_since = None
            self._inflight.append(call)
        return call

    def _fill_wait_over(self) -> bool:
        now = self.clock()
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since >= self.fill_wait_s

    def _assemble(self) -> EngineCall | None:
        """Rows of the open images, oldest first; then rows ahead; then padding."""
        size = self.rows_per_call
        blocks: list[np.ndarray] = []
        parts: list[_Part] = []
        count = 0
        for job in self._open:
            if count == size:
                break
            take = min(size - count, job.unsent)
            if take <= 0:
                continue
            if math.isnan(job.first_sent):
                job.first_sent = self.clock()
            blocks.append(np.column_stack([np.full(take, job.slot), job.stage[job.sent : job.sent + take]]))
            parts.append(_Part(job, "stage", take, start=job.sent))
            job.sent += take
            count += take
        if count < size and self.rows_ahead:
            count += self._ahead(size - count, blocks, parts)
        if count == 0:
            return None
        rows = np.concatenate(blocks).astype(np.int64)  # (count, 4): slot, v, i, c
        if count < size:  # pad by repeating the last row: every call has the engine's one shape
            rows = rows[np.minimum(np.arange(size), count - 1)]
            self.stats.rows_padding += size - count
        self.stats.engine_calls += 1
        self.stats.rows_sent += size
        loads, self._loads = tuple(self._loads), []
        return EngineCall(rows, count, loads, tuple(parts), self.clock())

    def _ahead(self, room: int, blocks: list[np.ndarray], parts: list[_Part]) -> int:
        """Fill ``room`` places with rows the open images' plans will ask for next."""
        used = 0
        for job in self._open:
            if used == room:
                break
            skip = job.ahead.keys() | job.ahead_out
            up = job.plan.upcoming(room - used + len(skip))
            keys: list[RowKey] = [k for k in map(tuple, up.tolist()) if k not in skip][: room - used]
            if not keys:
                continue
            blocks.append(np.column_stack([np.full(len(keys), job.slot), np.array(keys, np.int64)]))
            parts.append(_Part(job, "ahead", len(keys), keys=tuple(keys)))
            job.ahead_out.update(keys)
            used += len(keys)
        self.stats.rows_ahead += used
        return used

    # -- applying ----------------------------------------------------------------------------------
    def update(self, call: EngineCall, errors: np.ndarray) -> list[Settled]:
        """Apply the (rows_per_call,) errors of ``call`` (the oldest call in flight): each image
        gets its own rows' errors; the images whose plans settle are returned, in the order their
        rows came in the call, and their slots go to queued images."""
        if not self._inflight or self._inflight[0] is not call:
            raise ConfigError("row scheduler: update() must apply the oldest call in flight, once")
        self._inflight.popleft()
        now = self.clock()
        per_row = (now - max(call.launched, self._t_last)) / call.real  # this call's time over its real rows
        self._t_last = now
        off = 0
        touched: dict[_Job, None] = {}
        for part in call.parts:
            job, n = part.job, part.count
            if part.kind == "stage":
                job.err[part.start : part.start + n] = errors[off : off + n]
                job.back += n
            else:
                for key, e in zip(part.keys, errors[off : off + n].tolist()):
                    job.ahead[key] = e
                    job.ahead_out.discard(key)
            job.unet_s += per_row * n
            off += n
            touched[job] = None
        settled = [self._settle(job) for job in touched
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
                self.stats.rows_ahead_used += int(known.sum())
            order = np.concatenate([np.flatnonzero(~known), np.flatnonzero(known)])
            job.stage, job.err = rows[order], err[order]
            job.n_send, job.sent, job.back = int((~known).sum()), 0, int(known.sum())
            if job.n_send:
                return False

    def _settle(self, job: _Job) -> Settled:
        self._open.remove(job)
        self._free.append(job.slot)
        p = job.plan
        self.stats.images += 1
        self.stats.rows_needed += p.rows
        return Settled(job.key, job.candidates, p.winner, int(job.candidates[p.winner]), p.per_vote_errors(),
                       p.vote_counts(), p.rows, p.stages, job.unet_s, job.vote_s, job.submitted, self.clock(),
                       job.first_sent, p.rows * self.evals_per_row)
