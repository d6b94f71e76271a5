"""``dbmef serve``: DBMEF behind HTTP on Ray Serve, speaking dbmef's JSON and the Open Inference
Protocol (KServe v2 / Triton HTTP).

    POST /classify                                  one encoded image -> 200 JSON (``classify``'s result)
    GET  /healthz                                   200 JSON once ready, else 503
    GET  /v2/health/live | /v2/health/ready         liveness (200) | readiness (503 until warmed up)
    GET  /v2 | /v2/models/M[/versions/V][/ready]    server and model metadata | model readiness
    POST /v2/models/M[/versions/V]/infer            OIP inference: input ``image`` BYTES [N, 1]
    GET  /metrics                                   Prometheus text format
    gRPC inference.GRPCInferenceService             with ``grpc_port``: the same protocol (``oip_grpc``)

Deploy from a file: ``app`` is an application builder (``serve run dbmef.cluster.serve:app bundle=B``,
or ``deploy/serve.yaml``'s ``import_path``; ``serve_config.config_from_args`` reads its args).

The routes are a FastAPI app on Ray Serve's ingress (``http_api``: exact paths, so ``/x/../classify``
is 404; the router's 404/405 and any defect answered as JSON and counted); an OIP request's header
is validated by typed models (``oip.InferHeader``). One replica owns both paths through a
``ClassifierWorker``: its fast thread batches whatever requests are waiting and answers the
confident ones at once; its slow thread runs one row scheduler over every rethought image of the
replica. Both share the replica's GPU: the fast path needs little of it, and keeping the two in one
process keeps each rethought image's latent and negative embeddings where its rows run (two
deployments would ship them between processes and hold two copies of every engine per GPU).
Scale out with replicas (``--replicas``, one per GPU).

Every replica opens its engines and runs one warm-up (both paths) in the background; until then
readiness is 503 and inference 503. Bad input gets a 4xx with a JSON ``error`` and never stops the
service. Overload is bounded (queues, ``rethink_skipped``; see ``dbmef.runtime.worker``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ray import serve

from dbmef.cluster import RuntimeSpec, for_this_actor
from dbmef.cluster.http_api import API, empty_response, json_response
from dbmef.cluster.metrics import CONTENT_TYPE, ServiceMetrics
from dbmef.cluster.oip import ModelInfo, ProtocolError, decode_infer, encode_infer, model_metadata, unknown_model
from dbmef.cluster.serve_config import ServeConfig, config_from_args
from dbmef.runtime.worker import ClassifierWorker, OverloadedError

log = logging.getLogger(__name__)


@serve.ingress(API)  # the routes are http_api's; they call the replica's methods below
class DBMEFService:
    """One replica: a runtime built from the spec, its worker, the routes and the metrics."""

    def __init__(self, spec: dict[str, Any], config: dict[str, Any]):
        self.spec = RuntimeSpec(**spec)
        self.cfg = ServeConfig(**config)
        self.metrics = ServiceMetrics()
        API.state.replica = self  # one replica per process: the middleware counts into its metrics
        self.worker: ClassifierWorker | None = None
        self.rt: Any = None
        self.model: ModelInfo | None = None
        self._failed: BaseException | None = None
        self._ready = threading.Event()
        import ray

        self.node = str(ray.get_runtime_context().get_node_id())  # the Ray node of this replica
        self.grpc: Any = None
        c = self.cfg
        if c.grpc_port is not None:  # up at once, so ServerLive answers during warm-up
            import dbmef
            from dbmef.cluster.oip_grpc import start_server

            self.grpc = start_server(self, dbmef.__version__, c.grpc_port, c.grpc_host,
                                     max_concurrent=c.max_ongoing_requests,
                                     max_message_bytes=c.max_body_bytes + c.max_header_bytes)
        threading.Thread(target=self._open, name="dbmef-open", daemon=True).start()

    # -- life cycle ---------------------------------------------------------------------------------
    def _open(self) -> None:
        """Open the engines, start the worker, warm both paths up; then report ready."""
        from dbmef.runtime.protector import Protector

        try:
            from importlib import resources

            rt = self.rt = for_this_actor(self.spec).build()
            c = self.cfg
            self.model = ModelInfo(c.model_name, c.model_version, rt.config.k, len(rt.class_names),
                                   max_batch=c.max_images_per_request)
            sample = (resources.files("dbmef") / "assets" / "sample.png").read_bytes()
            rt.with_protector(Protector.fixed(0.0)).pipeline.classify([sample])  # every engine, once
            self.worker = ClassifierWorker(rt.pipeline, c.worker, observer=self.metrics)
            self.metrics.worker = self.worker
            self._ready.set()
            log.info("replica ready: %s", rt.bundle_dir)
        except BaseException as exc:  # reported by check_health, which makes Serve replace the replica
            log.exception("the replica could not open its bundle")
            self._failed = exc

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica whose bundle failed to open, or whose worker
        died, is unhealthy (Serve restarts it)."""
        if self._failed is not None:
            raise RuntimeError(f"dbmef replica failed to start: {self._failed}")
        if self.worker is not None and not self.worker.alive:
            raise RuntimeError("dbmef replica's worker threads died")

    def __del__(self) -> None:  # Serve calls it after draining this replica's requests
        if self.grpc is not None:  # refuse new calls, let those in flight finish
            self.grpc.stop(grace=self.cfg.graceful_shutdown_s)
        if self.worker is not None:
            self.worker.close(timeout=self.cfg.graceful_shutdown_s)
        if self.rt is not None:
            self.rt.close()

    # -- what the HTTP routes (http_api) call ------------------------------------------------------------
    def metrics_text(self) -> Any:
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def healthz(self) -> Any:
        return json_response(200 if self._ready.is_set() else 503, self.health())

    def ready_status(self) -> Any:
        return empty_response(200 if self._ready.is_set() else 503)

    def model_metadata(self, name: str, version: str | None) -> Any:
        if (refused := self._unknown(name, version)) is not None:
            return refused
        if self.model is None:
            return json_response(503, {"error": "the model is still loading; retry when /v2/health/ready answers 200"})
        return json_response(200, model_metadata(self.model))

    def model_ready(self, name: str, version: str | None) -> Any:
        return self._unknown(name, version) or self.ready_status()

    def model_config(self, name: str, version: str | None) -> Any:
        c = self.cfg
        return self._unknown(name, version) or json_response(200, {
            "name": c.model_name, "platform": "dbmef", "max_batch_size": c.max_images_per_request,
            "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}]})

    async def model_infer(self, request: Any, name: str, version: str | None) -> Any:
        return self._unknown(name, version) or await self._infer(request)

    def _unknown(self, name: str, version: str | None) -> Any:
        """The 404 for a model this server does not have (None when it has it)."""
        why = unknown_model(name, version, self.cfg.model_name, self.cfg.model_version)
        return None if why is None else json_response(404, {"error": why})

    # -- inference ----------------------------------------------------------------------------------
    async def _body(self, request: Any) -> bytes | Any:
        """The request body, or the response that refuses it (413 / 408)."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return json_response(413, {"error": f"body of {int(declared)} bytes is over the {limit}-byte limit"})
        try:
            body = await asyncio.wait_for(self._read_body(request, limit), timeout=self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            return json_response(408, {"error": f"the request body did not arrive within "
                                               f"{self.cfg.body_timeout_s:g} s"})
        if body is None:
            return json_response(413, {"error": f"body is over the {limit}-byte limit"})
        return body

    @staticmethod
    async def _read_body(request: Any, limit: int) -> bytes | None:
        """The body, or None past ``limit`` bytes (enforced while reading: the header may lie)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    def _not_ready(self) -> Any:
        return json_response(503, {"error": "the service is warming up (opening engines); retry when /v2/health/ready "
                                    "answers 200"}, {"retry-after": "1"})

    async def _answers(self, images: list[bytes], deadline_s: float | None) -> list[Any] | Any:
        """The worker's results for ``images``, or the 503 that refuses them."""
        try:
            futures = self._submit(images, deadline_s)
        except OverloadedError as exc:
            return json_response(503, {"error": str(exc)}, {"retry-after": "1"})
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except OverloadedError as exc:
            return json_response(503, {"error": str(exc)}, {"retry-after": "1"})

    async def classify_request(self, request: Any) -> Any:
        body = await self._body(request)
        if not isinstance(body, bytes):
            return body
        if not body:
            return json_response(400, {"error": "empty body: POST one encoded image (JPEG, PNG, ...)"})
        if not self._ready.is_set():
            return self._not_ready()
        got = await self._answers([body], None)
        if not isinstance(got, list):
            return got
        r = got[0]
        if r.error:
            # "the request body: not a readable image (...)", "...: 40000x40000 = ... pixels is over the limit"
            return json_response(400, {"error": "the request body: " + r.error.split(": ", 1)[-1]})
        d = r.to_dict()
        d.pop("index", None)
        d.pop("image", None)
        return json_response(200, d)

    async def _infer(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await self._body(request)
        if not isinstance(body, bytes):
            return body
        if not self._ready.is_set() or self.model is None:
            return self._not_ready()
        try:
            req = decode_infer(body, request.headers.get("inference-header-content-length"), self.model,
                               self.cfg.max_header_bytes)
        except ProtocolError as exc:
            return json_response(exc.status, {"error": str(exc)})
        got = await self._answers(req.images, req.timeout_s)
        if not isinstance(got, list):
            return got
        if all(r.error for r in got):
            return json_response(400, {"error": "the request's image " + got[0].error.split(": ", 1)[-1]})
        payload, headers = encode_infer(req, got, self.model)
        return Response(payload, status_code=200, headers=headers)

    # -- what the gRPC service (oip_grpc.Backend) calls, from its own threads ------------------------
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def infer_images(self, images: list[bytes], deadline_s: float | None) -> list[Any]:
        """The worker's results for ``images`` (blocking; ``OverloadedError`` when refused)."""
        return [f.result() for f in self._submit(images, deadline_s)]

    def _submit(self, images: list[bytes], deadline_s: float | None) -> list[Any]:
        """One worker future per image of a request (``OverloadedError`` when the queue is full)."""
        assert self.worker is not None
        return [self.worker.submit(im, f"request image {j}", deadline_s) for j, im in enumerate(images)]

    def count(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.metrics.request(endpoint, outcome, seconds)

    def health(self) -> dict[str, Any]:
        if not self._ready.is_set() or self.rt is None:
            return {"status": "failed" if self._failed else "warming up", "error": str(self._failed or "")}
        rt = self.rt
        p = rt.protector
        return {"status": "ok", "bundle": str(rt.bundle_dir), "classes": len(rt.class_names),
                "scoring": rt.config.to_dict(), "protector": p.to_dict(),
                "max_batch_size": self.cfg.worker.batch_size, "max_body_bytes": self.cfg.max_body_bytes,
                "model": {"name": self.cfg.model_name, "version": self.cfg.model_version},
                "node": self.node}


def build_app(spec: RuntimeSpec, config: ServeConfig | None = None) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``)."""
    cfg = config or ServeConfig()
    options: dict[str, Any] = {}
    if cfg.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = cfg.max_replicas_per_node
    deployment: Any = serve.deployment(
        DBMEFService, name="dbmef", num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        max_ongoing_requests=cfg.max_ongoing_requests, graceful_shutdown_timeout_s=cfg.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5, health_check_period_s=5.0, **options,
    )
    return deployment.bind(spec.to_dict(), cfg.to_dict())


def app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder: ``serve run dbmef.cluster.serve:app bundle=B grpc_port=8001``
    or a Serve config file's ``import_path`` with ``args`` (``serve_config.config_from_args``)."""
    return build_app(*config_from_args(args))


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
            serve.start(proxy_location=cfg.proxy_location,
                        http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s,
                                      "keep_alive_timeout_s": cfg.keep_alive_timeout_s})
            break
        except Exception as exc:  # ActorDiedError / GetTimeoutError from the proxy start
            if attempt == 2:
                raise
            log.warning("Ray Serve's HTTP proxy did not start (%s); retrying", type(exc).__name__)
            serve.shutdown()
    return serve.run(build_app(spec, cfg), name="dbmef", route_prefix="/", blocking=blocking)


def drain_and_stop(started_ray: bool, timeout_s: float = 60.0) -> None:
    """Stop taking requests, let the replicas answer what they hold (each waits up to its
    ``graceful_shutdown_s``), stop Serve, and stop Ray if this process started it."""
    import ray

    try:
        serve.delete("dbmef", _blocking=True)
    except Exception as exc:  # already gone, or Serve never came up
        log.info("serve.delete: %s", exc)
    if started_ray:
        # Ray goes down with everything on it; serve.shutdown() first would kill Serve's controller
        # while its graceful_shutdown task is being retried, and Ray logs that as a failure.
        ray.shutdown()
    else:
        serve.shutdown()
