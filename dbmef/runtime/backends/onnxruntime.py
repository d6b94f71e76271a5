"""ONNX Runtime backend of the Engine interface: CPU, CUDA and TensorRT execution providers.

onnxruntime is imported lazily. onnxruntime-gpu silently falls back to the CPU provider when the
CUDA libraries are missing; :class:`OrtEngine` compares the providers a session really uses with
the ones asked for and warns loudly (or raises with ``strict=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BackendUnavailableError, ConfigError, EngineError
from dbmef.runtime.engine import Engine

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            "onnxruntime is not installed: `pip install 'dbmef[cpu]'` (CPU) or `pip install 'dbmef[gpu]'` "
            "(CUDA/TensorRT) - one of the two, never both"
        ) from exc
    ort.set_default_logger_severity(3)  # errors only; dbmef reports what matters itself
    return ort


@dataclass
class OrtOptions:
    """Session settings. ``device``: 'cpu', 'cuda', 'tensorrt' or 'auto' ('auto' is CUDA when the
    installed onnxruntime offers it, else the CPU; never the TensorRT EP, which builds engines on
    first use: ask for it with 'tensorrt'). Thread counts of 0 let ONNX Runtime decide."""

    device: str = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    io_binding: bool | None = None  # default: on for GPU providers
    # Off: an fp16 bundle is already fp16, and an fp32 bundle must not silently run in fp16 (the
    # native TensorRT path builds strongly typed engines with the graph's own precision).
    trt_fp16: bool = False
    trt_cache_dir: str | None = None  # engine and timing caches of the TensorRT EP
    trt_workspace_bytes: int = 4 << 30
    # "name:1x3x224x224,..." for trt_profile_{min,opt,max}_shapes; set per component by the backend
    # from the bundle (the same profiles `dbmef build-engines` uses), so the EP builds one engine
    # up front instead of a new one whenever a new batch size arrives.
    trt_profile_shapes: dict[str, str] = field(default_factory=dict)
    strict: bool = False  # raise instead of warn when a GPU provider is not really used
    # ONNX Runtime's CPU arena keeps (and rounds up) what a session ever allocated until the session
    # is gone: right for serving, wasteful for a one-off check of a multi-GB graph (export validation)
    cpu_mem_arena: bool = True
    extra_session_config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # More threads than cores only makes the pool thrash (1000 threads turned 0.55 s into 105 s).
        cores = os.cpu_count() or 1
        for name in ("intra_op_threads", "inter_op_threads"):
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= cores:
                flag = " (--threads)" if name == "intra_op_threads" else ""
                raise ConfigError(f"{name}{flag} = {n!r} is invalid: 0 lets ONNX Runtime decide, 1..{cores} (this "
                                  "machine's cores) sets it")
        if self.device not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ConfigError(f"device = {self.device!r} is not one of auto, cpu, cuda, tensorrt (--device)")


def available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def resolve_providers(opts: OrtOptions) -> list[Any]:
    """The provider list to request, in priority order, with per-provider options."""
    avail = available_providers()
    dev = opts.device
    if dev == "auto":
        dev = "cuda" if CUDA in avail else "cpu"
    if dev == "cpu":
        return [CPU]
    cuda_opts = {"device_id": opts.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if dev == "cuda":
        if CUDA not in avail:
            raise BackendUnavailableError(
                f"device 'cuda' asked for but this onnxruntime offers only {avail}; install onnxruntime-gpu "
                "(`pip install 'dbmef[gpu]'`, after uninstalling onnxruntime) or use --device cpu"
            )
        return [(CUDA, cuda_opts), CPU]
    if dev == "tensorrt":
        if TRT not in avail:
            raise BackendUnavailableError(
                f"device 'tensorrt' asked for but this onnxruntime offers only {avail}; install onnxruntime-gpu "
                "and TensorRT (`pip install 'dbmef[gpu]'`) or use --device cuda"
            )
        cache = opts.trt_cache_dir or os.path.join("engines", "ort-trt-cache")
        Path(cache).mkdir(parents=True, exist_ok=True)
        trt_opts = {
            "device_id": opts.device_id,
            "trt_fp16_enable": opts.trt_fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
            "trt_max_workspace_size": opts.trt_workspace_bytes,
            **{f"trt_profile_{k}_shapes": v for k, v in opts.trt_profile_shapes.items()},
        }
        return [(TRT, trt_opts), (CUDA, cuda_opts), CPU]
    raise EngineError(f"unknown device {opts.device!r}; use cpu, cuda, tensorrt or auto")


class OrtEngine(Engine):
    """One ONNX model in an InferenceSession, behind the Engine interface."""

    @classmethod
    def on_cpu(cls, path: str | Path, name: str | None = None, arena: bool = True) -> OrtEngine:
        """A CPU session whatever the machine has: what export-time validation compares against
        (``arena=False`` there: memory goes back as soon as a tensor is freed)."""
        return cls(path, name, OrtOptions(device="cpu", cpu_mem_arena=arena))

    def __init__(self, path: str | Path, name: str | None = None, options: OrtOptions | None = None):
        ort = import_onnxruntime()
        self.options = opts = options or OrtOptions()
        self.path = Path(path)
        self.name = name or self.path.stem
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opts.graph_optimization]
        so.log_severity_level = 3  # errors only: ORT's optimizer notes are not the user's business
        so.enable_cpu_mem_arena = opts.cpu_mem_arena
        so.intra_op_num_threads = opts.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        # Spinning pool threads burn the cores another session (the worker's other path, the
        # decoder) needs: on the 2-core machine, with it off, classify of the 597 digits took 9.2 s
        # instead of 13.5 s and a closed loop through ClassifierWorker 9.8 s instead of 15.8 s.
        # extra_session_config can turn it back on.
        entries = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0",
                   **opts.extra_session_config}
        for k, v in entries.items():
            so.add_session_config_entry(k, v)
        requested = resolve_providers(opts)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=requested)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime could not load {self.path}: {exc}") from exc
        self._providers: list[str] = list(self.session.get_providers())
        wanted = [p if isinstance(p, str) else p[0] for p in requested]
        if wanted[0] != CPU and self._providers[0] != wanted[0]:
            msg = (
                f"engine '{self.name}': asked for {wanted[0]} but ONNX Runtime runs it on {self._providers[0]}. "
                "onnxruntime-gpu falls back to the CPU when CUDA/cuDNN/TensorRT libraries are missing or "
                "mismatched; check `python -c \"import onnxruntime; onnxruntime.preload_dlls()\"` and the "
                "CUDA version onnxruntime-gpu was built for"
            )
            if opts.strict:
                raise BackendUnavailableError(msg)
            log.warning("!!! %s", msg)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._in_dtypes = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        on_gpu = self._providers[0] in (CUDA, TRT)
        self.io_binding = on_gpu if opts.io_binding is None else (opts.io_binding and on_gpu)
        self.calls = 0

    @property
    def device(self) -> str:  # type: ignore[override]
        return {CUDA: "cuda", TRT: "tensorrt"}.get(self._providers[0], "cpu")

    @property
    def providers(self) -> list[str]:
        return self._providers

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        inputs = {n: np.ascontiguousarray(feeds[n], dtype=self._in_dtypes[n]) for n in self.input_names}
        try:
            if self.io_binding:
                # Bind host inputs and let outputs stay in device memory until the one copy back:
                # avoids ORT's extra staging copies per call.
                b = self.session.io_binding()
                for n, a in inputs.items():
                    b.bind_cpu_input(n, a)
                for n in self.output_names:
                    b.bind_output(n, "cuda", self.options.device_id)
                self.session.run_with_iobinding(b)
                outs = b.copy_outputs_to_cpu()
            else:
                outs = self.session.run(list(self.output_names), inputs)
        except Exception as exc:
            shapes = {n: a.shape for n, a in inputs.items()}
            raise EngineError(f"engine '{self.name}' ({self.path.name}) failed on inputs {shapes}: {exc}") from exc
        return {n: np.asarray(o) for n, o in zip(self.output_names, outs)}

    def close(self) -> None:
        self.session = None
