"""``dbmef serve``: DBMEF behind HTTP on Ray Serve.

    POST /classify   body: one encoded image (JPEG, PNG, ...)  ->  200 JSON, ``classify``'s result
    GET  /healthz    ->  200 JSON (bundle, classes, scoring, protector)

Concurrent requests are gathered into batches (``ray.serve.batch``): the rethought images of a
batch share UNet batches, which is where the time goes. Each replica holds one runtime and a GPU
share (``gpus_per_replica``: 1 per GPU, 0.5 for two per GPU). Bad input gets a 4xx with a JSON
``error`` and never stops the service: an empty or non-image body 400, a body over the size limit
413, another method 405, another path 404.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

from ray import serve

from dbmef.cluster import RuntimeSpec
from dbmef.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How the service is deployed (saved by nobody: it is the command line)."""

    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_body_bytes: int = 10 << 20
    # Requests a replica holds at once. Intake is async and the batch bounds the compute, so this is
    # high on purpose: at 64, 64 clients trickling their uploads took every slot and /healthz waited.
    max_ongoing_requests: int = 1024
    body_timeout_s: float = 10.0  # the whole body must arrive within this, else 408 and the slot is freed
    request_timeout_s: float = 300.0  # Serve's HTTP proxy: end to end, then 408/504
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections are closed after this

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "replicas", "max_body_bytes", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve option {name} = {getattr(self, name)} must be at least 1")
        for name in ("batch_wait_ms", "gpus_per_replica", "cpus_per_replica", "body_timeout_s",
                     "request_timeout_s", "keep_alive_timeout_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"serve option {name} = {v} must be finite and >= 0")


def _json(status: int, payload: dict[str, Any]) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status)


class DBMEFService:
    """One replica: a runtime built from the spec, an HTTP entry point and a batched classifier."""

    def __init__(self, spec: dict[str, Any], config: dict[str, Any]):
        self.spec = RuntimeSpec(**spec)
        self.cfg = ServeConfig(**config)
        self.rt = self.spec.build()
        # serve.batch's decorator arguments are fixed at import; these setters apply the command line.
        batched: Any = self._classify_batch
        batched.set_max_batch_size(self.cfg.max_batch_size)
        batched.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000.0)

    async def __call__(self, request: Any) -> Any:
        path = request.url.path.rstrip("/") or "/"
        if path.endswith("/healthz"):
            if request.method != "GET":
                return _json(405, {"error": f"{request.method} {path}: use GET"})
            return _json(200, self.health())
        if not path.endswith("/classify"):
            return _json(404, {"error": f"no route {path}; POST an image to /classify, GET /healthz"})
        if request.method != "POST":
            return _json(405, {"error": f"{request.method} /classify: POST the image bytes as the body"})
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _json(413, {"error": f"body of {int(declared)} bytes is over the {limit}-byte limit"})
        try:
            body = await asyncio.wait_for(self._read_body(request, limit), timeout=self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            return _json(408, {"error": f"the request body did not arrive within {self.cfg.body_timeout_s:g} s"})
        if body is None:
            return _json(413, {"error": f"body is over the {limit}-byte limit"})
        if not body:
            return _json(400, {"error": "empty body: POST one encoded image (JPEG, PNG, ...)"})
        result = await self._classify_batch(bytes(body))
        if result.get("error"):
            return _json(400, result)
        return _json(200, result)

    @staticmethod
    async def _read_body(request: Any, limit: int) -> bytes | None:
        """The body, or None past ``limit`` bytes (enforced while reading: the header may lie)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    def health(self) -> dict[str, Any]:
        rt = self.rt
        p = rt.protector
        # JSON has no infinity: an uncalibrated protector (rethink all / none) reports null.
        threshold = p.threshold if math.isfinite(p.threshold) else None
        return {"status": "ok", "bundle": str(rt.bundle_dir), "classes": len(rt.class_names),
                "scoring": rt.config.to_dict(), "protector": {"threshold": threshold, "prot": p.prot},
                "max_batch_size": self.cfg.max_batch_size, "max_body_bytes": self.cfg.max_body_bytes}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        names = [f"request {i}" for i in range(len(bodies))]
        # The runtime is synchronous; a worker thread keeps the replica's event loop (health
        # checks, request intake for the next batch) responsive. Batches run one at a time.
        results = await asyncio.to_thread(self.rt.classify, bodies, names)
        out = []
        for r in results:
            d = r.to_dict()
            d.pop("index", None)
            d.pop("image", None)
            if r.error:
                d = {"error": "the request body " + r.error.split(": ", 1)[-1]}
            else:
                d["batch_size"] = len(bodies)
            out.append(d)
        return out


def build_app(spec: RuntimeSpec, config: ServeConfig | None = None) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``)."""
    import dataclasses

    cfg = config or ServeConfig()
    deployment: Any = serve.deployment(
        DBMEFService, name="dbmef", num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        max_ongoing_requests=max(cfg.max_ongoing_requests, cfg.max_batch_size),
    )
    return deployment.bind(spec.to_dict(), dataclasses.asdict(cfg))


def start(spec: RuntimeSpec, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, blocking: bool = False) -> Any:
    """Start (or join, with ``address``) Ray, start Serve's HTTP proxy on host:port and deploy."""
    from dbmef.cluster import init_ray

    cfg = config or ServeConfig()
    init_ray(address)
    # Serve gives its HTTP proxy a fixed 60 s to come up; a loaded machine can miss that while
    # worker processes start. Try again rather than fail the service.
    for attempt in range(3):
        try:
            serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s,
                                      "keep_alive_timeout_s": cfg.keep_alive_timeout_s})
            break
        except Exception as exc:  # ActorDiedError / GetTimeoutError from the proxy start
            if attempt == 2:
                raise
            log.warning("Ray Serve's HTTP proxy did not start (%s); retrying", type(exc).__name__)
            serve.shutdown()
    return serve.run(build_app(spec, cfg), name="dbmef", route_prefix="/", blocking=blocking)
