"""``dbmef serve``'s settings (``ServeConfig``) and how a Serve config file's ``args`` (or ``serve run
... key=value``) become them: what ``serve.app`` builds an application from."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from dbmef.errors import ConfigError
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.worker import WorkerConfig

__all__ = ["ServeConfig", "config_from_args"]


def _service_worker() -> WorkerConfig:
    """A replica's worker defaults: a service bounds how long a rethink may take (a library caller does not)."""
    return WorkerConfig(deadline_s=60.0)


@dataclass(frozen=True)
class ServeConfig:
    """How the service is deployed and how it treats load (the command line's serve options). The
    replica's worker (fast-path batching, queues, deadlines, overload) is ``worker``; how many images
    rethink at once is the runtime's ``window`` (``RuntimeSpec``, ``--window``)."""

    worker: WorkerConfig = field(default_factory=_service_worker)
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_replicas_per_node: int | None = None  # 1 spreads the replicas over the nodes
    max_body_bytes: int = 10 << 20
    max_header_bytes: int = 1 << 20  # the OIP JSON header
    max_images_per_request: int = 64
    # Requests a replica holds at once. Intake is async and the worker bounds the compute, so this is
    # high on purpose: at 64, 64 clients trickling their uploads took every slot and health checks waited.
    max_ongoing_requests: int = 1024
    body_timeout_s: float = 10.0  # the whole body must arrive within this, else 408 and the slot is freed
    request_timeout_s: float = 300.0  # Serve's HTTP proxy: end to end, then 408/504
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections are closed after this
    graceful_shutdown_s: float = 30.0  # on shutdown, in-flight requests get this long to finish
    model_name: str = "dbmef"
    model_version: str = "1"
    # the Open Inference Protocol's gRPC service (oip_grpc), served by every replica on this port
    # (None: no gRPC); grpc_host is the address it binds (dbmef serve --host sets both)
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    proxy_location: str = "EveryNode"  # Serve's HTTP proxies; HeadOnly when nodes share one machine (tests)

    def __post_init__(self) -> None:
        if isinstance(self.worker, dict):  # from to_dict (what a Ray deployment is bound with)
            object.__setattr__(self, "worker", WorkerConfig(**self.worker))
        for name in ("replicas", "max_body_bytes", "max_header_bytes", "max_images_per_request",
                     "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve option {name} = {getattr(self, name)} must be at least 1")
        for name in ("gpus_per_replica", "cpus_per_replica", "body_timeout_s", "request_timeout_s",
                     "keep_alive_timeout_s", "graceful_shutdown_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"serve option {name} = {v} must be finite and >= 0")
        if self.grpc_port is not None and not (isinstance(self.grpc_port, int) and 0 <= self.grpc_port < 65536):
            raise ConfigError(f"serve option grpc_port = {self.grpc_port!r} must be a port number (0-65535)")
        if self.proxy_location not in ("EveryNode", "HeadOnly"):
            raise ConfigError(f"serve option proxy_location = {self.proxy_location!r}: EveryNode or HeadOnly")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.model_name + self.model_version):
            raise ConfigError("serve options model_name / model_version may hold letters, digits, '_', '.', '-'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_args(args: dict[str, Any]) -> tuple[RuntimeSpec, ServeConfig]:
    """A runtime spec and a serve config from application ``args``: ``bundle`` (required), any
    ``RuntimeSpec`` field (``backend``, ``batch_size``, ``window``, ``scoring`` as a mapping, ...),
    any ``ServeConfig`` field, and ``WorkerConfig`` fields flat or under ``worker``. Values may be
    strings (``serve run ... key=value``): each is read as its field's type; unknown keys are refused."""
    args = dict(args)
    if "bundle" not in args:
        raise ConfigError("the application needs args.bundle: the bundle folder to serve (serve run "
                          "dbmef.cluster.serve:app bundle=/path/to/bundle)")
    worker = dict(args.pop("worker", None) or {})
    groups: dict[str, dict[str, Any]] = {"spec": {}, "serve": {}, "worker": worker}
    fields = {"spec": _fields(RuntimeSpec), "serve": _fields(ServeConfig), "worker": _fields(WorkerConfig)}
    for key, value in args.items():
        group = next((g for g in ("spec", "serve", "worker") if key in fields[g] and key != "worker"), None)
        if group is None:
            known = sorted(set(fields["spec"]) | set(fields["serve"]) | set(fields["worker"]))
            raise ConfigError(f"unknown application arg {key!r}; the args are {known}")
        groups[group][key] = value
    typed = {g: {k: _typed(fields[g][k], v, k) for k, v in groups[g].items()} for g in groups}
    serve_cfg = ServeConfig(**{**typed["serve"], "worker": WorkerConfig(**{**asdict(_service_worker()),
                                                                            **typed["worker"]})})
    return RuntimeSpec(**typed["spec"]), serve_cfg


def _fields(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _typed(tp: Any, value: Any, name: str) -> Any:
    """``value`` as type ``tp`` where it came as a string (``key=value`` on the command line)."""
    if not isinstance(value, str):
        return value
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    if optional and value.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if base in (int, float):
            return base(value)
    except ValueError:
        raise ConfigError(f"application arg {name}={value!r} is not a {getattr(base, '__name__', base)}") from None
    return value
