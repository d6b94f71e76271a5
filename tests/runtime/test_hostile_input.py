"""Hostile input (issue 15): no image, file, flag or manifest crashes a batch or loses results."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
from dbmef.errors import BundleError, ConfigError, DBMEFError, ImageError
from dbmef.runtime.preprocess import MAX_IMAGE_PIXELS, load_image
from tests.conftest import cli, needs_ort, png_declaring

ROOT = Path(__file__).resolve().parents[2]


def real_bomb(path: Path) -> Path:
    """A real 8200 x 8200 image (67 M pixels, over the 64 M limit) in a small 1-bit PNG."""
    Image.new("1", (8200, 8200)).save(path)
    return path


def tall(path: Path) -> Path:
    Image.new("L", (1, 2_000_000)).save(path)  # 2 MB in memory, a few KB on disk
    return path


def test_size_limits_are_checked_before_decoding(tmp_path):
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        load_image(png_declaring(30000, 30000))
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        load_image(real_bomb(tmp_path / "bomb.png"))
    with pytest.raises(ImageError, match="aspect ratio of 2000000"):
        load_image(tall(tmp_path / "tall.png"))
    assert 8200 * 8200 > MAX_IMAGE_PIXELS


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # a white band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "side.jpg")
    assert img.size == (20, 40)  # upright: width and height swapped
    up = np.asarray(img)
    assert up[:10].mean() > 200 and up[-10:].mean() < 50  # the left band is now on top


FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


def test_fuzzed_files_decode_or_raise_a_dbmef_error():
    """3 000 seeded byte mutations of small files of six formats: each one decodes or raises a
    DBMEFError; nothing else escapes the decoder."""
    rng = np.random.default_rng(0)
    base = np.asarray(render(demo_test_split().images[0]).resize((24, 24)))
    seeds = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, format=fmt)
        seeds[fmt] = buf.getvalue()
    outcomes = {"decoded": 0, "refused": 0}
    for j in range(3000):
        data = bytearray(seeds[FORMATS[j % len(FORMATS)]])
        for _ in range(int(rng.integers(1, 9))):
            kind = rng.integers(0, 3)
            pos = int(rng.integers(0, len(data)))
            if kind == 0:
                data[pos] = int(rng.integers(0, 256))
            elif kind == 1:
                del data[pos : pos + int(rng.integers(1, 16))]
            else:
                data[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        try:
            load_image(bytes(data))
            outcomes["decoded"] += 1
        except DBMEFError:
            outcomes["refused"] += 1
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 100


@needs_ort
def test_classify_keeps_the_good_images_of_a_batch_with_bombs(tmp_path):
    good = tmp_path / "good.png"
    render(demo_test_split().images[0]).save(good)
    render(demo_test_split().images[1]).convert("RGB").save(tmp_path / "good2.jpg")
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))
    rc, out, err, peak = cli("-q", "classify", "--json", "--bundle", str(demo_bundle_dir()), str(good),
                             str(tmp_path / "bomb.png"), str(tall(tmp_path / "tall.png")), str(tmp_path / "good2.jpg"))
    assert rc == 0, err
    res = json.loads(out)
    assert [r["error"] is None for r in res] == [True, False, False, True]
    assert "decompression-bomb guard" in res[1]["error"] and "aspect ratio" in res[2]["error"]
    assert res[0]["label"] is not None and res[3]["label"] is not None
    assert 0 < peak < 1 << 30


@needs_ort
def test_eval_completes_over_a_folder_with_a_bomb_and_broken_links(tmp_path):
    data = tmp_path / "data"
    for c, j in ((0, 0), (1, 1)):
        (data / str(c)).mkdir(parents=True, exist_ok=True)
        render(demo_test_split().images[j]).save(data / str(c) / f"d{j}.png")
    real_bomb(data / "0" / "bomb.png")
    os.symlink(data / "0" / "missing.png", data / "0" / "dangling.png")
    os.symlink(data / "1" / "loop.png", data / "1" / "loop.png")
    res = tmp_path / "r.jsonl"
    rc, out, err, _ = cli("-q", "eval", "--json", "--bundle", str(demo_bundle_dir()), "--data", str(data),
                          "--results", str(res))
    assert rc == 0, err
    s = json.loads(out)
    assert s["n_total"] == 5 and s["n_errors"] == 3 and s["n_images"] == 2
    errors = {Path(e["image"]).name: e["error"] for e in s["errors"]}
    assert "decompression-bomb guard" in errors["bomb.png"]
    assert "symbolic link" in errors["dangling.png"] and "symbolic link" in errors["loop.png"]


@needs_ort
def test_a_folder_named_like_an_image_is_one_failed_input(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    render(demo_test_split().images[0]).save(tmp_path / "good.png")
    rc, out, err, _ = cli("-q", "classify", "--json", "--bundle", str(demo_bundle_dir()), str(tmp_path / "x.jpg"),
                          str(tmp_path / "good.png"))
    assert rc == 0, err
    res = json.loads(out)
    assert "is a folder" in res[0]["error"] and res[1]["error"] is None


@needs_ort
@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--lam", "inf"], "lam"), (["--lam", "1e30"], "lam"), (["--votes", "0"], "votes"),
    (["--threads", "-2"], "--threads"), (["--early-exit", "adaptive", "--exit-z", "nan"], "exit_z"),
])
def test_bad_numbers_are_refused_naming_the_flag(tmp_path, flags, message):
    render(demo_test_split().images[0]).save(tmp_path / "a.png")
    for cmd in (["classify", str(tmp_path / "a.png")], ["eval", "--data", str(tmp_path)],
                ["calibrate", "--data", str(tmp_path)]):
        rc, _, err, _ = cli("-q", cmd[0], "--bundle", str(demo_bundle_dir()), *flags, *cmd[1:])
        assert rc == 2 and message in err and "Traceback" not in err, (cmd, err)


def test_malformed_manifests_name_the_field(tmp_path):
    from dbmef.runtime.bundle import load_manifest

    b = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), b)
    good = json.loads((b / "manifest.json").read_text())
    for change, field in ((lambda d: d.update(components=[]), "'manifest.components'"),
                          (lambda d: d["vae"].update(latent_shape=[4, 8]), "'manifest.vae.latent_shape'"),
                          (lambda d: d["class_names"].__setitem__(3, 3), "'manifest.class_names[3]'"),
                          (lambda d: d["components"]["scorer"].update(inputs="x0"),
                           "'manifest.components.scorer.inputs'")):
        d = json.loads(json.dumps(good))
        change(d)
        (b / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(BundleError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_manifest(b)
    (b / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must be a JSON object, got list"):
        load_manifest(b)


@needs_ort
def test_bundle_digest_pins_the_manifest_too(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), b)
    rc, out, _, _ = cli("info", "--bundle", str(b), "--json")
    digest = json.loads(out)["digest"]
    render(demo_test_split().images[0]).save(tmp_path / "a.png")
    assert cli("-q", "classify", "--bundle", str(b), "--expect-digest", digest, str(tmp_path / "a.png"))[0] == 0
    m = json.loads((b / "manifest.json").read_text())
    m["class_names"][1], m["class_names"][7] = m["class_names"][7], m["class_names"][1]  # no file hash changes
    (b / "manifest.json").write_text(json.dumps(m))
    rc, _, err, _ = cli("-q", "classify", "--bundle", str(b), "--expect-digest", digest, str(tmp_path / "a.png"))
    assert rc == 2 and "--expect-digest" in err
    (b / "tokenizer.json").write_text("{}")
    rc, _, err, _ = cli("-q", "classify", "--bundle", str(b), str(tmp_path / "a.png"))
    assert rc == 2 and "--no-verify" in err


@needs_ort
def test_resume_refuses_another_configuration_and_survives_a_torn_only_file(tmp_path):
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.evaluate import evaluate, read_results_file

    data = tmp_path / "data"
    for j in range(4):
        (data / str(demo_test_split().labels[j])).mkdir(parents=True, exist_ok=True)
        render(demo_test_split().images[j]).save(data / str(demo_test_split().labels[j]) / f"d{j}.png")
    spec = RuntimeSpec(str(demo_bundle_dir()), batch_size=2)
    with spec.build() as rt:
        items = load_labelled(data, rt.class_names)
        res = tmp_path / "r.jsonl"
        res.write_text('{"image": "torn')  # a crash mid-write, before any whole line
        s = evaluate(rt, items, res)
        assert s["n_done"] == 4
        header, done = read_results_file(res)
        assert header["identity"] == rt.identity() == spec.identity() and len(done) == 4
        assert all(json.loads(line) for line in res.read_text().splitlines())  # no fragment left
    with RuntimeSpec(str(demo_bundle_dir()), scoring={"n_timesteps": 10}).build() as other:
        with pytest.raises(ConfigError, match=r"scoring\.n_timesteps: file 30, now 10"):
            evaluate(other, items, res)
        assert evaluate(other, items, res, resume=False)["n_done"] == 4  # --no-resume starts over
