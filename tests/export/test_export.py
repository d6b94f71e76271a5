"""dbmef-export on the tiny system: graphs, validation, manifest, offline behaviour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbmef.errors import BundleError, ExportError, ValidationError
from dbmef.runtime.bundle import Bundle, BundleManifest, load_manifest
from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]


def test_bundle_layout_and_checker(tiny_bundle):
    import onnx

    m = load_manifest(tiny_bundle)
    assert set(m.components) == {"backbone", "text_encoder", "vae_encoder", "scorer", "unet", "features"}
    for rec in m.components.values():
        onnx.checker.check_model(str(tiny_bundle / rec.file))
        assert rec.validation["status"] == "passed"
    assert m.tokenizer.file == "tokenizer.json" and (tiny_bundle / "tokenizer.json").is_file()
    emb = np.load(tiny_bundle / "positive_embeddings.npy")
    assert emb.shape == (10, 77, 32) and emb.dtype == np.float32
    assert m.vae.latent_shape == (4, 8, 8)
    assert m.components["scorer"].validation["decision_check"]["cases"] == 8
    assert "torch" in m.tools and "onnx" in m.tools
    assert json.loads((tiny_bundle / "export_config.json").read_text())["sd"] == "tiny"


@pytest.mark.parametrize("component", ["backbone", "text_encoder", "vae_encoder", "scorer", "unet"])
def test_onnxruntime_matches_torch_at_two_batch_sizes(tiny_bundle, tiny_system, component):
    """Independent of the exporter's own validation: fresh torch modules from the system folder."""
    import torch

    from dbmef.reference.loading import load_backbone, load_sd
    from dbmef.reference.modules import (
        BackboneModule,
        FusedScorerModule,
        TextEncoderModule,
        UNetModule,
        VaeEncoderModule,
    )
    from dbmef.runtime.backends.onnxruntime import OrtEngine, OrtOptions
    from dbmef.runtime.noise_schedule import alphas_cumprod

    sd = load_sd(tiny_system / "sd")
    module = {
        "backbone": lambda: BackboneModule(load_backbone(tiny_system / "backbone")),
        "text_encoder": lambda: TextEncoderModule(sd.text_encoder),
        "vae_encoder": lambda: VaeEncoderModule(sd.vae),
        "scorer": lambda: FusedScorerModule(sd.unet, alphas_cumprod()),
        "unet": lambda: UNetModule(sd.unet),
    }[component]().eval()
    eng = OrtEngine(tiny_bundle / f"{component}.onnx", component, OrtOptions(device="cpu"))
    rng = np.random.default_rng(0)
    for b in (1, 5):
        feeds = {}
        for name in eng.input_names:
            if name == "pixel_values":
                feeds[name] = rng.standard_normal((b, 3, 64, 64)).astype(np.float32)
            elif name == "input_ids":
                feeds[name] = rng.integers(0, 500, (b, 77))
            elif name == "image":
                feeds[name] = rng.uniform(-1, 1, (b, 3, 64, 64)).astype(np.float32)
            elif name == "timestep":
                feeds[name] = rng.integers(0, 1000, (b,))
            elif name in ("emb_pos", "emb_neg", "encoder_hidden_states"):
                feeds[name] = rng.standard_normal((b, 77, 32)).astype(np.float32)
            elif name == "lam":
                feeds[name] = np.array([1.1], np.float32)
            else:
                feeds[name] = rng.standard_normal((b, 4, 8, 8)).astype(np.float32)
        got = next(iter(eng(feeds).values()))
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[n]) for n in eng.input_names)).numpy()
        assert got.shape == ref.shape and got.shape[0] == b
        err = np.abs(got - ref)
        assert err.max() <= 1e-4 + 1e-4 * np.abs(ref).max(), f"{component} b={b}: max abs {err.max():.3g}"


def test_manifest_roundtrip(tiny_bundle):
    m = load_manifest(tiny_bundle)
    again = BundleManifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.to_dict() == m.to_dict()


def test_missing_and_altered_files_detected(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    bundle = Bundle.open(b)
    with open(b / "vae_encoder.onnx", "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"vae_encoder\.onnx does not match the sha256"):
        bundle.verify()
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        bundle.verify(hashes=False)


def test_unknown_format_version_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    d = json.loads((b / "manifest.json").read_text())
    d["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        load_manifest(b)


def test_cli_resnet18_random_init_tiny_sd(tmp_path):
    from dbmef.export.cli import main

    out = tmp_path / "r18"
    assert main(["--backbone", "resnet18", "--random-init", "--sd", "tiny", "--out", str(out), "-q"]) == 0
    m = load_manifest(out)
    assert len(m.class_names) == 1000 and m.class_names[0] == "tench"
    assert m.sources["class_wnids"][0] == "n01440764"
    assert m.backbone_preprocess.input_size == (3, 224, 224)


def test_fp16_export_validates(tmp_path):
    from dbmef.export.exporter import ExportConfig, export_bundle

    out = export_bundle(ExportConfig(backbone="tiny", sd="tiny", precision="fp16", out=str(tmp_path / "h")))
    m = load_manifest(out)
    assert m.precision == "fp16"
    checks = m.components["scorer"].validation["checks"]
    assert all(c["ok"] for c in checks) and checks[0]["max_abs"] > 0  # really fp16: not bit-identical
    import onnx

    g = onnx.load(str(out / "scorer.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in g.graph.initializer)
    assert g.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O contract


def test_failed_validation_refuses_the_export(tmp_path, monkeypatch):
    from dbmef.export import specs
    from dbmef.export.exporter import ExportConfig, export_bundle

    monkeypatch.setitem(specs.TOLERANCES, "fp32", {**specs.TOLERANCES["fp32"], "text_encoder": (0.0, 0.0)})
    out = tmp_path / "bad"
    with pytest.raises(ValidationError, match=r"text_encoder.*differs from torch"):
        export_bundle(ExportConfig(backbone="tiny", sd="tiny", out=str(out)))
    assert not (out / "manifest.json").exists()


def _run_export(args, tmp_path, timeout=120):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-home"), "TORCH_HOME": str(tmp_path / "th")}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "dbmef.export.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_offline_default_fails_fast_naming_what_is_missing(tmp_path):
    r = _run_export(["--backbone", "resnet50", "--out", str(tmp_path / "x")], tmp_path)
    assert r.returncode == 2
    assert "resnet50" in r.stderr and "--weights" in r.stderr and "--random-init" in r.stderr
    r = _run_export(["--backbone", "resnet50", "--random-init", "--out", str(tmp_path / "x")], tmp_path)
    assert r.returncode == 2
    assert "stable-diffusion-v1-5" in r.stderr and "--sd" in r.stderr


def test_bad_sources_and_class_names(tmp_path):
    from dbmef.export.exporter import ExportConfig, export_bundle

    with pytest.raises(ExportError, match="no such folder"):
        export_bundle(ExportConfig(backbone="resnet18", random_init=True, sd=str(tmp_path / "nope")))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(ExportError, match="3 class names for a backbone with 10 classes"):
        export_bundle(ExportConfig(backbone="tiny", sd="tiny", class_names=str(names), out=str(tmp_path / "o")))
    with pytest.raises(ExportError, match="precision"):
        ExportConfig(precision="int8")
    assert Path(tmp_path / "o").exists() is False or not (tmp_path / "o" / "manifest.json").exists()


def test_clear_decision_needs_every_vote_and_the_tie_break_clear():
    """Hand-worked (V, k) per-vote errors against ``vote``'s rule: each vote's own margin, then the
    tie-break among tied counts, must exceed twice the tolerance."""
    from dbmef.export.checks import clear_decision

    assert clear_decision(np.array([[1.0, 2.0], [1.0, 2.0]]), 0.1)
    # mean over votes leads by 0.5 (clear on the old criterion), but vote 0 is a near tie: 1.0 vs 1.01
    assert not clear_decision(np.array([[1.0, 1.01, 3.0], [1.0, 2.0, 3.0]]), 0.1)
    # a 1-1 split: the tie-break's means are 2.0 and 1.5 (margin 0.5)
    split = np.array([[1.0, 2.0], [3.0, 1.0]])
    assert clear_decision(split, 0.2) and not clear_decision(split, 0.3)


def test_cast_copy_converts_without_touching_the_original():
    """The fp16 copy traced for export: every floating tensor in fp16, integer buffers kept, the
    float32 original unchanged and unshared, and the same function up to fp16 rounding."""
    import torch

    from dbmef.export.components import cast_copy

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    h = cast_copy(m, torch.float16)
    assert all(p.dtype == torch.float16 for p in h.parameters())
    assert h[1].running_mean.dtype == torch.float16 and h[1].num_batches_tracked.dtype == torch.int64
    assert all(torch.equal(v, m.state_dict()[k]) and v.dtype == m.state_dict()[k].dtype for k, v in before.items())
    assert h[0].weight.data_ptr() != m[0].weight.data_ptr()
    x = torch.randn(2, 4)
    torch.testing.assert_close(h(x.half()).float(), m(x), atol=2e-3, rtol=2e-3)


def _live_unets() -> list[str]:
    """The dtypes of every UNet2DConditionModel still alive in the process."""
    import gc

    from diffusers import UNet2DConditionModel

    gc.collect()
    return [str(next(o.parameters()).dtype) for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)]


def test_fp16_export_drops_the_float32_unet_before_tracing_and_checking(tmp_path, monkeypatch):
    """Issue 24.4: the float32 UNet is gone (not merely unset) when the half-precision scorer is
    traced, and no torch UNet at all is alive while ONNX Runtime validates the written graph."""
    from dbmef.export import onnx_tools
    from dbmef.export.exporter import ExportConfig, export_bundle

    seen: dict[str, list[str]] = {}
    trace, check = onnx_tools.trace_onnx, onnx_tools.check_outputs

    def traced(module, spec, *a, **kw):
        seen[f"trace {spec.name}"] = _live_unets()
        return trace(module, spec, *a, **kw)

    def checked(path, spec, *a, **kw):
        seen[f"check {spec.name}"] = _live_unets()
        return check(path, spec, *a, **kw)

    before = len(_live_unets())
    monkeypatch.setattr(onnx_tools, "trace_onnx", traced)
    monkeypatch.setattr(onnx_tools, "check_outputs", checked)
    export_bundle(ExportConfig(backbone="tiny", sd="tiny", precision="fp16", out=str(tmp_path / "h")))
    extra = lambda key: seen[key][before:] if len(seen[key]) > before else []  # noqa: E731
    assert len(seen["trace backbone"]) == before + 1  # the system's float32 UNet, loaded once
    assert extra("trace scorer") == ["torch.float16"]  # the traced copy only
    assert extra("check scorer") == []


def test_decision_check_on_precomputed_references_still_refuses(tmp_path, monkeypatch):
    """The torch side of the decision check runs before the UNet is exported and dropped; a scorer
    whose picks differ from it with clear margins must still refuse the export."""
    from dbmef.export import checks
    from dbmef.export.exporter import ExportConfig, export_bundle

    honest = checks.score_cases_on_ort

    def wrong_picks(cases, path, component):
        got = honest(cases, path, component)  # honest errors (so the tolerance stays tight), wrong labels:
        worst = got.errors.mean(axis=1).argmax(axis=1)  # the candidate with the largest mean error
        got.labels[:] = cases.candidates[np.arange(len(worst)), worst]
        return got

    monkeypatch.setattr(checks, "score_cases_on_ort", wrong_picks)
    out = tmp_path / "bad"
    with pytest.raises(ValidationError, match="decision check failed"):
        export_bundle(ExportConfig(backbone="tiny", sd="tiny", out=str(out)))
    assert not (out / "manifest.json").exists()
