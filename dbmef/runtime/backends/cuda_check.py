"""A self-check of ``cuda.py`` on a real (or simulated) CUDA device: what the GPU machine's
``benchmarks/device_check.py`` runs first, and what the tests run on ``tests/simdevice.py``. It
needs the CUDA bindings and a device, nothing of TensorRT."""

from __future__ import annotations

from typing import Any

import numpy as np

from dbmef.errors import BackendUnavailableError, EngineError
from dbmef.runtime.backends import cuda
from dbmef.runtime.backends.row_gather import plan_chunk

__all__ = ["CountingCudart", "check_cuda", "row_gather_on_device"]


class CountingCudart:
    """The CUDA runtime module with its allocation calls counted (to prove none per batch)."""

    COUNTED = ("cudaMalloc", "cudaMallocHost", "cudaFree", "cudaFreeHost", "cudaMallocAsync", "cudaFreeAsync")

    def __init__(self, rt: Any):
        self._rt, self.counts = rt, dict.fromkeys(self.COUNTED, 0)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._rt, name)
        if name in self.counts:
            def counted(*args: Any) -> Any:
                self.counts[name] += 1
                return value(*args)
            return counted
        return value

    @property
    def allocations(self) -> int:
        return sum(self.counts.values())


def check_cuda() -> dict[str, Any]:
    """``cuda.py``'s primitives on device 0: copies through the non-blocking stream, the error path,
    a graph's replay, a capture that synchronises refused, and the row path's gathers against numpy
    with no allocation per batch. ``passed`` says whether all held; BackendUnavailableError without
    a CUDA device."""
    if cuda.device_count() == 0:
        raise BackendUnavailableError("no CUDA device (or cuda-python) here")
    cuda.set_device(0)
    out: dict[str, Any] = {"device": cuda.device_info(0)}
    rng = np.random.default_rng(0)
    stream = cuda.Stream()

    # copies: host -> device -> pinned, through the non-blocking stream
    a = rng.standard_normal(1 << 16).astype(np.float32)
    buf = cuda.DeviceBuffer(a.nbytes)
    pinned = cuda.PinnedArray(a.shape, np.float32)
    cuda.memcpy_htod(buf.ptr, a)
    cuda.memcpy_dtoh_async(pinned.array, buf.ptr, stream)
    stream.synchronize()
    out["copies_round_trip"] = bool(np.array_equal(pinned.array, a))

    # the error path: an impossible allocation names its CUDA error; the next call still works
    try:
        cuda.DeviceBuffer(1 << 60)
        out["error_raised"] = False
    except EngineError as exc:
        out["error_raised"], out["error_message"] = True, str(exc)
    probe = cuda.DeviceBuffer(16)
    out["works_after_error"] = True
    probe.free()

    # a graph captured on the stream replays its copy, reading the source as it is at launch
    b = cuda.DeviceBuffer(a.nbytes)
    graph = cuda.CudaGraph(stream, lambda: cuda.memcpy_dtod_async(b.ptr, buf.ptr, a.nbytes, stream))
    a2 = (a * 2).astype(np.float32)
    cuda.memcpy_htod(buf.ptr, a2)
    graph.launch(stream)
    cuda.memcpy_dtoh_async(pinned.array, b.ptr, stream)
    stream.synchronize()
    out["graph_replays_at_launch"] = bool(np.array_equal(pinned.array, a2))
    graph.destroy()

    # a capture that synchronises (forbidden while capturing) fails cleanly; the stream still works
    try:
        cuda.CudaGraph(stream, stream.synchronize)
        out["bad_capture_refused"] = False
    except cuda.CaptureFailed as exc:
        out["bad_capture_refused"], out["bad_capture_message"] = True, str(exc)
    cuda.memcpy_dtoh_async(pinned.array, buf.ptr, stream)
    stream.synchronize()
    out["stream_works_after_failed_capture"] = bool(np.array_equal(pinned.array, a2))

    out["row_gather"] = row_gather_on_device(stream, rng)
    for x in (buf, b, pinned):
        x.free()
    stream.destroy()
    out["passed"] = all(out[k] for k in ("copies_round_trip", "error_raised", "works_after_error",
                                         "graph_replays_at_launch", "bad_capture_refused",
                                         "stream_works_after_failed_capture")) and out["row_gather"]["passed"]
    return out


def row_gather_on_device(stream: Any, rng: np.random.Generator, batches: int = 20) -> dict[str, Any]:
    """The scorer row path's gathers on the device (the copies ``TrtEngine.launch_rows`` issues),
    checked against numpy's gather, allocations counted per batch."""

    M, V, n, C, k, L, D, B = 8, 2, 10, 10, 3, 77, 64, 32
    lat = (4, 8, 8)
    src: dict[str, np.ndarray] = {"latents": rng.standard_normal((M, *lat)).astype(np.float32),
           "noise": rng.standard_normal((V, n, *lat)).astype(np.float32),
           "timesteps": rng.integers(0, 1000, n).astype(np.int64),
           "positive": rng.standard_normal((C, L, D)).astype(np.float32),
           "negative": rng.standard_normal((M, k, L, D)).astype(np.float32)}
    candidates = np.stack([rng.choice(C, k, replace=False) for _ in range(M)]).astype(np.int64)
    dev = {name: cuda.DeviceBuffer(x.nbytes) for name, x in src.items()}
    for name, x in src.items():
        cuda.memcpy_htod(dev[name].ptr, x)
    shapes = {"x0": (B, *lat), "eps": (B, *lat), "timestep": (B,), "emb_pos": (B, L, D), "emb_neg": (B, L, D)}
    dtypes = {"timestep": np.int64}
    dst = {name: cuda.DeviceBuffer(int(np.prod(s)) * np.dtype(dtypes.get(name, np.float32)).itemsize)
           for name, s in shapes.items()}
    host = {name: cuda.PinnedArray(s, dtypes.get(name, np.float32)) for name, s in shapes.items()}
    lat_b, emb_b = int(np.prod(lat)) * 4, L * D * 4
    counting = CountingCudart(cuda.cudart())
    real = cuda.cudart
    cuda.cudart = lambda: counting  # type: ignore[assignment]
    wrong, allocs_after_first = 0, 0
    try:
        for t in range(batches):
            before = counting.allocations
            rows = np.column_stack([rng.integers(0, M, B), rng.integers(0, V, B), rng.integers(0, n, B),
                                    rng.integers(0, k, B)])
            m, v, i, c = rows.T
            for cp in plan_chunk(m, v, i, c, candidates, lat_b, emb_b, n, k):
                cuda.memcpy_dtod_async(dst[cp.dst].ptr + cp.dst_offset, dev[cp.src].ptr + cp.src_offset, cp.nbytes,
                                       stream)
            for name in shapes:
                cuda.memcpy_dtoh_async(host[name].array, dst[name].ptr, stream)
            stream.synchronize()
            want = {"x0": src["latents"][m], "eps": src["noise"][v, i], "timestep": src["timesteps"][i],
                    "emb_pos": src["positive"][candidates[m, c]], "emb_neg": src["negative"][m, c]}
            wrong += sum(not np.array_equal(host[name].array, want[name]) for name in shapes)
            if t > 0:
                allocs_after_first += counting.allocations - before
    finally:
        cuda.cudart = real  # type: ignore[assignment]
    for held in (*dev.values(), *dst.values(), *host.values()):
        held.free()
    return {"batches": batches, "rows_per_batch": B, "inputs_differing_from_numpy": wrong,
            "allocations_after_first_batch": allocs_after_first,
            "passed": wrong == 0 and allocs_after_first == 0}
