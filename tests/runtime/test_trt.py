"""TensorRT parts that need no GPU: profiles, cache keys, manifest records, buffer sizes, row
gathering, clear errors without GPU or TensorRT, backend fallback. Run-time tests carry `gpu`."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dbmef.errors import BackendUnavailableError, BundleError
from dbmef.runtime.backends.cuda import device_count
from dbmef.runtime.backends.row_gather import plan_chunk, simulate
from dbmef.runtime.backends.tensorrt import buffer_bytes
from dbmef.runtime.backends.trt_engines import ShapeProfile, engine_file_name, engine_key, shape_profile
from dbmef.runtime.bundle import load_manifest
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import FunctionEngine, RowScorer
from tests.conftest import needs_ort, needs_torch

ROOT = Path(__file__).resolve().parents[2]
def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


# Issue 14.3: a GPU without TensorRT (onnxruntime-gpu alone) is not enough for these tests.
gpu = pytest.mark.skipif(device_count() == 0 or not _has_tensorrt(), reason="needs an NVIDIA GPU with TensorRT")


@needs_torch
@needs_ort
def test_profiles_from_the_tiny_manifest(tiny_bundle):
    m = load_manifest(tiny_bundle)
    p = shape_profile(m, "backbone")
    assert p.inputs == (("pixel_values", (1, 3, 64, 64), (16, 3, 64, 64), (64, 3, 64, 64)),)
    assert not p.static
    s = shape_profile(m, "scorer", unet_batch=8)
    assert s.static
    assert dict((n, mx) for n, _, _, mx in s.inputs) == {
        "x0": (8, 4, 8, 8), "eps": (8, 4, 8, 8), "timestep": (8,), "emb_pos": (8, 77, 32),
        "emb_neg": (8, 77, 32), "lam": (1,)}
    u = shape_profile(m, "unet", unet_batch=8)
    assert u.max_shape("sample") == (16, 4, 8, 8)  # both conditions in one call
    t = shape_profile(m, "text_encoder")
    assert t.max_shape("input_ids") == (64, 77)
    v = shape_profile(m, "vae_encoder")
    assert v.max_shape("image")[1:] == (3, 64, 64)


def test_engine_key_changes_with_every_input():
    prof = ShapeProfile((("x", (1, 3), (4, 3), (8, 3)),))
    base = dict(onnx_sha256="a" * 64, trt_version="10.16.1.11", gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability="9.0", precision="fp16", profile=prof)
    k0 = engine_key(**base)
    assert k0 == engine_key(**base) and len(k0) == 20
    changes = {"onnx_sha256": "b" * 64, "trt_version": "11.4.0.106", "gpu_name": "NVIDIA H200",
               "compute_capability": "8.9", "precision": "fp32",
               "profile": ShapeProfile((("x", (1, 3), (4, 3), (16, 3)),))}
    for field, value in changes.items():
        assert engine_key(**{**base, field: value}) != k0, field
    assert engine_file_name("scorer", k0) == f"trt/scorer-{k0}.engine"
    # issue 14.7: builder settings are part of the key, so --opt-level 5 never reuses a level-3 engine
    from dbmef.runtime.backends.trt_engines import BuildSettings

    assert engine_key(**base, settings=BuildSettings()) == k0
    for settings in (BuildSettings(optimization_level=5), BuildSettings(workspace_bytes=1 << 30),
                     BuildSettings(tf32=True)):
        assert engine_key(**base, settings=settings) != k0, settings


class FakeTrtEngine:
    """Models two documented ICudaEngine answers: get_tensor_shape has -1 for every dimension that
    is dynamic in the network, whatever the profile; get_tensor_profile_shape(name, 0) gives
    [min, opt, max] of optimisation profile 0."""

    def __init__(self, profiles):
        self.profiles = profiles

    def get_tensor_shape(self, name):
        return tuple(-1 if mn != mx or i == 0 else mn for i, (mn, mx) in
                     enumerate(zip(self.profiles[name][0], self.profiles[name][2])))

    def get_tensor_profile_shape(self, name, profile):
        assert profile == 0
        return self.profiles[name]


def test_cuda_graphs_are_used_for_a_static_profile_despite_a_symbolic_batch():
    """Issue 14.1: the scorer's min = opt = max profile is static although its network batch is -1."""
    from dbmef.runtime.backends.tensorrt import static_profile

    static = FakeTrtEngine({"x0": [(32, 4, 8, 8)] * 3, "timestep": [(32,)] * 3})
    assert static.get_tensor_shape("x0")[0] == -1
    assert static_profile(static, ["x0", "timestep"])
    dynamic = FakeTrtEngine({"x0": [(1, 4, 8, 8), (8, 4, 8, 8), (32, 4, 8, 8)], "timestep": [(32,)] * 3})
    assert not static_profile(dynamic, ["x0", "timestep"])


class FakeBuilderConfig:
    """Models IBuilderConfig's timing-cache answers: set_timing_cache returns False for a cache whose
    header names another device or TensorRT version; get_timing_cache may return None."""

    def __init__(self, foreign: bytes = b"", cache_after_build: bool = True):
        self.foreign, self.cache_after_build, self.attached = foreign, cache_after_build, None

    def create_timing_cache(self, data: bytes):
        return ("cache", bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache[1] and cache[1] == self.foreign and not ignore_mismatch:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        if not self.cache_after_build:
            return None

        class Cache:
            def serialize(self):
                return b"timings"
        return Cache()


def test_a_foreign_timing_cache_falls_back_to_a_fresh_one(tmp_path, caplog):
    """Issue 14.2: the build must not crash after it succeeded because the saved cache came from
    another GPU; the cache file is keyed by TensorRT version and compute capability."""
    from dbmef.export.trt_build import attach_timing_cache, save_timing_cache, timing_cache_name

    cfg = FakeBuilderConfig(foreign=b"h100 timings")
    attach_timing_cache(cfg, b"h100 timings")
    assert cfg.attached == ("cache", b"") and "refused the saved timing cache" in caplog.text
    good = FakeBuilderConfig()
    attach_timing_cache(good, b"mine")
    assert good.attached == ("cache", b"mine")
    save_timing_cache(FakeBuilderConfig(cache_after_build=False), tmp_path / "t.cache")  # None: no crash
    assert not (tmp_path / "t.cache").exists()
    save_timing_cache(good, tmp_path / "t.cache")
    assert (tmp_path / "t.cache").read_bytes() == b"timings"
    assert timing_cache_name("10.16.1.11", "9.0") != timing_cache_name("10.16.1.11", "8.9")


def test_onnxruntime_tensorrt_provider_keeps_the_bundle_precision_and_profiles():
    """Issue 14.6: the TensorRT execution provider must not run an fp32 bundle in fp16 by default, and
    gets the bundle's shape profiles up front (else it builds an engine per new batch size)."""
    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.runtime.backends import ort_trt_profile
    from dbmef.runtime.backends.onnxruntime import OrtOptions
    from dbmef.runtime.bundle import load_manifest

    assert OrtOptions().trt_fp16 is False
    m = load_manifest(demo_bundle_dir())
    assert ort_trt_profile(m, "backbone") == {"min": "pixel_values:1x3x16x16", "opt": "pixel_values:16x3x16x16",
                                              "max": "pixel_values:64x3x16x16"}
    scorer = ort_trt_profile(m, "scorer")
    assert scorer["min"] == scorer["max"] and "x0:64x4x8x8" in scorer["min"] and "lam:1" in scorer["min"]


def test_buffer_sizes():
    assert buffer_bytes((32, 4, 64, 64), np.float32) == 32 * 4 * 64 * 64 * 4
    assert buffer_bytes((32, 77, 768), np.float16) == 32 * 77 * 768 * 2
    assert buffer_bytes((32,), np.int64) == 256


def test_row_gather_plan_equals_numpy_fancy_indexing():
    rng = np.random.default_rng(0)
    M, V, n, k, C, L, D = 3, 2, 4, 3, 9, 5, 6
    latents = rng.standard_normal((M, 4, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((V, n, 4, 2, 2)).astype(np.float32)
    timesteps = np.array([10, 20, 30, 40], np.int64)
    pos = rng.standard_normal((C, L, D)).astype(np.float32)
    neg = rng.standard_normal((M, k, L, D)).astype(np.float32)
    cands = np.array([[1, 5, 8], [0, 2, 3], [7, 6, 4]])
    B = 7
    total = M * V * n * k
    padded = -(-total // B) * B
    m, v, i, c = np.unravel_index(np.minimum(np.arange(padded), total - 1), (M, V, n, k))
    src = {"latents": latents, "noise": noise, "timesteps": timesteps, "positive": pos, "negative": neg}
    n_copies = 0
    for s in range(0, padded, B):
        sl = slice(s, s + B)
        dst = {"x0": np.zeros((B, 4, 2, 2), np.float32), "eps": np.zeros((B, 4, 2, 2), np.float32),
               "timestep": np.zeros(B, np.int64), "emb_pos": np.zeros((B, L, D), np.float32),
               "emb_neg": np.zeros((B, L, D), np.float32)}
        plan = plan_chunk(m[sl], v[sl], i[sl], c[sl], cands, 4 * 2 * 2 * 4, L * D * 4, n, k)
        n_copies += len(plan)
        simulate(plan, src, dst)
        np.testing.assert_array_equal(dst["x0"], latents[m[sl]])
        np.testing.assert_array_equal(dst["eps"], noise[v[sl], i[sl]])
        np.testing.assert_array_equal(dst["timestep"], timesteps[i[sl]])
        np.testing.assert_array_equal(dst["emb_pos"], pos[cands[m[sl], c[sl]]])
        np.testing.assert_array_equal(dst["emb_neg"], neg[m[sl], c[sl]])
    assert n_copies < 5 * padded  # contiguous runs were merged


def test_device_row_path_of_the_scorer_matches_the_host_path():
    """An engine offering the row path (as TrtEngine does), gathering by the copy plan, gives the
    host path's errors exactly, with calls launched before the previous one is collected."""
    from tests.runtime.conftest import LATENT, make_fused_engine, score

    rng = np.random.default_rng(1)
    cfg = ScoringConfig(k=3, n_timesteps=3, votes=2, unet_batch=5)
    latents = rng.standard_normal((2, *LATENT)).astype(np.float32)
    cands = np.array([[1, 4, 6], [0, 2, 3]])
    pos = rng.standard_normal((7, 5, 6)).astype(np.float32)
    neg = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    inner = make_fused_engine([])

    class DeviceEngine(FunctionEngine, RowScorer):
        def rows(self):
            return self

        def open_rows(self, noise, timesteps, positive, lam, batch, capacity, k):
            self.t = {"noise": noise, "timesteps": timesteps, "positive": positive,
                      "latents": np.zeros((capacity, *noise.shape[2:]), np.float32),
                      "negative": np.zeros((capacity, k, *positive.shape[1:]), np.float32)}
            self.cands, self.lam, self.batch, self.queue, self.most_in_flight = np.zeros((capacity, k), int), lam, \
                batch, {}, 0

        def load_rows(self, slot, latent, candidates, negatives):
            self.t["latents"][slot], self.cands[slot], self.t["negative"][slot] = latent, candidates, negatives

        def launch_rows(self, rows):
            t, b = self.t, self.batch
            lb, eb = int(np.prod(t["latents"].shape[1:])) * 4, int(np.prod(t["positive"].shape[1:])) * 4
            dst = {"x0": np.zeros((b, *t["latents"].shape[1:]), np.float32),
                   "eps": np.zeros((b, *t["latents"].shape[1:]), np.float32), "timestep": np.zeros(b, np.int64),
                   "emb_pos": np.zeros((b, *t["positive"].shape[1:]), np.float32),
                   "emb_neg": np.zeros((b, *t["positive"].shape[1:]), np.float32)}
            s, v, i, c = rows.T
            simulate(plan_chunk(s, v, i, c, self.cands, lb, eb, t["noise"].shape[1], self.cands.shape[1]), t, dst)
            ticket = self.launched = getattr(self, "launched", -1) + 1
            self.queue[ticket] = inner({**dst, "lam": self.lam})["error"]
            self.most_in_flight = max(self.most_in_flight, len(self.queue))
            return ticket

        def collect_rows(self, ticket):
            assert ticket == min(self.queue)  # oldest first
            return self.queue.pop(ticket)

        def close_rows(self):
            pass

    dev = DeviceEngine("scorer", inner.input_names, inner.output_names, inner._fn)
    a = score(cfg, inner, latents, cands, pos, neg)
    b = score(cfg, dev, latents, cands, pos, neg)
    np.testing.assert_array_equal(a.errors, b.errors)
    assert list(a.labels) == list(b.labels) and b.stats.engine_calls == a.stats.engine_calls
    assert b.stats.host_syncs == b.stats.engine_calls  # one wait per call
    assert dev.most_in_flight == 2  # the next call was launched before the last one was collected


@pytest.mark.skipif(device_count() > 0, reason="checks the no-GPU error")
def test_clear_error_without_gpu_or_tensorrt(tmp_path):
    from dbmef.export.trt_build import build_engines, import_tensorrt
    from dbmef.runtime.backends.tensorrt import TrtEngine

    with pytest.raises(BackendUnavailableError, match=r"no NVIDIA GPU|cuda-python is not installed"):
        TrtEngine(tmp_path / "x.engine")
    with pytest.raises(BackendUnavailableError, match=r"no NVIDIA GPU|cuda-python"):
        build_engines(tmp_path)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match=r"pip install 'dbmef\[gpu\]'"):
            import_tensorrt()


@needs_torch
@needs_ort
def test_backend_fallback_order(tiny_bundle, tmp_path, caplog):
    """auto: native TensorRT when engines for this GPU exist, else ONNX Runtime; tensorrt: no
    silent fallback."""
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.backends.onnxruntime import OrtEngine
    from dbmef.runtime.bundle import Bundle, EngineRecord, TensorRTRecord

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    bundle = Bundle.open(b)
    # no engines recorded
    assert isinstance(open_engine(bundle, "backbone", "auto", None), OrtEngine)
    with pytest.raises(BundleError, match="build-engines"):
        open_engine(bundle, "backbone", "tensorrt", None)
    # engines recorded (as on a GPU machine), but this machine cannot run them
    rec = EngineRecord("trt/backbone-x.engine", "x", "", "10.0", "GPU", "9.0", "fp32", {}, 1.0)
    bundle = Bundle(b, bundle.manifest.replace(tensorrt=TensorRTRecord({"backbone": rec})))
    if device_count() == 0:
        assert isinstance(open_engine(bundle, "backbone", "auto", None), OrtEngine)
        with pytest.raises(BackendUnavailableError):
            open_engine(bundle, "backbone", "tensorrt", None)
    rt = DBMEFRuntime(b, backend="auto")
    # issue 14.3: on a machine with a working onnxruntime-gpu, auto's fallback runs on CUDA
    from dbmef.runtime.backends.onnxruntime import CUDA, available_providers

    want = "CUDAExecutionProvider" if CUDA in available_providers() else "CPUExecutionProvider"
    assert rt.describe()["providers"]["scorer"] == want


def test_check_trt_is_wired_into_make_test():
    text = (ROOT / "Makefile").read_text()
    assert "check-trt:" in text and "check_trt.py --self-test" in text
    recipe = text.split("\ntest:")[1].split("\n\n")[0]
    assert "check-trt" in recipe and "unit" in recipe


@pytest.mark.skipif(not (ROOT / ".cache" / "check-trt" / "stubs-11.4.0.106").is_dir(),
                    reason="run `make check-trt` first (downloads the TensorRT bindings wheels)")
def test_check_trt_catches_a_misspelt_method(tmp_path):
    """The static check fails on a misspelt TensorRT method: a copy of backends/tensorrt.py with
    execute_async_v3 -> execute_async_v4 is type-checked against the 11.x stubs."""
    src = (ROOT / "dbmef/runtime/backends/tensorrt.py").read_text().replace("execute_async_v3(", "execute_async_v4(")
    broken = tmp_path / "broken_tensorrt.py"  # not tensorrt.py: it would shadow TensorRT
    broken.write_text(src)
    sys.path.insert(0, str(ROOT / "tools" / "check_trt"))
    try:
        import check_trt
    finally:
        sys.path.pop(0)
    stubs = ROOT / ".cache" / "check-trt" / "stubs-11.4.0.106"
    ok, out = check_trt.mypy_against(stubs, [broken])
    assert not ok and "execute_async_v4" in out
    ok, out = check_trt.mypy_against(stubs, [ROOT / "dbmef/runtime/backends/tensorrt.py"])
    assert ok, out


@pytest.mark.gpu
@gpu
def test_trt_engine_matches_onnxruntime_on_gpu(tiny_bundle, tmp_path):
    """On a GPU: build engines for the tiny bundle and compare with ONNX Runtime (the full
    comparison with timings is benchmarks/gpu_check.py)."""
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime.system import DBMEFRuntime

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    build_engines(b)
    cfg = ScoringConfig(n_timesteps=4, votes=2)
    imgs = [np.random.default_rng(j).integers(0, 255, (80, 90, 3), dtype=np.uint8) for j in range(4)]
    from dbmef.runtime.protector import Protector

    a = DBMEFRuntime(b, backend="tensorrt", scoring=cfg, protector=Protector(math.inf, 0.0)).classify(imgs)
    r = DBMEFRuntime(b, backend="onnxruntime", scoring=cfg, protector=Protector(math.inf, 0.0)).classify(imgs)
    assert [x.label for x in a] == [y.label for y in r]
