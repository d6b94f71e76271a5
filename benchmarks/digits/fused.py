"""The fused decision (issue 34) against the paper's rule, on the committed digits bundle.

    python -m benchmarks.digits.fused            # calibration choice, then the 597 held-out digits once

Part 1, the calibration split only (``docs/fused_decision.md`` records the choice): the variants
(per vote or pooled rows; the error difference or the relative error) at their maximum-likelihood
scale, and the fitted beta per (k, V). Part 2, the test split, scored once: every test digit's
full per-row errors (k 3, 5; V 5, whose first vote is V 1), then the backbone alone, the paper's
rule and the fused rule at the bundle's threshold and at Prot 0, with the UNet evaluations per
test digit that ``exact`` spends on each (the runtime's planner replayed over the errors).
Writes ``benchmarks/digits/fused.json`` and ``FUSED.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.digits.early_exit import full_errors
from benchmarks.digits.exit_defaults import errors_for
from dbmef.apps.digits import DigitsSplit, demo_bundle_dir, demo_calibration_split, demo_test_split
from dbmef.runtime.early_exit import ExitPolicy
from dbmef.runtime.fusion import fit_beta, truth_positions
from dbmef.runtime.method import fused_offsets, softmax, top_k, vote
from dbmef.runtime.replay import replay

HERE = Path(__file__).parent
SETTINGS = ((3, 1), (3, 5), (5, 1), (5, 5))


def backbone(bundle: Path, split: DigitsSplit) -> tuple[np.ndarray, float]:
    """(N, C) softmax of the bundle's backbone on the split, and the bundle's threshold."""
    from dbmef.runtime import DBMEFRuntime

    with DBMEFRuntime(bundle) as rt:
        logits, _ = rt.pipeline.backbone_logits(split.rendered())
        return softmax(logits), float(rt.protector.threshold)


def variants(e: np.ndarray, tp: np.ndarray, top: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Calibration only: each variant's accuracy at Prot 0 at its own maximum-likelihood beta."""
    lp, mv, t = np.log(tp.astype(np.float64)), e.mean(axis=2).astype(np.float64), truth_positions(top, y)
    out = {}
    for form in ("difference", "relative"):
        m = mv - mv.min(axis=2, keepdims=True)
        if form == "relative":
            m = m / mv.min(axis=2, keepdims=True)
        beta = fit_beta(m.mean(axis=1), tp, t).beta
        per_vote = np.array([top[j, vote(m[j] - lp[j] / beta)[0]] for j in range(len(y))])
        pooled = top[np.arange(len(y)), (lp - beta * m.mean(axis=1)).argmax(axis=1)]
        out[form] = {"beta": beta, "per_vote": float(np.mean(per_vote == y)), "pooled": float(np.mean(pooled == y))}
    return out


def score(e: np.ndarray, tp: np.ndarray, top: np.ndarray, y: np.ndarray, thr: float, beta: float) -> dict[str, Any]:
    """Backbone, paper and fused at the threshold and at Prot 0, with exact's UNet evaluations."""
    re = tp[:, 0] <= thr
    off = replay(e, ExitPolicy("off"))
    paper = replay(e, ExitPolicy("exact"))
    fused = replay(e, ExitPolicy("exact"), fused_offsets(tp, beta))
    fused_off = replay(e, ExitPolicy("off"), fused_offsets(tp, beta))
    ans = {"paper": top[np.arange(len(y)), paper.winner], "fused": top[np.arange(len(y)), fused.winner]}
    evals = {"paper": paper.rows * 2.0, "fused": fused.rows * 2.0}  # lam 1.1: positive + negative per row
    r: dict[str, Any] = {"backbone": float(np.mean(top[:, 0] == y)), "rethink_rate": float(re.mean()),
                         "off_evals_per_rethought": float(off.rows.mean() * 2),
                         "fused_exact_equals_off": bool((fused.winner == fused_off.winner).all()),
                         "paper_exact_equals_off": bool((paper.winner == off.winner).all())}
    for rule in ("paper", "fused"):
        at = np.where(re, ans[rule], top[:, 0])
        r[rule] = {"threshold": float(np.mean(at == y)), "prot0": float(np.mean(ans[rule] == y)),
                   "evals_threshold": float((evals[rule] * re).mean()), "evals_prot0": float(evals[rule].mean()),
                   "fixed": int(((at == y) & (top[:, 0] != y)).sum()),
                   "broken": int(((at != y) & (top[:, 0] == y)).sum())}
    return r


def run(bundle: Path, cache: Path) -> dict[str, Any]:
    cal, test = demo_calibration_split(), demo_test_split()
    p_cal, thr = backbone(bundle, cal)
    p_test, _ = backbone(bundle, test)
    out: dict[str, Any] = {"threshold": thr, "calibration": {}, "test": {}}
    for k in (3, 5):
        e_cal = errors_for(bundle, k, cache / "calibration-errors")
        path = cache / "test-errors" / f"test_all_k{k}_V5.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, full_errors(bundle, test, k, 5, all_images=True)["errors"])
        e_test = np.load(path)
        top_c, tp_c = top_k(p_cal, k)
        top_t, tp_t = top_k(p_test, k)
        for V in (1, 5):
            key = f"k{k}_V{V}"
            mean_cal = e_cal[:, :V].mean(axis=(1, 2))
            fit = fit_beta(mean_cal, tp_c, truth_positions(top_c, cal.labels))
            out["calibration"][key] = {"fit": fit.to_dict(),
                                       "variants": variants(e_cal[:, :V], tp_c, top_c, cal.labels),
                                       **score(e_cal[:, :V], tp_c, top_c, cal.labels, thr, fit.beta)}
            out["test"][key] = score(e_test[:, :V], tp_t, top_t, test.labels, thr, fit.beta)
            print(key, json.dumps(out["test"][key]), flush=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = ["# The fused decision on the committed digits bundle (issue 34)", "",
             "Regenerate: `python -m benchmarks.digits.fused` (per-row errors cached under `engines/digits/`). "
             f"Written {time.strftime('%Y-%m-%d')}. The choices (per vote, the error difference, beta by maximum "
             "likelihood on the 200 calibration digits) were committed in `docs/fused_decision.md` before any test "
             f"digit was scored with the fused rule. Bundle threshold {r['threshold']:.4f} (Prot 0.95). UNet "
             "evaluations per test digit under `exact` (the runtime's planner replayed over the full errors; "
             "2 per row at lam 1.1).", "", "## Calibration split (200 digits): the fit and the variants", "",
             "| k, V | beta | NLL fused / classifier | Prot 0: per vote, difference | per vote, relative | pooled, "
             "difference | pooled, relative |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, c in r["calibration"].items():
        v, f = c["variants"], c["fit"]
        lines.append(f"| {key} | {f['beta']:.0f} | {f['nll']:.3f} / {f['nll_classifier']:.3f} | "
                     f"{v['difference']['per_vote']:.1%} | {v['relative']['per_vote']:.1%} | "
                     f"{v['difference']['pooled']:.1%} | {v['relative']['pooled']:.1%} |")
    lines += ["", "## Test split (597 digits), scored once", "",
              "| k, V | backbone | paper @ threshold | fused @ threshold | paper, Prot 0 | fused, Prot 0 | "
              "rethink rate | evals/digit paper / fused @ thr | evals/digit paper / fused Prot 0 | "
              "fixed/broken paper / fused @ thr |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, t in r["test"].items():
        p, f = t["paper"], t["fused"]
        lines.append(f"| {key} | {t['backbone']:.2%} | {p['threshold']:.2%} | {f['threshold']:.2%} | "
                     f"{p['prot0']:.2%} | {f['prot0']:.2%} | {t['rethink_rate']:.1%} | {p['evals_threshold']:.1f} / "
                     f"{f['evals_threshold']:.1f} | {p['evals_prot0']:.0f} / {f['evals_prot0']:.0f} | "
                     f"{p['fixed']}/{p['broken']} / {f['fixed']}/{f['broken']} |")
    same = all(t["fused_exact_equals_off"] for t in r["test"].values())
    lines += ["", f"`exact` with the fused rule decides every test digit as `off` with the fused rule: {same}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=demo_bundle_dir())
    ap.add_argument("--cache", type=Path, default=Path("engines/digits"))
    args = ap.parse_args(argv)
    r = run(args.bundle, args.cache)
    (HERE / "fused.json").write_text(json.dumps(r, indent=1) + "\n")
    (HERE / "FUSED.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
