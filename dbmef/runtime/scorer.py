"""The DBMEF diffusion scorer (DESIGN.md §1.4-1.8): rows, fixed-size UNet batches, lam, votes.

One *row* is one (image m, vote v, timestep i, candidate c) with both of its conditions (two UNet
evaluations). For a batch of M rethought images the full method has R = M*V*n*k rows. The scorer
runs them in *stages* chosen by ``early_exit.RowPlanner`` (one stage of all R rows when
``early_exit = off``; vote rounds and paired elimination otherwise). Each stage's rows, across
all images, are gathered in fixed-size chunks of ``unet_batch`` rows (the tail padded by
repeating the last row) so every engine call has the same shape: the shape a TensorRT engine or
a CUDA graph was built for. On the device path there is one host synchronisation per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dbmef.errors import EngineError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy, RowPlanner, run_planner
from dbmef.runtime.engine import Engine, row_scorer
from dbmef.runtime.method import add_noise, combine_and_error, error_terms
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.schedule import NoiseSchedule

__all__ = ["DiffusionScorer", "ScoreResult"]

log = logging.getLogger(__name__)

# A row kernel maps gathered rows to one error per row:
# (x0 (B,4,h,w), eps (B,4,h,w), t (B,), emb_pos (B,L,D), emb_neg (B,L,D)) -> err (B,)
RowKernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ScoreResult:
    """Scorer output for M images. candidates (M,k) class ids in rank order; errors (M,V,k) mean
    error per vote and candidate over the timesteps evaluated (NaN where early exit evaluated none);
    votes (M,k) votes won among completed votes; labels (M,) winning class ids; rows_per_image (M,)
    rows evaluated for each image (padding excluded; 2 UNet evaluations each); engine_calls: engine
    invocations made; stages: planner stages (host syncs on the device path)."""

    candidates: np.ndarray
    errors: np.ndarray
    votes: np.ndarray
    labels: np.ndarray
    engine_calls: int
    rows_per_image: np.ndarray
    stages: int = 1

    @property
    def rows(self) -> int:
        """Rows evaluated for all M images together (padding excluded)."""
        return int(self.rows_per_image.sum())

    @property
    def unet_evals_per_image(self) -> np.ndarray:
        """(M,) UNet evaluations each image cost: positive and negative per row."""
        return 2 * self.rows_per_image


class DiffusionScorer:
    """Re-rank candidates by how well each text condition lets the UNet predict fixed noise.

    ``engine`` is either a fused scorer engine (component ``scorer``: inputs x0, eps, timestep,
    emb_pos, emb_neg, lam -> error) or a plain UNet engine (component ``unet``: sample, timestep,
    encoder_hidden_states -> noise_pred), in which case noising, the lam combination and the
    error run on the host. ``mode`` is inferred from the engine's input names.
    """

    def __init__(self, config: ScoringConfig, engine: Engine, latent_shape: tuple[int, int, int],
                 schedule: NoiseSchedule | None = None):
        self.config = config
        self.engine = engine
        self.latent_shape = tuple(latent_shape)
        self.schedule = schedule or NoiseSchedule()
        self.timesteps = self.schedule.grid(config.n_timesteps)  # (n,)
        self.abar = self.schedule.alphas_cumprod()
        # Square roots taken in float64, then cast: the fused graph embeds these same tables.
        self.sqrt_abar = np.sqrt(self.abar).astype(np.float32)  # (T,)
        self.sqrt_one_minus_abar = np.sqrt(1.0 - self.abar).astype(np.float32)  # (T,)
        self.noise = NoiseBank(config.votes, config.n_timesteps, self.latent_shape, config.seed)
        names = set(engine.input_names)
        if {"x0", "eps", "emb_pos", "emb_neg"} <= names:
            self.mode = "fused"
            self._kernel: RowKernel = self._fused_kernel
        elif {"sample", "timestep", "encoder_hidden_states"} <= names:
            self.mode = "unet"
            self._kernel = self._unet_kernel
        else:
            raise EngineError(
                f"engine '{engine.name}' has inputs {list(engine.input_names)}: neither a fused "
                "scorer (x0, eps, timestep, emb_pos, emb_neg, lam) nor a UNet "
                "(sample, timestep, encoder_hidden_states)"
            )
        self._lam = np.array([config.lam], dtype=np.float32)

    # -- row kernels -------------------------------------------------------------------------
    def _fused_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        out = self.engine(
            {"x0": x0, "eps": eps, "timestep": t, "emb_pos": emb_pos, "emb_neg": emb_neg, "lam": self._lam}
        )
        return np.asarray(out["error"], dtype=np.float32).reshape(-1)

    def _unet_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        pos, neg = self._unet_predictions(x0, eps, t, emb_pos, emb_neg)
        return combine_and_error(eps, pos, neg, self.config.lam)

    def _terms_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        pos, neg = self._unet_predictions(x0, eps, t, emb_pos, emb_neg)
        return error_terms(eps, pos, neg)

    def _unet_predictions(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        x_t = add_noise(x0, eps, self.sqrt_abar[t], self.sqrt_one_minus_abar[t])  # (B,4,h,w)
        # Both conditions in one call: rows [0, B) positive, [B, 2B) negative.
        out = self.engine(
            {
                "sample": np.concatenate([x_t, x_t]),
                "timestep": np.concatenate([t, t]),
                "encoder_hidden_states": np.concatenate([emb_pos, emb_neg]),
            }
        )["noise_pred"]
        b = x0.shape[0]
        return out[:b], out[b:]

    def _score_on_host(self, latents, candidates, positive_table, negative_embeddings, index, progress,  # type: ignore[no-untyped-def]
                       kernel=None, width=None):
        """Gather rows ``index`` = (m, v, i, c) on the host, one fixed-size engine call per chunk.
        Returns (errors (R,), calls); with ``kernel``/``width`` (the terms kernel), (R, width) float64."""
        kernel = kernel or self._kernel
        B = self.config.unet_batch
        m_all, v_all, i_all, c_all = index
        total = len(m_all)
        errors = np.empty(total, dtype=np.float32) if width is None else np.empty((total, width), np.float64)
        calls = 0
        for start in range(0, total, B):
            stop = min(start + B, total)
            sel = np.minimum(np.arange(start, start + B), stop - 1)  # pad the tail by repeating the last row
            m, v, i, c = m_all[sel], v_all[sel], i_all[sel], c_all[sel]
            err = kernel(
                latents[m],  # (B,4,h,w)
                self.noise.eps[v, i],  # (B,4,h,w)
                self.timesteps[i],  # (B,)
                positive_table[candidates[m, c]],  # (B,L,D)
                negative_embeddings[m, c],  # (B,L,D)
            )
            errors[start:stop] = err[: stop - start]
            calls += 1
            if progress is not None:
                progress(stop - start)
        return errors, calls

    def _score_on_device(self, device, latents, candidates, positive_table, negative_embeddings, index,  # type: ignore[no-untyped-def]
                         progress):
        """One stage on an engine that gathers rows on the device (native TensorRT): one host sync."""
        B = self.config.unet_batch
        total = len(index[0])
        padded = -(-total // B) * B
        sel = np.minimum(np.arange(padded), total - 1)
        mvic = tuple(a[sel] for a in index)
        errors = device.score_rows(latents, self.noise.eps, self.timesteps, positive_table, negative_embeddings,
                                   candidates, self._lam, mvic, B)[:total]
        if progress is not None:
            progress(total)
        return np.asarray(errors, dtype=np.float32), padded // B

    # -- scoring -----------------------------------------------------------------------------
    def score_terms(
        self,
        latents: np.ndarray,
        candidates: np.ndarray,
        positive_table: np.ndarray,
        negative_embeddings: np.ndarray,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Per-row ``error_terms`` for ablations: (M, V, n, k, 3) float64 (needs a plain UNet
        engine; the fused graph returns one lam's error only). Same rows, noise and batching as
        ``score``: ``error_from_terms(terms, cfg.lam).mean(axis=2)`` equals ``score(...).errors``."""
        if self.mode != "unet":
            raise EngineError("score_terms needs the plain UNet engine (export with --scorer unet or both)")
        cfg = self.config
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        candidates = np.asarray(candidates, dtype=np.int64)
        self._check(latents, candidates, negative_embeddings)
        full = RowPlanner(latents.shape[0], cfg.votes, cfg.n_timesteps, cfg.k, ExitPolicy("off")).next_rows()
        terms, _ = self._score_on_host(latents, candidates, positive_table, negative_embeddings, full, progress,
                                       kernel=self._terms_kernel, width=3)
        return terms.reshape(latents.shape[0], cfg.votes, cfg.n_timesteps, cfg.k, 3)

    def _check(self, latents: np.ndarray, candidates: np.ndarray, negative_embeddings: np.ndarray) -> None:
        m_count = latents.shape[0]
        if latents.shape[1:] != self.latent_shape:
            raise EngineError(f"latents have shape {latents.shape[1:]}, scorer expects {self.latent_shape}")
        if candidates.shape != (m_count, self.config.k):
            raise EngineError(f"candidates have shape {candidates.shape}, expected ({m_count}, {self.config.k})")
        if negative_embeddings.shape[:2] != (m_count, self.config.k):
            raise EngineError(
                f"negative embeddings have shape {negative_embeddings.shape}, "
                f"expected ({m_count}, {self.config.k}, L, D)"
            )

    def score(
        self,
        latents: np.ndarray,
        candidates: np.ndarray,
        positive_table: np.ndarray,
        negative_embeddings: np.ndarray,
        progress: Callable[[int], None] | None = None,
    ) -> ScoreResult:
        """Score M images.

        latents: (M,4,h,w) float32 VAE latents x0. candidates: (M,k) class ids in rank order.
        positive_table: (C,L,D) positive embedding of every class. negative_embeddings: (M,k,L,D)
        the negative condition of each image's candidates. progress: called with rows done.
        """
        cfg = self.config
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        candidates = np.asarray(candidates, dtype=np.int64)
        m_count = latents.shape[0]
        self._check(latents, candidates, negative_embeddings)
        device = row_scorer(self.engine) if self.mode == "fused" else None
        calls = 0

        def evaluate(index: tuple[np.ndarray, ...]) -> np.ndarray:
            nonlocal calls
            if device is not None:
                err, n_calls = self._score_on_device(device, latents, candidates, positive_table,
                                                     negative_embeddings, index, progress)
            else:
                err, n_calls = self._score_on_host(latents, candidates, positive_table, negative_embeddings,
                                                   index, progress)
            calls += n_calls
            return err

        plan = run_planner(RowPlanner(m_count, cfg.votes, cfg.n_timesteps, cfg.k, cfg.exit_policy), evaluate)
        labels = candidates[np.arange(m_count), plan.winner] if m_count else np.empty(0, np.int64)
        return ScoreResult(candidates, plan.per_vote_errors(), plan.vote_counts(), labels.astype(np.int64),
                           engine_calls=calls, rows_per_image=plan.rows.copy(),
                           stages=plan.stages)
