"""The engine backends the runtime can open a bundle's components with, by name.

A backend is one function ``open(bundle, component, options) -> Engine`` registered under a name
(``bundle``: an opened ``dbmef.runtime.bundle.Bundle``). ``options`` is whatever the caller passed:
the backend's own options object, or a
plain dict (what a ``RuntimeSpec`` ships to Ray workers), or None for its defaults; each backend
turns it into its own settings, so no other module builds backend options. Adding a backend::

    from dbmef.runtime.backends import register

    def open_openvino(bundle, component, options):
        return MyOpenVinoEngine(bundle.path(bundle.manifest.components[component].file), component, options)

    register("openvino", open_openvino)

then ``DBMEFRuntime(bundle, backend="openvino")`` or ``dbmef classify --backend openvino``.
Built in: ``onnxruntime`` (CPU, CUDA, TensorRT execution providers), ``tensorrt`` (native engines
built by ``dbmef build-engines``) and ``auto`` (TensorRT where this bundle has engines for a
component and they open, else ONNX Runtime, saying why at WARNING level).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime.bundle import Bundle, BundleManifest
from dbmef.runtime.engine import Engine

log = logging.getLogger(__name__)

Opener = Callable[[Bundle, str, Any], Engine]


@dataclass(frozen=True)
class Backend:
    name: str
    open: Opener
    description: str = ""
    # options -> the backend's own settings, raising ConfigError for a bad value; run by
    # ``check_options`` when a runtime is specified, so a bad flag fails before any data is read
    settings: Callable[[Any], Any] | None = None


_REGISTRY: dict[str, Backend] = {}


def register(name: str, opener: Opener, description: str = "",
             settings: Callable[[Any], Any] | None = None) -> None:
    """Make ``opener`` available as backend ``name`` (replacing any backend of that name);
    ``settings`` (optional) checks options before anything is opened."""
    if not name or name == "auto":
        raise ConfigError(f"backend name {name!r} is reserved or empty")
    _REGISTRY[name] = Backend(name, opener, description, settings)


def check_options(backend: str, options: Any) -> None:
    """Refuse an unknown backend or options it would refuse, before any work (``auto`` falls back
    to ONNX Runtime, so its options are ONNX Runtime's)."""
    name = "onnxruntime" if backend == "auto" else backend
    if name not in _REGISTRY:
        raise ConfigError(f"backend {backend!r} is not one of the registered backends {list(names())}")
    settings = _REGISTRY[name].settings
    if settings is not None:
        settings(options)


def names() -> tuple[str, ...]:
    """Registered backends, plus 'auto'."""
    return (*_REGISTRY, "auto")


def open_engine(bundle: Bundle, component: str, backend: str, options: Any = None) -> Engine:
    """One component of a bundle on the named backend."""
    if component not in bundle.manifest.components:
        raise BundleError(f"bundle {bundle.dir} has no component {component!r} (it has "
                          f"{sorted(bundle.manifest.components)})")
    if backend == "auto":
        return _open_auto(bundle, component, options)
    if backend not in _REGISTRY:
        raise ConfigError(f"backend {backend!r} is not registered; known backends: {list(names())}")
    return _REGISTRY[backend].open(bundle, component, options)


def _open_auto(bundle: Bundle, component: str, options: Any) -> Engine:
    if component in bundle.manifest.tensorrt.engines:
        try:
            return open_engine(bundle, component, "tensorrt", None)
        except Exception as exc:  # any reason TensorRT cannot serve: say it loudly, then fall back
            log.warning("backend auto: native TensorRT engine for '%s' could not be used (%s); running it on "
                        "ONNX Runtime instead", component, exc)
    return open_engine(bundle, component, "onnxruntime", options)


# -- built-in backends -------------------------------------------------------------------------------
def _ort_settings(options: Any) -> Any:
    """``OrtOptions`` from None, a dict of its fields, or an ``OrtOptions`` (checked by its
    ``__post_init__``)."""
    from dbmef.runtime.backends.onnxruntime import OrtOptions

    if options is None or isinstance(options, dict):
        try:
            return OrtOptions(**(options or {}))
        except TypeError as exc:
            raise ConfigError(f"onnxruntime backend options {options}: {exc}") from exc
    return options


def _open_onnxruntime(bundle: Bundle, component: str, options: Any) -> Engine:
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    options = _ort_settings(options)
    if options.device == "tensorrt" and not options.trt_profile_shapes:
        options = dataclasses.replace(options, trt_profile_shapes=ort_trt_profile(bundle.manifest, component))
    return OrtEngine(bundle.path(bundle.manifest.components[component].file), component, options)


def ort_trt_profile(manifest: BundleManifest, component: str) -> dict[str, str]:
    """The component's TensorRT shape profile (``trt_engines.shape_profile``) in the TensorRT
    execution provider's ``name:AxBxC,...`` form, keyed min / opt / max."""
    from dbmef.runtime.backends.trt_engines import shape_profile

    prof = shape_profile(manifest, component)

    def fmt(j: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[j])}" for name, *shapes in prof.inputs)

    return {"min": fmt(0), "opt": fmt(1), "max": fmt(2)}


def _open_tensorrt(bundle: Bundle, component: str, options: Any) -> Engine:
    if component not in bundle.manifest.tensorrt.engines:
        raise BundleError(
            f"bundle {bundle.dir} has no TensorRT engine for '{component}'; build them with "
            f"`dbmef build-engines --bundle {bundle.dir}` on the target GPU, or use --backend onnxruntime"
        )
    from dbmef.runtime.backends.tensorrt import TrtEngine

    return TrtEngine.from_bundle(bundle, component)


register("onnxruntime", _open_onnxruntime, "ONNX Runtime: CPU, CUDA or TensorRT execution provider", _ort_settings)
register("tensorrt", _open_tensorrt, "native TensorRT engines built by `dbmef build-engines`")
