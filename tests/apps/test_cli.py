"""End-to-end CLI: classify, calibrate, eval (with a corrupt file and an interrupted run), info."""

from __future__ import annotations

import json

import pytest

from dbmef.apps.cli import main
from dbmef.runtime.bundle import load_manifest
from tests.apps.conftest import FAST
from tests.conftest import needs_ort, needs_torch, write_images

pytestmark = [needs_torch, needs_ort]
@pytest.fixture
def labelled(tmp_path, many_images, tiny_bundle):
    """ImageFolder with folders named by index, by class name and by class name with a corrupt file."""
    root = tmp_path / "data"
    write_images(root / "0", many_images[:4])
    write_images(root / "dog", many_images[4:8])
    write_images(root / "car", many_images[8:11])
    (root / "car" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_classify_json_in_input_order(bundle, many_images, tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", many_images[:3])
    bad = tmp_path / "imgs" / "zz_bad.jpg"
    bad.write_bytes(b"nope")
    args = ["classify", "--bundle", str(bundle), *FAST, "--json", str(paths[2]), str(bad), str(paths[0])]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(paths[2]), str(bad), str(paths[0])]
    assert out[1]["error"] and out[1]["label"] is None
    for o in (out[0], out[2]):
        assert o["error"] is None and isinstance(o["label"], int) and o["class_name"] and o["rethought"] is True


def test_classify_table_and_folder(bundle, many_images, tmp_path, capsys):
    write_images(tmp_path / "imgs", many_images[:2])
    assert main(["classify", "--bundle", str(bundle), *FAST, "--prot", "1", str(tmp_path / "imgs")]) == 0
    out = capsys.readouterr().out
    assert "class_name" in out and "img000.png" in out and "False" in out


def test_calibrate_writes_manifest(bundle, labelled, capsys):
    before = (bundle / "manifest.json").read_bytes()
    assert main(["calibrate", "--bundle", str(bundle), "--data", str(labelled), "--prot", "0.9"]) == 2
    err = capsys.readouterr().err
    # refused before the pass: 12 files (one of them corrupt, not yet read) are under the default 100
    assert "12 calibration images cannot give the 100" in err and "--min-samples" in err, err
    assert (bundle / "manifest.json").read_bytes() == before
    assert main(["calibrate", "--bundle", str(bundle), "--data", str(labelled), "--prot", "0.9", "--json",
                 "--min-samples", "1", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    m = load_manifest(bundle)
    assert m.protector is not None and m.protector.prot == 0.9
    assert m.protector.threshold == out["chosen"]["point"]["threshold"]
    assert m.protector.n_samples == out["n_correct"]
    assert m.sources["calibration"]["n_unreadable"] == 1 and m.sources["calibration"]["n_images"] == 11
    assert m.sources["calibration"]["chosen"]["rule"] == "prot"


def test_eval_resumes_after_interruption(bundle, labelled, tmp_path, capsys):
    from dbmef.runtime import ScoringConfig
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.evaluate import evaluate, read_results
    from dbmef.runtime.system import DBMEFRuntime

    results = tmp_path / "res.jsonl"
    rt = DBMEFRuntime(bundle, scoring=ScoringConfig(n_timesteps=2, votes=2, unet_batch=16), batch_size=4)
    items = load_labelled(labelled, rt.class_names)
    partial = evaluate(rt, items, results, stop_after=4)  # "interrupted" after one batch
    assert partial["n_done"] == 4 and len(read_results(results)) == 4
    with open(results, "a") as f:
        f.write('{"image": "torn')  # a crash mid-line
    args = ["eval", "--bundle", str(bundle), "--data", str(labelled), "--results", str(results), *FAST,
            "--batch-size", "4", "--json"]
    assert main(args) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert main([*args, "--no-resume", "--results", str(tmp_path / "fresh.jsonl")]) == 0
    fresh = json.loads(capsys.readouterr().out)
    for key in ("n_images", "backbone_accuracy", "dbmef_accuracy", "rethink_rate", "flips_true_to_false",
                "flips_false_to_true"):
        assert resumed[key] == fresh[key], key
    assert resumed["n_images"] == 11 and resumed["n_errors"] == 1
    assert "broken.png" in resumed["errors"][0]["image"]
    assert len(read_results(results)) == 12


def test_eval_table_and_file_list(bundle, labelled, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{labelled / '0' / 'img000.png'} 0\n{labelled / 'dog' / 'img001.png'} dog\n")
    res = str(tmp_path / "r.jsonl")
    assert main(["eval", "--bundle", str(bundle), "--data", str(lst), *FAST, "--results", res]) == 0
    out = capsys.readouterr().out
    assert "dbmef_accuracy" in out and "unet_scoring" in out


def test_info(bundle, capsys):
    assert main(["info", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "scorer" in out and "passed" in out and "classes     10" in out
    assert main(["info", "--bundle", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1


def test_clear_errors(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--bundle", str(bundle), "--data", str(empty)]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    (empty / "zebra").mkdir()
    assert main(["eval", "--bundle", str(bundle), "--data", str(empty)]) == 2
    assert "match no class" in capsys.readouterr().err
    assert main(["classify", "--bundle", str(tmp_path / "nope"), "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_scoring_flag_reaches_the_scoring_config():
    """Each early-exit flag lands in ScoringConfig with its type (lists as tuples, names as strings)."""
    from dbmef.apps.args import runtime_spec
    from dbmef.apps.cli import build_parser
    from dbmef.runtime.config import ScoringConfig

    args = build_parser().parse_args(
        ["classify", "x.png", "--bundle", "B", "--timesteps", "4", "--early-exit", "adaptive", "--exit-z", "2",
         "--exit-interval", "2", "--exit-min-rows", "3", "--exit-test", "t", "--exit-order", "3", "1", "2", "0"])
    cfg = ScoringConfig(**runtime_spec(args).scoring)
    assert (cfg.exit_test, cfg.exit_z, cfg.exit_interval, cfg.exit_min_rows) == ("t", 2.0, 2, 3)
    assert cfg.exit_order == (3, 1, 2, 0) and cfg.exit_policy.test == "t"


@needs_ort
def test_the_old_scorer_flag_still_works_and_says_it_was_renamed(tmp_path, capsys):
    """--scorer-graph scorer|unet was the runtime's spelling before the one vocabulary (--scorer
    fused|unet): users may have typed it, so it still runs, and says once what it is called now."""
    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render

    img = tmp_path / "digit.png"
    render(demo_test_split().images[3]).save(img)
    argv = ["-q", "classify", "--bundle", str(demo_bundle_dir()), "--timesteps", "2", "--votes", "1", "--prot", "0",
            "--json", str(img)]
    assert main([*argv, "--scorer-graph", "scorer"]) == 0
    old = capsys.readouterr()
    assert old.err.count("is now called") == 1 and "--scorer-graph is now called --scorer" in old.err
    assert main([*argv, "--scorer", "fused"]) == 0
    new = capsys.readouterr()
    keys = ("label", "rethought", "candidates", "noise_errors", "votes", "unet_evals")
    (a,), (b,) = json.loads(old.out), json.loads(new.out)
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys} and b["rethought"]
