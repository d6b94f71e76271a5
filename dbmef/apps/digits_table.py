"""The paper's Table 1 on the digits test split: one system's ablation and the report's tables
(``benchmarks/digits/table.py`` runs them over trained runs; ``digits_report`` writes RESULTS.md).

Columns (each over the 597 test images, per backbone, k = 3 and 5):

* ``top1``: the backbone alone;
* ``no_protector``: every image rethought with the combined score (lam 1.1, V = 1), i.e. the
  diffusion classifier alone over the backbone's top-k;
* ``neg_only``, ``pos_only``, ``combined``: the calibrated protector, rethought images re-ranked
  by the negative condition only (the candidate whose negative, "the features of {the others}",
  predicts the noise *worst* wins), by the positive only (lam = 1), or by both (lam = 1.1);
* ``combined_votes``: the protector, lam = 1.1 and V = 5 votes.

Every diffusion number comes from the bundle's own ONNX engines through the runtime's scorer:
one pass of UNet rows per image gives all three scores (``DiffusionScorer.score_terms``), and the
``combined`` column is checked against ``DBMEFRuntime.classify`` (the fused graph the product
serves). Costs are UNet evaluations per test image and the seconds they take, at the UNet rate
measured in the same run. n = the bundle's timesteps (30, as in the paper).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DigitsSplit, render

COLUMNS = ["top1", "no_protector", "neg_only", "pos_only", "combined", "combined_votes"]


def ablate(bundle: Path, split: DigitsSplit, k: int, votes: int = 5, check_runtime: bool = True,
           keep_errors: bool = False, calibration: DigitsSplit | None = None) -> dict[str, Any]:
    """All Table 1 columns for one bundle and k. Returns accuracies, costs and the runtime check;
    with the system's ``calibration`` split, the fused decision's columns too (``fused``)."""
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.method import error_from_terms

    images = [np.asarray(render(a)) for a in split.images]
    y = split.labels
    with DBMEFRuntime(bundle) as base:
        cfg = base.manifest.scoring.replace(k=k, votes=1)
    n = cfg.n_timesteps
    with DBMEFRuntime(bundle, scoring=cfg) as rt:
        logits, errs = rt.pipeline.backbone_logits(images)
        assert not any(errs)
        gate = rt.protector.gate(logits, k)
        top, rethink = gate.top, gate.rethink
        sel = np.flatnonzero(rethink)
        terms1, terms_v, sec_per_eval = error_terms(rt, cfg, split, top, sel, votes)
        lam = cfg.lam
        e_comb = error_from_terms(terms1, lam).mean(axis=1)  # (N, k)
        pred = predictions(top, rethink, terms1, error_from_terms(terms_v, lam).mean(axis=2), sel, lam)
        check = runtime_check(rt, images, y, e_comb, pred["combined"]) if check_runtime else {}
        fused = None
        if calibration is not None:
            betas = fit_fused(rt, cfg, calibration, votes)
            per_vote = error_from_terms(terms_v, lam).mean(axis=2)  # (M, V, k)
            fused = {"beta": betas, **fused_columns(e_comb, per_vote, sel, top, gate.top_p, y, betas)}

    early_inputs = {"e1": error_from_terms(terms1[sel], lam)[:, None].astype(np.float32),
                    "ev": error_from_terms(terms_v, lam).astype(np.float32), "top": top, "sel": sel, "y": y}
    if keep_errors:  # beside the bundle, so the early-exit columns can be replayed under other defaults (--replay-only)
        np.savez_compressed(Path(bundle).parent / f"early_exit_errors_{Path(bundle).name}_k{k}.npz",
                            **early_inputs)  # type: ignore[arg-type]
    early = early_exit_from(early_inputs, votes)
    acc = {c: float((pred[c] == y).mean()) for c in COLUMNS}
    rate = float(rethink.mean())
    evals = {"top1": 0.0, "no_protector": 2.0 * n * k, "neg_only": 2.0 * n * k * rate,
             "pos_only": 2.0 * n * k * rate, "combined": 2.0 * n * k * rate,
             "combined_votes": 2.0 * n * k * rate * votes}
    top1 = top[:, 0]
    return {
        "bundle": str(bundle), "k": k, "n_timesteps": n, "lam": lam, "votes": votes,
        "prot": rt.protector.prot, "threshold": rt.protector.threshold, "rethink_rate": rate,
        "n_images": len(y), "accuracy": acc, "unet_evals_per_image": evals,
        "unet_seconds_per_eval_during_run": sec_per_eval,
        "flips": {"fixed": int(((pred["combined"] == y) & (top1 != y)).sum()),
                  "broken": int(((pred["combined"] != y) & (top1 == y)).sum())},
        "runtime_check": check,
        "early_exit": early,
        **({"fused": fused} if fused is not None else {}),
    }


def fit_fused(rt: Any, cfg: Any, calibration: DigitsSplit, votes: int) -> dict[str, float]:
    """The fused decision's beta at V = 1 and V = ``votes`` (``fusion.fit_beta``), fitted on every
    image of the system's own calibration split, rethought (docs/fused_decision.md)."""
    from dbmef.runtime.fusion import fit_beta, truth_positions
    from dbmef.runtime.method import error_from_terms

    logits, _ = rt.pipeline.backbone_logits([render(a) for a in calibration.images])
    gate = rt.protector.gate(logits, cfg.k)
    every = np.arange(len(calibration.labels))
    _, terms_v, _ = error_terms(rt, cfg, calibration, gate.top, every, votes)
    e = error_from_terms(terms_v, cfg.lam).mean(axis=2)  # (N, V, k) per-vote mean errors
    truth = truth_positions(gate.top, calibration.labels)
    return {"V1": fit_beta(e[:, 0], gate.top_p, truth).beta, f"V{votes}": fit_beta(e.mean(axis=1), gate.top_p,
                                                                                     truth).beta}


def fused_columns(e1: np.ndarray, per_vote: np.ndarray, sel: np.ndarray, top: np.ndarray, top_p: np.ndarray,
                  y: np.ndarray, betas: dict[str, float]) -> dict[str, Any]:
    """Accuracies of the paper's rule and the fused rule (``method.fused_vote``) from the test images'
    V = 1 mean errors ``e1`` (N, k), the rethought images' (``sel``) per-vote errors (M, V, k), the
    candidates ``top`` (N, k) and their probabilities: every image rethought at V = 1 (Prot 0), the
    protector's images at V = 1 and at V = V."""
    from dbmef.runtime.method import fused_vote, vote

    V = per_vote.shape[1]
    b1, bv = betas["V1"], betas[f"V{V}"]
    n = np.arange(len(y))
    every = {"paper": top[n, e1.argmin(axis=1)],
             "fused": np.array([top[j, fused_vote(e1[j][None], top_p[j], b1)[0]] for j in n])}
    out: dict[str, Any] = {"accuracy": {}}
    for rule, ans in every.items():
        at_thr = top[:, 0].copy()
        at_thr[sel] = ans[sel]
        voted = top[:, 0].copy()
        for q, j in enumerate(sel):
            pick = vote(per_vote[q])[0] if rule == "paper" else fused_vote(per_vote[q], top_p[j], bv)[0]
            voted[j] = top[j, pick]
        out["accuracy"].update({f"{rule}_prot0": float((ans == y).mean()), f"{rule}_V1": float((at_thr == y).mean()),
                                f"{rule}_V{V}": float((voted == y).mean())})
    out["accuracy"]["top1"] = float((top[:, 0] == y).mean())
    return out




def error_terms(rt: Any, cfg: Any, split: DigitsSplit, top: np.ndarray, sel: np.ndarray, votes: int
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """One pass of UNet rows through the bundle's plain UNet graph: every image's error terms at V = 1
    (N, n, k, 3), the rethought images' at V = ``votes`` (M, V, n, k, 3), and seconds per evaluation."""
    from tqdm.auto import tqdm

    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.scorer import DiffusionScorer

    pipe, n, k, name = rt.pipeline, cfg.n_timesteps, cfg.k, Path(rt.bundle_dir).name
    latents = pipe.encode_latents([render(a) for a in split.images])
    neg, pos = pipe.negative_embeddings(top), pipe.positive_embeddings
    unet = open_engine(rt.bundle, "unet", "onnxruntime", None)
    shape = rt.manifest.vae.latent_shape
    rows1 = len(split.labels) * n * k
    with tqdm(total=rows1, desc=f"{name} k={k} V=1", unit="row", mininterval=2) as bar:
        t0 = time.perf_counter()
        scorer = DiffusionScorer(cfg, unet, shape, rt.manifest.schedule)
        terms1 = scorer.score_terms(latents, top, pos, neg, bar.update)[:, 0]
        sec_per_eval = (time.perf_counter() - t0) / (2 * rows1)  # two UNet evaluations per row
    with tqdm(total=len(sel) * votes * n * k, desc=f"{name} k={k} V={votes}", unit="row", mininterval=2) as bar:
        terms_v = DiffusionScorer(cfg.replace(votes=votes), unet, shape, rt.manifest.schedule).score_terms(
            latents[sel], top[sel], pos, neg[sel], bar.update)
    # Noise banks are prefix-stable: vote 0 of the V-vote run is the V=1 run's noise.
    np.testing.assert_allclose(terms_v[:, 0], terms1[sel], rtol=1e-5, atol=1e-7)
    unet.close()
    return terms1, terms_v, sec_per_eval


def predictions(top: np.ndarray, rethink: np.ndarray, terms1: np.ndarray, per_vote: np.ndarray, sel: np.ndarray,
                lam: float) -> dict[str, np.ndarray]:
    """Each column's predicted class per image: terms1 (N, n, k, 3) at V = 1, per_vote (M, V, k) the
    rethought images' per-vote errors at lam."""
    from dbmef.runtime.method import error_from_terms, vote

    rng = np.arange(len(top))
    pick = {"combined": error_from_terms(terms1, lam).mean(axis=1).argmin(axis=1),
            "pos_only": terms1[..., 1].mean(axis=1).argmin(axis=1),
            "neg_only": terms1[..., 0].mean(axis=1).argmax(axis=1)}
    top1 = top[:, 0]
    pred = {"top1": top1, "no_protector": top[rng, pick["combined"]]}
    for name in ("neg_only", "pos_only", "combined"):
        pred[name] = np.where(rethink, top[rng, pick[name]], top1)
    voted = top1.copy()
    for q, j in enumerate(sel):
        voted[j] = top[j, vote(per_vote[q])[0]]
    pred["combined_votes"] = voted
    return pred


def runtime_check(rt: Any, images: list[Any], y: np.ndarray, e_comb: np.ndarray, combined: np.ndarray
                  ) -> dict[str, Any]:
    """The product's own path (fused graph, protector, batching) on the same images, against the
    ``combined`` column: differences, and those not explained by a near tie."""
    t0 = time.perf_counter()
    res = rt.classify(images)
    wall = time.perf_counter() - t0
    served = np.array([r.label for r in res])
    margins = np.sort(e_comb, axis=1)
    close = (margins[:, 1] - margins[:, 0]) < 1e-4 * margins[:, 0]
    differ = served != combined
    return {"runtime_accuracy": float((served == y).mean()), "differences": int(differ.sum()),
            "differences_not_near_ties": int((differ & ~close).sum()), "wall_seconds": wall,
            "seconds_per_image": wall / len(y)}


def early_exit_from(inputs: Any, votes: int) -> dict[str, Any]:
    """The early-exit columns at V = 1 and V = ``votes`` from the saved inputs (see ``ablate``)."""
    return {f"V{V}": early_exit_columns(inputs[e], inputs["top"], inputs["sel"], inputs["y"])
            for V, e in ((1, "e1"), (votes, "ev"))}


def early_exit_columns(errors: np.ndarray, top: np.ndarray, sel: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Each early-exit mode (adaptive at the runtime's defaults) replayed over the full per-row errors
    (M, V, n, k) of the rethought images ``sel``: UNet evaluations per rethought image, agreement with
    ``off`` on those images, and test accuracy (images not rethought keep the backbone's answer)."""
    from dbmef.runtime.config import ScoringConfig
    from dbmef.runtime.early_exit import ExitPolicy
    from dbmef.runtime.replay import replay

    errors = errors.astype(np.float32)
    off = replay(errors, ExitPolicy("off"))
    out: dict[str, Any] = {}
    for name, policy in (("off", ExitPolicy("off")), ("exact", ExitPolicy("exact")),
                         ("adaptive", ScoringConfig(early_exit="adaptive").exit_policy)):
        p = off if name == "off" else replay(errors, policy)
        pred = top[:, 0].copy()
        pred[sel] = top[sel, p.winner]
        out[name] = {"unet_evals_per_rethought_image": float(2 * p.rows.mean()) if len(sel) else 0.0,
                     "agreement_with_off": float((p.winner == off.winner).mean()) if len(sel) else 1.0,
                     "accuracy": float((pred == y).mean()),
                     "policy": {"z": policy.z, "interval": policy.interval, "min_rows": policy.min_rows}}
    return out
