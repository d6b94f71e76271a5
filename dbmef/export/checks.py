"""Export-time checks beyond per-component tolerances: the source's noise schedule is SD's, and
the exported scorer makes the torch reference's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dbmef.errors import ExportError, ValidationError
from dbmef.runtime.bundle import BundleManifest
from dbmef.runtime.config import ScoringConfig

if TYPE_CHECKING:
    from dbmef.export.exporter import ExportConfig


def check_scheduler(sched: dict[str, Any]) -> None:
    """DBMEF assumes SD's scaled_linear schedule; refuse a source trained with another."""
    if not sched:
        return
    expected = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000}
    bad = {k: sched.get(k) for k, v in expected.items() if k in sched and sched[k] != v}
    if bad:
        raise ExportError(f"the SD source's scheduler_config.json has {bad}; DBMEF's scorer assumes {expected}")


def decision_check(out: Path, manifest: BundleManifest, sd: Any, abar: np.ndarray, cfg: ExportConfig) -> dict[str, Any]:
    """On random cases (latent, k candidates, conditions), the exported scorer through ONNX
    Runtime must pick the same candidate as the torch reference scorer."""
    from dbmef.reference.engines import TorchEngine
    from dbmef.reference.modules import FusedScorerModule, UNetModule
    from dbmef.runtime.engine import SCORER, UNET

    comp = manifest.scorer_component
    reference = (TorchEngine(SCORER, FusedScorerModule(sd.unet, abar)) if comp == "scorer"
                 else TorchEngine(UNET, UNetModule(sd.unet)))
    return compare_scorers(out, manifest, reference, cfg.scoring, cfg.seed, cfg.decision_cases, "torch")


def clear_decision(errors: np.ndarray, tolerance: float) -> bool:
    """Whether ``vote``'s decision on (V, k) per-vote errors survives moving every error by up to
    ``tolerance``: each vote's winner leads its runner-up by more than twice that, and where the
    vote counts tie, the tie-break (mean error over votes) is as clear among the tied candidates.
    (A margin on the mean over votes alone is not enough: one near-tied vote can swing a 1-1 split.)"""
    errors = np.asarray(errors, np.float64)
    ranked = np.sort(errors, axis=1)
    if errors.shape[1] > 1 and not np.all(ranked[:, 1] - ranked[:, 0] > 2 * tolerance):
        return False
    counts = np.bincount(errors.argmin(axis=1), minlength=errors.shape[1])
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) == 1:
        return True
    means = np.sort(errors.mean(axis=0)[tied])
    return bool(means[1] - means[0] > 2 * tolerance)


def compare_scorers(out: Path, manifest: BundleManifest, reference: Any, scoring: ScoringConfig, seed: int,
                    cases: int, what: str) -> dict[str, Any]:
    """The bundle's scorer (ONNX Runtime, CPU) against ``reference`` (any engine with a scorer or
    UNet contract) on random cases: the same candidate wherever the reference's margin is clear."""
    from dbmef.export.onnx_io import release_memory
    from dbmef.runtime.backends.onnxruntime import OrtEngine
    from dbmef.runtime.scorer import DiffusionScorer

    comp = manifest.scorer_component
    k = min(scoring.k, len(manifest.class_names))
    latent_shape = manifest.vae.latent_shape
    # Each row costs two UNet evaluations on both sides. A real-size UNet (about 0.8 TFLOP per
    # evaluation at 64x64) gets a few cases on a coarse grid so the check takes minutes on a CPU;
    # the tiny system gets many.
    big = latent_shape[1] >= 32
    small = scoring.replace(k=k, n_timesteps=min(scoring.n_timesteps, 2 if big else 4),
                            votes=min(scoring.votes, 1 if big else 2),
                            # a CPU materialises attention: 64x64 latents take 0.5 GB per UNet sample
                            unet_batch=1 if big else min(scoring.unet_batch, 8))
    rng = np.random.default_rng(seed + 1)
    m = min(cases, 2) if big else cases
    latents = rng.standard_normal((m, *latent_shape)).astype(np.float32)
    cands = np.stack([rng.permutation(len(manifest.class_names))[:k] for _ in range(m)])
    pos_table = np.load(out / manifest.positive_embeddings.file)
    neg = pos_table[rng.integers(0, len(pos_table), (m, k))]  # real text-encoder outputs as negatives
    # one side at a time: the session is gone before the reference runs (their memory never adds up)
    ort_engine = OrtEngine.on_cpu(out / manifest.components[comp].file, comp, arena=False)
    try:
        a = DiffusionScorer(small, ort_engine, latent_shape).score(latents, cands, pos_table, neg)
    finally:
        ort_engine.close()
    release_memory()
    b = DiffusionScorer(small, reference, latent_shape).score(latents, cands, pos_table, neg)
    agree = int((a.labels == b.labels).sum())
    rel = float(np.max(np.abs(a.errors - b.errors) / np.maximum(np.abs(b.errors), 1e-12)))
    # A random case can be a near tie; a disagreement only counts where the reference's decision
    # could not flip under the measured error difference.
    max_abs = float(np.max(np.abs(a.errors - b.errors)))
    real = [i for i in range(m) if a.labels[i] != b.labels[i] and clear_decision(b.errors[i], max_abs)]
    report = {"cases": m, "agree": agree, "max_rel_error_diff": rel, "max_abs_error_diff": max_abs,
              "near_ties": int(m - agree - len(real)), "reference": what, "config": small.to_dict()}
    if real:
        raise ValidationError(
            f"decision check failed: the exported {comp} picks a different candidate than the {what} reference in "
            f"{len(real)} of {m} random cases with clear margins (max error diff {max_abs:.3g}); the export is refused"
        )
    return report
