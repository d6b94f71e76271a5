"""Shared fixtures: one tiny seeded system per test session, built through save_pretrained."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torch = pytest.mark.skipif(not (has("torch") and has("diffusers") and has("timm")),
                                 reason="needs the [export] extra (torch, diffusers, timm)")
needs_ort = pytest.mark.skipif(not has("onnxruntime"), reason="needs onnxruntime ([cpu] or [gpu] extra)")


@pytest.fixture(scope="session", autouse=True)
def no_worker_threads_left():
    """A ClassifierWorker left open keeps threads inside ONNX Runtime while the interpreter shuts
    down, which can crash the process after every test has passed: fail the session instead."""
    yield
    import threading

    left = [t.name for t in threading.enumerate() if t.name.startswith("dbmef-") and t.is_alive()]
    assert not left, f"threads still running when the tests ended: {left} (close every ClassifierWorker)"


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (has("torch") and has("diffusers") and has("timm")):
        pytest.skip("needs the [export] extra")
    from dbmef.reference.tiny import build_tiny_system

    return build_tiny_system(tmp_path_factory.mktemp("systems") / "tiny")


@pytest.fixture(scope="session")
def sample_images() -> list:
    """A few seeded RGB arrays of different sizes and aspect ratios."""
    import numpy as np

    rng = np.random.default_rng(1234)
    sizes = [(80, 100), (64, 64), (120, 90), (70, 140), (96, 96), (100, 75)]
    out = []
    for j, (h, w) in enumerate(sizes):
        base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        # smooth gradients so images differ in more than noise
        yy, xx = np.mgrid[0:h, 0:w]
        base[..., j % 3] = ((xx * (j + 1) + yy * 3) % 256).astype(np.uint8)
        out.append(base)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny system exported to an ONNX bundle (same seed as ``tiny_system``: same weights)."""
    if not (has("torch") and has("diffusers") and has("timm") and has("onnxruntime")):
        pytest.skip("needs the [export] and [cpu] extras")
    from dbmef.export.exporter import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(ExportConfig(backbone="tiny", sd="tiny", out=str(out), scorer="both"))


def write_images(folder: Path, images: list, prefix: str = "img") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, a in enumerate(images):
        p = folder / f"{prefix}{j:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def many_images() -> list:
    """40 seeded images with varied content, enough for parity on >= 32 images."""
    import numpy as np

    rng = np.random.default_rng(99)
    out = []
    for j in range(40):
        h, w = int(rng.integers(64, 130)), int(rng.integers(64, 130))
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * (1 + j % 5) + yy * (j % 3)) % 256, (yy * (1 + j % 7)) % 256,
                      ((xx + yy) * (j % 4 + 1)) % 256], -1).astype(np.uint8)
        a = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
        out.append(a)
    return out


@pytest.fixture(scope="session")
def onnx_folder(tiny_system: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny system's SD written as ONNX in optimum's layout (``dbmef.reference.optimum_layout``)."""
    from dbmef.reference.optimum_layout import write_onnx_sd_folder

    return write_onnx_sd_folder(tiny_system / "sd", tmp_path_factory.mktemp("optimum") / "sd", image_size=64)

