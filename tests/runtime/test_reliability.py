"""Reliability round 2 (issue 27): a bundle cannot reach outside itself, a bad manifest, record,
path or flag is a clear error, a failed calibration leaves the bundle as it was, and legal images
at the pixel limit cost the memory of one of them."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from pathlib import Path

import pytest

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
from dbmef.errors import BundleError, ConfigError, ImageError
from tests.conftest import cli, needs_ort


def bundle_copy(tmp_path: Path) -> Path:
    b = tmp_path / "b"
    shutil.copytree(demo_bundle_dir(), b)
    return b


def rewrite(b: Path, change) -> None:  # type: ignore[no-untyped-def]
    d = json.loads((b / "manifest.json").read_text())
    change(d)
    (b / "manifest.json").write_text(json.dumps(d))


# -- 1. the bundle and its manifest -----------------------------------------------------------------
@needs_ort
def test_a_manifest_naming_a_file_outside_its_bundle_is_refused(tmp_path):
    from dbmef.runtime.bundle import Bundle, sha256_file

    b = bundle_copy(tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(b / "backbone.onnx", outside)
    rewrite(b, lambda d: d["components"]["backbone"].update(file="../elsewhere.onnx",
                                                            sha256=sha256_file(outside)))
    with pytest.raises(BundleError, match=r"components\.backbone|resolves outside the bundle folder"):
        Bundle.open(b)
    for cmd in (["info"], ["classify", str(outside)]):
        rc, _, err, _ = cli("-q", cmd[0], "--bundle", str(b), *cmd[1:])
        assert rc == 2 and "outside the bundle folder" in err and "Traceback" not in err, err
    rewrite(b, lambda d: d["tokenizer"].update(file="/etc/hostname"))
    with pytest.raises(BundleError, match=r"relative to the bundle folder|outside the bundle"):
        Bundle.open(b, verify=False)
    (b / "link.json").symlink_to(outside)  # a symbolic link out of the folder is outside too
    rewrite(b, lambda d: d["tokenizer"].update(file="link.json"))
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(b, verify=False)


def test_damaged_manifests_are_bundle_errors_never_tracebacks(tmp_path, monkeypatch):
    from dbmef.runtime import bundle as bundle_mod
    from dbmef.runtime.bundle import Bundle

    b = bundle_copy(tmp_path)
    good = (b / "manifest.json").read_bytes()
    (b / "manifest.json").write_bytes(good[:100] + b"\xff\xfe" + good[100:])
    with pytest.raises(BundleError, match="not UTF-8"):
        Bundle.open(b)
    (b / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(BundleError, match=r"nests JSON too deeply|not valid JSON|must be a JSON object"):
        Bundle.open(b)
    (b / "manifest.json").write_bytes(good)
    monkeypatch.setattr(bundle_mod, "MAX_MANIFEST_BYTES", len(good) - 1)  # a 200 MiB class name, scaled down
    with pytest.raises(BundleError, match=r"over the .*-byte limit for a manifest"):
        Bundle.open(b)
    monkeypatch.undo()
    with open(b / "positive_embeddings.npy", "r+b") as f:  # a damaged .npy header, hashes not checked
        f.write(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(BundleError, match=r"positive_embeddings.npy is not a readable numpy array"):
        Bundle.open(b, verify=False).positive_embeddings()


@pytest.mark.parametrize("threshold", [float("nan"), "nan", 1.5, -0.1])
def test_a_threshold_that_is_not_a_probability_is_refused(tmp_path, threshold):
    from dbmef.runtime.bundle import Bundle
    from dbmef.runtime.protector import Protector

    b = bundle_copy(tmp_path)
    rewrite(b, lambda d: d["protector"].update(threshold=threshold))
    with pytest.raises(BundleError, match="protector"):
        Bundle.open(b)
    with pytest.raises(ConfigError, match="threshold"):
        Protector(float(threshold), 0.95, 10)
    assert Protector.fixed(0.0).threshold == math.inf and Protector.fixed(1.0).threshold == -math.inf


# -- 3. memory: legal images at the pixel limit -----------------------------------------------------
@needs_ort
def test_eight_images_at_the_pixel_limit_in_one_call_cost_one_image(tmp_path):
    """8192 x 8192 RGBA PNGs (64 M pixels each, exactly the limit): decoded one at a time and
    released once preprocessed, so the call's peak memory is about one decoded image (RGBA + its
    RGB: 0.45 GB), not eight (3.2 GB before)."""
    from PIL import Image

    big = Image.new("RGBA", (8192, 8192), (20, 40, 60, 128))
    paths = []
    for j in range(8):
        p = tmp_path / f"big{j}.png"
        big.save(p, compress_level=1) if j == 0 else os.link(paths[0], p)
        paths.append(p)
    del big
    rc, out, err, peak = cli("-q", "classify", "--json", "--bundle", str(demo_bundle_dir()), *map(str, paths),
                             timeout=600)
    assert rc == 0, err
    assert all(r["error"] is None for r in json.loads(out))
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB"


# -- 4. paths and flags ---------------------------------------------------------------------------
def test_paths_that_are_not_image_files_are_named_as_what_they_are(tmp_path):
    from dbmef.runtime.data import expand_inputs, list_images
    from dbmef.runtime.preprocess import load_image

    with pytest.raises(ConfigError, match="empty"):
        expand_inputs([""])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, what in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path, "a folder")):
        with pytest.raises(ImageError, match=what):
            load_image(path)
    deep = tmp_path / "deep"
    d = deep
    deep.mkdir()
    for _ in range(1100):  # deeper than Python's recursion limit (1000), inside PATH_MAX (4096)
        d = d / "d"
        d.mkdir()  # one level at a time: Path.mkdir(parents=True) itself recurses per level
    render(demo_test_split().images[0]).save(d / "x.png")
    try:
        assert list_images(deep) == [d / "x.png"]
        assert expand_inputs([str(deep)]) == [str(d / "x.png")]
    finally:  # bottom up, one level at a time: shutil.rmtree (pytest's clean-up) recurses per level
        (d / "x.png").unlink()
        while d != deep:
            d.rmdir()
            d = d.parent


@needs_ort
def test_bad_flags_are_refused_before_any_work(tmp_path):
    render(demo_test_split().images[0]).save(tmp_path / "a.png")
    rc, _, err, _ = cli("-q", "classify", "--bundle", str(demo_bundle_dir()), "--threads", "1000",
                        str(tmp_path / "a.png"))
    assert rc == 2 and "--threads" in err and "cores" in err
    rc, _, err, _ = cli("-q", "classify", "--bundle", str(demo_bundle_dir()), "")
    assert rc == 2 and "empty" in err


# -- 5. eval resume --------------------------------------------------------------------------------
@needs_ort
def test_malformed_records_are_redone_and_two_writers_cannot_share_a_file(tmp_path):
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.evaluate import ResultsFile, evaluate, read_results

    data = tmp_path / "data"
    split = demo_test_split()
    for j in range(6):
        (data / str(split.labels[j])).mkdir(parents=True, exist_ok=True)
        render(split.images[j]).save(data / str(split.labels[j]) / f"d{j}.png")
    with RuntimeSpec(str(demo_bundle_dir()), batch_size=2).build() as rt:
        items = load_labelled(data, rt.class_names)
        res = tmp_path / "r.jsonl"
        evaluate(rt, items, res)
        lines = res.read_text().splitlines()
        recs = [json.loads(line) for line in lines[1:]]
        recs[0]["timings"] = 5
        del recs[1]["rethought"]
        recs[2]["rethought"] = "yes"
        res.write_text("\n".join([lines[0], *map(json.dumps, recs)]) + "\n")
        assert len(read_results(res)) == 3  # the three bad ones are not taken as done
        summary = evaluate(rt, items, res)
        assert summary["n_done"] == 6 and len(read_results(res)) == 6
        # a second writer while the first holds the file
        with ResultsFile(res, items, True, rt.identity()):
            errors = []

            def second() -> None:
                try:
                    evaluate(rt, items, res)
                except ConfigError as exc:
                    errors.append(str(exc))

            t = threading.Thread(target=second)
            t.start()
            t.join(60)
        assert errors and "another dbmef process is writing" in errors[0]
        assert len(read_results(res)) == 6 and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


# -- 6. calibrate ----------------------------------------------------------------------------------
@needs_ort
@pytest.mark.parametrize("flags,message", [
    (["--max-rethink-rate", "2"], "must lie in \\[0, 1\\]"), (["--prot", "1.5"], "must lie in \\[0, 1\\]"),
    (["--latency-budget-ms", "-1"], "positive"), (["--target-accuracy", "1.5"], "must lie in \\(0, 1\\]"),
    (["--target-accuracy", "nan"], "finite"),
])
def test_calibrate_checks_its_rule_before_any_work(tmp_path, flags, message):
    import re

    b = bundle_copy(tmp_path)
    render(demo_test_split().images[0]).save(tmp_path / "a.png")
    rc, _, err, _ = cli("-q", "calibrate", "--bundle", str(b), "--data", str(tmp_path / "nonexistent"), *flags)
    assert rc == 2 and re.search(message, err), err  # the rule is refused before the data is even looked at
    assert not (b / "calibration").exists()


@needs_ort
def test_a_failed_calibration_leaves_the_bundle_as_it_was(tmp_path):
    b = bundle_copy(tmp_path)
    before = (b / "manifest.json").read_bytes()
    data = tmp_path / "one"
    (data / "zero").mkdir(parents=True)
    render(demo_test_split().images[0]).save(data / "zero" / "a.png")
    rc, _, err, _ = cli("-q", "calibrate", "--bundle", str(b), "--data", str(data))
    assert rc == 2 and "--min-samples" in err
    rc, _, err, _ = cli("-q", "calibrate", "--bundle", str(b), "--data", str(data), "--min-samples", "1",
                        "--target-accuracy", "1.0")  # the pass runs, then no threshold reaches 100 %...
    assert (rc == 2 and "no threshold reaches" in err) or rc == 0
    if rc == 2:
        assert (b / "manifest.json").read_bytes() == before and not (b / "calibration").exists()
    rc, _, err, _ = cli("-q", "calibrate", "--bundle", str(b), "--data", str(data), "--min-samples", "1",
                        "--results", str(tmp_path))
    assert rc == 2 and "is a folder" in err and not list(tmp_path.glob("*.tmp"))
