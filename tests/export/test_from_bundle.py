"""dbmef-export --sd BUNDLE: a classifier exported in front of an existing bundle's diffusion side."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbmef.errors import ExportError
from dbmef.runtime.bundle import Bundle, load_manifest
from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]


@pytest.fixture(scope="module")
def swapped(tiny_system, tiny_bundle, tmp_path_factory):
    """The tiny system's own classifier exported in front of the tiny bundle's diffusion side: the
    same weights as the bundle's backbone, so the new bundle must answer exactly as the old one."""
    from dbmef.export.cli import main

    out = tmp_path_factory.mktemp("swap") / "b"
    assert main(["--backbone", str(tiny_system / "backbone"), "--sd", str(tiny_bundle), "--out", str(out), "-q"]) == 0
    return out


def test_the_diffusion_side_is_copied_byte_for_byte_and_the_backbone_validated(swapped, tiny_bundle, capsys):
    from dbmef.apps.cli import main

    old, new = load_manifest(tiny_bundle), load_manifest(swapped)
    assert set(new.components) == set(old.components)
    for name, rec in old.components.items():
        if name != "backbone":
            assert (swapped / rec.file).read_bytes() == (tiny_bundle / rec.file).read_bytes()
            assert new.components[name] == rec
    for f in ("tokenizer.json", "positive_embeddings.npy"):
        assert (swapped / f).read_bytes() == (tiny_bundle / f).read_bytes()
    assert new.components["backbone"].validation["status"] == "passed"
    assert new.backbone_preprocess == old.backbone_preprocess
    assert new.class_names == old.class_names and new.scoring.k == old.scoring.k
    assert new.sources["sd"]["bundle"] == str(tiny_bundle)
    assert new.sources["sd"]["bundle_digest"] == old.digest(calibration=False)
    Bundle.open(swapped)  # every recorded sha256 matches what was written
    assert main(["info", "--bundle", str(swapped)]) == 0
    out = capsys.readouterr().out
    assert f"(diffusion side copied from the bundle {tiny_bundle})" in out and "not calibrated" in out


def test_the_new_bundle_answers_as_the_bundle_it_came_from(swapped, tiny_bundle, many_images):
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.protector import Protector

    every = Protector.fixed(0.0)  # every image through the slow path too
    images = many_images[:6]
    with DBMEFRuntime(tiny_bundle, protector=every) as a, DBMEFRuntime(swapped, protector=every) as b:
        ra, rb = a.classify(images), b.classify(images)
    assert [r.label for r in rb] == [r.label for r in ra] and all(r.rethought for r in rb)
    assert [r.candidates for r in rb] == [r.candidates for r in ra]
    np.testing.assert_allclose([[p for _, p in r.topk] for r in rb], [[p for _, p in r.topk] for r in ra], atol=1e-6)
    np.testing.assert_allclose([r.noise_errors for r in rb], [r.noise_errors for r in ra], rtol=1e-6)


def test_what_belonged_to_the_old_classifier_is_dropped(tiny_bundle, tiny_system, tmp_path):
    """A calibrated source (a protector and a fused beta): the new bundle keeps neither."""
    import shutil

    from dbmef.export.config import ExportConfig
    from dbmef.export.from_bundle import export_with_bundle_diffusion
    from dbmef.runtime.bundle import EngineRecord, TensorRTRecord, sha256_file
    from dbmef.runtime.protector import Protector

    src = tmp_path / "calibrated"
    shutil.copytree(tiny_bundle, src)
    (src / "trt").mkdir()
    engines = {}
    for name in ("backbone", "unet", "text_encoder"):  # stand-in engine files: only their bytes matter here
        (src / "trt" / f"{name}.engine").write_bytes(name.encode() * 10)
        engines[name] = EngineRecord(f"trt/{name}.engine", "k", sha256_file(src / "trt" / f"{name}.engine"), "10.9",
                                     "H100", "9.0", "fp32", {}, 1.0)
    (src / "trt" / "text_encoder.engine").write_bytes(b"altered after its build")
    (src / "trt" / "cache.bin").write_bytes(b"timings")
    b = Bundle.open(src)
    b.save(b.manifest.replace(protector=Protector(0.3, prot=0.95, n_samples=40),
                              scoring=b.manifest.scoring.replace(decision="fused", fused_beta=120.0),
                              tensorrt=TensorRTRecord(engines, "trt/cache.bin")))
    out = export_with_bundle_diffusion(ExportConfig(backbone=str(tiny_system / "backbone"), sd=str(src),
                                                    out=str(tmp_path / "new")))
    m = load_manifest(out)
    assert m.protector is None and m.scoring.decision == "paper" and m.scoring.fused_beta is None
    # the graphs' engines carry over (their keys hold the unchanged graph hashes); the classifier's and
    # an altered one do not
    assert m.tensorrt.engines == {"unet": engines["unet"]} and m.tensorrt.timing_cache == "trt/cache.bin"
    assert (out / "trt" / "unet.engine").read_bytes() == b"unet" * 10
    assert (out / "trt" / "cache.bin").read_bytes() == b"timings"
    assert not (out / "trt" / "backbone.engine").exists() and not (out / "trt" / "text_encoder.engine").exists()
    assert json.loads((out / "export_config.json").read_text())["sd"] == str(src)


def test_a_classifier_of_other_classes_is_refused(tiny_bundle, tiny_system, tmp_path):
    from dbmef.export.config import ExportConfig
    from dbmef.export.from_bundle import export_with_bundle_diffusion

    names = list(load_manifest(tiny_bundle).class_names)
    shuffled = tmp_path / "names.json"
    shuffled.write_text(json.dumps(names[::-1]))
    with pytest.raises(ExportError, match=r"--class-names .* differ from the class names of the bundle"):
        export_with_bundle_diffusion(ExportConfig(backbone=str(tiny_system / "backbone"), sd=str(tiny_bundle),
                                                  class_names=str(shuffled), out=str(tmp_path / "a")))
    with pytest.raises(ExportError, match=rf"has 1000 classes, the bundle .* has {len(names)}"):
        export_with_bundle_diffusion(ExportConfig(backbone="resnet18", random_init=True, sd=str(tiny_bundle),
                                                  out=str(tmp_path / "b")))
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "b").exists()


def test_cli_refuses_what_the_bundle_decides_and_writing_over_it(tiny_bundle, tiny_system, capsys):
    from dbmef.export.cli import main

    backbone = str(tiny_system / "backbone")
    assert main(["--backbone", backbone, "--sd", str(tiny_bundle), "--precision", "fp16", "--scorer", "unet",
                 "--out", "unused", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--precision, --scorer: with a bundle as --sd" in err and "come from that bundle" in err
    assert main(["--backbone", backbone, "--sd", str(tiny_bundle), "--out", str(tiny_bundle), "-q"]) == 2
    assert "is the --sd bundle itself" in capsys.readouterr().err
    Bundle.open(tiny_bundle)  # untouched


def test_build_engines_reuses_the_carried_engines_and_builds_the_classifiers_alone(tiny_bundle, tiny_system,
                                                                                    tmp_path, monkeypatch):
    """On the simulated device (tests/simdevice.py): TensorRT's build itself is checked on a GPU."""
    import shutil

    from dbmef.export.config import ExportConfig
    from dbmef.export.from_bundle import export_with_bundle_diffusion
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime import DBMEFRuntime
    from tests.simdevice import install

    src = tmp_path / "src"
    shutil.copytree(tiny_bundle, src)
    dev = install(monkeypatch)
    old = build_engines(src)
    assert dev.calls["engine_build"] == 4
    out = export_with_bundle_diffusion(ExportConfig(backbone=str(tiny_system / "backbone"), sd=str(src),
                                                    out=str(tmp_path / "new")))
    new = build_engines(out)
    assert dev.calls["engine_build"] == 5  # the classifier's engine alone
    assert {n: r.key for n, r in new.items() if n != "backbone"} == {n: r.key for n, r in old.items()
                                                                     if n != "backbone"}
    with DBMEFRuntime(out, backend="tensorrt") as rt:
        assert rt.describe()["providers"]["scorer"] == "TensorRT"
