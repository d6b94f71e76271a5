"""Export-time checks beyond per-component tolerances: the source's noise schedule is SD's, and
the exported scorer makes the torch reference's decisions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError, ValidationError
from dbmef.runtime.bundle import BundleManifest
from dbmef.runtime.config import ScoringConfig


def check_scheduler(sched: dict[str, Any]) -> None:
    """DBMEF assumes SD's scaled_linear schedule; refuse a source trained with another."""
    if not sched:
        return
    expected = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000}
    bad = {k: sched.get(k) for k, v in expected.items() if k in sched and sched[k] != v}
    if bad:
        raise ExportError(f"the SD source's scheduler_config.json has {bad}; DBMEF's scorer assumes {expected}")


@dataclass(frozen=True)
class DecisionCases:
    """Random scoring cases (latent, k candidates, conditions) on which an exported scorer must pick
    the candidate its reference picks, and the small scoring config they run under."""

    config: ScoringConfig
    latents: np.ndarray  # (m, C, h, w)
    candidates: np.ndarray  # (m, k) class indices
    positives: np.ndarray  # (classes, 77, D): the bundle's positive embeddings
    negatives: np.ndarray  # (m, k, 77, D)


def decision_cases(n_classes: int, latent_shape: tuple[int, int, int], positives: np.ndarray,
                   scoring: ScoringConfig, seed: int, cases: int) -> DecisionCases:
    k = min(scoring.k, n_classes)
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
    cands = np.stack([rng.permutation(n_classes)[:k] for _ in range(m)])
    neg = positives[rng.integers(0, len(positives), (m, k))]  # real text-encoder outputs as negatives
    return DecisionCases(small, latents, cands, positives, neg)


@dataclass(frozen=True)
class CaseScores:
    """What one side of the decision check decided: labels (m,) and per-vote errors (m, V, k)."""

    labels: np.ndarray
    errors: np.ndarray


def score_cases(cases: DecisionCases, engine: Any) -> CaseScores:
    """Every case through ``engine`` (a scorer or UNet contract) on the runtime's slow path."""
    from dbmef.runtime.scorer import DiffusionScorer
    from dbmef.runtime.slow_path import SlowPath

    scorer = DiffusionScorer(cases.config, engine, tuple(cases.latents.shape[1:]))
    with SlowPath(scorer.executor(cases.positives, len(cases.latents)), cases.config) as slow:
        settled = slow.run(cases.latents, cases.candidates, cases.negatives)
    return CaseScores(np.array([s.label for s in settled]), np.stack([s.errors for s in settled]))


def score_cases_on_ort(cases: DecisionCases, path: Path, component: str) -> CaseScores:
    """``score_cases`` through the exported graph at ``path`` on ONNX Runtime (CPU, no arena); the
    session is closed and its memory handed back before this returns."""
    from dbmef.export.onnx_io import release_memory
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    engine = OrtEngine.on_cpu(path, component, arena=False)
    try:
        return score_cases(cases, engine)
    finally:
        engine.close()
        release_memory()


def torch_reference(sd: Any, abar: np.ndarray, component: str) -> Any:
    """The float32 torch engine the exported ``component`` (``scorer`` or ``unet``) is judged against."""
    from dbmef.reference.engines import TorchEngine
    from dbmef.reference.modules import FusedScorerModule, UNetModule
    from dbmef.runtime.contracts import SCORER, UNET

    return (TorchEngine(SCORER, FusedScorerModule(sd.unet, abar)) if component == "scorer"
            else TorchEngine(UNET, UNetModule(sd.unet)))


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
    comp = manifest.scorer_component
    c = decision_cases(len(manifest.class_names), manifest.vae.latent_shape,
                       np.load(out / manifest.positive_embeddings.file), scoring, seed, cases)
    # one side at a time: the session is gone before the reference runs (their memory never adds up)
    got = score_cases_on_ort(c, out / manifest.components[comp].file, comp)
    return judge_decisions(c, got, score_cases(c, reference), comp, what)


def judge_decisions(cases: DecisionCases, got: CaseScores, ref: CaseScores, component: str, what: str
                    ) -> dict[str, Any]:
    """The decision check's report on the exported side's scores ``got`` against the reference's
    ``ref``; raises ValidationError on a different pick where the reference's margin is clear."""
    m = len(cases.latents)
    agree = int((got.labels == ref.labels).sum())
    rel = float(np.max(np.abs(got.errors - ref.errors) / np.maximum(np.abs(ref.errors), 1e-12)))
    # A random case can be a near tie; a disagreement only counts where the reference's decision
    # could not flip under the measured error difference.
    max_abs = float(np.max(np.abs(got.errors - ref.errors)))
    real = [i for i in range(m) if got.labels[i] != ref.labels[i] and clear_decision(ref.errors[i], max_abs)]
    report = {"cases": m, "agree": agree, "max_rel_error_diff": rel, "max_abs_error_diff": max_abs,
              "near_ties": int(m - agree - len(real)), "reference": what, "config": cases.config.to_dict()}
    if real:
        raise ValidationError(
            f"decision check failed: the exported {component} picks a different candidate than the {what} reference "
            f"in {len(real)} of {m} random cases with clear margins (max error diff {max_abs:.3g}); the export is "
            "refused"
        )
    return report
