"""Prometheus metrics of one service replica (``GET /metrics``), with ``prometheus_client``.

Counters of work done come from the worker's and the row scheduler's own counts when scraped (a
custom collector: no second bookkeeping to drift); distributions (queue waits, stage seconds,
batch sizes, request durations) are observed as they happen. Names follow Prometheus' rules
(``_total`` counters, ``_seconds`` units); README maps them to Triton's ``nv_inference_*``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dbmef.runtime.results import STAGES, ImageResult
from dbmef.runtime.worker import WorkerObserver

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics(WorkerObserver):
    """The metrics of one replica; ``worker`` is attached once it exists (before that, only the
    request counters move)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.worker: Any = None
        r = self.registry
        self.requests = Counter("dbmef_requests", "HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.request_seconds = Histogram("dbmef_request_duration_seconds", "time from request to response",
                                         ["endpoint"], buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("dbmef_queue_wait_seconds", "time an image waited for a path",
                                    ["path"], buckets=_SECONDS, registry=r)
        self.stage_seconds = Histogram("dbmef_stage_seconds", "an image's share of each pipeline stage",
                                       ["stage"], buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("dbmef_fast_batch_size", "requests per fast-path batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.images = Counter("dbmef_images", "images answered by path", ["path"], registry=r)
        self._lock = threading.Lock()
        r.register(_WorkCollector(self))

    # -- WorkerObserver -----------------------------------------------------------------------------
    def fast_batch(self, size: int, waits: list[float]) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.labels("fast").observe(max(w, 0.0))

    def slow_wait(self, seconds: float) -> None:
        self.queue_wait.labels("slow").observe(max(seconds, 0.0))

    def answered(self, result: ImageResult) -> None:
        path = "error" if result.error else "slow" if result.rethought else "fast"
        self.images.labels(path).inc()
        for stage, secs in result.timings.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(secs)

    # -- the HTTP side ------------------------------------------------------------------------------
    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkCollector:
    """Counters and gauges read from the worker and its row scheduler at scrape time."""

    def __init__(self, metrics: ServiceMetrics):
        self.m = metrics

    def describe(self) -> list[Any]:
        return []  # collected on demand only: the worker may not exist yet

    def collect(self) -> Iterator[Any]:
        w = self.m.worker
        ready = GaugeMetricFamily("dbmef_ready", "1 once the engines are open and warmed up")
        ready.add_metric([], 0.0 if w is None else 1.0)
        yield ready
        if w is None:
            return
        st, sc = w.stats, w.slow.stats
        yield _counter("dbmef_rethought", "images answered by the slow path", st.rethought)
        skipped = CounterMetricFamily("dbmef_rethink_skipped", "rethinks the gate asked for and the service skipped",
                                      labels=["reason"])
        for reason in ("overloaded", "deadline"):
            skipped.add_metric([reason], st.rethink_skipped.get(reason, 0))
        yield skipped
        yield _counter("dbmef_rejected", "requests refused as overload (503)", st.rejected)
        yield _counter("dbmef_unet_evaluations", "UNet evaluations of the answered rethinks", st.unet_evals)
        yield _counter("dbmef_engine_calls", "scorer engine calls", sc.engine_calls)
        rows = CounterMetricFamily("dbmef_engine_rows", "scorer rows by kind: sent (calls x batch), needed (asked "
                                   "for by the plans), padding, ahead (sent before asked for)", labels=["kind"])
        for kind, v in (("sent", sc.rows_sent), ("needed", sc.rows_needed), ("padding", sc.rows_padding),
                        ("ahead", sc.rows_ahead), ("ahead_used", sc.rows_ahead_used)):
            rows.add_metric([kind], v)
        yield rows
        depth = GaugeMetricFamily("dbmef_queue_depth", "images waiting: fast (for the fast path), decode (large "
                                  "images in the decode lane), slow (for a scheduler slot), open (in the scheduler)",
                                  labels=["queue"])
        for q, v in (("fast", st.fast_queue), ("decode", st.decode_queue), ("slow", st.slow_queue),
                     ("open", st.slow_open)):
            depth.add_metric([q], v)
        yield depth


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c
