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
* ``execute_async_v3`` fails while an input shape or a tensor address is unset, and its kernels
  take the shapes and addresses of the enqueue; ``cudaGraphLaunch`` replays what was captured
  (those shapes and addresses), reading the buffers' contents as they are when it runs.
* Strict as CUDA is (issue 24; ``SimDevice`` lists it): queued work runs at synchronisation only;
  an unsafe call inside a capture fails and breaks it, by capture mode and thread; copies check
  pointer kinds and bounds; ``cudaMalloc`` past the device's memory fails; handles are distinct;
  the parser takes only ONNX files, and a build fails (None) without a valid profile for every
  dynamic input.
* Precision is the network's types (strongly typed, the only mode of TensorRT 11: its "Strongly
  Typed Networks" guide): a build with a precision flag (FP16, INT8, BF16) fails, and an fp16
  bundle's engine computes in fp16, since its kernels are ONNX Runtime runs of the fp16 graph
  (every tensor rounded to half precision between operators; ONNX Runtime accumulates inside an
  operator in float32 where it lacks an fp16 kernel, which a GPU's fp16 kernels need not).
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import types
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

SUCCESS = 0
INVALID = 1  # cudaErrorInvalidValue
NO_MEMORY = 2  # cudaErrorMemoryAllocation
BAD_HANDLE = 400  # cudaErrorInvalidResourceHandle
CAPTURE_UNSUPPORTED = 900  # cudaErrorStreamCaptureUnsupported: an unsafe call while a capture is open
CAPTURE_INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated: cudaStreamEndCapture of a broken capture
ERROR_NAMES = {SUCCESS: "cudaSuccess", INVALID: "cudaErrorInvalidValue", NO_MEMORY: "cudaErrorMemoryAllocation",
               BAD_HANDLE: "cudaErrorInvalidResourceHandle", CAPTURE_UNSUPPORTED: "cudaErrorStreamCaptureUnsupported",
               CAPTURE_INVALIDATED: "cudaErrorStreamCaptureInvalidated"}
GLOBAL, THREAD_LOCAL, RELAXED = 0, 1, 2  # cudaStreamCaptureMode


class Capture:
    """An open stream capture: the work recorded so far, its mode and thread, whether CUDA broke it."""

    def __init__(self, mode: int):
        self.work: list[Any] = []
        self.mode, self.thread, self.invalid = mode, threading.get_ident(), False


class SimDevice:
    """The state behind both fake modules: allocations, streams, captures, counters.

    Strict where CUDA is (issue 24): work on a stream is queued and runs only when the host
    synchronises with it (a stream or event sync, or a free, which synchronises the device), so an
    early read of an output sees stale memory; an unsafe call while a capture is open (a sync, an
    allocation or free, a blocking copy, an asynchronous copy from pageable memory) fails with
    ``cudaErrorStreamCaptureUnsupported`` and breaks the capture (in global mode from any thread,
    in thread-local mode from the capturing thread); a graph replays the copies and kernels with
    the addresses and shapes they were captured with; every copy's pointers must lie inside
    allocations of the kinds its direction names (pageable host memory is any address outside the
    device's allocations); handles are distinct and a destroyed one is refused.
    """

    MEMORY = 80 << 30  # "device memory": an allocation past it fails as cudaMalloc does

    def __init__(self, name: str = "Simulated GPU", cc: tuple[int, int] = (9, 0), count: int = 1):
        self.name, self.cc, self.count = name, cc, count
        self.memory: dict[int, Any] = {}  # address -> buffer
        self.kinds: dict[int, tuple[int, str]] = {}  # address -> (size, "device" | "pinned")
        self.calls: Counter[str] = Counter()
        self.stream_flags: dict[int, tuple[int, ...]] = {}  # the flags each stream was created with
        self.loggers: list[Any] = []  # the ILogger every Builder was made with
        self.syncs: Counter[int] = Counter()
        self.capturing: dict[int, Capture] = {}
        self.graphs: dict[int, list[Any]] = {}  # captured graphs
        self.execs: dict[int, list[Any]] = {}  # instantiated graphs
        self.streams: set[int] = set()
        self.pending: dict[int, deque[Any]] = {}  # stream -> work not yet run
        self.queued: Counter[int] = Counter()  # stream -> work items ever queued
        self.done: Counter[int] = Counter()  # stream -> work items run
        self._next = 1

    def new_id(self) -> int:
        self._next += 1
        return self._next

    def alloc(self, nbytes: int, kind: str = "device") -> int:
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        addr = ctypes.addressof(buf)
        self.memory[addr] = buf
        self.kinds[addr] = (max(int(nbytes), 1), kind)
        return addr

    def release(self, ptr: int, kind: str) -> int:
        if self.kinds.get(int(ptr), (0, ""))[1] != kind:
            return INVALID  # not an allocation of this kind (cudaFree of a pinned pointer, twice, ...)
        self.synchronize_all()  # cudaFree and cudaFreeHost synchronise the device
        del self.memory[int(ptr)], self.kinds[int(ptr)]
        return SUCCESS

    def kind_of(self, ptr: int, nbytes: int) -> str | None:
        """"device" / "pinned" when [ptr, ptr + nbytes) lies in one allocation, "host" when it touches
        none, None when it starts in one and runs past its end (out of bounds)."""
        for addr, (size, kind) in self.kinds.items():
            if addr <= ptr < addr + size:
                return kind if ptr + nbytes <= addr + size else None
        return "host"

    # -- streams ---------------------------------------------------------------------------------------
    def submit(self, stream: int, work: Any) -> None:
        """Queue ``work`` on ``stream`` (it runs at the next synchronisation), or record it when the
        stream is being captured."""
        if stream in self.capturing:
            self.capturing[stream].work.append(work)
            return
        self.pending.setdefault(stream, deque()).append(work)
        self.queued[stream] += 1

    def run_until(self, stream: int, count: int) -> None:
        """Run ``stream``'s queued work until ``count`` items have run in all."""
        q = self.pending.get(stream, deque())
        while self.done[stream] < count and q:
            q.popleft()()
            self.done[stream] += 1

    def synchronize(self, stream: int) -> None:
        self.run_until(stream, self.queued[stream])

    def synchronize_all(self) -> None:
        for s in list(self.pending):
            self.synchronize(s)

    def unsafe_call(self, name: str, stream: int | None = None) -> bool:
        """Whether ``name`` breaks an open capture (and so fails): a call on the capturing stream
        always, any other in global mode from any thread and in thread-local mode from the
        capturing thread."""
        broken = [c for s, c in self.capturing.items() if s == stream or c.mode == GLOBAL
                  or (c.mode == THREAD_LOCAL and c.thread == threading.get_ident())]
        for c in broken:
            c.invalid = True
        if broken:
            self.calls[f"unsafe_in_capture_{name}"] += 1
        return bool(broken)


def fake_cudart(dev: SimDevice) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")

    class cudaError_t:
        cudaSuccess = SUCCESS
        cudaErrorInvalidValue = INVALID

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed = (
            GLOBAL, THREAD_LOCAL, RELAXED)

    kinds = {1: "htod", 2: "dtoh", 3: "dtod"}
    sides = {1: (("host", "pinned"), ("device",)), 2: (("device",), ("host", "pinned")), 3: (("device",), ("device",))}

    def check_copy(dst: int, src: int, n: int, kind: int) -> int:
        src_ok, dst_ok = sides[int(kind)]
        if dev.kind_of(int(src), int(n)) not in src_ok or dev.kind_of(int(dst), int(n)) not in dst_ok:
            dev.calls["bad_copy"] += 1
            return INVALID  # a pointer of the wrong kind for this direction, or past its allocation's end
        return SUCCESS

    def memcpy(dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        if (err := check_copy(dst, src, n, kind)) != SUCCESS:
            return (err,)
        host = int(dst) if int(kind) == 2 else int(src) if int(kind) == 1 else None
        if host is not None and dev.kind_of(host, int(n)) == "host" and dev.unsafe_call("pageable_copy", int(stream)):
            return (CAPTURE_UNSUPPORTED,)  # pageable memory cannot be captured into a graph
        dev.calls[f"memcpy_{kinds[kind]}"] += 1
        dev.submit(int(stream), lambda: ctypes.memmove(int(dst), int(src), int(n)))
        return (SUCCESS,)

    def memcpy_blocking(dst: int, src: int, n: int, kind: int) -> tuple[int]:
        if dev.unsafe_call("cudaMemcpy"):
            return (CAPTURE_UNSUPPORTED,)
        if (err := check_copy(dst, src, n, kind)) != SUCCESS:
            return (err,)
        dev.calls[f"memcpy_{kinds[kind]}"] += 1
        ctypes.memmove(int(dst), int(src), int(n))  # the legacy stream: it does not wait for non-blocking ones
        return (SUCCESS,)

    def malloc(kind: str) -> Any:
        def f(n: int) -> tuple[int, int]:
            if dev.unsafe_call(f"malloc_{kind}"):
                return CAPTURE_UNSUPPORTED, 0
            if int(n) > SimDevice.MEMORY:
                return NO_MEMORY, 0
            dev.calls[f"malloc_{kind}"] += 1
            return SUCCESS, dev.alloc(n, kind)
        return f

    def free(kind: str) -> Any:
        def f(p: int) -> tuple[int]:
            if dev.unsafe_call(f"free_{kind}"):
                return (CAPTURE_UNSUPPORTED,)
            return (dev.release(int(p), kind),)
        return f

    def stream_create(*flags: int) -> tuple[int, int]:
        s = dev.new_id()
        dev.streams.add(s)
        dev.stream_flags[s] = flags
        return SUCCESS, s

    def stream_destroy(s: int) -> tuple[int]:
        if int(s) not in dev.streams:
            return (BAD_HANDLE,)
        dev.synchronize(int(s))
        dev.streams.discard(int(s))
        return (SUCCESS,)

    def begin_capture(s: int, mode: int) -> tuple[int]:
        if int(s) not in dev.streams or int(s) in dev.capturing:
            return (BAD_HANDLE,)
        dev.capturing[int(s)] = Capture(int(mode))
        return (SUCCESS,)

    def end_capture(stream: int) -> tuple[int, Any]:
        cap = dev.capturing.pop(int(stream))
        if cap.invalid:
            return CAPTURE_INVALIDATED, None
        graph = dev.new_id()
        dev.graphs[graph] = cap.work
        dev.calls["graph_capture"] += 1
        return SUCCESS, graph

    def instantiate(graph: int, flags: int) -> tuple[int, int]:
        if int(graph) not in dev.graphs:
            return BAD_HANDLE, 0
        exec_id = dev.new_id()
        dev.execs[exec_id] = list(dev.graphs[int(graph)])
        return SUCCESS, exec_id

    def launch(exec_id: int, stream: int) -> tuple[int]:
        if int(exec_id) not in dev.execs:
            return (BAD_HANDLE,)
        dev.calls["graph_launch"] += 1
        for work in dev.execs[int(exec_id)]:
            dev.submit(int(stream), work)
        return (SUCCESS,)

    def drop(table: dict[int, Any]) -> Any:
        return lambda h: ((SUCCESS,) if table.pop(int(h), None) is not None else (BAD_HANDLE,))

    def sync(stream: int) -> tuple[int]:
        if dev.unsafe_call("stream_sync", int(stream)):
            return (CAPTURE_UNSUPPORTED,)
        dev.syncs[int(stream)] += 1
        dev.synchronize(int(stream))
        return (SUCCESS,)

    events: dict[int, tuple[int, int] | None] = {}  # event -> (stream, work queued before it) at its last record

    def event_create(flags: int) -> tuple[int, int]:
        e = dev.new_id()
        events[e] = None
        return SUCCESS, e

    def event_record(event: int, stream: int) -> tuple[int]:
        if int(event) not in events:
            return (BAD_HANDLE,)
        if int(stream) not in dev.capturing:  # (a record inside a capture is not modelled: dbmef makes none)
            events[int(event)] = (int(stream), dev.queued[int(stream)])
        return (SUCCESS,)

    def event_sync(event: int) -> tuple[int]:
        if int(event) not in events:
            return (BAD_HANDLE,)
        if dev.unsafe_call("event_sync"):
            return (CAPTURE_UNSUPPORTED,)
        mark = events[int(event)]
        if mark is not None:
            stream, count = mark
            dev.syncs[stream] += 1
            dev.run_until(stream, count)  # that stream's work up to the record, and no further
        return (SUCCESS,)

    def event_destroy(e: int) -> tuple[int]:
        return (SUCCESS,) if events.pop(int(e), 0) != 0 else (BAD_HANDLE,)

    props = types.SimpleNamespace(name=dev.name.encode(), major=dev.cc[0], minor=dev.cc[1], totalGlobalMem=80 << 30)
    rt.__dict__.update(
        cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind, cudaStreamCaptureMode=cudaStreamCaptureMode,
        cudaGetDeviceCount=lambda: (SUCCESS, dev.count),
        cudaSetDevice=lambda d: (dev.calls.update({f"set_device_{d}": 1}), (SUCCESS,))[1],
        cudaGetDeviceProperties=lambda device: (SUCCESS, props),
        cudaGetErrorName=lambda err: (SUCCESS, ERROR_NAMES.get(int(err), f"cudaError{int(err)}").encode()),
        cudaGetErrorString=lambda err: (SUCCESS, b"simulated failure"),
        cudaMalloc=malloc("device"), cudaMallocHost=malloc("pinned"),
        cudaFree=free("device"), cudaFreeHost=free("pinned"),
        cudaStreamCreate=stream_create,
        cudaStreamNonBlocking=1,
        cudaStreamCreateWithFlags=stream_create,
        cudaGetLastError=lambda: (SUCCESS,),
        cudaStreamDestroy=stream_destroy,
        cudaStreamSynchronize=sync,
        cudaMemcpyAsync=memcpy,
        cudaMemcpy=memcpy_blocking,
        cudaEventDisableTiming=2,
        cudaEventCreateWithFlags=event_create,
        cudaEventRecord=event_record,
        cudaEventSynchronize=event_sync,
        cudaEventDestroy=event_destroy,
        cudaStreamBeginCapture=begin_capture,
        cudaStreamEndCapture=end_capture,
        cudaGraphInstantiate=instantiate,
        cudaGraphLaunch=launch,
        cudaGraphExecDestroy=drop(dev.execs),
        cudaGraphDestroy=drop(dev.graphs),
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
        FP16, INT8, TF32, BF16 = 0, 1, 7, 17

    class Network:
        def __init__(self) -> None:
            self.path = ""
            self.inputs: dict[str, list[int]] = {}  # input -> dims, -1 where dynamic (set by the parser)

    class OnnxParser:
        def __init__(self, network: Network, logger: Any):
            self.network = network
            self.errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def parse_from_file(self, path: str) -> bool:
            """Only a readable ONNX model parses (TensorRT's parser refuses anything else)."""
            import onnx

            try:
                model = onnx.load(str(path), load_external_data=False)
            except Exception as exc:  # not a file, not protobuf, not ONNX
                self.errors.append(f"could not parse {path}: {type(exc).__name__}")
                return False
            self.network.path = str(Path(path).resolve())
            inits = {i.name for i in model.graph.initializer}
            self.network.inputs = {i.name: [d.dim_value if d.HasField("dim_value") else -1
                                            for d in i.type.tensor_type.shape.dim]
                                   for i in model.graph.input if i.name not in inits}
            return True

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self) -> bytes:
            return json.dumps({"device": dev.name, "trt": trt.__version__}).encode()

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags_cleared: list[int] = []
            self.flags_set: list[int] = []
            self.profile: dict[str, Any] = {}
            self.builder_optimization_level = 3
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: int, limit: int) -> None:
            self.workspace = limit

        def clear_flag(self, flag: int) -> None:
            self.flags_cleared.append(flag)

        def set_flag(self, flag: int) -> None:
            self.flags_set.append(flag)

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
            dev.loggers.append(logger)

        def create_network(self, flags: int) -> Network:
            assert flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            """None (TensorRT's build failure) unless every input has a profile that fits it:
            min <= opt <= max, the network's static dimensions kept, its rank."""
            if {BuilderFlag.FP16, BuilderFlag.INT8, BuilderFlag.BF16} & set(config.flags_set):
                dev.calls["precision_flag"] += 1
                return None  # a strongly typed network takes its precision from its types, never a flag
            for name, dims in network.inputs.items():
                shapes = config.profile.get(name)
                if shapes is None and -1 in dims:
                    dev.calls["bad_profile"] += 1
                    return None  # a dynamic input without a profile
                for mn, opt, mx in ([shapes] if shapes else []):
                    if not (len(mn) == len(opt) == len(mx) == len(dims)) or any(
                            not a <= b <= c or (d != -1 and not a == b == c == d)
                            for a, b, c, d in zip(mn, opt, mx, dims)):
                        dev.calls["bad_profile"] += 1
                        return None
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
            # only the static inputs have a shape before set_input_shape (TensorRT: -1 until set)
            self.shapes = {n: tuple(engine.profile[n][0]) for n in engine.inputs
                           if engine.profile[n][0] == engine.profile[n][2]}
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
            if name in self.engine.inputs:
                return self.shapes.get(name, self.engine.get_tensor_shape(name))
            return self._outputs()[name]

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            if int(stream) in dev.capturing and self.enqueued == 0:
                return False  # a capture must not contain TensorRT's first, lazily allocating enqueue
            if set(self.shapes) != set(self.engine.inputs) or set(self.addresses) != set(self.engine.names):
                dev.calls["enqueue_unset"] += 1
                return False  # an input shape or a tensor address was never set
            self.enqueued += 1
            dev.calls["enqueue"] += 1
            # the kernels take the shapes and addresses of now: a graph replays them, whatever is set later
            shapes, addresses = dict(self.shapes), dict(self.addresses)
            dev.submit(int(stream), lambda: self._run(shapes, addresses))
            return True

        def _run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
            dev.calls["kernel_run"] += 1
            feeds = {}
            for n, s in shapes.items():
                dt = np.dtype(_NP[self.engine.inputs[n].type])
                count = int(np.prod(s))
                raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(addresses[n])
                feeds[n] = np.frombuffer(raw, dtype=dt, count=count).reshape(s).copy()
            for n, out in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
                out = np.ascontiguousarray(out)
                ctypes.memmove(addresses[n], out.ctypes.data, out.nbytes)

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
