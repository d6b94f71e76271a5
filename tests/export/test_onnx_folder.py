"""A bundle from an ONNX Stable Diffusion folder in optimum's layout (issue 18).

The fixture folder is written by dbmef's own writer (``dbmef.reference.optimum_layout``) from the
tiny system's diffusers folder, following optimum's documented names and shapes: optimum's
exporter needs transformers < 4.58 and cannot share this environment. What this proves: the
ONNX-folder path (graph adaptation, the composed scorer, the converted tokenizer) reproduces the
torch export of the same weights; not that every optimum version writes exactly these graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dbmef.errors import ExportError
from dbmef.runtime import DBMEFRuntime, Protector, ScoringConfig
from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]
CFG = ScoringConfig(k=3, n_timesteps=4, votes=3, unet_batch=16, early_exit="off")


def export_args(folder: Path, tiny_bundle: Path, out: Path, *extra: str) -> list[str]:
    """dbmef-export arguments for the ONNX path: the tiny bundle's classifier graph and preprocessing."""
    dc = json.dumps(json.loads((tiny_bundle / "manifest.json").read_text())["backbone_preprocess"])
    names = out.parent / "class_names.json"
    names.write_text(json.dumps(json.loads((tiny_bundle / "manifest.json").read_text())["class_names"]))
    return ["-q", "--sd", str(folder), "--backbone-onnx", str(tiny_bundle / "backbone.onnx"),
            "--class-names", str(names), "--backbone-data-config", dc, "--out", str(out), *extra]


def test_onnx_folder_bundle_makes_the_torch_bundles_decisions(onnx_folder, tiny_bundle, sample_images, tmp_path):
    from dbmef.export.cli import main

    out = tmp_path / "from-onnx"
    assert main(export_args(onnx_folder, tiny_bundle, out, "--scorer", "both", "--features", "up.1",
                            "--features-timestep", "90", "--features-pool", "2")) == 0
    m = json.loads((out / "manifest.json").read_text())
    for name in ("backbone", "text_encoder", "vae_encoder", "unet", "features"):
        assert m["components"][name]["validation"]["status"] == "passed", name
    # the features graph cut from the folder's UNet (optimum's scope names) computes what the torch
    # export's does (same weights; tiny_bundle's was checked against torch's forward hook)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    from dbmef.export.feature_bundle import session

    np.testing.assert_allclose(session(out / "features.onnx").run(None, {"pixel_values": x})[0],
                               session(tiny_bundle / "features.onnx").run(None, {"pixel_values": x})[0],
                               rtol=1e-4, atol=1e-5)
    dc = m["components"]["scorer"]["validation"]["decision_check"]
    assert dc["agree"] == dc["cases"] and dc["max_rel_error_diff"] < 1e-4
    assert m["sources"]["sd"]["kind"] == "onnx-folder"
    prot = Protector.fixed(0.0)
    ours = DBMEFRuntime(out, scoring=CFG, protector=prot).classify(sample_images)
    ref = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot).classify(sample_images)
    assert [r.label for r in ours] == [r.label for r in ref]
    assert [r.backbone_label for r in ours] == [r.backbone_label for r in ref]
    for a, b in zip(ours, ref):
        ea, eb = np.asarray(a.noise_errors, float), np.asarray(b.noise_errors, float)
        assert np.max(np.abs(ea - eb) / np.abs(eb)) <= 1e-4
    # the converted tokenizer (vocab.json + merges.txt) tokenizes like transformers' CLIP tokenizer
    from dbmef.runtime.tokenizer import ClipTokenizer

    prompts = ["a photo of a cat.", "the features of dog,  Bird , CAR!", "Ünïcode  café's 123 it's", ""]
    np.testing.assert_array_equal(ClipTokenizer(out / "tokenizer.json")(prompts),
                                  ClipTokenizer(tiny_bundle / "tokenizer.json")(prompts))
    np.testing.assert_allclose(np.load(out / "positive_embeddings.npy"),
                               np.load(tiny_bundle / "positive_embeddings.npy"), rtol=1e-4, atol=1e-5)


def _variant(tiny_system: Path, tmp: Path, **kw: str) -> Path:
    from dbmef.reference.optimum_layout import write_onnx_sd_folder

    return write_onnx_sd_folder(tiny_system / "sd", tmp / "sd", image_size=64, **kw)


@pytest.mark.parametrize("case,message", [
    ("scalar_timestep", "unet/model.onnx: input 'timestep' has rank 0"),
    ("latent_sample", "vae_encoder/model.onnx emits only 'latent_sample'"),
    ("no_tokenizer", "tokenizer: no tokenizer files"),
    ("no_unet_file", "is missing"),
])
def test_unusable_folders_are_refused_naming_the_file(case, message, onnx_folder, tiny_system, tiny_bundle, tmp_path):
    from dbmef.export.onnx_bundle import OnnxExportConfig, export_from_onnx_folder

    if case == "scalar_timestep":
        folder = _variant(tiny_system, tmp_path, timestep="scalar")
    elif case == "latent_sample":
        folder = _variant(tiny_system, tmp_path, vae_output="latent_sample")
    else:
        folder = tmp_path / "sd"
        shutil.copytree(onnx_folder, folder)
        if case == "no_tokenizer":
            for f in ("vocab.json", "merges.txt"):
                (folder / "tokenizer" / f).unlink()
        else:
            (folder / "vae_encoder" / "model.onnx").unlink()
            message = "vae_encoder/model.onnx is missing"
    names = tmp_path / "names.json"
    names.write_text(json.dumps(json.loads((tiny_bundle / "manifest.json").read_text())["class_names"]))
    cfg = OnnxExportConfig(sd=str(folder), backbone_onnx=str(tiny_bundle / "backbone.onnx"), class_names=str(names),
                           data_config='{"input_size": [3, 32, 32]}', out=str(tmp_path / "out"))
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        export_from_onnx_folder(cfg)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_onnx_flags_without_an_onnx_folder_are_refused(tiny_system, capsys):
    from dbmef.export.cli import main

    assert main(["-q", "--sd", str(tiny_system / "sd"), "--backbone-onnx", "x.onnx"]) == 2
    assert "go with an ONNX Stable Diffusion folder" in capsys.readouterr().err


def test_external_data_in_and_out(onnx_folder, tiny_bundle, sample_images, tmp_path, monkeypatch):
    """A folder whose UNet keeps its weights as external data is read, and a scorer over the 2 GB
    limit is written with external data the manifest records (the limit lowered to the tiny UNet's
    size so the rule runs here), and the bundle classifies as the self-contained one."""
    import onnx

    import dbmef.export.onnx_io as onnx_io
    from dbmef.export.cli import main

    folder = tmp_path / "sd"
    shutil.copytree(onnx_folder, folder)
    unet = onnx.load(str(folder / "unet" / "model.onnx"))
    onnx.save_model(unet, str(folder / "unet" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    assert (folder / "unet" / "model.onnx_data").stat().st_size > 0
    monkeypatch.setattr(onnx_io, "TWO_GB", 1 << 20)  # 1 MiB: the tiny UNet's weights exceed it
    out = tmp_path / "b"
    assert main(export_args(folder, tiny_bundle, out)) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["components"]["scorer"]["external_data"] == "scorer.onnx.data"
    assert (out / "scorer.onnx.data").stat().st_size > (out / "scorer.onnx").stat().st_size
    prot = Protector.fixed(0.0)
    ours = DBMEFRuntime(out, scoring=CFG, protector=prot).classify(sample_images[:3])
    ref = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot).classify(sample_images[:3])
    assert [r.label for r in ours] == [r.label for r in ref]


def test_timm_backbone_with_an_onnx_folder(onnx_folder, tiny_system, tiny_bundle, sample_images, tmp_path):
    """--backbone (timm, through torch) with an ONNX --sd folder: the classifier is exported and
    validated alone, the rest comes from the folder."""
    from dbmef.export.cli import main

    out = tmp_path / "b"
    assert main(["-q", "--sd", str(onnx_folder), "--backbone", str(tiny_system / "backbone"),
                 "--class-names", str(tiny_system / "class_names.json"), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["components"]["backbone"]["validation"]["status"] == "passed"
    assert m["backbone_preprocess"] == json.loads((tiny_bundle / "manifest.json").read_text())["backbone_preprocess"]
    prot = Protector.fixed(0.0)
    ours = DBMEFRuntime(out, scoring=CFG, protector=prot).classify(sample_images[:3])
    ref = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=prot).classify(sample_images[:3])
    assert [(r.backbone_label, r.label) for r in ours] == [(r.backbone_label, r.label) for r in ref]
