"""The DBMEF diffusion scorer (docs/design.md, "The method"): rows onto fixed-size engine calls.

One *row* is one (image, vote v, timestep i, candidate c) with both of its conditions (two UNet
evaluations). Which rows run, and when an image is settled, is the planner's business
(``early_exit.ImagePlan``); which rows share an engine call is the row scheduler's
(``row_scheduler.RowScheduler``); ``slow_path.SlowPath`` drives the two. This module executes: an
``Executor`` holds the images in flight in *slots* (latent, candidates, negative embeddings) and
runs calls of exactly ``rows_per_call`` rows (slot, v, i, c), the shape a TensorRT engine or a CUDA
graph was built for.

* ``HostRows``: rows gathered on the host by fancy indexing, one blocking engine call each (ONNX
  Runtime, the torch reference, any Engine). Depth 1: a call's errors are known when it returns.
* ``DeviceRows``: an engine with the device row path (``engine.RowScorer``, native TensorRT): the
  tables live on the GPU, a call is launched without waiting and collected later, so the next
  call's rows can be chosen and launched before the last call's errors are read (depth 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from dbmef.errors import EngineError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.contracts import SCORER, UNET
from dbmef.runtime.engine import Engine, RowScorer
from dbmef.runtime.method import add_noise, combine_and_error, error_terms
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.noise_schedule import NoiseSchedule

__all__ = ["DeviceRows", "DiffusionScorer", "Executor", "HostRows", "RowExecutor", "evaluate_rows"]

log = logging.getLogger(__name__)

# A row kernel maps gathered rows to one error per row:
# (x0 (B,4,h,w), eps (B,4,h,w), t (B,), emb_pos (B,L,D), emb_neg (B,L,D)) -> err (B,)
RowKernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Executor(Protocol):
    """What the slow-path driver runs engine calls on: ``capacity`` image slots and calls of
    exactly ``rows_per_call`` rows (slot, v, i, c).

    ``load`` puts an image in a slot (latent (4,h,w), candidates (k,), negatives (k,L,D) or None in
    zero-shot mode); ``launch`` starts one call and returns a ticket; ``collect`` returns that
    call's (rows_per_call,) errors, oldest ticket first. At most ``depth`` calls are in flight.
    ``evals_per_row``: UNet evaluations one row costs; ``syncs``: host waits for the device so far.
    """

    rows_per_call: int
    capacity: int
    depth: int
    evals_per_row: int
    syncs: int

    def load(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None) -> None: ...

    def launch(self, rows: np.ndarray) -> Any: ...

    def collect(self, ticket: Any) -> np.ndarray: ...

    def close(self) -> None: ...


class RowExecutor:
    """What both executors share: the scorer, the call size, the slots and the positive table."""

    depth = 1

    def __init__(self, scorer: DiffusionScorer, positive_table: np.ndarray, capacity: int):
        self.scorer = scorer
        self.rows_per_call = scorer.config.unet_batch
        self.capacity = int(capacity)
        self.evals_per_row = scorer.evals_per_row
        self.positive = np.ascontiguousarray(positive_table, dtype=np.float32)  # (C, L, D)
        self.syncs = 0  # host synchronisations with the device (0 on the host path)

    def close(self) -> None:
        """Release what the executor holds (device tables); the engine stays open."""


class HostRows(RowExecutor):
    """Rows gathered on the host; the engine call blocks, so ``launch`` computes and ``collect``
    hands the result over. ``kernel``: another row kernel than the scorer's (``terms_kernel``)."""

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
        self.scorer.check_image(latent, candidates, negatives)
        self.latents[slot], self.candidates[slot] = latent, candidates
        if self.negatives is not None:
            self.negatives[slot] = negatives

    def launch(self, rows: np.ndarray) -> np.ndarray:
        s, v, i, c = rows.T  # rows (B, 4): slot, vote, grid position, candidate position
        sc = self.scorer
        pos = self.positive[self.candidates[s, c]]  # (B, L, D)
        neg = pos if self.negatives is None else self.negatives[s, c]
        return self.kernel(self.latents[s], sc.noise.eps[v, i], sc.timesteps[i], pos, neg)

    def collect(self, ticket: np.ndarray) -> np.ndarray:
        return ticket


class DeviceRows(RowExecutor):
    """Rows gathered on the device by an engine's ``RowScorer`` path (native TensorRT)."""

    depth = 2

    def __init__(self, scorer: DiffusionScorer, device: RowScorer, positive_table: np.ndarray, capacity: int):
        super().__init__(scorer, positive_table, capacity)
        self.device = device
        device.open_rows(scorer.noise.eps, scorer.timesteps, self.positive, scorer.lam, self.rows_per_call,
                         self.capacity, scorer.config.k)

    def load(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None) -> None:
        self.scorer.check_image(latent, candidates, negatives)
        if negatives is None:
            raise EngineError("the device row path runs the fused scorer, which needs negative embeddings")
        self.device.load_rows(slot, latent, candidates, negatives)

    def launch(self, rows: np.ndarray) -> int:
        return self.device.launch_rows(rows)

    def collect(self, ticket: int) -> np.ndarray:
        out = self.device.collect_rows(ticket)
        self.syncs += 1
        return out

    def close(self) -> None:
        self.device.close_rows()


def evaluate_rows(executor: Executor, rows: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Every one of ``rows`` (R, 4) in order, in full calls of ``executor.rows_per_call`` (the last
    padded by repeating its last row): their (R, ...) outputs. No planning: a fixed list of rows
    (an ablation's every row, a batch-synchronous stage)."""
    size = executor.rows_per_call
    outs = []
    for start in range(0, len(rows), size):
        stop = min(start + size, len(rows))
        sel = np.minimum(np.arange(start, start + size), stop - 1)
        outs.append(executor.collect(executor.launch(rows[sel]))[: stop - start])
        if progress is not None:
            progress(stop - start)
    return np.concatenate(outs) if outs else np.empty(0, np.float32)


class DiffusionScorer:
    """Re-rank candidates by how well each text condition lets the UNet predict fixed noise.

    ``engine`` is either a fused scorer engine (the ``SCORER`` contract: x0, eps, timestep, emb_pos,
    emb_neg, lam -> error) or a plain UNet engine (the ``UNET`` contract: sample, timestep,
    encoder_hidden_states -> noise_pred), in which case noising, the lam combination and the error
    run on the host. ``mode`` (``"fused"`` or ``"unet"``) is read off the engine's input names.
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
        self.mode = scorer_mode(engine)
        self.evals_per_row = 2  # UNet evaluations one row costs: the positive and the negative condition
        if self.mode == "fused":
            if config.zero_shot:
                raise EngineError("zero-shot mode scores the positive condition alone, which the fused scorer graph "
                                  "cannot: use the bundle's plain UNet graph (export with --scorer unet or both)")
            self.kernel: RowKernel = self._fused_kernel
        elif config.lam == 1.0:
            # eps_hat = neg + 1 * (pos - neg) = pos: the negative condition cannot change the error
            self.kernel, self.evals_per_row = self._positive_kernel, 1
        else:
            self.kernel = self._unet_kernel
        self.lam = np.array([config.lam], dtype=np.float32)
        self._checked = False  # the engine's inputs are checked against its contract on the first call only

    def executor(self, positive_table: np.ndarray, capacity: int) -> Executor:
        """The executor for this scorer's engine: on the device when it gathers rows there."""
        device = self.engine.rows() if self.mode == "fused" else None
        if device is not None:
            return DeviceRows(self, device, positive_table, capacity)
        return HostRows(self, positive_table, capacity)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The engine on one call's feeds; the kernels build them the same way every call, so their
        dtypes and ranks are checked against the contract once (the hot loop skips the check)."""
        out = self.engine(feeds, check=not self._checked)
        self._checked = True
        return out

    # -- row kernels: (x0 (B,4,h,w), eps (B,4,h,w), t (B,), emb_pos (B,L,D), emb_neg (B,L,D)) ----
    def _fused_kernel(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray, emb_pos: np.ndarray,
                      emb_neg: np.ndarray) -> np.ndarray:
        out = self._run({"x0": x0, "eps": eps, "timestep": t, "emb_pos": emb_pos, "emb_neg": emb_neg,
                         "lam": self.lam})
        return np.asarray(out["error"], dtype=np.float32).reshape(-1)  # (B,)

    def _unet_kernel(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray, emb_pos: np.ndarray,
                     emb_neg: np.ndarray) -> np.ndarray:
        pos, neg = self._unet_predictions(x0, eps, t, emb_pos, emb_neg)
        return combine_and_error(eps, pos, neg, self.config.lam)

    def _positive_kernel(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray, emb_pos: np.ndarray,
                         emb_neg: np.ndarray) -> np.ndarray:
        x_t = add_noise(x0, eps, self.sqrt_abar[t], self.sqrt_one_minus_abar[t])  # (B,4,h,w)
        pos = self._run({"sample": x_t, "timestep": t, "encoder_hidden_states": emb_pos})["noise_pred"]
        return combine_and_error(eps, pos, pos, 1.0)  # eps_hat = pos + 1 * (pos - pos) = pos, exactly

    def terms_kernel(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray, emb_pos: np.ndarray,
                     emb_neg: np.ndarray) -> np.ndarray:
        """Per-row ``error_terms`` (B, 3) float64 instead of one error (plain UNet engines only)."""
        pos, neg = self._unet_predictions(x0, eps, t, emb_pos, emb_neg)
        return error_terms(eps, pos, neg)

    def _unet_predictions(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray, emb_pos: np.ndarray,
                          emb_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_t = add_noise(x0, eps, self.sqrt_abar[t], self.sqrt_one_minus_abar[t])  # (B,4,h,w)
        # Both conditions in one call: rows [0, B) positive, [B, 2B) negative.
        out = self._run({"sample": np.concatenate([x_t, x_t]), "timestep": np.concatenate([t, t]),
                         "encoder_hidden_states": np.concatenate([emb_pos, emb_neg])})["noise_pred"]
        b = x0.shape[0]
        return out[:b], out[b:]

    # -- every row, for ablations ------------------------------------------------------------
    def check_image(self, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray | None) -> None:
        """Raise EngineError unless one image's latent (4,h,w), candidates (k,) and negatives (k,L,D)
        fit this scorer (every executor's ``load`` checks its image here)."""
        k = self.config.k
        if np.shape(latent) != self.latent_shape:
            raise EngineError(f"a latent has shape {np.shape(latent)}, the scorer expects {self.latent_shape}")
        if np.shape(candidates) != (k,):
            raise EngineError(f"candidates have shape {np.shape(candidates)}, expected ({k},): the top-k of the "
                              "scoring config")
        if negatives is not None and np.shape(negatives)[:1] != (k,):
            raise EngineError(f"negative embeddings have shape {np.shape(negatives)}, expected ({k}, L, D)")

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
        m_count = latents.shape[0]
        ex = HostRows(self, positive_table, m_count, kernel=self.terms_kernel)
        for s in range(m_count):
            ex.load(s, latents[s], candidates[s], negative_embeddings[s])
        shape = (m_count, cfg.votes, cfg.n_timesteps, cfg.k)
        every = np.indices(shape).reshape(4, -1).T  # (M*V*n*k, 4): slot m, v, i, c in that order
        return evaluate_rows(ex, every, progress).reshape(*shape, 3)


def scorer_mode(engine: Engine) -> str:
    """``"fused"`` or ``"unet"``: which scoring contract the engine's inputs are (``engine.SCORER`` or
    ``engine.UNET``); an EngineError naming both otherwise."""
    names = set(engine.input_names)
    for mode, contract in (("fused", SCORER), ("unet", UNET)):
        if set(contract.input_names) <= names:
            return mode
    raise EngineError(f"engine '{engine.name}' has inputs {list(engine.input_names)}: neither a fused scorer "
                      f"{list(SCORER.input_names)} nor a UNet {list(UNET.input_names)}")
