"""The simulated device is strict where CUDA is (issue 24): each strictness catches a planted fault
that the lenient device let pass. The fault is written here, against dbmef's own cuda layer or the
fake TensorRT context, and the device must refuse it or show its wrong result."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest

from tests.simdevice import install


@pytest.fixture
def cuda(monkeypatch):
    from dbmef.runtime.backends import cuda as cuda_mod

    dev = install(monkeypatch)
    return cuda_mod, dev


def test_work_runs_at_synchronisation_so_an_early_read_is_stale(cuda):
    cu, _ = cuda
    s = cu.Stream()
    a = np.arange(8, dtype=np.float32)
    buf, out = cu.DeviceBuffer(a.nbytes), cu.PinnedArray(a.shape, np.float32)
    cu.memcpy_htod(buf.ptr, a)
    cu.memcpy_dtoh_async(out.array, buf.ptr, s)
    assert not out.array.any()  # planted fault: read before the sync
    s.synchronize()
    np.testing.assert_array_equal(out.array, a)


def test_an_event_waits_for_the_work_before_its_record_only(cuda):
    cu, _ = cuda
    s, e = cu.Stream(), cu.Event()
    a = np.arange(4, dtype=np.float32) + 1
    buf = cu.DeviceBuffer(a.nbytes)
    first, second = cu.PinnedArray(a.shape, np.float32), cu.PinnedArray(a.shape, np.float32)
    cu.memcpy_htod(buf.ptr, a)
    cu.memcpy_dtoh_async(first.array, buf.ptr, s)
    e.record(s)
    cu.memcpy_dtoh_async(second.array, buf.ptr, s)
    e.synchronize()
    np.testing.assert_array_equal(first.array, a)
    assert not second.array.any()  # queued after the record: reading it needs another wait


@pytest.mark.parametrize("fault", ["sync", "malloc", "pageable_copy", "blocking_copy"])
def test_an_unsafe_call_inside_a_capture_fails_it(cuda, fault):
    cu, dev = cuda
    s = cu.Stream()
    a = np.ones(4, np.float32)
    buf = cu.DeviceBuffer(a.nbytes)
    held = []
    enqueue = {"sync": s.synchronize, "malloc": lambda: held.append(cu.DeviceBuffer(16)),
               "pageable_copy": lambda: cu.memcpy_htod_async(buf.ptr, a, s),
               "blocking_copy": lambda: cu.memcpy_htod(buf.ptr, a)}[fault]
    with pytest.raises(cu.CaptureFailed, match="cudaErrorStreamCapture"):
        cu.CudaGraph(s, enqueue)
    assert not dev.capturing  # ended
    pinned = cu.PinnedArray(a.shape, np.float32)
    cu.memcpy_dtoh_async(pinned.array, buf.ptr, s)  # the stream works afterwards
    s.synchronize()


def test_capture_modes_decide_whether_another_thread_breaks_a_capture(cuda):
    """An allocation on another thread breaks a global-mode capture (what dbmef used before issue
    24) but not the thread-local one dbmef uses now."""
    cu, _ = cuda
    rt = cu.cudart()
    s = cu.Stream()
    for mode, broken in ((rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal, True),
                         (rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal, False)):
        cu.check(rt.cudaStreamBeginCapture(s.handle, mode))
        errors: list[int] = []
        t = threading.Thread(target=lambda out=errors: out.append(rt.cudaMalloc(64)[0]))
        t.start()
        t.join()
        err, _ = rt.cudaStreamEndCapture(s.handle)
        assert (err != 0) == broken and (errors[0] != 0) == broken


def test_a_graph_replays_the_addresses_and_shapes_it_captured(tmp_path, monkeypatch):
    """Planted fault: rebinding a tensor address after capture without capturing again. The replay
    still writes where it was captured to write; the new buffer stays empty. An unset input shape
    fails the enqueue."""
    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.runtime.backends import cuda as cu
    from tests.simdevice import fake_tensorrt

    dev = install(monkeypatch)
    trt = fake_tensorrt(dev)
    profile = {"pixel_values": [[1, 3, 16, 16], [2, 3, 16, 16], [4, 3, 16, 16]]}
    spec = {"sim_engine": 1, "onnx": str(demo_bundle_dir() / "backbone.onnx"), "profile": profile}
    engine = trt.Runtime(None).deserialize_cuda_engine(json.dumps(spec).encode())
    ctx = engine.create_execution_context()
    s = cu.Stream()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    xin, out_a, out_b = cu.DeviceBuffer(x.nbytes), cu.DeviceBuffer(2 * 10 * 4), cu.DeviceBuffer(2 * 10 * 4)
    ctx.set_tensor_address("pixel_values", xin.ptr)
    ctx.set_tensor_address("logits", out_a.ptr)
    assert not ctx.execute_async_v3(s.ptr)  # planted fault: the dynamic input's shape was never set
    assert ctx.set_input_shape("pixel_values", x.shape)
    cu.memcpy_htod(xin.ptr, x)
    assert ctx.execute_async_v3(s.ptr)
    s.synchronize()
    graph = cu.CudaGraph(s, lambda: ctx.execute_async_v3(s.ptr))
    ctx.set_tensor_address("logits", out_b.ptr)  # the planted fault: no new capture
    graph.launch(s)
    got_a, got_b = cu.PinnedArray((2, 10), np.float32), cu.PinnedArray((2, 10), np.float32)
    cu.memcpy_dtoh_async(got_a.array, out_a.ptr, s)
    cu.memcpy_dtoh_async(got_b.array, out_b.ptr, s)
    s.synchronize()
    assert got_a.array.any() and not got_b.array.any()


def test_copies_check_pointer_kinds_and_bounds(cuda):
    from dbmef.errors import EngineError

    cu, _ = cuda
    s = cu.Stream()
    buf = cu.DeviceBuffer(16)
    pinned = cu.PinnedArray((8,), np.float32)  # 32 bytes: more than the device buffer holds
    with pytest.raises(EngineError, match="cudaErrorInvalidValue"):
        cu.memcpy_dtoh_async(pinned.array, buf.ptr, s)  # reads past the end of the allocation
    with pytest.raises(EngineError, match="cudaErrorInvalidValue"):
        cu.memcpy_dtod_async(buf.ptr, pinned.ptr, 16, s)  # a host pointer as a device source
    with pytest.raises(EngineError, match="cudaErrorInvalidValue"):
        cu.check(cu.cudart().cudaFree(pinned.ptr))  # pinned memory freed as device memory
    with pytest.raises(EngineError, match="cudaErrorMemoryAllocation"):
        cu.DeviceBuffer(1 << 60)


def test_handles_are_distinct_and_a_destroyed_graph_is_refused(cuda):
    from dbmef.errors import EngineError

    cu, _ = cuda
    s = cu.Stream()
    a, b = cu.DeviceBuffer(16), cu.DeviceBuffer(16)
    g = cu.CudaGraph(s, lambda: cu.memcpy_dtod_async(b.ptr, a.ptr, 16, s))
    assert g.exec != g.graph and s.ptr not in (g.exec, g.graph)
    exec_id = g.exec
    g.destroy()
    g.exec = exec_id  # planted fault: launching what was destroyed
    with pytest.raises(EngineError, match="cudaErrorInvalidResourceHandle"):
        g.launch(s)


def test_a_missing_wait_in_the_row_path_is_caught(tmp_path, monkeypatch):
    """Planted fault in dbmef's own TensorRT row path: collect_rows reads the pinned errors without
    waiting for its event. On the strict device the errors read are not the call's (the copy back
    has not run), so the rethink's noise errors differ from ONNX Runtime's; with the wait they agree."""
    import shutil

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.backends import cuda as cu

    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), bundle)
    install(monkeypatch)
    build_engines(bundle)
    images = [np.asarray(render(a)) for a in demo_test_split().images[:4]]
    scoring = {"k": 3, "votes": 1, "n_timesteps": 8, "early_exit": "off"}

    def errors(backend: str) -> np.ndarray:
        rt = RuntimeSpec(str(bundle), backend=backend, scoring=scoring, prot=0.0, batch_size=4).build()
        try:
            return np.array([r.noise_errors for r in rt.classify(images)], float)
        finally:
            rt.close()

    want = errors("onnxruntime")
    np.testing.assert_allclose(errors("tensorrt"), want, rtol=1e-5)
    monkeypatch.setattr(cu.Event, "synchronize", lambda self: None)  # the planted fault
    assert not np.allclose(errors("tensorrt"), want, rtol=1e-3)


def test_the_parser_and_the_profiles_are_checked(tmp_path, monkeypatch):
    """Planted faults: an engine built from a file that is not ONNX, and a profile whose minimum is
    above its maximum. Both were accepted before; now build_engines refuses each by name."""
    import shutil

    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.errors import EngineError
    from dbmef.export import trt_build
    from dbmef.export.trt_build import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), bundle)
    install(monkeypatch)
    (bundle / "backbone.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match="could not parse"):
        build_engines(bundle)
    shutil.copy(demo_bundle_dir() / "backbone.onnx", bundle / "backbone.onnx")
    real = trt_build.EngineBytesFromNetwork.__init__

    def inverted(self, loader, profile, settings, cache=None):
        bad = type(profile)(tuple((n, mx, opt, mn) for n, mn, opt, mx in profile.inputs))
        real(self, loader, bad, settings, cache)

    monkeypatch.setattr(trt_build.EngineBytesFromNetwork, "__init__", inverted)
    with pytest.raises(EngineError, match="failed to build an engine"):
        build_engines(bundle)


def test_a_precision_flag_fails_the_build(tmp_path, monkeypatch):
    """Planted fault: the old weakly typed recipe (``config.set_flag(FP16)``) on the strongly typed
    network dbmef builds. TensorRT 11 has no such flag and 10.x refuses it with strong typing; the
    simulated builder fails the build, and build_engines says so."""
    import shutil

    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.errors import EngineError
    from dbmef.export import trt_build
    from dbmef.export.trt_build import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), bundle)
    dev = install(monkeypatch)
    real = trt_build.attach_timing_cache

    def with_fp16(config, data):
        import tensorrt as trt

        config.set_flag(trt.BuilderFlag.FP16)
        return real(config, data)

    monkeypatch.setattr(trt_build, "attach_timing_cache", with_fp16)
    with pytest.raises(EngineError, match="failed to build an engine"):
        build_engines(bundle)
    assert dev.calls["precision_flag"] == 1 and dev.calls["engine_build"] == 0


def test_an_fp16_engine_computes_in_half_precision(tiny_bundle, sample_images, tmp_path, monkeypatch):
    """An fp16 bundle's engines run in half precision on the simulated device, so tolerances are
    exercised. Planted fault: judging the fp16 VAE encoder engine by the float32 tolerance (against
    the float32 bundle's graph on ONNX Runtime, the same weights) fails; the fp16 tolerance passes.
    End to end the noise errors move (more than float32 rounding) within gpu_check's fp16 tolerance
    and the decisions are the same."""
    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.export.onnx_io import compare
    from dbmef.export.specs import TOLERANCES
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.bundle import Bundle

    half = export_bundle(ExportConfig(backbone="tiny", sd="tiny", precision="fp16", out=str(tmp_path / "h")))
    install(monkeypatch)
    build_engines(half)
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    engines = open_engine(Bundle.open(tiny_bundle), "vae_encoder", "onnxruntime"), \
        open_engine(Bundle.open(half), "vae_encoder", "tensorrt")
    want, got = (e({"image": image})["latent"] for e in engines)
    for e in engines:
        e.close()
    assert not compare("latent", got, want, *TOLERANCES["fp32"]["vae_encoder"])["ok"]
    assert compare("latent", got, want, *TOLERANCES["fp16"]["vae_encoder"])["ok"]

    scoring = {"k": 3, "votes": 1, "early_exit": "off"}
    images = sample_images[:4]

    def errors(bundle, backend):
        with RuntimeSpec(str(bundle), backend=backend, scoring=scoring, prot=0.0, batch_size=len(images)).build() as rt:
            res = rt.classify(images)
        return [r.label for r in res], np.array([r.noise_errors for r in res], np.float64)

    (want_labels, want_err), (got_labels, got_err) = errors(tiny_bundle, "onnxruntime"), errors(half, "tensorrt")
    assert 1e-6 < float(np.max(np.abs(got_err - want_err) / np.abs(want_err))) <= 3e-2
    assert got_labels == want_labels


def test_streams_are_non_blocking_one_logger_serves_every_build_and_warm_up_syncs_are_apart(tmp_path, monkeypatch):
    """Issue 24 faults 3, 6 and 5. (3) every stream the backend makes is created non-blocking, so
    work other libraries put on the legacy default stream neither waits for it nor breaks its
    captures; (6) every Builder of two build_engines calls gets the one process-wide logger
    (TensorRT requires it to outlive all it made); (5) on a fresh runtime the scorer's host syncs
    split into one per engine call plus one warm-up sync per graph capture, which gpu_check leaves
    out of its per-call figure."""
    import shutil

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.backends import trt_engines

    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), bundle)
    dev = install(monkeypatch)
    monkeypatch.setattr(trt_engines, "_LOGGER", None)  # as in a fresh process
    build_engines(bundle)
    build_engines(bundle, force=True)
    assert dev.loggers and all(lg is trt_engines.trt_logger() for lg in dev.loggers)

    images = [np.asarray(render(a)) for a in demo_test_split().images[:8]]
    with RuntimeSpec(str(bundle), backend="tensorrt", scoring={"k": 3, "votes": 1}, prot=0.0,
                     batch_size=len(images)).build() as rt:
        rt.classify(images)
        scorer = rt.pipeline.engines.scorer
        nonblocking = sys.modules["cuda.bindings.runtime"].cudaStreamNonBlocking
        assert dev.stream_flags and all(f == (nonblocking,) for f in dev.stream_flags.values())
        assert scorer.calls > 0
        assert scorer.syncs - scorer.warmup_syncs == scorer.calls
        assert scorer.warmup_syncs == (1 if scorer.graph is not None else 0)


def test_a_failed_capture_runs_without_a_graph_and_close_releases_everything(tmp_path, monkeypatch):
    """Issue 24 faults 1 and 7. Planted: a cudaMalloc inside every enqueue (what a garbage-collected
    buffer or another library does); inside the scorer's capture CUDA refuses it and invalidates
    the capture. The engine must end the capture, drop the graph, log why and run without one,
    giving ONNX Runtime's decisions. Then close() releases the context, engine and runtime at once
    (not at garbage collection) and a second close is harmless."""
    import shutil

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.backends.tensorrt import TrtEngine

    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), bundle)
    dev = install(monkeypatch)
    build_engines(bundle)
    images = [np.asarray(render(a)) for a in demo_test_split().images[:8]]
    spec = {"scoring": {"k": 3, "votes": 1}, "prot": 0.0, "batch_size": len(images)}
    with RuntimeSpec(str(bundle), backend="onnxruntime", **spec).build() as rt:
        want = [r.label for r in rt.classify(images)]
    real = TrtEngine._enqueue

    def planted(self):
        sys.modules["cuda.bindings.runtime"].cudaMalloc(16)
        real(self)

    monkeypatch.setattr(TrtEngine, "_enqueue", planted)
    rt = RuntimeSpec(str(bundle), backend="tensorrt", **spec).build()
    got = [r.label for r in rt.classify(images)]
    scorer = rt.pipeline.engines.scorer
    assert dev.calls["unsafe_in_capture_malloc_device"] >= 1  # the planted call did break a capture
    assert not scorer.use_cuda_graph and scorer.graph is None
    assert got == want
    rt.close()
    assert not hasattr(scorer, "context") and not hasattr(scorer, "engine") and scorer.stream.handle is None
    scorer.close()
