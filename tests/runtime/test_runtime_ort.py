"""The lean runtime over ONNX Runtime against the torch reference, and its handling of bad input."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime import Protector, ScoringConfig
from dbmef.runtime.engine import Engine
from dbmef.runtime.system import DBMEFRuntime
from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]

CFG = ScoringConfig(k=5, n_timesteps=4, votes=3, lam=1.1, seed=0, unet_batch=16)


def _half_threshold(tiny_bundle, images) -> Protector:
    """A threshold at the median top-1 probability, so about half the images are rethought."""
    rt = DBMEFRuntime(tiny_bundle, scoring=CFG)
    probs, _ = rt.backbone_scores(images)
    return Protector(float(np.median(probs.max(axis=1))), None, None)


def test_parity_with_torch_reference_on_32_plus_images(tiny_bundle, tiny_system, many_images):
    from dbmef.reference.engines import reference_pipeline

    images = many_images[:36]
    prot = _half_threshold(tiny_bundle, images)
    ours = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot, batch_size=36).classify(images)
    ref = reference_pipeline(tiny_system, CFG, prot).classify(images)
    n_re = sum(r.rethought for r in ours)
    assert 5 <= n_re <= 31, "need both protected and rethought images"
    for a, b in zip(ours, ref):
        assert a.rethought == b.rethought
        assert a.backbone_label == b.backbone_label
        assert a.label == b.label
        if a.rethought:
            assert a.candidates == b.candidates and a.votes == b.votes
            ea, eb = np.asarray(a.noise_errors), np.asarray(b.noise_errors)
            rel = np.abs(ea - eb) / np.abs(eb)
            where = np.unravel_index(rel.argmax(), rel.shape)
            assert rel.max() <= 1e-4, f"max rel error diff {rel.max():.3g} at {where}"


@pytest.mark.parametrize("scorer", ["fused", "unet"])
def test_same_answer_alone_or_in_a_batch(tiny_bundle, many_images, scorer):
    # scorer: the fused graph, or the plain-UNet path of the same bundle
    rt = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=Protector(np.inf, 0.0), batch_size=8, scorer=scorer)
    assert rt.describe()["scorer"] == rt.scorer == scorer
    batch = rt.classify(many_images[:8])
    for j in (0, 3, 7):
        alone = rt.classify([many_images[j]])[0]
        assert alone.label == batch[j].label and alone.votes == batch[j].votes
        np.testing.assert_allclose(alone.noise_errors, batch[j].noise_errors, rtol=1e-5)


def test_fused_and_unet_scorers_agree(tiny_bundle, many_images):
    every = Protector(np.inf, 0.0)
    a = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=every).classify(many_images[:4])
    b = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=every, scorer="unet").classify(many_images[:4])
    for x, y in zip(a, b):
        assert x.label == y.label
        np.testing.assert_allclose(x.noise_errors, y.noise_errors, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"scorer 'vae_encoder' is not one of \['fused', 'unet'\]"):
        DBMEFRuntime(tiny_bundle, scorer="vae_encoder")


def test_only_rethought_images_are_encoded_and_negatives_cached(tiny_bundle, many_images):
    images = many_images[:12]
    prot = _half_threshold(tiny_bundle, images)
    rt = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot)
    seen = []
    vae = rt.pipeline.engines.vae_encoder
    orig = vae.__call__

    class Spy(Engine):
        name, input_names, output_names = vae.name, vae.input_names, vae.output_names

        def run(self, feeds):
            seen.append(len(feeds["image"]))
            return orig(feeds)

    rt.pipeline.engines.vae_encoder = Spy()  # type: ignore[assignment]
    res = rt.classify(images)
    assert sum(seen) == sum(r.rethought for r in res) > 0
    misses = rt.pipeline.negative_cache.misses
    rt.classify(images)
    assert rt.pipeline.negative_cache.misses == misses  # second pass: every negative from the cache
    assert rt.pipeline.negative_cache.hits >= sum(r.rethought for r in res)


def test_bad_and_odd_inputs(tiny_bundle, many_images, tmp_path):
    rt = DBMEFRuntime(tiny_bundle, scoring=CFG.replace(votes=1, n_timesteps=2), protector=Protector(np.inf, 0.0))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    buf = io.BytesIO()
    Image.new("CMYK", (70, 90), (10, 200, 30, 0)).save(buf, format="JPEG")
    inputs = [
        many_images[0],
        str(corrupt),
        Image.fromarray(many_images[1]).convert("L"),
        Image.fromarray(many_images[2]).convert("RGBA"),
        buf.getvalue(),
        str(text),
        (many_images[3].astype(np.uint16) * 257),
        str(tmp_path / "missing.png"),
    ]
    res = rt.classify(inputs)
    assert [r.error is None for r in res] == [True, False, True, True, True, False, True, False]
    assert "corrupt.jpg" in res[1].error and "not a readable image" in res[1].error
    assert "no such file" in res[7].error
    assert all(r.label is not None and r.rethought for r in res if r.error is None)
    assert [r.index for r in res] == list(range(8))


def test_bundle_errors(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    d = json.loads((b / "manifest.json").read_text())
    d["class_names"] = d["class_names"][:9]
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="9 class names but positive_embeddings has 10"):
        DBMEFRuntime(b)
    with pytest.raises(BundleError, match="does not exist"):
        DBMEFRuntime(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a dbmef bundle"):
        DBMEFRuntime(tmp_path)
    with pytest.raises(ConfigError, match="backend"):
        DBMEFRuntime(tiny_bundle, backend="tvm")


def test_fast_path_then_rethink_elsewhere_equals_classify(tiny_bundle, many_images):
    """The split a distributed pipeline uses: fast path on one runtime, the batch shipped as
    columns (pickled, as Ray does), its rethought rows re-ranked by another runtime in two other
    batches, which never sees an image: classify's answers and timings' shape."""
    from dbmef.runtime.results import Batch

    images = [*many_images[:12], b"not an image"]
    prot = _half_threshold(tiny_bundle, many_images[:12])
    whole = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot).classify(images)
    # lazy engines: each side opens only the networks its half of the pipeline uses
    a = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot, lazy=True)
    b = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot, lazy=True)
    fast = a.pipeline.fast_path(images)
    assert fast.error[-1] and [v is not None for v in fast.vae_pixels] == list(fast.rethink)
    cols = pickle.loads(pickle.dumps(fast.columns()))
    shipped = fast.results(a.class_names)
    todo = np.flatnonzero(fast.rethink)
    assert 0 < len(todo) < 12
    for part in (todo[::2], todo[1::2]):  # rethought in two other batches
        done = b.pipeline.rethink(Batch.from_columns({k: v[part] for k, v in cols.items()}))
        for j, r in zip(part, done.results(b.class_names)):
            shipped[j] = r
    for x, y in zip(shipped, whole):
        assert (x.name, x.label, x.rethought, x.backbone_label, x.candidates, x.votes, x.error is None) == (
            y.name, y.label, y.rethought, y.backbone_label, y.candidates, y.votes, y.error is None)
        assert set(x.timings) == set(y.timings)
        if x.rethought:
            np.testing.assert_allclose(x.noise_errors, y.noise_errors, rtol=1e-6)
            assert set(x.timings) >= {"backbone", "unet_scoring"}
    ea, eb = a.pipeline.engines, b.pipeline.engines
    assert ea.backbone.opened and not (ea.vae_encoder.opened or ea.text_encoder.opened or ea.scorer.opened)
    assert not eb.backbone.opened and eb.vae_encoder.opened and eb.text_encoder.opened and eb.scorer.opened
