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
