"""A thin layer over cuda-python (``cuda.bindings.runtime``): device and pinned memory, streams,
events and CUDA graphs, with every call's error code checked.

Why cuda-python and not pycuda: pycuda compiles against the CUDA toolkit at install time (it needs
curand.h and libcuda) and fails where the package must install, on machines without a GPU
included; cuda-python ships wheels, imports anywhere and is what NVIDIA's own TensorRT diffusion
demo uses for buffers, streams and CUDA graphs.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from dbmef.errors import BackendUnavailableError, EngineError


def cudart() -> Any:
    """The CUDA runtime bindings, imported lazily (cuda-python >= 12.6 layout, then the older one)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailableError(
                "cuda-python is not installed: `pip install 'dbmef[gpu]'` (it provides cuda.bindings.runtime)"
            ) from exc
    return runtime


def _error_name(err: Any) -> str:
    _, name = cudart().cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result: Any) -> Any:
    """cuda-python returns (error, *values): raise on error, return the values."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise EngineError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}: "
                          f"{text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of CUDA devices; 0 when the driver or cuda-python is missing."""
    try:
        rt = cudart()
        err, n = rt.cudaGetDeviceCount()
    except Exception:
        return 0
    return int(n) if int(err) == 0 else 0


def require_gpu() -> None:
    if device_count() == 0:
        raise BackendUnavailableError(
            "no NVIDIA GPU is visible (cudaGetDeviceCount found none, or the CUDA driver / cuda-python "
            "is missing); use the ONNX Runtime backend (`--backend onnxruntime --device cpu`)"
        )


def set_device(device: int) -> None:
    """Make ``device`` this thread's current CUDA device: what TensorRT builds on and where every
    allocation and stream after this lands."""
    if not 0 <= device < device_count():
        raise BackendUnavailableError(f"CUDA device {device} does not exist here ({device_count()} visible); pass "
                                      "--device-id 0..N-1")
    check(cudart().cudaSetDevice(device))


def device_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability: part of every TensorRT engine's cache key."""
    props = check(cudart().cudaGetDeviceProperties(device))
    name = props.name
    name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
            "total_memory": int(props.totalGlobalMem)}


class _Allocation:
    """A CUDA allocation at ``ptr``: released once, by ``free()`` or garbage collection."""

    ptr = 0

    def _release(self, ptr: int) -> None:
        raise NotImplementedError

    def free(self) -> None:
        if self.ptr:
            self._release(self.ptr)
            self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # at interpreter exit the CUDA runtime may already be gone
            pass


class DeviceBuffer(_Allocation):
    """``nbytes`` of device memory."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def _release(self, ptr: int) -> None:
        check(cudart().cudaFree(ptr))


class PinnedArray(_Allocation):
    """A numpy array in page-locked host memory: asynchronous copies from and to it do not make
    the host wait (copies from pageable memory do)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.dtype = np.dtype(dtype)
        self.nbytes = max(int(np.prod(shape)) * self.dtype.itemsize, 1)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes)))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(shape))).reshape(shape)

    def _release(self, ptr: int) -> None:
        check(cudart().cudaFreeHost(ptr))


class Stream:
    """A non-blocking stream: it never synchronises with the legacy default stream, so other
    libraries' work on that stream (ONNX Runtime, a garbage-collected buffer) neither waits for it nor
    breaks a capture on it."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None


class Event:
    """A CUDA event without timing (the cheap kind): ``record`` on a stream, then ``synchronize``
    waits for the work queued before it, and only that."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle))

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            check(cudart().cudaEventDestroy(self.handle))
            self.handle = None


def memcpy_htod(dst: int, src: np.ndarray) -> None:
    """A blocking host-to-device copy (for tables uploaded once)."""
    rt = cudart()
    check(rt.cudaMemcpy(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))


def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             stream.handle))


def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             stream.handle))


def memcpy_dtod_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle))


class CaptureFailed(EngineError):
    """A CUDA graph capture did not succeed; the work runs without a graph (the cause is kept)."""


class CudaGraph:
    """Capture the kernels one ``enqueue()`` launches on ``stream`` and replay them with one launch:
    removes the per-kernel launch overhead of a UNet's several hundred kernels.

    Thread-local capture mode: an unsafe CUDA call from another thread (a buffer freed by the
    garbage collector, ONNX Runtime, a service thread) does not invalidate this capture. A failed
    capture (``enqueue`` raises, or CUDA invalidated it) is ended, its partial graph destroyed, the
    sticky error cleared, and ``CaptureFailed`` raised with the cause, as trtexec does; the caller
    then runs without a graph."""

    def __init__(self, stream: Stream, enqueue: Any):
        rt = cudart()
        self.graph: Any = None
        self.exec: Any = None
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        cause: BaseException | None = None
        try:
            enqueue()
        except BaseException as exc:  # ended below whatever happened: a capture left open breaks the stream
            cause = exc
        err, graph = rt.cudaStreamEndCapture(stream.handle)
        if cause is not None or int(err) != int(rt.cudaError_t.cudaSuccess):
            if graph is not None and int(err) == int(rt.cudaError_t.cudaSuccess):
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()  # clear the capture's error so the next call does not inherit it
            detail = cause if cause is not None else f"cudaStreamEndCapture: {_error_name(err)}"
            raise CaptureFailed(f"CUDA graph capture failed ({detail}); running without a graph") from cause
        self.graph = graph
        try:
            self.exec = check(rt.cudaGraphInstantiate(graph, 0))
        except EngineError as exc:
            rt.cudaGraphDestroy(graph)
            self.graph = None
            raise CaptureFailed(f"CUDA graph instantiation failed ({exc}); running without a graph") from exc

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle))

    def destroy(self) -> None:
        rt = cudart()
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if self.graph is not None:
            check(rt.cudaGraphDestroy(self.graph))
            self.graph = None
