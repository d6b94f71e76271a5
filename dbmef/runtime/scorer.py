"""The DBMEF diffusion scorer (docs/design.md, "The method"): rows onto fixed-size engine calls.

One *row* is one (image, vote v, timestep i, candidate c) with both of its conditions (two UNet
evaluations). Which rows run, and when an image is settled, is the planner's business
(``early_exit.ImagePlan``); which rows share an engine call is the row scheduler's
(``scheduler.RowScheduler``). This module executes: a ``RowExecutor`` holds the images in flight
in *slots* (latent, candidates, negative embeddings) and runs calls of exactly ``unet_batch``
rows (slot, v, i, c), the shape a TensorRT engine or a CUDA graph was built for.

* ``HostRows``: rows gathered on the host by fancy indexing, one blocking engine call each (ONNX
  Runtime, the torch reference, any Engine). Depth 1: a call's errors are known when it returns.
* ``DeviceRows``: an engine with the device row path (``engine.RowScorer``, native TensorRT): the
  tables live on the GPU, a call is launched without waiting and collected later, so the next
  call's rows can be chosen and launched before the last call's errors are read (depth 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dbmef.errors import EngineError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy, RowPlanner
from dbmef.runtime.engine import Engine, RowScorer
from dbmef.runtime.method import add_noise, combine_and_error, error_terms
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.schedule import NoiseSchedule

__all__ = ["DeviceRows", "DiffusionScorer", "HostRows", "RowExecutor", "ScoreResult"]

log = logging.getLogger(__name__)

# A row kernel maps gathered rows to one error per row:
# (x0 (B,4,h,w), eps (B,4,h,w), t (B,), emb_pos (B,L,D), emb_neg (B,L,D)) -> err (B,)
RowKernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ScoreResult:
    """Scorer output for M images scored together (``DiffusionScorer.score``). errors (M,V,k)
    mean error per vote and candidate over the timesteps evaluated (NaN where early exit evaluated
    none); votes (M,k) votes won among completed votes; labels (M,) winning class ids;
    rows_per_image (M,) rows evaluated for each image (2 UNet evaluations each); stats: the
    scheduler's engine-level counts (calls, rows sent, padding, ...)."""

    errors: np.ndarray
    votes: np.ndarray
    labels: np.ndarray
    rows_per_image: np.ndarray
    stats: Any

    @property
    def rows(self) -> int:
        """Rows evaluated for all M images together (padding excluded)."""
        return int(self.rows_per_image.sum())

    @property
    def engine_calls(self) -> int:
        return int(self.stats.engine_calls)

    evals_per_row: int = 2

    @property
    def unet_evals_per_image(self) -> np.ndarray:
        """(M,) UNet evaluations each image cost: positive and negative per row (one at lam = 1)."""
        return self.evals_per_row * self.rows_per_image


class RowExecutor:
    """Fixed-size engine calls over rows (slot, v, i, c) of the images held in ``capacity`` slots.

    ``load`` puts an image in a slot; ``launch`` starts one call of exactly ``batch`` rows and
    returns a ticket; ``collect`` returns that call's (batch,) errors, oldest ticket first. At most
    ``depth`` calls are in flight. Subclasses implement the four; the base holds what both share.
    """

    depth = 1

    def __init__(self, scorer: DiffusionScorer, positive_table: np.ndarray, capacity: int):
        self.scorer = scorer
        self.batch = scorer.config.unet_batch
        self.capacity = int(capacity)
        self.positive = np.ascontiguousarray(positive_table, dtype=np.float32)  # (C, L, D)
        self.syncs = 0  # host synchronisations with the device (0 on the host path)

    def load(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray) -> None:
        raise NotImplementedError

    def launch(self, rows: np.ndarray) -> Any:
        raise NotImplementedError

    def collect(self, ticket: Any) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (device tables); the engine stays open."""


class HostRows(RowExecutor):
    """Rows gathered on the host; the engine call blocks, so ``launch`` computes and ``collect``
    hands the result over."""

    def __init__(self, scorer: DiffusionScorer, positive_table: np.ndarray, capacity: int,
                 kernel: RowKernel | None = None):
        super().__init__(scorer, positive_table, capacity)
        self.kernel = kernel or scorer.kernel
        k = scorer.config.k
        self.latents = np.zeros((self.capacity, *scorer.latent_shape), np.float32)  # (S, 4, h, w)
        self.candidates = np.zeros((self.capacity, k), np.int64)  # (S, k)
        # (S, k, L, D); none in zero-shot mode, whose positive-only kernel reads no negative condition
        self.negatives = (None if scorer.config.zero_shot else
                          np.zeros((self.capacity, k, *self.positive.shape[1:]), np.float32))

    def load(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None) -> None:
        self.latents[slot], self.candidates[slot] = latent, candidates
        if self.negatives is not None:
            self.negatives[slot] = negatives

    def launch(self, rows: np.ndarray) -> np.ndarray:
        s, v, i, c = rows.T  # rows (B, 4): slot, vote, grid position, candidate position
        sc = self.scorer
        pos = self.positive[self.candidates[s, c]]  # (B, L, D)
        neg = pos if self.negatives is None else self.negatives[s, c]
        return sc.kernel_on(self.kernel, self.latents[s], sc.noise.eps[v, i], sc.timesteps[i], pos, neg)

    def collect(self, ticket: np.ndarray) -> np.ndarray:
        return ticket


class DeviceRows(RowExecutor):
    """Rows gathered on the device by an engine's ``RowScorer`` path (native TensorRT)."""

    depth = 2

    def __init__(self, scorer: DiffusionScorer, device: RowScorer, positive_table: np.ndarray, capacity: int):
        super().__init__(scorer, positive_table, capacity)
        self.device = device
        device.open_rows(scorer.noise.eps, scorer.timesteps, self.positive, scorer.lam, self.batch,
                         self.capacity, scorer.config.k)

    def load(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray) -> None:
        self.device.load_rows(slot, latent, candidates, negatives)

    def launch(self, rows: np.ndarray) -> int:
        return self.device.launch_rows(rows)

    def collect(self, ticket: int) -> np.ndarray:
        out = self.device.collect_rows(ticket)
        self.syncs += 1
        return out

    def close(self) -> None:
        self.device.close_rows()


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
        self.evals_per_row = 2  # UNet evaluations one row costs: the positive and the negative condition
        if {"x0", "eps", "emb_pos", "emb_neg"} <= names:
            if config.zero_shot:
                raise EngineError("zero-shot mode scores the positive condition alone, which the fused scorer graph "
                                  "cannot: use the bundle's plain UNet graph (export with --scorer unet or both)")
            self.mode = "fused"
            self.kernel: RowKernel = self._fused_kernel
        elif {"sample", "timestep", "encoder_hidden_states"} <= names:
            self.mode = "unet"
            self.kernel = self._unet_kernel
            if config.lam == 1.0:
                # eps_hat = neg + 1 * (pos - neg) = pos: the negative condition cannot change the error
                self.kernel, self.evals_per_row = self._positive_kernel, 1
        else:
            raise EngineError(
                f"engine '{engine.name}' has inputs {list(engine.input_names)}: neither a fused "
                "scorer (x0, eps, timestep, emb_pos, emb_neg, lam) nor a UNet "
                "(sample, timestep, encoder_hidden_states)"
            )
        self.lam = np.array([config.lam], dtype=np.float32)

    def executor(self, positive_table: np.ndarray, capacity: int) -> RowExecutor:
        """The executor for this scorer's engine: on the device when it gathers rows there."""
        device = self.engine.rows() if self.mode == "fused" else None
        if device is not None:
            return DeviceRows(self, device, positive_table, capacity)
        return HostRows(self, positive_table, capacity)

    # -- row kernels -------------------------------------------------------------------------
    def kernel_on(self, kernel: RowKernel, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        return kernel(np.ascontiguousarray(x0), np.ascontiguousarray(eps), t, emb_pos, emb_neg)

    def _fused_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        out = self.engine(
            {"x0": x0, "eps": eps, "timestep": t, "emb_pos": emb_pos, "emb_neg": emb_neg, "lam": self.lam}
        )
        return np.asarray(out["error"], dtype=np.float32).reshape(-1)

    def _unet_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        pos, neg = self._unet_predictions(x0, eps, t, emb_pos, emb_neg)
        return combine_and_error(eps, pos, neg, self.config.lam)

    def _positive_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        x_t = add_noise(x0, eps, self.sqrt_abar[t], self.sqrt_one_minus_abar[t])  # (B,4,h,w)
        pos = self.engine({"sample": x_t, "timestep": t, "encoder_hidden_states": emb_pos})["noise_pred"]
        return combine_and_error(eps, pos, pos, 1.0)  # eps_hat = pos + 1 * (pos - pos) = pos, exactly

    def terms_kernel(self, x0, eps, t, emb_pos, emb_neg):  # type: ignore[no-untyped-def]
        """Per-row ``error_terms`` (B, 3) float64 instead of one error (plain UNet engines only)."""
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

    # -- scoring -----------------------------------------------------------------------------
    def check(self, latents: np.ndarray, candidates: np.ndarray, negative_embeddings: np.ndarray) -> None:
        """Raise EngineError unless latents (M,4,h,w), candidates (M,k), negatives (M,k,L,D) fit."""
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

    def score_terms(
        self,
        latents: np.ndarray,
        candidates: np.ndarray,
        positive_table: np.ndarray,
        negative_embeddings: np.ndarray,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Per-row ``error_terms`` for ablations: (M, V, n, k, 3) float64 (needs a plain UNet
        engine; the fused graph returns one lam's error only). Every row of the full method, in
        fixed-size calls: ``error_from_terms(terms, cfg.lam).mean(axis=2)`` equals the ``off``
        mode's errors."""
        if self.mode != "unet":
            raise EngineError("score_terms needs the plain UNet engine (export with --scorer unet or both)")
        cfg = self.config
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        candidates = np.asarray(candidates, dtype=np.int64)
        self.check(latents, candidates, negative_embeddings)
        m_count = latents.shape[0]
        ex = HostRows(self, positive_table, m_count, kernel=self.terms_kernel)
        for s in range(m_count):
            ex.load(s, latents[s], candidates[s], negative_embeddings[s])
        full = np.column_stack(RowPlanner(m_count, cfg.votes, cfg.n_timesteps, cfg.k, ExitPolicy("off")).next_rows())
        B = cfg.unet_batch
        terms = np.empty((len(full), 3), np.float64)
        for start in range(0, len(full), B):
            stop = min(start + B, len(full))
            sel = np.minimum(np.arange(start, start + B), stop - 1)  # pad the tail by repeating the last row
            terms[start:stop] = ex.collect(ex.launch(full[sel]))[: stop - start]
            if progress is not None:
                progress(stop - start)
        return terms.reshape(m_count, cfg.votes, cfg.n_timesteps, cfg.k, 3)

    def score(
        self,
        latents: np.ndarray,
        candidates: np.ndarray,
        positive_table: np.ndarray,
        negative_embeddings: np.ndarray,
        progress: Callable[[int], None] | None = None,
        lockstep: bool = False,
    ) -> ScoreResult:
        """Score M images together through one row scheduler (every engine call full but the last).

        latents: (M,4,h,w) float32 VAE latents x0. candidates: (M,k) class ids in rank order.
        positive_table: (C,L,D) positive embedding of every class. negative_embeddings: (M,k,L,D)
        the negative condition of each image's candidates. progress: called with rows done.
        lockstep: the earlier batch-synchronous schedule (each stage of every image, then the next,
        every stage's last call padded), kept for comparison; the answers are the same.
        """
        from dbmef.runtime.scheduler import RowScheduler

        latents = np.ascontiguousarray(latents, dtype=np.float32)
        candidates = np.asarray(candidates, dtype=np.int64)
        self.check(latents, candidates, negative_embeddings)
        m_count = latents.shape[0]
        cfg = self.config
        errors = np.full((m_count, cfg.votes, cfg.k), np.nan, np.float32)
        votes = np.zeros((m_count, cfg.k), np.int64)
        labels = np.full(m_count, -1, np.int64)
        rows = np.zeros(m_count, np.int64)
        ex = self.executor(positive_table, max(m_count, 1))
        try:
            sched = RowScheduler(ex, cfg, lockstep=lockstep, progress=progress)
            for m in range(m_count):
                sched.submit(m, latents[m], candidates[m], negative_embeddings[m])
            for s in sched.drain():
                errors[s.key], votes[s.key], labels[s.key], rows[s.key] = s.errors, s.votes, s.label, s.rows
        finally:
            ex.close()
        return ScoreResult(errors, votes, labels, rows, sched.stats, self.evals_per_row)
