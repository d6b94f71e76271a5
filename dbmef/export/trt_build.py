"""Build TensorRT engines from a bundle's ONNX files, for the GPU they will run on.

Small loaders after Polygraphy's (``NetworkFromOnnxPath`` -> ``EngineBytesFromNetwork`` ->
``SaveEngine``): each holds its arguments and does one thing when called. Networks are strongly
typed (precision comes from the ONNX graph's types), which works on TensorRT 10.x and 11.x alike:
11.x removed ``BuilderFlag.FP16`` and friends. The backbone, text encoder and VAE get a
dynamic-batch profile; the scorer a static one at the runtime's fixed UNet batch, so its
execution can be captured in a CUDA graph. What an engine file is keyed by, and when the runtime
may load one, is ``dbmef.runtime.backends.trt_engines``: the contract both sides share.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dbmef.errors import EngineError
from dbmef.runtime.backends.trt_engines import (
    ENGINE_DIR,
    BuildSettings,
    ShapeProfile,
    engine_file_name,
    engine_key,
    import_tensorrt,
    shape_profile,
    trt_logger,
)
from dbmef.runtime.bundle import Bundle, ComponentRecord, EngineRecord, TensorRTRecord, sha256_file

log = logging.getLogger(__name__)


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    """Timing caches hold per-GPU, per-version kernel timings: one file per (TensorRT, compute
    capability), so a bundle built on several GPUs never feeds one GPU's cache to another."""
    return f"timing-trt{trt_version}-cc{compute_capability}.cache"


def attach_timing_cache(config: Any, cache_bytes: bytes) -> Any:
    """Give ``config`` a timing cache made from ``cache_bytes``; when TensorRT refuses it (its
    header names another device or version: ``set_timing_cache`` returns False), a fresh empty one.
    Returns the cache in use."""
    cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    if cache is None or not config.set_timing_cache(cache, False):
        if cache_bytes:  # a damaged file (create_timing_cache returned None) or another GPU / TensorRT version
            log.warning("TensorRT refused the saved timing cache (damaged, another GPU or TensorRT version?); "
                        "starting a fresh one")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineError("TensorRT could not create an empty timing cache")
    return cache


def save_timing_cache(config: Any, path: Path) -> None:
    """Write the builder's timing cache, if it has one (``get_timing_cache`` may return None)."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s not updated", path)
        return
    data = cache.serialize()
    if data is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary file, then one rename: an interrupted build never leaves half a cache behind
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(memoryview(data)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NetworkFromOnnxPath:
    """Parse an ONNX file (external data resolved beside it) into a strongly typed network."""

    def __init__(self, path: Path, logger: Any):
        self.path = path
        self.logger = logger

    def __call__(self) -> tuple[Any, Any, Any]:
        import_tensorrt()
        import tensorrt as trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f"TensorRT could not parse {self.path}: {'; '.join(errors) or 'unknown error'}")
        return builder, network, parser


class EngineBytesFromNetwork:
    """Build a serialized engine with one optimization profile, a workspace limit and a timing
    cache that is loaded before and saved after the build."""

    def __init__(self, network_loader: NetworkFromOnnxPath, profile: ShapeProfile, settings: BuildSettings,
                 timing_cache: Path | None = None):
        self.network_loader = network_loader
        self.profile = profile
        self.settings = settings
        self.timing_cache = timing_cache

    def __call__(self) -> bytes:
        import_tensorrt()
        import tensorrt as trt
        builder, network, _parser = self.network_loader()
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings.workspace_bytes)
        config.builder_optimization_level = self.settings.optimization_level
        if not self.settings.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        attach_timing_cache(config, cache_bytes)
        prof = builder.create_optimization_profile()
        for name, mn, opt, mx in self.profile.inputs:
            prof.set_shape(name, trt.Dims(mn), trt.Dims(opt), trt.Dims(mx))
        config.add_optimization_profile(prof)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build an engine from {self.network_loader.path} "
                              "(see the TensorRT messages above, -v)")
        if self.timing_cache is not None:
            save_timing_cache(config, self.timing_cache)
        return bytes(memoryview(serialized))


# The oldest compute capability whose tensor cores run each precision: INT8 from Turing (7.5; TensorRT
# 10's support matrix), FP8 from Ada (8.9) and Hopper (9.0).
MIN_COMPUTE_CAPABILITY = {"int8": (7, 5), "fp8": (8, 9)}


def check_precision(component: str, precision: str, gpu: dict[str, Any]) -> None:
    """Refuse a quantized graph this GPU has no kernels for, naming the GPU and what it needs."""
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    have = tuple(int(x) for x in str(gpu["compute_capability"]).split("."))
    if need is not None and have < need:
        raise EngineError(f"{component} is a {precision} graph, and {gpu['name']} (compute capability "
                          f"{gpu['compute_capability']}) has no {precision} tensor cores: it needs compute capability "
                          f"{need[0]}.{need[1]} or newer. Build it on such a GPU, or serve the fp32/fp16 bundle it "
                          "was quantized from")


def build_engines(bundle_dir: str | Path, components: list[str] | None = None, force: bool = False,
                  workspace_bytes: int = 8 << 30, unet_batch: int | None = None, optimization_level: int = 3,
                  device: int = 0, tf32: bool = False) -> dict[str, EngineRecord]:
    """Build (or reuse) a TensorRT engine per component for this GPU; record them in the manifest.

    An existing engine is reused only when its key (ONNX hash, TensorRT version, GPU, compute
    capability, precision, profile) matches and its file hash checks out.
    """
    from dbmef.runtime.backends.cuda import device_info, require_gpu, set_device

    require_gpu()
    set_device(device)  # the engines are built on, and keyed by, this GPU
    import_tensorrt()
    import tensorrt as trt
    bundle = Path(bundle_dir)
    manifest = Bundle.open(bundle, verify=False).manifest
    gpu = device_info(device)
    names = components or ["backbone", "text_encoder", "vae_encoder", manifest.scorer_component]
    for name in names:  # before any build: a refused precision should not leave half the engines built
        check_precision(name, manifest.components[name].precision, gpu)
    existing = manifest.tensorrt.engines
    logger = trt_logger()
    out: dict[str, EngineRecord] = {}
    for name in names:
        rec: ComponentRecord = manifest.components[name]
        profile = shape_profile(manifest, name, unet_batch)
        settings = BuildSettings(optimization_level, workspace_bytes, tf32)
        key = engine_key(rec.sha256, trt.__version__, gpu["name"], gpu["compute_capability"], rec.precision, profile,
                         settings)
        old = existing.get(name)
        path = bundle / engine_file_name(name, key)
        if not force and old and old.key == key and path.is_file() and sha256_file(path) == old.sha256:
            log.info("%s: reusing %s", name, path.name)
            out[name] = old
            continue
        if old and old.key != key:
            log.info("%s: engine key changed (%s -> %s): rebuilding", name, old.key, key)
        t0 = time.perf_counter()
        cache = bundle / ENGINE_DIR / timing_cache_name(trt.__version__, gpu["compute_capability"])
        data = EngineBytesFromNetwork(NetworkFromOnnxPath(bundle / rec.file, logger), profile, settings, cache)()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = EngineRecord(file=engine_file_name(name, key), key=key, sha256=sha256_file(path),
                                 trt_version=trt.__version__, gpu=gpu["name"],
                                 compute_capability=gpu["compute_capability"], precision=rec.precision,
                                 profile=profile.to_dict(), build_seconds=round(time.perf_counter() - t0, 2),
                                 settings=settings.to_dict())
        log.info("%s: built %s in %.1f s", name, path.name, out[name].build_seconds)
    b = Bundle.open(bundle, verify=False)  # re-read: keep whatever else changed meanwhile
    cache_file = timing_cache_name(trt.__version__, gpu["compute_capability"])
    record = TensorRTRecord({**b.manifest.tensorrt.engines, **out}, f"{ENGINE_DIR}/{cache_file}")
    b.save(b.manifest.replace(tensorrt=record))
    return out
