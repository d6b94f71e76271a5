"""The TensorRT engine-file contract shared by the builder (``dbmef.export.trt_build``) and the
runtime backend (``tensorrt.py``): which shape profile and settings a component is built with,
what an engine file is keyed by, and whether a built engine may be loaded on this machine.

Every engine file is keyed by the ONNX hash, the TensorRT version, the GPU name and compute
capability, the precision, the shape profile and the build settings; the key is recorded in the
manifest and a stale engine is never reused silently: a key mismatch is refused with the command
that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dbmef.errors import BackendUnavailableError, BundleError
from dbmef.runtime.bundle import ENGINE_DIR, Bundle, BundleManifest

log = logging.getLogger(__name__)

# Batch profiles per component: (min, opt, max), or a static batch for the scorer/unet.
DEFAULT_BATCH_PROFILES: dict[str, tuple[int, int, int]] = {
    "backbone": (1, 16, 64),
    "text_encoder": (1, 5, 64),
    "vae_encoder": (1, 4, 16),
}


def import_tensorrt() -> None:
    """Raise a clear error when TensorRT cannot be imported. Callers then ``import tensorrt as trt``
    themselves, so that type checkers see the real module (``make check-trt`` checks every call
    against stubs generated from the TensorRT 10.x and 11.x bindings)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed (or its native libraries are missing): `pip install 'dbmef[gpu]'` "
            "on a machine with an NVIDIA GPU; elsewhere use --backend onnxruntime"
        ) from exc


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shape of every input of one engine (equal for a static profile)."""

    inputs: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    @property
    def static(self) -> bool:
        return all(mn == opt == mx for _, mn, opt, mx in self.inputs)

    def max_shape(self, name: str) -> tuple[int, ...]:
        for n, _, _, mx in self.inputs:
            if n == name:
                return mx
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, a, b, c in self.inputs}


def symbol_values(manifest: BundleManifest, component: str) -> dict[str, int]:
    """Concrete sizes for the symbolic dims of a component's contract."""
    emb = manifest.positive_embeddings.shape  # (C, L, D)
    _, h, w = manifest.vae.latent_shape
    sizes = {"L": int(emb[1]), "D": int(emb[2]), "C": len(manifest.class_names), "h": int(h), "w": int(w)}
    if component == "backbone" and manifest.backbone_preprocess is not None:
        _, hh, ww = manifest.backbone_preprocess.input_size
        sizes.update(H=int(hh), W=int(ww))
    elif component == "vae_encoder":
        sizes.update(H=manifest.vae.image_size, W=manifest.vae.image_size)
    return sizes


def shape_profile(manifest: BundleManifest, component: str, unet_batch: int | None = None,
                  batch_profiles: dict[str, tuple[int, int, int]] | None = None) -> ShapeProfile:
    """The engine's shape profile: dynamic batch for the backbone, text encoder and VAE; the
    scorer static at ``unet_batch`` rows (the UNet at 2 x unet_batch: both conditions)."""
    rec = manifest.components[component]
    sizes = symbol_values(manifest, component)
    ub = int(unet_batch or manifest.scoring.unet_batch)
    if component == "scorer":
        bmin = bopt = bmax = ub
    elif component == "unet":
        bmin = bopt = bmax = 2 * ub
    else:
        bmin, bopt, bmax = (batch_profiles or DEFAULT_BATCH_PROFILES)[component]
    out = []
    for t in rec.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d == "B":
                dims.append((bmin, bopt, bmax))
            elif d in sizes:
                dims.append((sizes[d],) * 3)
            else:
                raise BundleError(f"component {component}: input {t.name} has unknown symbolic dim {d!r}")
        out.append((t.name, tuple(x[0] for x in dims), tuple(x[1] for x in dims), tuple(x[2] for x in dims)))
    return ShapeProfile(tuple(out))


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings that change the engine, hence part of its key: the optimisation level, the
    workspace limit and TF32. TF32 is off by default for fp32 graphs: TensorRT enables it by default
    and a strongly typed network does not turn it off, so an fp32 engine would run its convolutions
    and matmuls at TF32 precision, which is not what an fp32 bundle promises."""

    optimization_level: int = 3
    workspace_bytes: int = 8 << 30
    tf32: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str, precision: str,
               profile: ShapeProfile, settings: BuildSettings | None = None) -> str:
    """A stable hash of everything an engine depends on."""
    blob = json.dumps({"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu_name, "cc": compute_capability,
                       "precision": precision, "profile": profile.to_dict(),
                       "settings": (settings or BuildSettings()).to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def engine_file_name(component: str, key: str) -> str:
    return f"{ENGINE_DIR}/{component}-{key}.engine"


_LOGGER: Any = None


def trt_logger() -> Any:
    """The process's one TensorRT logger, routing messages to ``logging`` (TensorRT's INFO becomes
    DEBUG). One for the process and never dropped: TensorRT requires the logger to outlive every
    builder, runtime, engine and parser made with it (NVIDIA's demo and Polygraphy keep one too)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _make_logger()
    return _LOGGER


def _make_logger() -> Any:
    import_tensorrt()
    import tensorrt as trt

    levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR, trt.ILogger.Severity.ERROR: logging.ERROR,
              trt.ILogger.Severity.WARNING: logging.WARNING}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return _Logger()


def usable_engine(bundle: Bundle, component: str) -> Path:
    """The engine file for ``component`` if it was built for this GPU and TensorRT; otherwise a
    BundleError that says to run build-engines (never a silent stale engine)."""
    from dbmef.runtime.backends.cuda import device_info

    import_tensorrt()
    import tensorrt as trt
    manifest, bundle_dir = bundle.manifest, bundle.dir
    rec = manifest.tensorrt.engines.get(component)
    if rec is None:
        raise BundleError(f"no TensorRT engine for {component}; run `dbmef build-engines --bundle {bundle_dir}`")
    gpu = device_info()
    want = (trt.__version__, gpu["name"], gpu["compute_capability"], manifest.components[component].sha256)
    have = (rec.trt_version, rec.gpu, rec.compute_capability, None)
    if want[:3] != have[:3]:
        raise BundleError(
            f"the TensorRT engine for {component} was built for {have[:3]} but this machine has {want[:3]}; "
            f"rebuild with `dbmef build-engines --bundle {bundle_dir}`"
        )
    profile = ShapeProfile(tuple((n, tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))
                                 for n, d in rec.profile.items()))
    settings = BuildSettings(**rec.settings)
    key = engine_key(want[3], trt.__version__, gpu["name"], gpu["compute_capability"],
                     manifest.components[component].precision, profile, settings)
    if key != rec.key:
        raise BundleError(f"the TensorRT engine for {component} is stale (its ONNX changed); rebuild with "
                          f"`dbmef build-engines --bundle {bundle_dir}`")
    return bundle.path(rec.file)
