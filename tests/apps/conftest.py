"""What the CLI tests share: scoring flags that keep a rethink to a handful of UNet rows, and a
private copy of the tiny bundle (commands such as calibrate write into it)."""

from __future__ import annotations

import shutil

import pytest

FAST = ["--timesteps", "2", "--votes", "2", "--unet-batch", "16"]


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    return b
