"""A simulated NVIDIA device for CI (issue 14): fakes of the ``tensorrt`` builder and runtime objects
and of the ``cuda.bindings.runtime`` calls that ``dbmef/runtime/backends/{cuda,trt_engines,tensorrt}.py``
and ``dbmef/export/trt_build.py`` make, so the native TensorRT backend's code (engine building and keys,
buffers, row gathering by device copies, CUDA graph capture and replay, host synchronisation) runs end
to end in ``make test``.

This is a harness for dbmef's logic, not evidence about TensorRT or CUDA: "device memory" is host
memory (every copy kind is a ``memmove``), a kernel launch is an ONNX Runtime run of the same ONNX
graph, and only the behaviours below are modelled, each after the documentation that states it:

* ``ICudaEngine.get_tensor_shape`` reports -1 for every dimension that is dynamic in the network,
  whatever the optimisation profile ("with -1 in place of each dynamic runtime dimension");
  ``get_tensor_profile_shape(name, 0)`` returns the profile's [min, opt, max].
* ``IExecutionContext.set_input_shape`` returns False for a shape outside the profile.
* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache made
  on another device or TensorRT version (its header differs); ``get_timing_cache`` may be None.
* Stream capture records work instead of running it; ``execute_async_v3`` must have run once
  outside a capture before it is captured (TensorRT allocates lazily on the first enqueue, which a
  capture cannot contain: NVIDIA's TensorRT best-practices guide, "CUDA Graphs").
* ``cudaGraphLaunch`` replays what was captured, reading the buffers as they are at launch time.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

SUCCESS = 0
INVALID = 1


class SimDevice:
    """The state behind both fake modules: allocations, streams, captures, counters."""

    def __init__(self, name: str = "Simulated GPU", cc: tuple[int, int] = (9, 0), count: int = 1):
        self.name, self.cc, self.count = name, cc, count
        self.memory: dict[int, Any] = {}
        self.calls: Counter[str] = Counter()
        self.syncs: Counter[int] = Counter()
        self.capturing: dict[int, list[Any]] = {}
        self.graphs: dict[int, list[Any]] = {}
        self._next = 1

    def new_id(self) -> int:
        self._next += 1
        return self._next

    def alloc(self, nbytes: int) -> int:
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        addr = ctypes.addressof(buf)
        self.memory[addr] = buf
        return addr

    def submit(self, stream: int, work: Any) -> None:
        """Run ``work`` now, or record it when ``stream`` is being captured."""
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()


def fake_cudart(dev: SimDevice) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t:
        cudaSuccess = SUCCESS
        cudaErrorInvalidValue = INVALID

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed = 0, 1, 2

    kinds = {1: "htod", 2: "dtoh", 3: "dtod"}

    def memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        dev.calls[f"memcpy_{kinds[kind]}"] += 1
        dev.submit(int(stream), lambda: ctypes.memmove(int(dst), int(src), int(n)))
        return (SUCCESS,)

    def end_capture(stream: int) -> tuple[int, int]:
        graph = dev.new_id()
        dev.graphs[graph] = dev.capturing.pop(int(stream))
        dev.calls["graph_capture"] += 1
        return SUCCESS, graph

    def launch(exec_id: int, stream: int) -> tuple[int]:
        dev.calls["graph_launch"] += 1
        for work in dev.graphs[exec_id]:
            dev.submit(int(stream), work)
        return (SUCCESS,)

    def sync(stream: int) -> tuple[int]:
        dev.syncs[int(stream)] += 1
        return (SUCCESS,)

    events: dict[int, int] = {}  # event -> the stream it was last recorded on

    def event_record(event: int, stream: int) -> tuple[int]:
        events[int(event)] = int(stream)
        return (SUCCESS,)

    def event_sync(event: int) -> tuple[int]:
        dev.syncs[events[int(event)]] += 1  # waits for that stream's work up to the record
        return (SUCCESS,)

    def memcpy_blocking(dst: int, src: int, n: int, kind: int) -> tuple[int]:
        dev.calls[f"memcpy_{kinds[kind]}"] += 1
        ctypes.memmove(int(dst), int(src), int(n))
        return (SUCCESS,)

    props = types.SimpleNamespace(name=dev.name.encode(), major=dev.cc[0], minor=dev.cc[1], totalGlobalMem=80 << 30)
    rt.__dict__.update(
        cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind, cudaStreamCaptureMode=cudaStreamCaptureMode,
        cudaGetDeviceCount=lambda: (SUCCESS, dev.count),
        cudaSetDevice=lambda d: (dev.calls.update({f"set_device_{d}": 1}), (SUCCESS,))[1],
        cudaGetDeviceProperties=lambda device: (SUCCESS, props),
        cudaGetErrorName=lambda err: (SUCCESS, b"cudaErrorSimulated"),
        cudaGetErrorString=lambda err: (SUCCESS, b"simulated failure"),
        cudaMalloc=lambda n: (SUCCESS, dev.alloc(n)),
        cudaMallocHost=lambda n: (SUCCESS, dev.alloc(n)),
        cudaFree=lambda p: (SUCCESS if dev.memory.pop(int(p), None) is not None else INVALID,),
        cudaFreeHost=lambda p: (SUCCESS if dev.memory.pop(int(p), None) is not None else INVALID,),
        cudaStreamCreate=lambda: (SUCCESS, dev.new_id()),
        cudaStreamNonBlocking=1,
        cudaStreamCreateWithFlags=lambda flags: (SUCCESS, dev.new_id()),
        cudaGetLastError=lambda: (SUCCESS,),
        cudaStreamDestroy=lambda s: (SUCCESS,),
        cudaStreamSynchronize=sync,
        cudaMemcpyAsync=memcpy,
        cudaMemcpy=memcpy_blocking,
        cudaEventDisableTiming=2,
        cudaEventCreateWithFlags=lambda flags: (SUCCESS, dev.new_id()),
        cudaEventRecord=event_record,
        cudaEventSynchronize=event_sync,
        cudaEventDestroy=lambda e: (SUCCESS,),
        cudaStreamBeginCapture=lambda s, mode: (dev.capturing.__setitem__(int(s), []), (SUCCESS,))[1],
        cudaStreamEndCapture=end_capture,
        cudaGraphInstantiate=lambda graph, flags: (SUCCESS, graph),
        cudaGraphLaunch=launch,
        cudaGraphExecDestroy=lambda g: (SUCCESS,),
        cudaGraphDestroy=lambda g: (SUCCESS,),
    )
    return rt


# -- tensorrt -------------------------------------------------------------------------------------------
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


def fake_tensorrt(dev: SimDevice) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-simulated"

    class DataType:
        FLOAT, HALF, INT32, INT64, INT8, BOOL, UINT8 = range(7)

    to_trt = {np.float32: DataType.FLOAT, np.float16: DataType.HALF, np.int64: DataType.INT64,
              np.int32: DataType.INT32}

    class TensorIOMode:
        INPUT, OUTPUT = 1, 2

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        TF32 = 7

    class Network:
        path: str = ""

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any):
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            self.network.path = str(Path(path).resolve())
            return Path(path).is_file()

        def get_error(self, i: int) -> str:
            return ""

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self) -> bytes:
            return json.dumps({"device": dev.name, "trt": trt.__version__}).encode()

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags_cleared: list[int] = []
            self.profile: dict[str, Any] = {}
            self.builder_optimization_level = 3
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: int, limit: int) -> None:
            self.workspace = limit

        def clear_flag(self, flag: int) -> None:
            self.flags_cleared.append(flag)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data and json.loads(cache.data) != json.loads(TimingCache(b"").serialize()) \
                    and not ignore_mismatch:
                return False  # the cache's header names another device or TensorRT version
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: Any) -> int:
            self.profile = profile.shapes
            return 0

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = [list(mn), list(opt), list(mx)]

    class Builder:
        def __init__(self, logger: Any):
            pass

        def create_network(self, flags: int) -> Network:
            assert flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
            dev.calls["engine_build"] += 1
            return json.dumps({"sim_engine": 1, "onnx": network.path, "profile": config.profile,
                               "tf32_cleared": BuilderFlag.TF32 in config.flags_cleared}).encode()

    class Engine:
        def __init__(self, spec: dict[str, Any]):
            from dbmef.runtime.backends.onnxruntime import import_onnxruntime

            ort = import_onnxruntime()
            self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profile = {k: [tuple(s) for s in v] for k, v in spec["profile"].items()}
            self.inputs = {i.name: i for i in self.session.get_inputs()}
            self.outputs = {o.name: o for o in self.session.get_outputs()}
            self.names = [*self.inputs, *self.outputs]

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> int:
            return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            t = self.inputs.get(name) or self.outputs[name]
            return tuple(d if isinstance(d, int) else -1 for d in t.shape)  # -1: dynamic in the network

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            assert profile == 0
            return list(self.profile[name])

        def get_tensor_dtype(self, name: str) -> int:
            t = self.inputs.get(name) or self.outputs[name]
            return to_trt[_NP[t.type]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Context:
        def __init__(self, engine: Engine):
            self.engine = engine
            self.shapes = {n: tuple(engine.profile[n][1]) for n in engine.inputs}  # opt
            self.addresses: dict[str, int] = {}
            self.out_shapes: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}
            self.enqueued = 0

        def set_input_shape(self, name: str, shape: Any) -> bool:
            mn, _, mx = self.engine.profile[name]
            shape = tuple(int(x) for x in shape)
            if len(shape) != len(mn) or any(not a <= s <= b for a, s, b in zip(mn, shape, mx)):
                return False
            self.shapes[name] = shape
            return True

        def _outputs(self) -> dict[str, tuple[int, ...]]:
            key = tuple(sorted(self.shapes.items()))
            if key not in self.out_shapes:
                feeds = {n: np.zeros(s, _NP[self.engine.inputs[n].type]) for n, s in self.shapes.items()}
                outs = self.engine.session.run(None, feeds)
                self.out_shapes[key] = {n: o.shape for n, o in zip(self.engine.outputs, outs)}
            return self.out_shapes[key]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shapes[name] if name in self.shapes else self._outputs()[name]

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            if int(stream) in dev.capturing and self.enqueued == 0:
                return False  # a capture must not contain TensorRT's first, lazily allocating enqueue
            self.enqueued += 1
            dev.calls["enqueue"] += 1
            dev.submit(int(stream), self._run)
            return True

        def _run(self) -> None:
            dev.calls["kernel_run"] += 1
            feeds = {}
            for n, s in self.shapes.items():
                dt = np.dtype(_NP[self.engine.inputs[n].type])
                count = int(np.prod(s))
                raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(self.addresses[n])
                feeds[n] = np.frombuffer(raw, dtype=dt, count=count).reshape(s).copy()
            for n, out in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
                out = np.ascontiguousarray(out)
                ctypes.memmove(self.addresses[n], out.ctypes.data, out.nbytes)

    class Runtime:
        def __init__(self, logger: Any):
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            try:
                spec = json.loads(bytes(data))
            except ValueError:
                return None  # not an engine of this (simulated) TensorRT
            return Engine(spec) if spec.get("sim_engine") == 1 else None

    trt.__dict__.update(
        DataType=DataType, TensorIOMode=TensorIOMode, ILogger=ILogger, Logger=ILogger,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, MemoryPoolType=MemoryPoolType,
        BuilderFlag=BuilderFlag, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        Dims=lambda shape: tuple(int(x) for x in shape),
    )
    return trt


def install(monkeypatch: Any, dev: SimDevice | None = None) -> SimDevice:
    """Put the fakes where ``import tensorrt`` and ``from cuda.bindings import runtime`` find them."""
    dev = dev or SimDevice()
    runtime = fake_cudart(dev)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    for name, mod in (("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime),
                      ("tensorrt", fake_tensorrt(dev))):
        monkeypatch.setitem(sys.modules, name, mod)
    return dev
