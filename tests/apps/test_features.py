"""``dbmef features`` on the committed digits bundle, and its linear head against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbmef.apps.digits import DigitsSplit, demo_bundle_dir, demo_test_split, demo_train_split, write_image_folder
from dbmef.errors import ConfigError
from tests.conftest import cli, has, needs_ort

pytestmark = [needs_ort, pytest.mark.skipif(not has("onnx"), reason="needs onnx ([onnx] or [export] extra)")]


def test_the_head_is_scikit_learns_logistic_regression():
    """The same objective solved by another implementation: scikit-learn's LogisticRegression with
    C = 1 / (l2 N) on the standardised features (its intercept is not penalised either)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from dbmef.apps.linear_head import fit_linear_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 12)) * rng.uniform(0.2, 4, 12) + rng.normal(size=12)
    y = (x[:, 0] - x[:, 3] > 0).astype(int) + (x[:, 5] > 0.5) + (x[:, 7] > 1.5)
    l2 = 3e-3
    head = fit_linear_head(x, y, 4, l2, tol=1e-9)
    mean, std = x.mean(0), x.std(0)
    ref = sklearn.LogisticRegression(C=1 / (len(y) * l2), tol=1e-12, max_iter=10_000).fit((x - mean) / std, y)
    np.testing.assert_allclose(head.weight * std, ref.coef_, rtol=1e-4, atol=1e-4)
    z = head.logits(x) - ref.decision_function((x - mean) / std)
    np.testing.assert_allclose(z - z.mean(axis=1, keepdims=True), 0, atol=1e-4)  # equal up to softmax's shift
    assert head.info["grad_max"] <= 1e-9
    with pytest.raises(ConfigError, match="L2 penalty must be > 0"):
        fit_linear_head(x, y, 4, 0.0)


def _subset(split: DigitsSplit, n: int) -> DigitsSplit:
    return DigitsSplit(split.images[:n], split.labels[:n], split.indices[:n])


def test_features_builds_a_bundle_whose_backbone_is_the_head(tmp_path, monkeypatch):
    from dbmef.apps.features import FeaturesConfig, extract_features, run_features
    from dbmef.export.feature_bundle import host_features
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.bundle import Bundle
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.features import FeatureSpec
    from dbmef.runtime.preprocess import VaePreprocess

    train = write_image_folder(_subset(demo_train_split(), 300), tmp_path / "train")
    test = write_image_folder(_subset(demo_test_split(), 40), tmp_path / "test")
    (test / "three" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg = FeaturesConfig(bundle=str(demo_bundle_dir()), data=str(train), out=str(tmp_path / "head"),
                         eval_data=str(test), block="up.0", timestep=50, pool=2, l2=1e-3)
    source = {f.name: f.read_bytes() for f in demo_bundle_dir().iterdir() if f.is_file()}
    report = run_features(cfg)
    # the source bundle (which has no features component) is read, never written
    assert {f.name: f.read_bytes() for f in demo_bundle_dir().iterdir() if f.is_file()} == source
    assert "features" not in Bundle.open(demo_bundle_dir()).manifest.components
    assert report["train"] == {"n": 300, "failed": 0, "accuracy": pytest.approx(report["head"]["train_accuracy"])}
    assert report["eval"]["n"] == 40 and report["eval"]["failed"] == 1  # the broken file reported, the rest scored
    assert report["eval"]["accuracy"] >= 0.8 and report["dim"] == 64 * 2 * 2
    b = Bundle.open(tmp_path / "head")
    m = b.manifest
    assert m.protector is None and m.scoring.fused_beta is None and "calibration" not in m.sources
    assert m.components["backbone"].source["kind"] == "diffusion-features-head"
    assert m.components["backbone"].source["features"] == FeatureSpec("up.0", 50, 2).to_dict()
    # the runtime's fast path on the new bundle is the head over features computed from the separate
    # VAE and UNet graphs (an independent route to the same numbers)
    items = load_labelled(test, m.class_names)[:12]
    images = [it.path for it in items if "broken" not in it.path]
    pre = VaePreprocess(16)
    x = host_features(b, FeatureSpec("up.0", 50, 2), _embedding(b), np.stack([pre(_load(p)) for p in images]))
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b.path("backbone.onnx"))).graph.initializer}
    want = (x @ inits["head/weight"].T + inits["head/bias"]).argmax(1)
    with DBMEFRuntime(b.dir, prot=1.0) as rt:
        assert [r.backbone_label for r in rt.classify(images)] == want.tolist()
    # a second extraction reads the cache back and never opens an engine
    import dbmef.runtime.backends as backends

    monkeypatch.setattr(backends, "open_engine", lambda *a, **k: pytest.fail("recomputed a cached part"))
    again = extract_features(b.dir, load_labelled(test, m.class_names), tmp_path / "head.cache" / "eval")
    assert len(again.y) == 40 and again.failed[0][0].endswith("broken.png")
    with pytest.raises(Exception, match="exists and is not empty"):
        run_features(cfg)


def _embedding(b):  # type: ignore[no-untyped-def]
    from dbmef.export.feature_bundle import empty_embedding

    return empty_embedding(b)


def _load(p: str):  # type: ignore[no-untyped-def]
    from dbmef.runtime.preprocess import load_image

    return load_image(p)


def test_cli_features_and_write_splits(tmp_path):
    rc, out, err, _ = cli("demo", "--write-splits", str(tmp_path / "splits"))
    assert rc == 0, err
    assert len(list((tmp_path / "splits" / "train").rglob("*.png"))) == 1000
    small = write_image_folder(_subset(demo_train_split(), 100), tmp_path / "small")
    rc, out, err, _ = cli("features", "--bundle", str(demo_bundle_dir()), "--data", str(small), "--out",
                          str(tmp_path / "hb"), "--pool", "1", "--json", "-q")
    assert rc == 0, err
    r = json.loads(out)
    assert r["features"] == {"block": "mid", "timestep": 10, "pool": 1, "seed": 0} and r["dim"] == 64
    rc, out, err, _ = cli("features", "--bundle", str(demo_bundle_dir()), "--data", str(small), "--out",
                          str(tmp_path / "hb2"), "--pool", "3")
    assert rc == 2 and "pool 3 does not divide the block's 4 x 4" in err
    assert not (tmp_path / "hb2").exists()  # nothing half-built left behind
