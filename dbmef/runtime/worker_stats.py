"""What a ``ClassifierWorker`` reports: its counters (``WorkerStats``), the hooks a metrics
exporter implements (``WorkerObserver``) and the overload it raises (``OverloadedError``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbmef.errors import DBMEFError
from dbmef.runtime.results import ImageResult

__all__ = ["OverloadedError", "WorkerObserver", "WorkerStats"]


class OverloadedError(DBMEFError):
    """The worker cannot take (or rethink) more requests now: retry later or add replicas."""


@dataclass
class WorkerStats:
    """Counters and current depths (what a metrics endpoint exports). Read them under no lock:
    each is one int or float written by one thread."""

    submitted: int = 0
    answered: int = 0
    failed: int = 0  # unreadable inputs (answered with an error)
    rethought: int = 0  # answered by the slow path
    rethink_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejected: int = 0  # OverloadedError raised
    unet_evals: int = 0
    fast_batches: int = 0
    fast_queue: int = 0  # requests waiting for the fast path
    decode_queue: int = 0  # large images waiting for (or in) the decode lane
    slow_queue: int = 0  # rethought images waiting for a slot in the slow path
    slow_open: int = 0  # images in the slow path's slots
    stage_seconds: dict[str, float] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)  # RowScheduler stats


class WorkerObserver:
    """What a worker reports as it runs (a metrics exporter subclasses it; every method here does
    nothing). Called from the worker's threads: keep them quick and thread-safe."""

    def fast_batch(self, size: int, waits: list[float]) -> None:
        """A fast-path batch of ``size`` requests started; ``waits``: each one's seconds in the queue."""

    def slow_wait(self, seconds: float) -> None:
        """A rethought image's first rows went into an engine call ``seconds`` after its fast path."""

    def answered(self, result: ImageResult) -> None:
        """An image was answered (by either path, or with an error)."""
