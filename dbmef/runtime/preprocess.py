"""Image decoding and the two preprocessing paths (backbone and VAE), numpy + Pillow only.

The backbone path reproduces timm's eval transform from the model's own data config
(``resolve_data_config``): resize the short side to ``floor(size / crop_pct)``, center crop,
scale to [0, 1], normalise. torchvision's Resize on a PIL image calls PIL's resize with the same
filter, so the two agree bit for bit before normalisation.
"""

from __future__ import annotations

import io
import math
import re
import stat
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dbmef.errors import ConfigError, ImageError

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]

# Limits on what one input may cost, checked from the file size and the image header before any
# pixel is decoded or resized: a 100 KB PNG can declare 30000 x 30000 pixels (a decompression bomb),
# and a 1 x 5 000 000 strip resized to a 512 short side would be 2.5 G pixels.
MAX_FILE_BYTES = 256 * 2**20
MAX_IMAGE_PIXELS = 64 * 2**20  # decoded pixels (PIL's own guard is 89 M with a warning, 179 M an error)
MAX_ASPECT_RATIO = 64.0  # long side / short side

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessed:
    """An input decoded once and preprocessed for both models (``DBMEFPipeline.preprocess``): what
    a service's decode lane hands the fast path, which then reads no pixels. ``error`` instead of
    the arrays when the input could not be read."""

    name: str
    pixel: np.ndarray | None  # the backbone's input (C, H, W); empty without a classifier
    vae: np.ndarray | None  # the VAE encoder's input (3, H, W)
    error: str | None = None


def header_pixels(src: Any) -> int:
    """Width x height an encoded image (bytes) declares in its header, read without decoding; 0 for
    every other input and for bytes that are not a readable header (decoding reports those)."""
    if not isinstance(src, bytes):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(src)) as im:
                return int(im.size[0]) * int(im.size[1])
    except Exception:  # anything unreadable is the decoder's to report, with its own message
        return 0


def describe(src: ImageInput | Preprocessed) -> str:
    """A short name for an input, for results and error messages."""
    if isinstance(src, Preprocessed):
        return src.name
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    return f"<PIL {src.mode} {src.size[0]}x{src.size[1]}>"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grey, 16-bit and float are rescaled, alpha is composited
    on white (a transparent background is not black), CMYK and palettes are converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0  # 65535 -> 255
        elif mode == "I":
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float images: assume [0, 1] when they look like it
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        # Pasted onto white through its own alpha: the same pixels as alpha_composite on an opaque
        # white RGBA (tested), without two more full-size RGBA copies (a 64 M-pixel image: 0.5 GB).
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")


def check_size(name: str, width: int, height: int) -> None:
    """Refuse sizes over the limits above, before anything is decoded or resized."""
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {width}x{height} = {width * height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                         "(a decompression-bomb guard); downscale the image first")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"{name}: {width}x{height} has an aspect ratio of {ratio:.0f}, over the limit of "
                         f"{MAX_ASPECT_RATIO:.0f}; the classifier's center crop would see almost none of it")


def _check_regular_file(p: Path, name: str) -> None:
    """Only a regular file is read: a FIFO or a device (``/dev/zero``, ``/dev/stdin``) would block or
    never end, and each is named as what it is."""
    try:
        st = p.stat()
    except OSError:
        link = " (a dangling or looping symbolic link)" if p.is_symlink() else ""
        raise ImageError(f"{name}: no such file{link}") from None
    mode = st.st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, what in kinds:
        if test(mode):
            raise ImageError(f"{name}: is {what}, not an image file")


def _decode(fp: Any, name: str) -> Image.Image:
    with warnings.catch_warnings():
        # Corrupt metadata makes PIL warn on stderr per file; the image's own error (if any) says enough.
        warnings.simplefilter("ignore", UserWarning)
        # PIL warns (and only warns) between its two bomb limits: treat that as the error it is.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(fp) as im:
            check_size(name, *im.size)  # from the header: nothing decoded yet
            im.load()
            # Phone photos store the sensor's orientation in EXIF: show the models the upright image.
            return ImageOps.exif_transpose(im) or im


def load_image(src: ImageInput) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or an array (H,W[,C], uint8/uint16/float) to RGB.

    Encoded inputs are checked against ``MAX_FILE_BYTES``, ``MAX_IMAGE_PIXELS`` and
    ``MAX_ASPECT_RATIO`` before decoding, and turned upright by their EXIF orientation.
    Raises ImageError naming the input when it cannot be read.
    """
    name = describe(src)
    img: Image.Image
    try:
        if isinstance(src, (str, Path)):
            p = Path(src)
            if not str(src):
                raise ImageError("an empty path is not an image file")
            _check_regular_file(p, name)
            if p.stat().st_size > MAX_FILE_BYTES:
                raise ImageError(f"{name}: {p.stat().st_size} bytes is over the limit of {MAX_FILE_BYTES}")
            img = _decode(p, name)
        elif isinstance(src, bytes):
            if len(src) > MAX_FILE_BYTES:
                raise ImageError(f"{name}: over the limit of {MAX_FILE_BYTES} bytes")
            img = _decode(io.BytesIO(src), name)
        elif isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = _array_to_pil(src)
        else:
            raise ImageError(
                f"unsupported image input of type {type(src).__name__}; pass a path, bytes, PIL image or array"
            )
        check_size(name, *img.size)
        return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses at open past twice its own limit: same answer as check_size, in its words
        raise ImageError(f"{name}: {exc} The limit here is {MAX_IMAGE_PIXELS} pixels (a decompression-bomb "
                         "guard); downscale the image first") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError,
            struct.error, ZeroDivisionError, IndexError, TypeError, KeyError) as exc:
        # Corrupt files reach many exception types inside PIL's decoders (found by fuzzing).
        # PIL names the in-memory buffer object in its message; that address helps nobody.
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {detail})") from exc


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"array of shape {a.shape} is not an image (H,W), (H,W,3|4) or (3|4,H,W)")
    if a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.rint(a * 255.0 if a.max(initial=0) <= 1.0 else a), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"array dtype {a.dtype} is not supported; use uint8, uint16 or float")
    return Image.fromarray(np.ascontiguousarray(a))


def resize_short_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so the short side is ``size``, as torchvision's ``Resize(int)`` does."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _filter(interpolation))


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's CenterCrop rounding: top = round((h - th) / 2)."""
    th, tw = size
    w, h = img.size
    if w < tw or h < th:
        raise ImageError(f"image {w}x{h} is smaller than the crop {tw}x{th}")
    top = round((h - th) / 2.0)
    left = round((w - tw) / 2.0)
    return img.crop((left, top, left + tw, top + th))


def _filter(name: str) -> Image.Resampling:
    try:
        return _FILTERS[name]
    except KeyError:
        raise ConfigError(f"interpolation {name!r} is not supported; use one of {sorted(_FILTERS)}") from None


@dataclass(frozen=True)
class BackbonePreprocess:
    """timm's eval preprocessing, from the model's data config (``resolve_data_config``)."""

    input_size: tuple[int, int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @classmethod
    def from_data_config(cls, cfg: Mapping[str, Any]) -> BackbonePreprocess:
        mode = cfg.get("crop_mode", "center")
        if mode not in ("center", "squash"):
            raise ConfigError(f"timm crop_mode {mode!r} is not supported; supported: 'center', 'squash'")
        return cls(
            input_size=tuple(int(x) for x in cfg["input_size"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            mean=tuple(float(x) for x in cfg.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg.get("std", cls.std)),  # type: ignore[arg-type]
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            crop_mode=mode,
        )

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BackbonePreprocess:
        """The manifest's record (timm's data config)."""
        return cls.from_data_config(cfg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> (3, H, W) float32, normalised."""
        _, h, w = self.input_size
        if self.crop_mode == "squash":
            scale = (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))
            img = img.resize((scale[1], scale[0]), _filter(self.interpolation))
        else:
            scale_size = math.floor(min(h, w) / self.crop_pct) if h == w else None
            if scale_size is not None:
                img = resize_short_side(img, scale_size, self.interpolation)
            else:
                img = img.resize(
                    (math.floor(w / self.crop_pct), math.floor(h / self.crop_pct)), _filter(self.interpolation)
                )
        img = center_crop(img, (h, w))
        a = np.asarray(img, dtype=np.float32) / 255.0  # (H,W,3)
        a = ((a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1))


@dataclass(frozen=True)
class VaePreprocess:
    """docs/design.md §1.4: bicubic resize of the short side to ``size``, center crop, scale to [-1, 1]."""

    size: int = 512

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> (3, size, size) float32 in [-1, 1]."""
        img = resize_short_side(img, self.size, "bicubic")
        img = center_crop(img, (self.size, self.size))
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(a.transpose(2, 0, 1))
