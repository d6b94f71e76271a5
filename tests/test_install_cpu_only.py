"""A production service installs only the runtime: the wheel `make wheel` builds, installed with
`[cpu]` into a fresh virtual environment (no torch, diffusers, transformers, timm), classifies a digit
with the digits bundle inside the installed package and with a bundle from the export side; then
`[cpu,onnx]` added to the same environment exports from an ONNX Stable Diffusion folder without torch:
the README's Install commands, run as written."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.conftest import needs_ort, needs_torch

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    """The wheel, built as `make wheel` builds it (pip wheel --no-deps -w DIR .)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("dbmef-*.whl")
    return wheel


def install(venv: Path, source: Path, extras: str, heavy: tuple[str, ...]) -> list[str]:
    """``source[extras]`` pip-installed into ``venv``; returns which of the ``heavy`` modules it can
    then import (the callers require none)."""
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[{extras}]"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = f"import importlib.util as u; print([m for m in {heavy!r} if u.find_spec(m)])"
    found = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True)
    return ast.literal_eval(found.stdout.strip())


class Installed(NamedTuple):
    venv: Path
    wheel: Path
    heavy: list[str]  # what the cpu extra alone made importable, probed before any other extra went in


@pytest.fixture(scope="module")
def cpu_venv(tmp_path_factory) -> Installed:
    """The wheel `make wheel` builds, pip-installed with ``[cpu]`` into a new virtual environment: one
    for the file (a venv and the runtime's dependencies take half a minute on 2 cores); the onnx test
    adds its extra to it after the cpu extra's contents were probed."""
    root = tmp_path_factory.mktemp("install")
    wheel = build_wheel(root / "dist")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    heavy = install(root / "venv", wheel, "cpu", ("torch", "diffusers", "transformers", "timm", "onnx", "matplotlib"))
    return Installed(root / "venv", wheel, heavy)


@needs_torch
@needs_ort
@pytest.mark.skipif(os.environ.get("DBMEF_SKIP_INSTALL_TEST") == "1", reason="DBMEF_SKIP_INSTALL_TEST=1")
def test_the_wheel_with_the_cpu_extra_in_a_fresh_venv_classifies(cpu_venv, tiny_bundle, tmp_path):
    from dbmef.apps.digits import demo_test_split, render

    venv = cpu_venv.venv
    assert cpu_venv.heavy == [], f"the cpu extra pulled in {cpu_venv.heavy}"
    split = demo_test_split()
    digit = tmp_path / "digit.png"
    render(split.images[0]).save(digit)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "from dbmef.apps.digits import demo_bundle_dir; "
                            "print(demo_bundle_dir())"], capture_output=True, text=True, check=True, cwd=tmp_path)
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(venv), installed  # the wheel's own copy, not this checkout's
    r = subprocess.run([str(venv / "bin" / "dbmef"), "classify", "-q", "--bundle", str(installed), "--json",
                        "--prot", "0", str(digit)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out[0]["error"] is None and out[0]["rethought"] is True and out[0]["label"] == int(split.labels[0])
    sample = ROOT / "dbmef" / "assets" / "sample.png"
    r = subprocess.run([str(venv / "bin" / "dbmef"), "-q", "classify", "--bundle", str(tiny_bundle), "--json",
                        "--timesteps", "2", "--votes", "1", "--prot", "0", str(sample)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)[0]["class_name"]
    # a command that needs an extra this venv lacks says which and how to install it
    r = subprocess.run([str(venv / "bin" / "dbmef-export"), "--backbone", "resnet50", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "pip install 'dbmef[export,cpu]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


@needs_torch
@needs_ort
@pytest.mark.skipif(os.environ.get("DBMEF_SKIP_INSTALL_TEST") == "1", reason="DBMEF_SKIP_INSTALL_TEST=1")
def test_onnx_folder_export_without_torch(cpu_venv, onnx_folder, tiny_bundle, sample_images, tmp_path):
    """Issue 18: ``pip install 'dbmef[cpu,onnx]'`` (no torch, diffusers, transformers, timm) builds a
    bundle from an ONNX SD folder, and it classifies as the torch-exported bundle of the same weights."""
    from PIL import Image

    from dbmef.runtime import DBMEFRuntime, Protector, ScoringConfig

    venv = cpu_venv.venv
    heavy = install(venv, cpu_venv.wheel, "cpu,onnx", ("torch", "diffusers", "transformers", "timm"))
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

