"""The DBMEF method as numpy functions, in the order docs/design.md §1 states it.

1. ``softmax`` and ``top_k``: the backbone's probabilities and its k candidates (§1.1, §1.3).
2. ``gate``: rethink an image iff its top probability ``S(x) <= threshold`` (§1.2); the threshold
   itself is calibrated by ``Protector`` (protector.py).
3. ``positive_prompt`` / ``negative_prompts``: the two text conditions of each candidate (§1.6).
4. ``add_noise``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the bundle's schedule
   (noise_schedule.py) and the fixed noise bank (noise.py) (§1.4-1.5).
5. ``combine_and_error``: ``eps_hat = neg + lam (pos - neg)`` and the per-row squared error
   (§1.7); ``error_terms`` / ``error_from_terms`` give it for every lam from one UNet pair.
6. ``vote_means`` and ``vote``: per-vote mean error over timesteps, majority over votes with the
   paper's tie-break (§1.8).
7. ``fused_offsets`` and ``fused_vote``: the fused decision (issue 34, not the paper's): each vote
   ranks the candidates by the classifier's log-probability plus the diffusion evidence, scaled by
   one calibrated ``beta`` (``fusion.fit_beta``); ``decision = "paper"`` is the paper's rule.

Everything else in the runtime is execution: which rows run when (early_exit.py), how they are
batched onto an engine (scorer.py), and how images flow through it (pipeline.py). This module is
the one place to read (and test) what is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dbmef.errors import ConfigError

__all__ = [
    "DECISIONS",
    "Gate",
    "PromptTemplates",
    "add_noise",
    "combine_and_error",
    "error_from_terms",
    "error_terms",
    "fused_offsets",
    "fused_vote",
    "gate",
    "negative_prompts",
    "positive_prompt",
    "rethinks",
    "softmax",
    "top_k",
    "vote",
    "vote_means",
]


# -- 1-2: the fast path's decision -----------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, computed in float64 then cast to float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidates: (N, C) probabilities -> ((N, k) class ids in rank order, (N, k) their
    probabilities). Ties keep the lower class id first (a stable sort)."""
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return top, np.take_along_axis(probs, top, axis=-1)


@dataclass(frozen=True)
class Gate:
    """The fast path's decision for N images: candidates ``top`` (N, k) in rank order with their
    probabilities ``top_p`` (N, k), and ``rethink`` (N,) bool."""

    top: np.ndarray
    top_p: np.ndarray
    rethink: np.ndarray


def rethinks(max_probs: np.ndarray, threshold: float) -> np.ndarray:
    """The gate rule: rethink iff ``S(x) <= threshold`` (``S`` the top probability). (N,) -> (N,) bool."""
    return np.asarray(max_probs) <= threshold


def gate(logits: np.ndarray, threshold: float, k: int) -> Gate:
    """(N, C) logits -> Gate: softmax, S(x) = max p, ``rethinks``, top-k."""
    probs = softmax(logits)
    top, top_p = top_k(probs, k)
    return Gate(top, top_p, rethinks(top_p[:, 0], threshold))


# -- 3: text conditions ----------------------------------------------------------------------
DEFAULT_POSITIVE_TEMPLATE = "a photo of a {name}."
DEFAULT_NEGATIVE_TEMPLATE = "the features of {names}."


@dataclass(frozen=True)
class PromptTemplates:
    """How class names become text conditions (docs/design.md §1.6).

    ``positive`` is formatted with ``name``; ``negative`` with ``names``, the other k-1
    candidates in rank order joined by ``separator``.
    """

    positive: str = DEFAULT_POSITIVE_TEMPLATE
    negative: str = DEFAULT_NEGATIVE_TEMPLATE
    separator: str = ","

    def __post_init__(self) -> None:
        if "{name}" not in self.positive:
            raise ConfigError(
                f"prompt template 'positive' = {self.positive!r} has no '{{name}}' placeholder; "
                "write it like 'a photo of a {name}.'"
            )
        if "{names}" not in self.negative:
            raise ConfigError(
                f"prompt template 'negative' = {self.negative!r} has no '{{names}}' placeholder; "
                "write it like 'the features of {names}.'"
            )


def positive_prompt(name: str, templates: PromptTemplates | None = None) -> str:
    """``"a photo of a {name}."`` by default."""
    t = templates or PromptTemplates()
    return t.positive.format(name=name)


def negative_prompts(candidate_names: Sequence[str], templates: PromptTemplates | None = None) -> list[str]:
    """One negative prompt per candidate, in candidate order.

    The negative of candidate ``c`` names the other k-1 candidates in rank order, joined by the
    template's separator (``","``): ``"the features of {names}."``.
    """
    t = templates or PromptTemplates()
    out = []
    for c in range(len(candidate_names)):
        others = [n for j, n in enumerate(candidate_names) if j != c]
        out.append(t.negative.format(names=t.separator.join(others)))
    return out


# -- 4: noising ------------------------------------------------------------------------------
def add_noise(x0: np.ndarray, eps: np.ndarray, sqrt_abar_t: np.ndarray, sqrt_one_minus_abar_t: np.ndarray
              ) -> np.ndarray:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` per row: (B,4,h,w) x2, (B,) x2 -> (B,4,h,w).
    The square-root tables come from ``NoiseSchedule`` (float64 roots cast to float32, the very
    tables the fused scorer graph embeds)."""
    a = np.asarray(sqrt_abar_t, dtype=np.float32)[:, None, None, None]
    s = np.asarray(sqrt_one_minus_abar_t, dtype=np.float32)[:, None, None, None]
    return a * x0 + s * eps


# -- 5: guidance and error -------------------------------------------------------------------
def combine_and_error(eps: np.ndarray, pred_pos: np.ndarray, pred_neg: np.ndarray, lam: float) -> np.ndarray:
    """``eps_hat = neg + lam (pos - neg)``; per-row ``mean((eps - eps_hat)^2)``. (B,4,h,w)x3 -> (B,)."""
    eps_hat = pred_neg + np.float32(lam) * (pred_pos - pred_neg)
    diff = eps.astype(np.float32) - eps_hat
    return np.asarray(np.mean(diff * diff, axis=tuple(range(1, diff.ndim)), dtype=np.float64), dtype=np.float32)


def error_terms(eps: np.ndarray, pred_pos: np.ndarray, pred_neg: np.ndarray) -> np.ndarray:
    """Per-row ``(mean(a*a), mean(b*b), mean(a*b))`` with ``a = eps - pred_neg``, ``b = eps - pred_pos``.

    Since ``eps - eps_hat = (1 - lam) a + lam b``, these three numbers give the error for every lam
    (``error_from_terms``) and the negative-only error (``mean(a*a)``) from one pair of UNet
    evaluations: ablations over lam cost no extra UNet work. (B,4,h,w)x3 -> (B,3) float64.
    """
    a = (eps.astype(np.float32) - pred_neg).reshape(eps.shape[0], -1).astype(np.float64)
    b = (eps.astype(np.float32) - pred_pos).reshape(eps.shape[0], -1).astype(np.float64)
    return np.stack([(a * a).mean(axis=1), (b * b).mean(axis=1), (a * b).mean(axis=1)], axis=1)


def error_from_terms(terms: np.ndarray, lam: float) -> np.ndarray:
    """``mean((eps - eps_hat)^2)`` from ``error_terms`` (last axis of size 3), for guidance ``lam``."""
    aa, bb, ab = terms[..., 0], terms[..., 1], terms[..., 2]
    return (1 - lam) ** 2 * aa + lam**2 * bb + 2 * lam * (1 - lam) * ab


# -- 6: votes --------------------------------------------------------------------------------
def vote_means(errors: np.ndarray) -> np.ndarray:
    """Per-vote mean error over timesteps: (..., n, k) -> (..., k) float32, summed in float64 in
    grid order. The one definition used by every early-exit policy, so ``exact`` compares the
    very numbers ``off`` compares."""
    return np.asarray(errors, dtype=np.float32).mean(axis=-2, dtype=np.float64).astype(np.float32)


def vote(errors: np.ndarray) -> tuple[int, np.ndarray]:
    """Majority vote over V repeats with the paper's tie-break.

    errors: (V, k) per-vote, per-candidate mean error. Each vote picks its argmin (a tie inside a
    vote goes to the better-ranked candidate). The candidate with the most votes wins; a tie goes to
    the tied candidate with the least mean error over votes, then to the better rank.
    Returns (winning candidate position, (k,) vote counts).
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2:
        raise ConfigError(f"vote() needs errors of shape (V, k), got {errors.shape}")
    counts = np.bincount(errors.argmin(axis=1), minlength=errors.shape[1])
    tied = np.flatnonzero(counts == counts.max())
    mean_err = errors.mean(axis=0)
    winner = int(tied[np.argmin(mean_err[tied])])  # argmin: first (best-ranked) among equal means
    return winner, counts


# -- 7: the fused decision (issue 34) ---------------------------------------------------------
DECISIONS = ("paper", "fused")


def fused_offsets(top_p: np.ndarray, beta: float) -> np.ndarray:
    """The classifier's term of the fused rule in error units: ``-log p(c) / beta`` per candidate.

    The fused rule scores candidate c in vote v by ``log p(c) - beta * (e_v(c) - min_c' e_v(c'))``
    (p the backbone's softmax, e_v the vote's mean noise error, beta > 0 calibrated): the softmax
    is a posterior over the labels and the diffusion error, up to the scale beta, a negative
    log-likelihood (Li et al.). The per-vote minimum is common to every candidate, so the highest
    score is the least ``e_v(c) + offset(c)``: the paper's rule on offset errors, which is how
    every early-exit policy applies it. (k,) or (N, k) float64; p = 0 gives +inf (never wins).
    """
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(top_p, dtype=np.float64)) / float(beta)


def fused_vote(errors: np.ndarray, top_p: np.ndarray, beta: float) -> tuple[int, np.ndarray]:
    """The fused rule for one image: errors (V, k) per-vote mean errors, top_p (k,) the candidates'
    probabilities. Each vote picks the least ``e_v(c) + offset(c)``; majority over votes, a tie to
    the least mean of it, then the better rank (``vote`` on the offset errors)."""
    return vote(np.asarray(errors, dtype=np.float64) + fused_offsets(top_p, beta))
