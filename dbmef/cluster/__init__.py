"""Scale-out with Ray (the optional ``dbmef[ray]`` extra): distributed evaluation on Ray Data
(``ray_eval``) and an HTTP service on Ray Serve (``serve``). Nothing outside this package imports
Ray; both build one ``DBMEFRuntime`` per worker from a ``RuntimeSpec`` (``dbmef.runtime``)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

from dbmef.runtime import RuntimeSpec

__all__ = ["RuntimeSpec", "for_this_actor", "init_ray", "require_ray"]


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # the optional extra is missing
        from dbmef.errors import ConfigError

        raise ConfigError("Ray is not installed: pip install 'dbmef[ray]' (Ray Data and Ray Serve)") from exc
    return ray


def for_this_actor(spec: RuntimeSpec) -> RuntimeSpec:
    """``spec`` as a Ray actor or Serve replica builds it: ONNX Runtime's thread pool sized to the
    CPUs Ray assigned this actor (``--cpus-per-actor``, ``cpus_per_replica``; at least 1), unless the
    spec sets ``intra_op_threads`` itself. ONNX Runtime's default is a thread per core of the node,
    whatever Ray reserved, and its pool threads spin while they wait: N replicas of one CPU each on an
    N-core node would run N^2 threads, each replica taking CPU Ray had given the others."""
    opts = spec.options
    if spec.backend not in ("onnxruntime", "auto") or not isinstance(opts, dict) or opts.get("intra_op_threads"):
        return spec
    try:
        cpus = float(require_ray().get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # the driver, or Ray not connected: Ray assigns nothing there; ONNX Runtime's default
        return spec
    if cpus <= 0:
        return spec
    threads = max(1, min(math.floor(cpus), os.cpu_count() or 1))
    return dataclasses.replace(spec, options={**opts, "intra_op_threads": threads})


def init_ray(address: str | None) -> bool:
    """Join the cluster at ``address`` (e.g. ``auto``), or start a local instance, unless Ray is
    already up in this process. Returns whether this call started it (so the caller shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            from dbmef.errors import ConfigError

            raise ConfigError(f"could not join the Ray cluster at {address!r}: {str(exc).splitlines()[0][:200]}; "
                              "check the address (auto, HOST:6379 or ray://HOST:10001) and that the cluster is up"
                              ) from None
    else:
        # Ray turns token authentication on for a new local instance (the secure default) and warns
        # that it did on every start; that one notice is dropped. Its warning when authentication is
        # *off* is kept.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AuthEnabledNotice())
        ray.init(**kwargs)
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``ray://host:port`` address must accept a connection before Ray Client tries it (which
    otherwise retries for a long while and fails with a traceback)."""
    if not address.startswith("ray://"):
        return
    import socket

    from dbmef.errors import ConfigError

    host, _, port = address[len("ray://"):].partition(":")
    try:
        port_n = int(port or 10001)
        with socket.create_connection((host, port_n), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({type(exc).__name__}: {exc}); check the "
                          "head node's address and Ray Client port (default 10001)") from None


class _AuthEnabledNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")
