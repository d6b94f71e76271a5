import io

import numpy as np
import pytest
from PIL import Image

from dbmef.errors import ImageError
from dbmef.runtime.preprocess import BackbonePreprocess, VaePreprocess, load_image
from tests.conftest import needs_torch


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG" if img.mode != "CMYK" else "JPEG")
    return b.getvalue()


def test_modes_are_converted_to_rgb():
    grey = Image.fromarray(np.full((8, 8), 100, np.uint8), "L")
    assert np.asarray(load_image(grey))[0, 0].tolist() == [100, 100, 100]
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white background
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink -> white
    assert np.asarray(load_image(_png(cmyk)))[0, 0].tolist() == [255, 255, 255]
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(load_image(_png(sixteen)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(np.full((4, 4), 257 * 10, np.uint16)))[0, 0].tolist() == [10, 10, 10]
    assert np.asarray(load_image(np.zeros((3, 5, 6), np.float32))).shape == (5, 6, 3)


def test_unreadable_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"broken\.jpg.*not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(np.zeros((2, 3, 4, 5), np.uint8))


def test_vae_preprocess_range_and_shape():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    a = VaePreprocess(64)(img)
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0


@needs_torch
@pytest.mark.parametrize("size,shape", [(64, (80, 100)), (224, (300, 200)), (224, (200, 333))])
def test_backbone_preprocess_matches_timm_transform(size, shape):
    import timm.data

    cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8))
    ref = timm.data.create_transform(**cfg, is_training=False)(img).numpy()
    ours = BackbonePreprocess.from_data_config(cfg)(img)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@needs_torch
def test_vae_preprocess_matches_torchvision():
    from torchvision import transforms as T

    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    tf = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                    T.Normalize([0.5], [0.5])])
    np.testing.assert_allclose(VaePreprocess(64)(img), tf(img).numpy(), atol=1e-5)
