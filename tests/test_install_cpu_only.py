"""A production service installs only the runtime: `pip install 'dbmef[cpu]'` into a fresh virtual
environment (no torch, diffusers, transformers, timm) classifies with a bundle from the export side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_ort, needs_torch

ROOT = Path(__file__).resolve().parents[1]


@needs_torch
@needs_ort
@pytest.mark.skipif(os.environ.get("DBMEF_SKIP_INSTALL_TEST") == "1", reason="DBMEF_SKIP_INSTALL_TEST=1")
def test_cpu_extra_in_fresh_venv_classifies(tiny_bundle, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[cpu]"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    heavy = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in "
                            "('torch','diffusers','transformers','timm','onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "[]", f"the cpu extra pulled in {heavy.stdout}"
    sample = ROOT / "dbmef" / "assets" / "sample.png"
    r = subprocess.run([str(venv / "bin" / "dbmef"), "-q", "classify", "--bundle", str(tiny_bundle), "--json",
                        "--timesteps", "2", "--votes", "1", "--prot", "0", str(sample)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out[0]["error"] is None and out[0]["rethought"] is True and out[0]["class_name"]
