"""A production service installs only the runtime: `pip install 'dbmef[cpu]'` into a fresh virtual
environment (no torch, diffusers, transformers, timm) classifies with a bundle from the export side."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_ort, needs_torch

ROOT = Path(__file__).resolve().parents[1]


def fresh_venv(venv: Path, extras: str, heavy: tuple[str, ...]) -> list[str]:
    """A new virtual environment with ``dbmef[extras]`` installed from this checkout; returns which
    of the ``heavy`` modules it can import (the callers require none)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[{extras}]"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = f"import importlib.util as u; print([m for m in {heavy!r} if u.find_spec(m)])"
    found = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True)
    return ast.literal_eval(found.stdout.strip())


@needs_torch
@needs_ort
@pytest.mark.skipif(os.environ.get("DBMEF_SKIP_INSTALL_TEST") == "1", reason="DBMEF_SKIP_INSTALL_TEST=1")
def test_cpu_extra_in_fresh_venv_classifies(tiny_bundle, tmp_path):
    venv = tmp_path / "venv"
    heavy = fresh_venv(venv, "cpu", ("torch", "diffusers", "transformers", "timm", "onnx"))
    assert heavy == [], f"the cpu extra pulled in {heavy}"
    sample = ROOT / "dbmef" / "assets" / "sample.png"
    r = subprocess.run([str(venv / "bin" / "dbmef"), "-q", "classify", "--bundle", str(tiny_bundle), "--json",
                        "--timesteps", "2", "--votes", "1", "--prot", "0", str(sample)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out[0]["error"] is None and out[0]["rethought"] is True and out[0]["class_name"]


@needs_torch
@needs_ort
@pytest.mark.skipif(os.environ.get("DBMEF_SKIP_INSTALL_TEST") == "1", reason="DBMEF_SKIP_INSTALL_TEST=1")
def test_onnx_folder_export_without_torch(onnx_folder, tiny_bundle, sample_images, tmp_path):
    """Issue 18: ``pip install 'dbmef[cpu,onnx]'`` (no torch, diffusers, transformers, timm) builds a
    bundle from an ONNX SD folder, and it classifies as the torch-exported bundle of the same weights."""
    from PIL import Image

    from dbmef.runtime import DBMEFRuntime, Protector, ScoringConfig

    venv = tmp_path / "venv"
    heavy = fresh_venv(venv, "cpu,onnx", ("torch", "diffusers", "transformers", "timm"))
    assert heavy == [], f"the onnx extra pulled in {heavy}"
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    (tmp_path / "names.json").write_text(json.dumps(m["class_names"]))
    out = tmp_path / "bundle"
    r = subprocess.run([str(venv / "bin" / "dbmef-export"), "-q", "--sd", str(onnx_folder), "--backbone-onnx",
                        str(tiny_bundle / "backbone.onnx"), "--class-names", str(tmp_path / "names.json"),
                        "--backbone-data-config", json.dumps(m["backbone_preprocess"]), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = []
    for j, a in enumerate(sample_images):
        paths.append(tmp_path / f"img{j}.png")
        Image.fromarray(a).save(paths[-1])
    r = subprocess.run([str(venv / "bin" / "dbmef"), "-q", "classify", "--bundle", str(out), "--json", "--k", "3",
                        "--timesteps", "4", "--votes", "3", "--early-exit", "off", "--prot", "0", *map(str, paths)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    cfg = ScoringConfig(k=3, n_timesteps=4, votes=3, early_exit="off")
    want = DBMEFRuntime(tiny_bundle, scoring=cfg, protector=Protector.fixed(0.0)).classify([str(p) for p in paths])
    assert [g["label"] for g in got] == [w.label for w in want]
    for g, w in zip(got, want):
        ea, eb = np.asarray(g["noise_errors"], float), np.asarray(w.noise_errors, float)
        assert np.max(np.abs(ea - eb) / np.abs(eb)) <= 1e-4

