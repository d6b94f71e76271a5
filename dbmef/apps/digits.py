"""The digits demo system's data: scikit-learn's 8x8 handwritten digits rendered as small RGB
images, the same way for training (``benchmarks/digits/train.py``), the demo and the tests.

Lean on purpose (numpy + Pillow): the demo classifies the committed test split with the
committed bundle and needs neither scikit-learn nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dbmef.errors import ConfigError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 16  # 8x8 digits upscaled 2x: the backbone's and the VAE's input size


def render(digit: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """One 8x8 digit (values 0..16, as ``load_digits`` gives them) -> a ``size`` x ``size`` RGB image,
    white strokes on black, bicubic-upscaled."""
    a = np.asarray(digit, dtype=np.float64)
    if a.shape != (8, 8):
        raise ConfigError(f"a digit is an 8x8 array, got shape {a.shape}")
    g = Image.fromarray(np.clip(np.rint(a * (255.0 / 16.0)), 0, 255).astype(np.uint8), mode="L")
    return g.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


@dataclass
class DigitsSplit:
    images: np.ndarray  # (N, 8, 8) uint8, values 0..16
    labels: np.ndarray  # (N,) int64
    indices: np.ndarray  # (N,) rows of sklearn's load_digits

    def rendered(self) -> list[Image.Image]:
        return [render(a) for a in self.images]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, images=self.images, labels=self.labels, indices=self.indices)

    @classmethod
    def load(cls, path: str | Path) -> DigitsSplit:
        with np.load(path) as z:
            return cls(z["images"].astype(np.uint8), z["labels"].astype(np.int64), z["indices"].astype(np.int64))


def is_digits_system(manifest: Any) -> bool:
    """Whether a bundle's manifest is a digits system's (this project's: its classes and its 16-pixel
    input), whose data is the digits test split."""
    return list(manifest.class_names) == DIGIT_NAMES and manifest.vae.image_size == IMAGE_SIZE


def demo_bundle_dir() -> Path:
    """The committed digits bundle (weak backbone, seed 0), shipped inside the package."""
    return Path(str(resources.files("dbmef") / "assets" / "digits" / "bundle"))


def demo_test_split() -> DigitsSplit:
    return DigitsSplit.load(Path(str(resources.files("dbmef") / "assets" / "digits" / "test_split.npz")))


def demo_calibration_split() -> DigitsSplit:
    """The 200 calibration digits the committed bundle's protector was calibrated on."""
    return DigitsSplit.load(Path(str(resources.files("dbmef") / "assets" / "digits" / "calibration_split.npz")))


def demo_train_split() -> DigitsSplit:
    """The 1 000 digits the committed bundle's classifiers were trained on (``make_splits``' first
    part, saved so that ``dbmef features`` can fit a head without scikit-learn)."""
    return DigitsSplit.load(Path(str(resources.files("dbmef") / "assets" / "digits" / "train_split.npz")))


SPLITS = {"train": demo_train_split, "calibration": demo_calibration_split, "test": demo_test_split}


def write_image_folder(split: DigitsSplit, root: str | Path) -> Path:
    """The split as an ImageFolder (``root/<class name>/<row>.png``), what ``--data`` reads."""
    root = Path(root)
    for a, y, i in zip(split.images, split.labels, split.indices):
        d = root / DIGIT_NAMES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        render(a).save(d / f"{int(i):04d}.png")
    return root

