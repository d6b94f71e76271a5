"""Scale-out with Ray (the optional ``dbmef[ray]`` extra): distributed evaluation on Ray Data
(``ray_eval``) and an HTTP service on Ray Serve (``serve``). Nothing outside this package imports
Ray; both build one ``DBMEFRuntime`` per worker from a ``RuntimeSpec``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # the optional extra is missing
        from dbmef.errors import ConfigError

        raise ConfigError("Ray is not installed: pip install 'dbmef[ray]' (Ray Data and Ray Serve)") from exc
    return ray


def init_ray(address: str | None) -> bool:
    """Join the cluster at ``address`` (e.g. ``auto``), or start a local instance, unless Ray is
    already up in this process. Returns whether this call started it (so the caller shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)
    return True


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a worker needs to build its own runtime: plain data, cheap to ship.

    The runtime holds no state that changes answers (noise banks are seeded, the negative cache
    only memoises), so any worker gives any image the same answer.
    """

    bundle: str
    backend: str = "onnxruntime"
    device: str = "auto"
    threads: int = 0
    verify: bool = True
    batch_size: int = 16
    scoring: dict[str, Any] = field(default_factory=dict)  # overrides of the bundle's scoring config
    prot: float | None = None  # 0: rethink everything, 1: nothing; None: the bundle's protector
    lazy: bool = True  # open engines on first use: a fast-path worker never loads the UNet

    def build(self) -> Any:
        import math

        from dbmef.runtime.bundle import load_manifest
        from dbmef.runtime.ort_backend import OrtOptions
        from dbmef.runtime.protector import Protector
        from dbmef.runtime.runtime import DBMEFRuntime

        scoring = load_manifest(self.bundle).scoring.replace(**self.scoring) if self.scoring else None
        protector = None
        if self.prot is not None:
            protector = Protector(math.inf if self.prot == 0.0 else -math.inf, self.prot, None)
        return DBMEFRuntime(self.bundle, backend=self.backend,
                            options=OrtOptions(device=self.device, intra_op_threads=self.threads),
                            verify=self.verify, scoring=scoring, protector=protector, batch_size=self.batch_size,
                            lazy=self.lazy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
