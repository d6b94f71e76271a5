"""The HTTP front of ``dbmef serve`` on Ray Serve's FastAPI ingress: the ``API`` object the replica's
routes are registered on (``serve.DBMEFService``), the middleware that counts every request by
endpoint and outcome (the router's own 404 and 405 included) and turns a defect into a JSON 500,
and the router's refusals in the service's JSON shape (``{"error": ...}``, saying what to do)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dbmef.cluster.serve")


def json_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status, headers=headers)


def empty_response(status: int) -> Any:
    from starlette.responses import Response

    return Response(status_code=status)


MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config)?$")
# The routes (methods of serve.DBMEFService, bound by @serve.ingress). Exact paths, no docs routes:
# the service answers what the module docstring lists and nothing else.
API = FastAPI(title="dbmef", docs_url=None, redoc_url=None, openapi_url=None)


def endpoint_of(path: str) -> str:
    """The metrics' endpoint label of a request path."""
    if path in ("/metrics", "/classify"):
        return path[1:]
    if path in ("/healthz", "/v2/health/live", "/v2/health/ready"):
        return "health"
    m = MODEL_PATH.match(path)
    return "metadata" if path == "/v2" or (m and m.group(3) != "/infer") else "infer" if m else "other"


def outcome_of(status: int) -> str:
    return ("success" if status < 400 else "bad_request" if status in (400, 404, 405) else "too_large"
            if status == 413 else "timeout" if status in (408, 504) else "unavailable" if status == 503 else "error")


class CountedRequests:
    """ASGI middleware: every request counted by endpoint and outcome (the router's 404 and 405 too),
    and a defect in a route answered as JSON 500 (logged, counted) instead of a bare error."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [0]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as exc:
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if status[0] == 0:  # nothing sent yet: answer it
                await json_response(500, {"error": f"internal error ({type(exc).__name__}); the service logged "
                                                   "it and keeps serving"})(scope, receive, send_status)
            else:
                status[0] = 500
        replica = getattr(API.state, "replica", None)
        if replica is not None:
            replica.metrics.request(endpoint_of(scope["path"]), outcome_of(status[0]), time.perf_counter() - t0)


API.add_middleware(CountedRequests)


@API.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
    """The router's refusals in the service's JSON shape, saying what to do."""
    path, method = request.url.path, request.method
    if exc.status_code == 404:
        message = (f"no route {path}; POST an image to /classify, or use the Open Inference Protocol under /v2 "
                   "(GET /v2 for the server's metadata)")
    elif exc.status_code == 405:
        how = ("POST the image bytes as the body" if path == "/classify" else "POST the inference request to "
               ".../infer" if path.endswith("/infer") else "use GET")
        message = f"{method} {path}: {how}"
    else:
        message = str(exc.detail)
    return json_response(exc.status_code, {"error": message})


# -- the routes: each asks the replica of this process (serve.DBMEFService) ----------------------------
def _replica() -> Any:
    return API.state.replica


@API.get("/metrics")
def metrics() -> Any:
    return _replica().metrics_text()


@API.post("/classify")
async def classify(request: Request) -> Any:
    return await _replica().classify_request(request)


@API.get("/healthz")
def healthz() -> Any:
    return _replica().healthz()


@API.get("/v2/health/live")
def live() -> Any:
    return empty_response(200)


@API.get("/v2/health/ready")
def ready() -> Any:
    return _replica().ready_status()


@API.get("/v2")
def v2_metadata() -> Any:
    import dbmef
    from dbmef.cluster.oip import server_metadata

    return json_response(200, server_metadata(dbmef.__version__))


@API.get("/v2/models/{name}")
@API.get("/v2/models/{name}/versions/{version}")
def v2_model_metadata(name: str, version: str | None = None) -> Any:
    return _replica().model_metadata(name, version)


@API.get("/v2/models/{name}/ready")
@API.get("/v2/models/{name}/versions/{version}/ready")
def v2_model_ready(name: str, version: str | None = None) -> Any:
    return _replica().model_ready(name, version)


@API.get("/v2/models/{name}/config")
@API.get("/v2/models/{name}/versions/{version}/config")
def v2_model_config(name: str, version: str | None = None) -> Any:
    return _replica().model_config(name, version)


@API.post("/v2/models/{name}/infer")
@API.post("/v2/models/{name}/versions/{version}/infer")
async def v2_infer(request: Request, name: str, version: str | None = None) -> Any:
    return await _replica().model_infer(request, name, version)
