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
from dbmef.runtime.bundle import load_manifest
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.cuda import device_count
from dbmef.runtime.engine import FunctionEngine
from dbmef.runtime.row_gather import plan_chunk, simulate
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.trt_backend import buffer_bytes
from dbmef.runtime.trt_build import ShapeProfile, engine_file_name, engine_key, shape_profile
from tests.conftest import needs_ort, needs_torch

ROOT = Path(__file__).resolve().parents[2]
gpu = pytest.mark.skipif(device_count() == 0, reason="needs an NVIDIA GPU with TensorRT")


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
    """An engine offering score_rows (as TrtEngine does) gives the host path's errors exactly."""
    from tests.runtime.test_scorer import LATENT, make_fused_engine

    rng = np.random.default_rng(1)
    cfg = ScoringConfig(k=3, n_timesteps=3, votes=2, unet_batch=5)
    latents = rng.standard_normal((2, *LATENT)).astype(np.float32)
    cands = np.array([[1, 4, 6], [0, 2, 3]])
    pos = rng.standard_normal((7, 5, 6)).astype(np.float32)
    neg = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    inner = make_fused_engine([])

    class DeviceEngine(FunctionEngine):
        def score_rows(self, latents, noise, timesteps, positive, negative, candidates, lam, index, batch):
            m, v, i, c = index
            out = []
            lb, eb = int(np.prod(latents.shape[1:])) * 4, int(np.prod(positive.shape[1:])) * 4
            for s in range(0, len(m), batch):
                sl = slice(s, s + batch)
                dst = {"x0": np.zeros((batch, *latents.shape[1:]), np.float32),
                       "eps": np.zeros((batch, *latents.shape[1:]), np.float32),
                       "timestep": np.zeros(batch, np.int64),
                       "emb_pos": np.zeros((batch, *positive.shape[1:]), np.float32),
                       "emb_neg": np.zeros((batch, *positive.shape[1:]), np.float32)}
                simulate(plan_chunk(m[sl], v[sl], i[sl], c[sl], candidates, lb, eb, noise.shape[1],
                                    candidates.shape[1]),
                         {"latents": latents, "noise": noise, "timesteps": timesteps, "positive": positive,
                          "negative": negative}, dst)
                out.append(inner({**dst, "lam": lam})["error"])
            return np.concatenate(out)

    dev = DeviceEngine("scorer", inner.input_names, inner.output_names, inner._fn)
    a = DiffusionScorer(cfg, inner, LATENT).score(latents, cands, pos, neg)
    b = DiffusionScorer(cfg, dev, LATENT).score(latents, cands, pos, neg)
    np.testing.assert_array_equal(a.errors, b.errors)
    assert list(a.labels) == list(b.labels) and b.engine_calls == a.engine_calls


@pytest.mark.skipif(device_count() > 0, reason="checks the no-GPU error")
def test_clear_error_without_gpu_or_tensorrt(tmp_path):
    from dbmef.runtime.trt_backend import TrtEngine
    from dbmef.runtime.trt_build import build_engines, import_tensorrt

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
    from dbmef.runtime.ort_backend import OrtEngine

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = load_manifest(b)
    # no engines recorded
    assert isinstance(open_engine(b, m, "backbone", "auto", None), OrtEngine)
    with pytest.raises(BundleError, match="build-engines"):
        open_engine(b, m, "backbone", "tensorrt", None)
    # engines recorded (as on a GPU machine), but this machine cannot run them
    m.tensorrt = {"engines": {"backbone": {"file": "trt/backbone-x.engine", "key": "x"}}}
    if device_count() == 0:
        assert isinstance(open_engine(b, m, "backbone", "auto", None), OrtEngine)
        with pytest.raises(BackendUnavailableError):
            open_engine(b, m, "backbone", "tensorrt", None)
    rt = DBMEFRuntime(b, backend="auto")
    assert rt.describe()["providers"]["scorer"] == "CPUExecutionProvider"


def test_check_trt_is_wired_into_make_test():
    text = (ROOT / "Makefile").read_text()
    assert "check-trt:" in text and "check_trt.py --self-test" in text
    assert "check-trt" in text.split("test:")[-1].splitlines()[0]


@pytest.mark.skipif(not (ROOT / ".cache" / "check-trt" / "stubs-11.4.0.106").is_dir(),
                    reason="run `make check-trt` first (downloads the TensorRT bindings wheels)")
def test_check_trt_catches_a_misspelt_method(tmp_path):
    """The static check fails on a misspelt TensorRT method: a copy of trt_backend.py with
    execute_async_v3 -> execute_async_v4 is type-checked against the 11.x stubs."""
    src = (ROOT / "dbmef/runtime/trt_backend.py").read_text().replace("execute_async_v3(", "execute_async_v4(")
    broken = tmp_path / "trt_backend.py"
    broken.write_text(src)
    sys.path.insert(0, str(ROOT / "tools" / "check_trt"))
    try:
        import check_trt
    finally:
        sys.path.pop(0)
    stubs = ROOT / ".cache" / "check-trt" / "stubs-11.4.0.106"
    ok, out = check_trt.mypy_against(stubs, [broken])
    assert not ok and "execute_async_v4" in out
    ok, out = check_trt.mypy_against(stubs, [ROOT / "dbmef/runtime/trt_backend.py"])
    assert ok, out


@gpu
def test_trt_engine_matches_onnxruntime_on_gpu(tiny_bundle, tmp_path):
    """On a GPU: build engines for the tiny bundle and compare with ONNX Runtime (the full
    comparison with timings is benchmarks/gpu_check.py)."""
    from dbmef.runtime.runtime import DBMEFRuntime
    from dbmef.runtime.trt_build import build_engines

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    build_engines(b)
    cfg = ScoringConfig(n_timesteps=4, votes=2)
    imgs = [np.random.default_rng(j).integers(0, 255, (80, 90, 3), dtype=np.uint8) for j in range(4)]
    from dbmef.runtime.protector import Protector

    a = DBMEFRuntime(b, backend="tensorrt", scoring=cfg, protector=Protector(math.inf, 0.0)).classify(imgs)
    r = DBMEFRuntime(b, backend="onnxruntime", scoring=cfg, protector=Protector(math.inf, 0.0)).classify(imgs)
    assert [x.label for x in a] == [y.label for y in r]
