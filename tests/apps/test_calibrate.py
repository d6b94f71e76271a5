"""``dbmef calibrate`` on the committed digits bundle and its committed calibration split (issue 17)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dbmef.apps.cli import main
from dbmef.apps.digits import demo_bundle_dir, demo_calibration_split, write_image_folder
from tests.conftest import needs_ort, seed_results

pytestmark = needs_ort


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, digits_calibration_pass):
    """A copy of the digits bundle and its calibration split as an ImageFolder. The rethink-all pass
    `dbmef calibrate` keeps (by default under $DBMEF_HOME) is seeded from the run's shared one: the
    commands below resume it, as a second `dbmef calibrate` on the same data does (a fresh pass
    through the CLI: tests/apps/test_cli.py, on the tiny bundle)."""
    from dbmef.runtime.evaluate import default_results

    root = tmp_path_factory.mktemp("cal")
    bundle = root / "bundle"
    shutil.copytree(demo_bundle_dir(), bundle)
    data = write_image_folder(demo_calibration_split(), root / "calibration")
    seed_results(digits_calibration_pass, data, default_results(bundle, data, "calibration"))
    return bundle, data


def _run(capsys, *argv) -> dict:
    assert main(["-q", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_max_rethink_rate_and_prot_from_one_pass(calibrated, capsys):
    bundle, data = calibrated
    stored = json.loads((demo_bundle_dir() / "manifest.json").read_text())["protector"]
    rep = _run(capsys, "calibrate", "--bundle", bundle, "--data", data, "--max-rethink-rate", "0.10", "--json")
    chosen = rep["chosen"]["point"]
    assert rep["n_images"] == 200 and chosen["rethink_rate"] <= 0.10
    # the curve's Prot 0.95 point is the threshold the bundle was calibrated with (same split): the
    # same calibration image's S, equal up to float32 rounding (the backbone ran in other batch sizes
    # then), and the same set of rethought images
    results = [json.loads(x) for x in open(rep["results"]).read().splitlines()[1:]]
    p95 = next(p for p in rep["curve"] if p["prot"] == 0.95)
    assert p95["threshold"] == pytest.approx(stored["threshold"], rel=1e-6)
    assert sum(r["max_prob"] <= stored["threshold"] for r in results) == round(p95["rethink_rate"] * 200)
    # the curve cost one slow pass: every image's evaluations, counted once
    assert rep["unet_evaluations"] == sum(r["unet_evals"] for r in results) > 0
    assert all(r["rethought"] for r in results) and len(results) == 200
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["protector"]["threshold"] == chosen["threshold"] and m["protector"]["prot"] is None
    cal = m["sources"]["calibration"]
    assert cal["chosen"]["rule"] == "max_rethink_rate" and cal["chosen"]["value"] == 0.10 and len(cal["curve"]) > 10
    assert Path(rep["plot"]).stat().st_size > 0 and Path(rep["plot"]).parent == Path(rep["results"]).parent
    assert not (bundle / "calibration").exists()  # results files live outside the bundle ($DBMEF_HOME)

    # another rule on the same data: the pass resumes (no new UNet work) and --prot 0.95 restores
    # the stored threshold exactly
    rep2 = _run(capsys, "calibrate", "--bundle", bundle, "--data", data, "--prot", "0.95", "--json")
    assert len(open(rep2["results"]).read().splitlines()) == 1 + 200
    assert rep2["unet_evaluations"] == rep["unet_evaluations"]
    assert json.loads((bundle / "manifest.json").read_text())["protector"]["threshold"] == p95["threshold"]

    assert main(["info", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "chosen by   prot 0.95 on 200 images" in out

    # the quick path still exists, and refuses rules that need the slow pass
    assert main(["-q", "calibrate", "--bundle", str(bundle), "--data", str(data), "--backbone-only", "--dry-run",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(stored["threshold"], rel=1e-6)
    assert main(["-q", "calibrate", "--bundle", str(bundle), "--data", str(data), "--backbone-only",
                 "--target-accuracy", "0.9"]) != 0
    assert "needs the slow pass" in capsys.readouterr().err


def test_fused_decision_fitted_on_the_same_pass(calibrated, capsys):
    """--decision fused: beta is the likelihood maximum over the pass's records (minimized here
    directly), written into the manifest with the threshold; the curve shows both rules; the pass
    resumes (one vote: every candidate's error is in the records already)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    bundle, data = calibrated
    stored = json.loads((demo_bundle_dir() / "manifest.json").read_text())["protector"]
    rep = _run(capsys, "calibrate", "--bundle", bundle, "--data", data, "--decision", "fused", "--prot", "0.95",
               "--json")
    recs = [json.loads(x) for x in open(rep["results"]).read().splitlines()[1:]]
    assert rep["unet_evaluations"] == sum(r["unet_evals"] for r in recs) and len(recs) == 200
    inside = [r for r in recs if r["label_true"] in r["candidates"]]
    e = np.array([np.mean(r["noise_errors"], axis=0) for r in inside])
    logp = np.log([[p for _, p in r["topk"]] for r in inside])
    t = np.array([r["candidates"].index(r["label_true"]) for r in inside])

    def nll(log_b: float) -> float:
        s = logp - np.exp(log_b) * e
        return float(-(s[np.arange(len(t)), t] - logsumexp(s, axis=1)).mean())

    direct = float(np.exp(minimize_scalar(nll, bounds=(0, 14), method="bounded", options={"xatol": 1e-9}).x))
    assert rep["decision"] == "fused" and rep["fused"]["beta"] == pytest.approx(direct, rel=1e-3)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["scoring"]["decision"] == "fused" and m["scoring"]["fused_beta"] == rep["fused"]["beta"]
    assert m["protector"]["threshold"] == pytest.approx(stored["threshold"], rel=1e-6)  # Prot 0.95: the backbone's
    # both rules on one curve: at Prot 0 the fused rule answers every calibration digit from the same
    # errors; here it beats the paper's (96.0 % against 94.0 %, docs/fused_decision.md)
    every = next(p for p in rep["curve"] if p["rethink_rate"] == 1.0)
    assert every["accuracy"] > every["accuracy_paper"] > every["backbone_accuracy"]
    assert set(rep["compare"]) == {"paper"}
    assert main(["-q", "calibrate", "--bundle", str(bundle), "--data", str(data), "--prot", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "fused decision: beta" in out and "paper acc" in out
    assert json.loads((bundle / "manifest.json").read_text())["scoring"]["decision"] == "fused"  # kept
