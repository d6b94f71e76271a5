"""The backend registry: README's "Adding a backend" followed literally, and one assembly path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbmef.errors import ConfigError
from tests.conftest import needs_ort, needs_torch, write_images

ROOT = Path(__file__).resolve().parents[2]


def recording_engine(path: Path, name: str, log: list[str]):  # type: ignore[no-untyped-def]
    """A toy backend's engine: ONNX Runtime with every graph optimisation off, recording its calls;
    it implements ``run`` only, as README says a backend does."""
    from dbmef.runtime.backends.onnxruntime import OrtEngine, OrtOptions
    from dbmef.runtime.engine import Engine

    class RecordingEngine(Engine):
        def __init__(self) -> None:
            self._inner = OrtEngine(path, name, OrtOptions(device="cpu", graph_optimization="disable"))
            self.name, self.input_names, self.output_names = name, self._inner.input_names, self._inner.output_names

        def run(self, feeds):  # type: ignore[no-untyped-def]
            log.append(self.name)
            return self._inner(feeds)

        def close(self) -> None:
            self._inner.close()

    return RecordingEngine()


@needs_ort
@needs_torch
def test_a_registered_backend_classifies_the_tiny_bundle(tiny_bundle, sample_images, tmp_path, monkeypatch):
    from dbmef.apps.cli import main
    from dbmef.runtime import DBMEFRuntime, Protector, ScoringConfig, register_backend
    from dbmef.runtime.backends import _REGISTRY

    calls: list[str] = []

    def open_recording(bundle, component, options):  # type: ignore[no-untyped-def]
        return recording_engine(bundle.path(bundle.manifest.components[component].file), component, calls)

    monkeypatch.setattr("dbmef.runtime.backends._REGISTRY", dict(_REGISTRY))  # removed again after the test
    register_backend("recording", open_recording)  # the one line README shows
    every = Protector(float("inf"), 0.0, None)
    few = ScoringConfig(n_timesteps=2, votes=2, unet_batch=16)  # every component runs; a few rows each
    with DBMEFRuntime(tiny_bundle, backend="recording", protector=every, scoring=few) as toy, \
            DBMEFRuntime(tiny_bundle, protector=every, scoring=few) as ort:
        ours = toy.classify(sample_images[:4])
        ref = ort.classify(sample_images[:4])
    assert [r.label for r in ours] == [r.label for r in ref]
    assert set(calls) == {"backbone", "vae_encoder", "text_encoder", "scorer"}
    # the CLI offers it too
    paths = write_images(tmp_path, sample_images[:2])
    assert main(["-q", "classify", "--bundle", str(tiny_bundle), "--backend", "recording", "--prot", "0",
                 "--timesteps", "2", "--votes", "2", *map(str, paths)]) == 0
    with pytest.raises(ConfigError, match="not one of"):
        DBMEFRuntime(tiny_bundle, backend="nonexistent")


@needs_ort
def test_classify_never_imports_ray_or_the_cluster_package(tmp_path):
    from dbmef.apps.digits import demo_bundle_dir

    z = str(tmp_path / "z.png")
    code = ("import sys, numpy as np; from dbmef.apps.cli import main; "
            f"from PIL import Image; Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save({z!r}); "
            f"rc = main(['-q', 'classify', '--json', '--bundle', {str(demo_bundle_dir())!r}, {z!r}]); "
            "print('MODULES', [m for m in sys.modules if m.startswith(('dbmef.cluster', 'ray'))], rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("MODULES [] 0"), out.stdout[-300:]


def test_scheduler_constants_cannot_be_overridden():
    """They belong to the bundle (the fused graph bakes them in): refused with the reason."""
    from dbmef.runtime import ScoringConfig

    with pytest.raises(ConfigError, match="noise schedule"):
        ScoringConfig.from_dict({"beta_end": 0.02})
    with pytest.raises(TypeError):
        ScoringConfig(beta_end=0.02)  # type: ignore[call-arg]


def test_old_manifests_with_the_schedule_in_scoring_still_load(tmp_path):
    """Bundles written before the schedule left the scoring config (the committed one among them)."""
    from dbmef.errors import BundleError
    from dbmef.runtime.bundle import BundleManifest
    from dbmef.runtime.config import ScoringConfig

    base = json.loads((ROOT / "dbmef/assets/digits/bundle/manifest.json").read_text())
    base["scoring"] = {**ScoringConfig().to_dict(), "num_train_timesteps": 1000, "beta_start": 0.00085,
                       "beta_end": 0.012}
    m = BundleManifest.from_dict(base)
    assert m.schedule.beta_end == 0.012 and m.scoring == ScoringConfig()
    base["scoring"]["beta_end"] = 0.02
    with pytest.raises(BundleError, match=r"disagrees with scheduler\.beta_end"):
        BundleManifest.from_dict(base)


def test_runtime_spec_validates_before_building():
    from dbmef.runtime import RuntimeSpec

    with pytest.raises(ConfigError, match="--batch-size"):
        RuntimeSpec("b", batch_size=0)
    with pytest.raises(ConfigError, match="calibrate"):
        RuntimeSpec("b", prot=0.5)
    assert RuntimeSpec("b", options={"device": "cpu"}).to_dict()["options"] == {"device": "cpu"}
    np.testing.assert_equal(RuntimeSpec("b").lazy, False)
