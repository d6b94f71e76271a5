"""Fitting the fused decision's one scale (issue 34): ``beta`` of ``method.fused_vote``.

The fused rule treats the backbone's softmax as a posterior over the candidates and the diffusion
error as a negative log-likelihood up to a scale: the posterior of candidate c is
``softmax_c(log p(c) - beta * e(c))`` with ``e(c)`` its mean error over every evaluated row.
``fit_beta`` chooses beta by maximum likelihood of the true labels on a calibration pass that
rethought every image (``dbmef calibrate``): a one-parameter multinomial logit with the
classifier's log-probabilities as fixed offsets. Its negative log-likelihood is convex in beta
(its second derivative is the candidates' error variance under the posterior), so the optimum is
the one root of the derivative, found by bisection: no grid, no tie-breaking among equally accurate
settings, nothing that depends on the threshold later chosen. Images whose true label is not a
candidate say nothing about beta and are left out.

``from_records`` reads what the fit and the fused answers need from evaluation records (each
rethought image's candidates, their probabilities and per-vote mean errors), so a calibration pass
already on disk is re-decided for any beta without a UNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.method import fused_vote

__all__ = ["FusedFit", "FusionInputs", "fit_beta", "nll", "truth_positions"]


def truth_positions(candidates: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) each true label's position among its image's candidates (N, k); -1 where it is none of them."""
    hit = np.asarray(candidates) == np.asarray(labels)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def nll(beta: float, errors: np.ndarray, top_p: np.ndarray, truth: np.ndarray) -> float:
    """Mean negative log-likelihood of the true candidates ``truth`` (N,) (positions 0..k-1) under
    ``softmax(log p - beta e)``: errors (N, k) mean errors, top_p (N, k) probabilities."""
    s = np.log(np.asarray(top_p, np.float64)) - beta * np.asarray(errors, np.float64)
    s = s - s.max(axis=1, keepdims=True)
    log_post = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return float(-log_post[np.arange(len(truth)), truth].mean())


def _slope(beta: float, e: np.ndarray, lp: np.ndarray, truth: np.ndarray) -> float:
    """d nll / d beta: the posterior's mean error minus the true candidate's (increasing in beta)."""
    s = lp - beta * e
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return float((e[np.arange(len(truth)), truth] - (w * e).sum(axis=1)).mean())


@dataclass(frozen=True)
class FusedFit:
    """The fitted scale and what it was fitted on. ``beta``: the maximum-likelihood scale, within
    [``low``, ``high``] (the search bracket, relative to the errors' scale; at ``low`` the diffusion
    evidence did not help, at ``high`` the classifier's did not). ``nll`` and ``nll_classifier``:
    mean negative log-likelihood of the true labels with it and with the classifier alone."""

    beta: float
    n_images: int
    nll: float
    nll_classifier: float
    low: float
    high: float

    @property
    def at_bound(self) -> str | None:
        """Which end of the bracket the fit stopped at, if any (say so: the data did not place it)."""
        if self.beta <= self.low * (1 + 1e-9):
            return "low"
        return "high" if self.beta >= self.high * (1 - 1e-9) else None

    def to_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "n_images": self.n_images, "nll": self.nll, "nll_classifier": self.nll_classifier,
                "bracket": [self.low, self.high], "at_bound": self.at_bound}


def fit_beta(errors: np.ndarray, top_p: np.ndarray, truth: np.ndarray, iterations: int = 100) -> FusedFit:
    """The maximum-likelihood beta: errors (N, k) each candidate's mean error, top_p (N, k) its
    probability, truth (N,) the true label's candidate position (-1: not a candidate; left out).

    The bracket is 1e-3 to 1e4 over the median gap between an image's two least errors (beta
    weighs error differences against log-probability differences of order 1); the root is found by
    bisection on log beta."""
    keep = np.asarray(truth) >= 0
    e = np.asarray(errors, np.float64)[keep]
    lp = np.log(np.asarray(top_p, np.float64)[keep])
    t = np.asarray(truth)[keep]
    if len(t) < 2 or e.shape[1] < 2:
        raise ConfigError(f"fitting the fused decision needs at least 2 calibration images whose true label is among "
                          f"their candidates; this pass has {len(t)}")
    e = e - e.min(axis=1, keepdims=True)  # relative to each image's best: the softmax does not change
    gaps = np.sort(e, axis=1)[:, 1]
    scale = float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 1.0
    low, high = 1e-3 / scale, 1e4 / scale
    if _slope(low, e, lp, t) >= 0:
        beta = low
    elif _slope(high, e, lp, t) <= 0:
        beta = high
    else:
        a, b = math.log(low), math.log(high)
        for _ in range(iterations):
            mid = (a + b) / 2
            a, b = (mid, b) if _slope(math.exp(mid), e, lp, t) < 0 else (a, mid)
        beta = math.exp((a + b) / 2)
    return FusedFit(beta, len(t), nll(beta, e, np.exp(lp), t), nll(0.0, e, np.exp(lp), t), low, high)


@dataclass(frozen=True)
class FusionInputs:
    """What the fused decision reads of N rethought images: ``candidates`` (N, k), their
    probabilities ``top_p`` (N, k) and per-vote mean errors ``errors`` (N, V, k)."""

    candidates: np.ndarray
    top_p: np.ndarray
    errors: np.ndarray

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], votes: int) -> FusionInputs:
        """From evaluation records (``ImageResult.to_dict``) of rethought images; every record must
        hold all ``votes`` votes of every candidate (a pass with early exit ``off``, or one vote)."""
        cands, probs, errs = [], [], []
        for r in records:
            noise = r.get("noise_errors") or []
            if len(noise) != votes or any(e is None for row in noise for e in row):
                raise ConfigError(f"image {r.get('image')!r} has {len(noise)} of {votes} votes with every candidate's "
                                  "error; the fused decision is fitted on a pass without early exit (--early-exit off)")
            cands.append([int(c) for c, _ in r["topk"]])
            probs.append([float(p) for _, p in r["topk"]])
            errs.append(noise)
        return cls(np.array(cands, np.int64), np.array(probs, np.float64), np.array(errs, np.float64))

    def fit(self, labels: np.ndarray) -> FusedFit:
        """``fit_beta`` on these images with their true ``labels`` (N,) class ids."""
        return fit_beta(self.errors.mean(axis=1), self.top_p, truth_positions(self.candidates, labels))

    def answers(self, beta: float) -> np.ndarray:
        """(N,) the fused rule's labels at ``beta`` (``method.fused_vote``, as the runtime decides)."""
        return np.array([self.candidates[m, fused_vote(self.errors[m], self.top_p[m], beta)[0]]
                         for m in range(len(self.candidates))], np.int64)
