"""The features component against torch: every block's output cut from the exported UNet graph
equals the diffusers module's output taken by a forward hook; the pooled graph equals torch's
adaptive average pool; the export's check is recorded and a failing one leaves no bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dbmef.errors import BundleError, ConfigError, ExportError, ValidationError
from dbmef.runtime.bundle import Bundle
from dbmef.runtime.features import FeatureSpec, feature_noise, pool_features
from tests.conftest import TINY_FEATURES, needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]


@pytest.fixture(scope="module")
def torch_side(tiny_system, tiny_bundle):
    from dbmef.reference.features import empty_prompt_embedding
    from dbmef.reference.loading import load_sd
    from dbmef.runtime.tokenizer import ClipTokenizer

    sd = load_sd(tiny_system / "sd")
    m = Bundle.open(tiny_bundle).manifest
    ids = ClipTokenizer(tiny_bundle / "tokenizer.json", pad_id=m.tokenizer.pad_id)([""])
    return sd, empty_prompt_embedding(sd, ids), m


def test_every_block_cut_from_the_unet_graph_is_torchs_block_output(tiny_bundle, torch_side):
    from dbmef.export.feature_bundle import empty_embedding, session
    from dbmef.export.features import blocks_of, feature_graph
    from dbmef.reference.features import torch_block_activations

    sd, emb_torch, m = torch_side
    b = Bundle.open(tiny_bundle)
    emb = empty_embedding(b)  # the bundle's ONNX text encoder on the empty prompt
    np.testing.assert_allclose(emb, emb_torch, rtol=1e-4, atol=1e-5)
    import onnx

    blocks = blocks_of(onnx.load(str(tiny_bundle / "unet.onnx")))
    assert blocks == ["down.0", "down.1", "mid", "up.0", "up.1"]
    abar = m.schedule.alphas_cumprod()
    x = np.random.default_rng(7).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    for t in (10, 400):
        g = feature_graph(tiny_bundle / "vae_encoder.onnx", tiny_bundle / "unet.onnx", FeatureSpec("mid", t), abar,
                          m.vae.latent_shape, emb, raw_blocks=blocks)
        s = session(g)
        got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"pixel_values": x})))
        ref = torch_block_activations(sd, x, blocks, t, float(abar[t]), feature_noise(0, m.vae.latent_shape), emb_torch)
        for block in blocks:
            np.testing.assert_allclose(got[f"act.{block}"], ref[block], rtol=1e-4, atol=1e-5, err_msg=f"{block} t={t}")
    # the blocks differ from each other (a cut at the wrong place would often repeat one)
    assert ref["down.1"].shape != ref["up.0"].shape and not np.allclose(ref["down.1"], ref["mid"])


def test_export_records_the_torch_check_of_the_features_component(tiny_bundle, torch_side):
    from dbmef.export.feature_bundle import session
    from dbmef.reference.features import torch_block_activations, torch_pooled

    sd, emb, m = torch_side
    rec = m.components["features"]
    assert rec.validation["status"] == "passed" and rec.validation["torch"]["ok"]
    assert rec.source["block"] == TINY_FEATURES["block"] and rec.source["dim"] == 32 * 2 * 2
    spec = FeatureSpec(**TINY_FEATURES)
    x = np.random.default_rng(8).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    abar = float(m.schedule.alphas_cumprod()[spec.timestep])
    act = torch_block_activations(sd, x, [spec.block], spec.timestep, abar, feature_noise(0, m.vae.latent_shape), emb)
    np.testing.assert_allclose(session(tiny_bundle / "features.onnx").run(None, {"pixel_values": x})[0],
                               torch_pooled(act[spec.block], spec.pool), rtol=1e-4, atol=1e-5)
    assert json.loads((tiny_bundle / "export_config.json").read_text())["features"]["block"] == "up.1"


def test_host_pooling_is_torchs_adaptive_average_pool():
    from dbmef.reference.features import torch_pooled

    a = np.random.default_rng(0).normal(size=(2, 3, 8, 12)).astype(np.float32)
    for p in (1, 2, 4):
        np.testing.assert_allclose(pool_features(a, p), torch_pooled(a, p), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="pool 3 does not divide the block's 8 x 12"):
        pool_features(a, 3)


def test_a_failed_check_leaves_no_manifest_and_unusable_inputs_are_refused(tiny_bundle, tmp_path):
    from dbmef.export.feature_bundle import add_features, with_features
    from dbmef.export.features import block_output

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    with pytest.raises(ValidationError, match="disagrees with torch's forward hook"):
        with_features(out, FeatureSpec("mid", 50), check=lambda b: {"ok": False, "max_abs": 1.0})
    assert not (out / "manifest.json").exists()
    with pytest.raises(ConfigError, match="not a block name"):
        FeatureSpec("decoder.3", 10)
    import onnx

    with pytest.raises(ExportError, match=r"its blocks are \['down.0', 'down.1', 'mid', 'up.0', 'up.1'\]"):
        block_output(onnx.load(str(tiny_bundle / "unet.onnx")), "up.7")
    shutil.copytree(tiny_bundle, out, dirs_exist_ok=True)  # the manifest back
    b = Bundle.open(out)
    b.save(b.manifest.replace(components={k: v for k, v in b.manifest.components.items() if k != "unet"}))
    with pytest.raises(BundleError, match="no plain UNet graph"):
        add_features(out, FeatureSpec("mid", 50))
    from dbmef.export.exporter import ExportConfig

    with pytest.raises(ExportError, match="add --scorer both"):
        ExportConfig(sd="tiny", backbone="tiny", scorer="fused", features=FeatureSpec("mid", 50))
