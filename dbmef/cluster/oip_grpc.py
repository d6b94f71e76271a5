"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``, what stock
``tritonclient.grpc`` speaks) for a dbmef model, over the protocol's own generated stubs (the ones
``tritonclient.grpc`` ships).

    ServerLive, ServerReady, ModelReady     liveness; readiness (false until the engines are warm)
    ServerMetadata, ModelMetadata           as HTTP's GET /v2 and /v2/models/M
    ModelInfer                              input ``image`` BYTES [N, 1] (or [N]) as raw_input_contents
                                            or bytes_contents; the outputs of ``oip.OUTPUTS`` (all, or
                                            those asked for) as raw_output_contents

The client's deadline is the request's deadline (less a margin, so the answer reaches the client in
time): a rethink that cannot finish before it gets the fast answer with ``rethink_skipped``, as over
HTTP. The request parameter ``timeout`` (microseconds, Triton's) tightens it further. Errors are
gRPC status codes: INVALID_ARGUMENT (bad input), NOT_FOUND (unknown model), RESOURCE_EXHAUSTED
(overload under ``--on-overload reject``, too many images), UNAVAILABLE (not ready yet).

Why not Ray Serve's gRPC proxy: it serves stock clients (one application needs no ``application``
metadata), but it hands the replica a copy of the call's context without the client's deadline
(``RayServegRPCContext`` keeps code, details, metadata and peer; the ``grpc-timeout`` header is not
metadata), so a deadline shorter than a rethink could only end in DEADLINE_EXCEEDED. Each replica
therefore serves the gRPC service itself, with grpcio, on the configured port (SO_REUSEPORT, so
replicas on one node share it and the kernel spreads connections).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from dbmef.cluster.oip import (
    OUTPUTS,
    ModelInfo,
    ProtocolError,
    bytes_elements,
    image_count,
    known_outputs,
    output_tensors,
    raw_bytes,
    unknown_model,
)
from dbmef.runtime.results import ImageResult
from dbmef.runtime.worker import OverloadedError

log = logging.getLogger(__name__)
DEADLINE_MARGIN_S = 0.05  # answered this long before the client's deadline, so the answer arrives in time
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED}


class Backend(Protocol):
    """What the gRPC service needs of a replica (``serve.DBMEFService`` is one)."""

    model: ModelInfo | None  # None until the engines are open

    def is_ready(self) -> bool: ...

    def infer_images(self, images: list[bytes], deadline_s: float | None) -> list[ImageResult]: ...

    def count(self, endpoint: str, outcome: str, seconds: float) -> None: ...


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, outcome: str):
        super().__init__(message)
        self.code, self.outcome = code, outcome


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The servicer: protocol in, ``Backend`` calls, protocol out."""

    def __init__(self, backend: Backend, version: str):
        self.backend, self.version = backend, version

    # -- health and metadata (the methods carry the protocol's names) ---------------------------------
    def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.backend.is_ready())

    def ModelReady(self, request: Any, context: Any) -> Any:
        m = self.backend.model
        known = m is not None and request.name == m.name and request.version in ("", m.version)
        return service_pb2.ModelReadyResponse(ready=bool(known and self.backend.is_ready()))

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(name="dbmef", version=self.version,
                                                  extensions=["binary_tensor_data"])

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        return self._guarded("metadata", context, lambda: self._metadata(request))

    def _metadata(self, request: Any) -> Any:
        m = self._model(request.name, request.version)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=m.name, versions=[m.version], platform=m.platform,
            inputs=[tensor(name="image", datatype="BYTES", shape=[-1, 1])],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in m.outputs()])

    # -- inference ----------------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: Any) -> Any:
        return self._guarded("infer", context, lambda: self._infer(request, context))

    def _infer(self, request: Any, context: Any) -> Any:
        m = self._model(request.model_name, request.model_version)
        images, outputs, timeout_s = decode_grpc_infer(request, m)
        remaining = context.time_remaining()  # None: the client set no deadline
        deadline = None if remaining is None else max(remaining - DEADLINE_MARGIN_S, 0.0)
        if timeout_s is not None:
            deadline = timeout_s if deadline is None else min(deadline, timeout_s)
        try:
            results = self.backend.infer_images(images, deadline)
        except OverloadedError as exc:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "unavailable") from None
        if all(r.error for r in results):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "the request's image " + str(results[0].error).split(": ", 1)[-1], "bad_request")
        response = service_pb2.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id)
        for name, dtype, a in output_tensors(outputs, results, m):
            response.outputs.add(name=name, datatype=dtype, shape=list(a.shape))
            response.raw_output_contents.append(raw_bytes(a))
        return response

    def _model(self, name: str, version: str) -> ModelInfo:
        m = self.backend.model
        if m is None or not self.backend.is_ready():
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the service is warming up (opening engines); retry when "
                         "ServerReady answers true", "unavailable")
        if (why := unknown_model(name, version, m.name, m.version)) is not None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, why, "bad_request")
        return m

    def _guarded(self, endpoint: str, context: Any, call: Callable[[], Any]) -> Any:
        """Run ``call``; a refusal becomes its status code, a defect INTERNAL; either way counted."""
        t0, outcome = time.perf_counter(), "success"
        try:
            return call()
        except ProtocolError as exc:
            outcome = "too_large" if exc.status == 413 else "bad_request"
            context.abort(_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        except _Abort as exc:
            outcome = exc.outcome
            context.abort(exc.code, str(exc))
        except Exception as exc:  # a defect: reported, never a dead server
            outcome = "error"
            log.exception("gRPC %s failed", endpoint)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the service logged it")
        finally:
            self.backend.count(f"grpc_{endpoint}", outcome, time.perf_counter() - t0)


def decode_grpc_infer(request: Any, model: ModelInfo) -> tuple[list[bytes], list[str], float | None]:
    """A ``ModelInferRequest``'s images, wanted outputs and ``timeout`` (seconds); ``ProtocolError``
    naming what is wrong, in the words the HTTP decoder uses."""
    names = [i.name for i in request.inputs]
    first = request.inputs[0] if names else None  # no inputs: image_count refuses the names first
    count = image_count(names, getattr(first, "datatype", ""), list(getattr(first, "shape", [])), model)
    spec = request.inputs[0]
    if len(request.raw_input_contents) > 1:
        raise ProtocolError(f"{len(request.raw_input_contents)} raw_input_contents for one input")
    if request.raw_input_contents:
        images = bytes_elements(request.raw_input_contents[0], count)
    elif len(spec.contents.bytes_contents) == count:
        images = list(spec.contents.bytes_contents)
    else:
        raise ProtocolError(f"input 'image': shape holds {count} elements, contents.bytes_contents has "
                            f"{len(spec.contents.bytes_contents)} (and there is no raw_input_contents)")
    outputs = known_outputs([o.name for o in request.outputs], model) or list(OUTPUTS)
    timeout_s = None
    if "timeout" in request.parameters:
        p = request.parameters["timeout"]
        us = p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else math.nan
        if not (math.isfinite(us) and us > 0):
            raise ProtocolError("parameters.timeout: microseconds, a positive integer (int64_param)")
        timeout_s = us / 1e6
    return images, outputs, timeout_s


class GRPCServer:
    """A running gRPC server and its thread pool; ``port`` is the bound port."""

    def __init__(self, server: grpc.Server, pool: ThreadPoolExecutor, port: int):
        self.server, self.pool, self.port = server, pool, port

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give those in flight ``grace`` seconds, then end the threads."""
        self.server.stop(grace).wait()
        self.pool.shutdown(wait=True)


def start_server(backend: Backend, version: str, port: int, host: str = "0.0.0.0", workers: int = 32,
                 max_concurrent: int = 1024, max_message_bytes: int = 16 << 20) -> GRPCServer:
    """A started gRPC server for ``backend`` on host:port (``port`` 0: any free one). ``workers``
    threads serve calls (each waits on the worker's futures); beyond ``max_concurrent`` calls in
    flight grpcio refuses a call RESOURCE_EXHAUSTED."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbmef-grpc")
    server = grpc.server(pool, maximum_concurrent_rpcs=max_concurrent,
                         options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", max_message_bytes),
                                  ("grpc.max_send_message_length", max_message_bytes)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(backend, version), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        pool.shutdown()
        from dbmef.errors import ConfigError

        raise ConfigError(f"cannot bind the gRPC port {host}:{port} (in use by another program?); choose another "
                          "with --grpc-port")
    server.start()
    return GRPCServer(server, pool, bound)


__all__ = ["Backend", "GRPCServer", "InferenceService", "decode_grpc_infer", "start_server"]
