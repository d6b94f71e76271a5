"""The native TensorRT backend end to end on a simulated device (tests/simdevice.py): engine
building and keys, persistent buffers, device-side row gathering, CUDA graph replay and host
synchronisation run here, in every CI run, and must give the ONNX Runtime backend's decisions.

The simulated device checks dbmef's logic only; TensorRT itself is checked on a GPU by
benchmarks/gpu_check.py (README, TensorRT)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
from tests.conftest import needs_ort
from tests.simdevice import install

pytestmark = needs_ort


def _classify(bundle, images, backend, scoring):
    from dbmef.runtime import RuntimeSpec

    rt = RuntimeSpec(str(bundle), backend=backend, scoring=scoring, prot=0.0, batch_size=len(images)).build()
    return rt, rt.classify(images)


def _calls(rt, images):
    """Classify ``images`` as one batch; the scorer calls that batch took."""
    return rt.pipeline.rethink(rt.pipeline.fast_path(images)).scoring["engine_calls"]


@pytest.mark.parametrize("which", ["tiny", "digits"])
def test_native_tensorrt_backend_on_a_simulated_device(which, tiny_bundle, sample_images, tmp_path, monkeypatch):
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime.backends.tensorrt import TrtEngine

    src, images = ((tiny_bundle, sample_images[:6]) if which == "tiny" else
                   (demo_bundle_dir(), [np.asarray(render(a)) for a in demo_test_split().images[:12]]))
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    dev = install(monkeypatch)
    recs = build_engines(bundle)
    assert set(recs) == {"backbone", "text_encoder", "vae_encoder", "scorer"} and dev.calls["engine_build"] == 4
    assert recs["scorer"].settings["tf32"] is False
    assert build_engines(bundle)["scorer"].key == recs["scorer"].key and dev.calls["engine_build"] == 4  # reused

    for mode in ("off", "exact"):
        # 8 timesteps: the logic under test (builds, buffers, gathering, graphs, syncs) is the same at 30
        scoring = {"k": 3, "votes": 3, "n_timesteps": 8, "early_exit": mode}
        _, want = _classify(bundle, images, "onnxruntime", scoring)
        rt, _ = _classify(bundle, images[:1], "tensorrt", scoring)  # opens the engines
        scorer = rt.pipeline.engines.scorer
        scorer.syncs = 0
        batch = rt.pipeline.rethink(rt.pipeline.fast_path(images))
        got = batch.results(rt.class_names)
        assert scorer.syncs == batch.scoring["engine_calls"] == batch.scoring["host_syncs"]  # one wait per call
        assert isinstance(scorer, TrtEngine) and rt.describe()["providers"]["scorer"] == "TensorRT"
        assert [r.label for r in got] == [r.label for r in want], mode
        assert [r.unet_evals for r in got] == [r.unet_evals for r in want]
        for r, w in zip(got, want):  # votes per image differ under exact early exit: compare image by image
            np.testing.assert_allclose(np.array(r.noise_errors, float), np.array(w.noise_errors, float), rtol=1e-5)
        # the scorer engine (static profile) is captured once and replayed; the dynamic ones are not
        assert scorer.use_cuda_graph and scorer.graph is not None
        assert not rt.pipeline.engines.backbone.use_cuda_graph
        # steady state: one host synchronisation per engine call, and calls queued behind the one in flight
        dev.syncs.clear()
        scorer.syncs = scorer.overlapped = 0
        calls = _calls(rt, images)
        assert dev.syncs[scorer.stream.ptr] == scorer.syncs == calls
        assert scorer.overlapped > 0  # the next call's rows were chosen before the last call's errors were read
        rt.close()
    assert dev.calls["graph_capture"] >= 1 and dev.calls["graph_launch"] > dev.calls["graph_capture"]
    # issue 14.8: a batch larger than the engines' profiles is split to fit them, not refused
    big = (images * 12)[:72]  # 72 images in one batch; the backbone profile allows 64
    scoring = {"k": 2, "votes": 1, "n_timesteps": 4}
    rt, got = _classify(bundle, big, "tensorrt", scoring)
    assert rt.pipeline.engines.backbone.max_batch == 64 < len(big)
    assert [r.label for r in got] == [r.label for r in _classify(bundle, big, "onnxruntime", scoring)[1]]
    rt.close()
    assert dev.calls["memcpy_dtod"] > 0  # rows gathered on the device, not uploaded from the host


def test_a_stale_or_foreign_engine_is_refused(tiny_bundle, tmp_path, monkeypatch):
    from dbmef.errors import BundleError
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import DBMEFRuntime
    from tests.simdevice import SimDevice

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    install(monkeypatch, SimDevice(name="Simulated H100", cc=(9, 0)))
    build_engines(bundle)
    install(monkeypatch, SimDevice(name="Simulated L4", cc=(8, 9)))  # the bundle moved to another GPU
    with pytest.raises(BundleError, match="rebuild with `dbmef build-engines"):
        DBMEFRuntime(bundle, backend="tensorrt")
    # a build there writes its own timing cache (keyed by TensorRT version and compute capability)
    build_engines(bundle)
    caches = sorted(p.name for p in (bundle / "trt").glob("timing-*.cache"))
    assert len(caches) == 2 and any("cc8.9" in c for c in caches) and any("cc9.0" in c for c in caches)


def test_bench_with_tensorrt_never_measures_onnxruntime_instead(tiny_bundle):
    """Issue 14.9: without TensorRT engines, --backend tensorrt is a clear error."""
    from dbmef.apps.cli import main

    assert main(["-q", "bench", "--bundle", str(tiny_bundle), "--backend", "tensorrt", "--images", "1"]) == 2
