"""Helpers the runtime tests share: toy engines whose errors are computed independently in the
tests, small scoring problems, the slow path run on M images at once, and a fake clock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import FunctionEngine
from dbmef.runtime.method import combine_and_error
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.noise_schedule import alphas_cumprod
from dbmef.runtime.row_scheduler import SchedulerStats
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.slow_path import SlowPath

LATENT = (4, 4, 4)
SCORER_INPUTS = ("x0", "eps", "timestep", "emb_pos", "emb_neg", "lam")


def toy_unet(sample, timestep, encoder_hidden_states):
    """A deterministic stand-in for the UNet, per-row independent."""
    cond = encoder_hidden_states.mean(axis=(1, 2))[:, None, None, None]
    return {"noise_pred": (0.5 * sample + cond + 1e-3 * timestep[:, None, None, None]).astype(np.float32)}


def make_unet_engine(batch_log):
    def fn(sample, timestep, encoder_hidden_states):
        batch_log.append(sample.shape[0])
        return toy_unet(sample, timestep, encoder_hidden_states)

    return FunctionEngine("unet", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",), fn)


def make_fused_engine(batch_log):
    abar = alphas_cumprod()

    def fn(x0, eps, timestep, emb_pos, emb_neg, lam):
        batch_log.append(x0.shape[0])
        a = np.sqrt(abar[timestep]).astype(np.float32)[:, None, None, None]
        s = np.sqrt(1 - abar[timestep]).astype(np.float32)[:, None, None, None]
        xt = a * x0 + s * eps
        p = toy_unet(xt, timestep, emb_pos)["noise_pred"]
        q = toy_unet(xt, timestep, emb_neg)["noise_pred"]
        return {"error": combine_and_error(eps, p, q, float(lam[0]))}

    return FunctionEngine("scorer", SCORER_INPUTS, ("error",), fn)


def close_call_engine(log):
    """A fused scorer whose per-row error is ``mean((eps - g)^2)``, g a per-condition offset: a
    candidate wins a vote when its g is nearest that vote's noise mean, so votes disagree and
    early exit needs several stages (``full_errors`` computes every row's error directly)."""

    def fn(x0, eps, timestep, emb_pos, emb_neg, lam):
        log.append(len(x0))
        g = (emb_pos.mean(axis=(1, 2)) - emb_neg.mean(axis=(1, 2)))[:, None, None, None]
        return {"error": np.mean((eps - g) ** 2, axis=(1, 2, 3)).astype(np.float32)}

    return FunctionEngine("scorer", SCORER_INPUTS, ("error",), fn)


def make_problem(M=6, C=9, k=4, L=5, D=6, seed=0, scale=0.3):
    """M images: latents (M,4,4,4), candidates (M,k) of C classes, positives (C,L,D), negatives (M,k,L,D)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, *LATENT)).astype(np.float32),
            np.stack([rng.permutation(C)[:k] for _ in range(M)]),
            scale * rng.standard_normal((C, L, D)).astype(np.float32),
            scale * rng.standard_normal((M, k, L, D)).astype(np.float32))


def full_errors(cfg: ScoringConfig, cands, pos, neg):
    """Every row's error under ``close_call_engine``, computed directly (M, V, n, k)."""
    eps = NoiseBank(cfg.votes, cfg.n_timesteps, LATENT, cfg.seed).eps  # (V, n, 4, h, w)
    g = pos[cands].mean(axis=(2, 3)) - neg.mean(axis=(2, 3))  # (M, k)
    return ((eps[None, :, :, None] - g[:, None, None, :, None, None, None]) ** 2).mean(axis=(4, 5, 6)).astype(
        np.float32)


@dataclass
class Scored:
    """M images scored together: labels (M,), errors (M,V,k), votes (M,k), rows (M,), the counts."""

    labels: np.ndarray
    errors: np.ndarray
    votes: np.ndarray
    rows: np.ndarray
    unet_evals: np.ndarray
    stats: SchedulerStats


def score(config: ScoringConfig, engine, latents, candidates, positives, negatives) -> Scored:
    """The runtime's slow path (``SlowPath.run``) on M images."""
    sc = DiffusionScorer(config, engine, LATENT)
    with SlowPath(sc.executor(positives, max(len(latents), 1)), config) as slow:
        s = slow.run(latents, candidates, negatives)
    return Scored(np.array([x.label for x in s]), np.stack([x.errors for x in s]), np.stack([x.votes for x in s]),
                  np.array([x.rows for x in s]), np.array([x.unet_evals for x in s]), slow.stats)


class FakeClock:
    """A monotonic clock under the test's control: ``advance(dt)``, and ``tick`` seconds more at
    every reading (so loops that wait for a moment on it reach it). Thread-safe."""

    def __init__(self, start: float = 1000.0, tick: float = 0.0):
        self.now, self.tick = start, tick
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += self.tick
            return self.now

    def advance(self, dt: float) -> None:
        with self._lock:
            self.now += dt
