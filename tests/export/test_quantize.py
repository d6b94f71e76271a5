"""``dbmef quantize`` on the committed digits bundle: INT8 Q/DQ graphs, the decision gate, and its refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbmef.apps.digits import demo_bundle_dir, demo_calibration_split, write_image_folder
from dbmef.errors import ValidationError
from tests.conftest import cli, has, needs_ort

pytestmark = [needs_ort, pytest.mark.skipif(not has("onnx"), reason="needs onnx ([onnx] or [export] extra)")]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):  # type: ignore[no-untyped-def]
    return write_image_folder(demo_calibration_split(), tmp_path_factory.mktemp("cal") / "calibration")


@pytest.mark.skipif(not has("diffusers"), reason="needs diffusers (the independent noising reference)")
def test_unet_rows_are_diffusers_add_noise_of_the_scorer_rows():
    from diffusers import DDPMScheduler

    from dbmef.export.quantize import unet_feeds
    from dbmef.runtime.bundle import Bundle

    m = Bundle.open(demo_bundle_dir()).manifest
    rng = np.random.default_rng(0)
    t = np.array([0, 17, 500, 999], np.int64)
    row = {"x0": rng.standard_normal((4, 4, 8, 8), np.float32), "eps": rng.standard_normal((4, 4, 8, 8), np.float32),
           "timestep": t, "emb_pos": np.ones((4, 3, 2), np.float32), "emb_neg": np.zeros((4, 3, 2), np.float32)}
    pos, neg = unet_feeds([row], m.schedule)
    import torch

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    want = sched.add_noise(torch.from_numpy(row["x0"]), torch.from_numpy(row["eps"]), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(pos["sample"], want, atol=1e-5)
    assert pos["sample"] is neg["sample"] and (pos["encoder_hidden_states"] == 1).all()
    assert (neg["encoder_hidden_states"] == 0).all() and (neg["timestep"] == t).all()


@pytest.fixture(scope="module")
def int8(calibration, tmp_path_factory):  # type: ignore[no-untyped-def]
    """``dbmef quantize`` of the committed bundle, and the source bundle's files before it ran."""
    source = {f.name: f.read_bytes() for f in demo_bundle_dir().iterdir() if f.is_file()}
    out = tmp_path_factory.mktemp("q") / "int8"
    rc, stdout, err, _ = cli("quantize", "--bundle", str(demo_bundle_dir()), "--data", str(calibration),
                             "--out", str(out), "--images", "10", "--calibration-batches", "8", "--json", "-q")
    assert rc == 0, err
    return out, json.loads(stdout), source


def test_cli_quantize_writes_int8_qdq_graphs_that_keep_the_decisions(int8):
    import onnx

    out, report, source = int8
    assert report["components"] == ["scorer", "unet"]
    for gate in report["gates"].values():
        assert gate["images"] == 10 and gate["agree"] == 10 and gate["differ"] == []
    assert {f.name: f.read_bytes() for f in demo_bundle_dir().iterdir() if f.is_file()} == source
    from dbmef.runtime.bundle import Bundle

    b = Bundle.open(out)  # every sha256 in the new manifest matches its file
    for name in ("scorer", "unet"):
        rec = b.manifest.components[name]
        assert rec.precision == "int8" and rec.validation["decision_gate"] == report["gates"][name]
        assert rec.source["quantized_from"]["sha256"] == Bundle.open(demo_bundle_dir()).manifest.components[name].sha256
        g = onnx.load(str(b.path(rec.file))).graph
        made_by = {o: n for n in g.node for o in n.output}
        # the default recipe: every convolution between Q/DQ pairs, the matmuls left in float
        convs = [n for n in g.node if n.op_type == "Conv"]
        assert convs and all(made_by[n.input[0]].op_type == "DequantizeLinear" for n in convs)
        matmuls = [n for n in g.node if n.op_type == "MatMul"]
        assert matmuls and not any(made_by.get(i) and made_by[i].op_type == "DequantizeLinear"
                                   for n in matmuls for i in n.input)
        weights = [made_by[n.input[1]] for n in convs]
        assert all(w.op_type == "DequantizeLinear" for w in weights)
        inits = {i.name: i for i in g.initializer}
        assert all(inits[w.input[0]].data_type == onnx.TensorProto.INT8 for w in weights)
    assert b.manifest.components["backbone"].precision == "fp32" and b.manifest.tensorrt.engines == {}
    rc, stdout, err, _ = cli("info", "--bundle", str(out))
    assert rc == 0, err
    assert "quantized   scorer int8" in stdout and "agree with fp32 on 10/10 calibration images" in stdout


def test_int8_engines_build_on_the_simulated_device_and_fp8_is_refused_before_ada(int8, tmp_path, monkeypatch):
    import shutil

    from dbmef.errors import EngineError
    from dbmef.export.trt_build import build_engines, check_precision
    from dbmef.runtime import RuntimeSpec
    from tests.simdevice import SimDevice, install

    bundle = tmp_path / "b"
    shutil.copytree(int8[0], bundle)
    dev = install(monkeypatch)
    recs = build_engines(bundle)
    assert recs["scorer"].precision == "int8" and recs["backbone"].precision == "fp32"
    assert dev.calls["engine_build"] == 4
    images = [np.asarray(im) for im in demo_calibration_split().rendered()[::25]]
    scoring = {"k": 3, "votes": 1, "n_timesteps": 6}
    got, want = (RuntimeSpec(str(bundle), backend=b, scoring=scoring, prot=0.0).build().classify(images)
                 for b in ("tensorrt", "onnxruntime"))
    assert [r.label for r in got] == [r.label for r in want]
    for r, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(r.noise_errors, float), np.array(w.noise_errors, float), rtol=1e-5)
    # an INT8 graph needs Turing's tensor cores, an FP8 one Ada's or Hopper's: refused before any build
    check_precision("scorer", "fp8", {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(EngineError, match=r"fp8 graph, and A100 \(compute capability 8.0\).* 8.9 or newer"):
        check_precision("scorer", "fp8", {"name": "A100", "compute_capability": "8.0"})
    old = install(monkeypatch, SimDevice(name="old", cc=(7, 0)))
    with pytest.raises(EngineError, match=r"int8 graph, and old \(compute capability 7.0\)"):
        build_engines(bundle, force=True)
    assert old.calls["engine_build"] == 0  # refused before the fp32 components were built


def test_a_broken_calibration_is_refused_naming_the_images_and_leaves_nothing(calibration, tmp_path, monkeypatch):
    import dbmef.export.quantize as quantize

    real = quantize.record_scorer_feeds

    def shrunk(bundle_dir, images):  # type: ignore[no-untyped-def]
        # ranges measured on latents and noise a thousand times too small: every real row saturates
        rec = real(bundle_dir, images)
        return rec._replace(feeds=[{**f, "x0": f["x0"] * 1e-3, "eps": f["eps"] * 1e-3} for f in rec.feeds])

    monkeypatch.setattr(quantize, "record_scorer_feeds", shrunk)
    cfg = quantize.QuantizeConfig(str(demo_bundle_dir()), str(calibration), str(tmp_path / "bad"), images=10,
                                  max_batches=8)
    with pytest.raises(ValidationError, match=r"changes \d+ of 10 decisions .*calibration/\w+/\d+\.png \(\d -> \d\)"):
        quantize.quantize_bundle(cfg)
    assert not (tmp_path / "bad").exists()
    rc, _, err, _ = cli("quantize", "--bundle", str(demo_bundle_dir()), "--data", str(calibration), "--out",
                        str(tmp_path / "fp8"), "--to", "fp8")
    assert rc == 2 and "fp8 Q/DQ graphs need NVIDIA Model Optimizer" in err and not (tmp_path / "fp8").exists()


def test_the_recording_pass_is_the_runtime_and_its_decisions_are_the_gates_reference(calibration):
    from dbmef.export.quantize import record_scorer_feeds
    from dbmef.runtime import DBMEFRuntime

    images = sorted(str(p) for p in calibration.rglob("*.png"))[::40][:5]
    rec = record_scorer_feeds(demo_bundle_dir(), images)
    with DBMEFRuntime(demo_bundle_dir(), prot=0.0, backend="onnxruntime", scorer="fused") as rt:
        results = rt.classify(images)
    assert rec.labels == [r.label for r in results] and None not in rec.labels
    # every scorer row the runtime evaluated was recorded: the fused graph makes two UNet evaluations per
    # row, and the scheduler packs the images' rows into full engine batches
    needed, width = sum(r.unet_evals for r in results) // 2, len(rec.feeds[0]["timestep"])
    assert needed > 0 and len(rec.feeds) == -(-needed // width)
    assert all(len(f["timestep"]) == width for f in rec.feeds)
    assert set(rec.feeds[0]) == {"x0", "eps", "timestep", "emb_pos", "emb_neg", "lam"}
