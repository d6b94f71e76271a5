"""Native TensorRT backend of the Engine interface, without torch: cuda-python for device
memory, streams and CUDA graphs; persistent I/O buffers; ``execute_async_v3``.

For the fused scorer it also offers the row path (``engine.RowScorer``): the noise bank, the
positive table and the images in flight stay on the device, each call's rows are gathered by
device-to-device copies, the static-shape engine is replayed as a CUDA graph, its errors are copied
into a pinned buffer behind an event, and the host waits for one call (one sync) while the next is
already queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import EngineError
from dbmef.runtime.backends import cuda
from dbmef.runtime.backends.row_gather import plan_chunk
from dbmef.runtime.backends.trt_engines import import_tensorrt, trt_logger, usable_engine
from dbmef.runtime.bundle import Bundle
from dbmef.runtime.contracts import SCORER
from dbmef.runtime.engine import Engine, RowScorer

log = logging.getLogger(__name__)


def numpy_dtype(trt: Any, dt: Any) -> np.dtype:
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
             "BOOL": np.bool_, "UINT8": np.uint8}
    for name, np_dt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return np.dtype(np_dt)
    raise EngineError(f"TensorRT tensor type {dt} has no numpy equivalent here")


def dims(d: Any) -> tuple[int, ...]:
    """TensorRT Dims -> tuple (indexing works on every version; iteration is not in its stubs)."""
    return tuple(int(d[j]) for j in range(len(d)))


@dataclass
class Slot:
    """One I/O tensor: its dtype, the largest shape the profile allows, and its buffers."""

    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    device: cuda.DeviceBuffer
    host: cuda.PinnedArray

    @property
    def max_nbytes(self) -> int:
        return int(np.prod(self.max_shape)) * self.dtype.itemsize


def buffer_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes one tensor of ``shape`` takes (what is allocated per I/O slot)."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def static_profile(engine: Any, input_names: Sequence[str]) -> bool:
    """Whether every input has one shape only, so one captured CUDA graph serves every call.

    ``get_tensor_shape`` is no answer: it reports -1 for every dimension that is dynamic in the
    network ("with -1 in place of each dynamic runtime dimension", ICudaEngine docs), and every
    exported graph has a symbolic batch, whatever the profile. The profile is: min == max for
    every input of profile 0 (``get_tensor_profile_shape`` returns [min, opt, max])."""
    for n in input_names:
        if all(d >= 0 for d in dims(engine.get_tensor_shape(n))):
            continue
        mn, _opt, mx = engine.get_tensor_profile_shape(n, 0)
        if dims(mn) != dims(mx):
            return False
    return True


class RowTables:
    """The row path's per-image tables: ``capacity`` slots of latents (S,4,h,w) and negatives
    (S,k,L,D) on the device with pinned host mirrors, the host table of candidates (S,k), and two
    pinned error buffers with their events (the two calls that may be in flight)."""

    def __init__(self, capacity: int, k: int, latent_shape: tuple[int, ...], emb_shape: tuple[int, ...], batch: int):
        self.capacity, self.k, self.latent_shape, self.emb_shape = capacity, k, latent_shape, emb_shape
        self.latent_bytes = int(np.prod(latent_shape)) * 4
        self.emb_bytes = int(np.prod(emb_shape)) * 4
        self.latents = cuda.DeviceBuffer(capacity * self.latent_bytes)
        self.negatives = cuda.DeviceBuffer(capacity * k * self.emb_bytes)
        self.latents_host = cuda.PinnedArray((capacity, *latent_shape), np.float32)
        self.negatives_host = cuda.PinnedArray((capacity, k, *emb_shape), np.float32)
        self.candidates = np.zeros((capacity, k), np.int64)
        self.errors_host = cuda.PinnedArray((2, batch), np.float32)
        self.done = [cuda.Event(), cuda.Event()]

    def free(self) -> None:
        for b in (self.latents, self.negatives, self.latents_host, self.negatives_host, self.errors_host):
            b.free()
        for e in self.done:
            e.destroy()


SCORER_DTYPES = SCORER.input_dtypes  # what the row path's raw device copies assume of each input


class TrtEngine(Engine, RowScorer):
    """A deserialized TensorRT engine with persistent buffers, behind the Engine interface."""

    def __init__(self, path: str | Path, name: str | None = None, use_cuda_graph: bool = True):
        cuda.require_gpu()
        import_tensorrt()
        import tensorrt as trt

        self.trt = trt
        self.path = Path(path)
        self.name = name or self.path.stem
        self.logger = trt_logger()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.path}: built by another TensorRT version or "
                              "for another GPU? Rebuild with `dbmef build-engines`")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.device = "tensorrt"
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_in[n])
        self.output_names = tuple(n for n in names if not is_in[n])
        # Inputs at their profile maximum, so output maxima can be read off the context.
        in_max: dict[str, tuple[int, ...]] = {}
        for n in self.input_names:
            shape = dims(self.engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                shape = dims(self.engine.get_tensor_profile_shape(n, 0)[2])
            in_max[n] = shape
            self.context.set_input_shape(n, shape)
        self.slots: dict[str, Slot] = {}
        for n in names:
            shape = in_max[n] if is_in[n] else dims(self.context.get_tensor_shape(n))
            dt = numpy_dtype(trt, self.engine.get_tensor_dtype(n))
            self.slots[n] = Slot(n, is_in[n], dt, shape, cuda.DeviceBuffer(buffer_bytes(shape, dt)),
                                 cuda.PinnedArray((int(np.prod(shape)),), dt))
            self.context.set_tensor_address(n, self.slots[n].device.ptr)
        self.current: dict[str, tuple[int, ...]] = dict(in_max)
        self.static = static_profile(self.engine, self.input_names)
        # rows per call the profile allows (the first input carries the batch in every component's
        # contract; the scorer's lam is (1,)): the pipeline chunks its calls to this
        self.max_batch = self.slots[self.input_names[0]].max_shape[0]
        self.use_cuda_graph = use_cuda_graph and self.static
        self.graph: cuda.CudaGraph | None = None
        self._resident: dict[str, tuple[Any, cuda.DeviceBuffer]] = {}
        self._rows: RowTables | None = None
        self._src: dict[str, int] = {}
        self._ticket = self._collected = 0
        self.overlapped = 0  # calls launched while the previous one was in flight (pipelining)
        self._batch = self._n_timesteps = 0
        self.calls = 0
        self.syncs = 0  # host synchronisations (gpu_check reports them per batch)
        self.warmup_syncs = 0  # of those, the one before each graph capture (not part of steady state)

    @classmethod
    def from_bundle(cls, bundle: Bundle, component: str) -> TrtEngine:
        return cls(usable_engine(bundle, component), component)

    # -- the Engine interface ---------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return ["TensorRT"]

    def rows(self) -> RowScorer | None:
        return self if set(self.input_names) == set(SCORER_DTYPES) else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for n in self.input_names:
            self._upload(n, feeds[n])
        self._execute()
        out_shapes = {n: dims(self.context.get_tensor_shape(n)) for n in self.output_names}
        for n in self.output_names:
            slot = self.slots[n]
            view = slot.host.array[: int(np.prod(out_shapes[n]))]
            cuda.memcpy_dtoh_async(view, slot.device.ptr, self.stream)
        self.stream.synchronize()
        self.syncs += 1
        self.calls += 1
        return {n: self.slots[n].host.array[: int(np.prod(s))].reshape(s).copy() for n, s in out_shapes.items()}

    def _upload(self, name: str, array: np.ndarray) -> None:
        slot = self.slots[name]
        a = np.ascontiguousarray(array, dtype=slot.dtype)
        if a.nbytes > slot.max_nbytes:
            raise EngineError(f"engine '{self.name}': input {name} of shape {a.shape} exceeds the engine's profile "
                              f"maximum {slot.max_shape}; rebuild engines with a larger profile")
        if a.shape != self.current[name]:
            if not self.context.set_input_shape(name, a.shape):
                raise EngineError(f"engine '{self.name}': shape {a.shape} for {name} is outside its profile")
            self.current[name] = a.shape
            self._drop_graph()
        view = slot.host.array[: a.size]
        view[...] = a.reshape(-1)
        cuda.memcpy_htod_async(slot.device.ptr, view, self.stream)

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise EngineError(f"engine '{self.name}': execute_async_v3 failed")

    def _execute(self) -> None:
        if not self.use_cuda_graph:
            self._enqueue()
            return
        if self.graph is None:
            # One ordinary run first: TensorRT may allocate or initialise lazily, which cannot be
            # captured; then capture the kernels of one run and replay them from now on.
            self._enqueue()
            self.stream.synchronize()  # once per engine (and per input-shape change), not per batch
            self.syncs += 1
            self.warmup_syncs += 1
            try:
                self.graph = cuda.CudaGraph(self.stream, self._enqueue)
            except cuda.CaptureFailed as exc:
                log.warning("engine '%s': %s", self.name, exc)
                self.use_cuda_graph = False
                self._enqueue()  # this call's work, uncaptured
                return
        self.graph.launch(self.stream)

    def _drop_graph(self) -> None:
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None

    # -- the scorer's row path (engine.RowScorer) --------------------------------------------------
    def _resident_buffer(self, key: str, array: np.ndarray) -> int:
        """Upload ``array`` once and keep it on the device while the same object is passed."""
        held = self._resident.get(key)
        if held is not None and held[0] is array:
            return held[1].ptr
        a = np.ascontiguousarray(array)
        if held is not None and held[1].nbytes >= a.nbytes:
            buf = held[1]  # grow-only: reuse the allocation (cudaFree would synchronise the device)
        else:
            buf = cuda.DeviceBuffer(a.nbytes)
        cuda.memcpy_htod(buf.ptr, a)  # once per table, at open: a plain synchronous copy is fine
        self._resident[key] = (array, buf)
        return buf.ptr

    def open_rows(self, noise: np.ndarray, timesteps: np.ndarray, positive: np.ndarray, lam: np.ndarray,
                  batch: int, capacity: int, k: int) -> None:
        """The device tables of the row path: the noise bank, timestep grid and positive table
        (uploaded once and kept while the same arrays are passed), ``capacity`` image slots (latent
        and negatives, with pinned host mirrors to upload from), two pinned error buffers and two
        events for the two calls that may be in flight. Buffers only grow: a second scheduler on
        the same engine allocates nothing unless it needs more slots."""
        if set(self.input_names) != set(SCORER_DTYPES):
            raise EngineError(f"engine '{self.name}' is not a fused scorer")
        # The device copies move raw bytes: every slot must hold what the host arrays hold.
        wrong = {n: str(self.slots[n].dtype) for n, dt in SCORER_DTYPES.items() if self.slots[n].dtype != dt}
        if wrong:
            raise EngineError(f"engine '{self.name}': input types {wrong} are not the fused scorer's "
                              f"{ {n: d.name for n, d in SCORER_DTYPES.items()} }; re-export the bundle")
        if self.slots["x0"].max_shape[0] != batch:
            raise EngineError(f"engine '{self.name}' was built for {self.slots['x0'].max_shape[0]} rows per call, "
                              f"the scorer asks for {batch}; rebuild engines with --unet-batch {batch}")
        latent_shape, emb_shape = tuple(noise.shape[2:]), tuple(positive.shape[1:])
        self._src = {"noise": self._resident_buffer("noise", noise),
                     "timesteps": self._resident_buffer("timesteps", np.ascontiguousarray(timesteps, np.int64)),
                     "positive": self._resident_buffer("positive", positive)}
        t = self._rows
        if t is None or t.capacity < capacity or t.k != k or t.latent_shape != latent_shape or t.emb_shape != emb_shape:
            if t is not None:
                t.free()
            t = self._rows = RowTables(capacity, k, latent_shape, emb_shape, batch)
        self._src.update(latents=t.latents.ptr, negative=t.negatives.ptr)
        self._upload("lam", lam)
        self._batch, self._n_timesteps = batch, int(noise.shape[1])

    def load_rows(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray) -> None:
        """Copy one image into ``slot`` (through its pinned mirror, so the copy does not wait)."""
        t = self._tables()
        t.latents_host.array[slot] = latent
        t.negatives_host.array[slot] = negatives
        t.candidates[slot] = candidates
        cuda.memcpy_htod_async(t.latents.ptr + slot * t.latent_bytes, t.latents_host.array[slot], self.stream)
        cuda.memcpy_htod_async(t.negatives.ptr + slot * t.k * t.emb_bytes, t.negatives_host.array[slot], self.stream)

    def launch_rows(self, rows: np.ndarray) -> int:
        """Gather the rows (B, 4) = (slot, v, i, c) into the engine's inputs by device copies, run
        the engine (its CUDA graph), copy the B errors into a pinned buffer and record an event;
        nothing waits."""
        t = self._tables()
        ticket = self._ticket
        self._ticket += 1
        if ticket > self._collected:  # the previous call is still in flight: this one was queued behind it
            self.overlapped += 1
        out = t.errors_host.array[ticket % 2]
        s, v, i, c = rows.T
        for cp in plan_chunk(s, v, i, c, t.candidates, t.latent_bytes, t.emb_bytes, self._n_timesteps, t.k):
            cuda.memcpy_dtod_async(self.slots[cp.dst].device.ptr + cp.dst_offset, self._src[cp.src] + cp.src_offset,
                                   cp.nbytes, self.stream)
        self._execute()
        cuda.memcpy_dtoh_async(out, self.slots["error"].device.ptr, self.stream)
        t.done[ticket % 2].record(self.stream)
        self.calls += 1
        return ticket

    def collect_rows(self, ticket: int) -> np.ndarray:
        """Wait for call ``ticket`` (and what was queued before it, not after: one host sync) and
        return its (B,) errors."""
        t = self._tables()
        t.done[ticket % 2].synchronize()
        self.syncs += 1
        self._collected = ticket + 1
        return t.errors_host.array[ticket % 2].copy()

    def close_rows(self) -> None:
        """Nothing to release per scheduler: the tables are kept (grow-only) until ``close``."""

    def _tables(self) -> RowTables:
        if self._rows is None:
            raise EngineError(f"engine '{self.name}': open_rows was not called")
        return self._rows

    def close(self) -> None:
        """Release everything now, in dependency order (an execution context holds GBs of activation
        memory for the UNet: it must not wait for the garbage collector): the graph, the context, the
        engine, the runtime, then the buffers and the stream. Calling it twice is harmless."""
        if self.stream.handle is None:
            return
        self.stream.synchronize()  # nothing of ours may still run on what is freed below
        self._drop_graph()
        del self.context  # the context before the engine, the engine before the runtime
        del self.engine
        del self.runtime
        for slot in self.slots.values():
            slot.device.free()
            slot.host.free()
        for _, buf in self._resident.values():
            buf.free()
        if self._rows is not None:
            self._rows.free()
            self._rows = None
        self._resident.clear()
        self.stream.destroy()
