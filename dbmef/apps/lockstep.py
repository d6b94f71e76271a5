"""The batch-synchronous slow path: the baseline ``dbmef bench`` measures the row scheduler against.

Each batch's rethought images advance in lockstep stages: stage s of every open image, in calls of
``unet_batch`` rows with the stage's last call padded, then stage s + 1. No rows ahead, no image
joins or leaves between stages, so a call is padded at the end of every stage. The answers are the
runtime's (each image's plan sees its own errors only); only the engine calls differ. It runs
outside the runtime, which has one driver (``dbmef.runtime.slow_path.SlowPath``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from dbmef.runtime.pipeline import DBMEFPipeline
from dbmef.runtime.replay import LockstepPlans
from dbmef.runtime.results import Batch
from dbmef.runtime.row_scheduler import SchedulerStats, Settled
from dbmef.runtime.scorer import DiffusionScorer, evaluate_rows

__all__ = ["rethink_lockstep", "score_lockstep"]


def rethink_lockstep(pipe: DBMEFPipeline, batch: Batch) -> Batch:
    """``pipe.rethink(batch)`` on the batch-synchronous schedule: the same answers, in place."""
    idx = pipe.to_rethink(batch)
    if not len(idx):
        return batch
    latents, neg = pipe.slow_inputs(batch, idx)
    settled, stats = score_lockstep(pipe.scorer, pipe.positive_embeddings, latents, batch.top[idx], neg,
                                    submitted=batch.submitted[idx], probs=batch.top_p[idx])
    for i, s in zip(idx, settled):
        batch.settle(int(i), s)
    batch.scoring = stats.to_dict()
    return batch


def score_lockstep(scorer: DiffusionScorer, positive: np.ndarray, latents: np.ndarray, candidates: np.ndarray,
                   negatives: np.ndarray | None, submitted: np.ndarray | None = None,
                   clock: Callable[[], float] = time.perf_counter, probs: np.ndarray | None = None,
                   ) -> tuple[list[Settled], SchedulerStats]:
    """M images (latents (M,4,h,w), candidates (M,k), negatives (M,k,L,D) or None, probs (M,k) the
    candidates' backbone probabilities for the fused decision) scored in lockstep stages: each
    image's ``Settled`` (keyed by its position) and the engine-level counts. An image's engine
    seconds are its rows' share of each stage's calls."""
    cfg, m_count = scorer.config, len(latents)
    start = clock()
    when = np.full(m_count, start) if submitted is None else np.asarray(submitted, np.float64)
    ex = scorer.executor(positive, m_count)
    stats = SchedulerStats()
    plans = LockstepPlans(m_count, cfg.votes, cfg.n_timesteps, cfg.k, cfg.exit_policy, cfg.decision_offsets(probs))
    unet_s, vote_s = np.zeros(m_count), np.zeros(m_count)
    first, done_at = np.full(m_count, math.nan), np.full(m_count, math.nan)
    try:
        for m in range(m_count):
            ex.load(m, latents[m], candidates[m], None if negatives is None else negatives[m])
        while not plans.done.all():
            index = plans.next_rows()  # (m, v, i, c): the slot of image m is m
            t0 = clock()
            first[np.isnan(first) & ~plans.done] = t0
            errors = evaluate_rows(ex, np.column_stack(index))  # (R,)
            t1 = clock()
            plans.feed(index, errors)
            t2 = clock()
            share = np.bincount(index[0], minlength=m_count) / len(errors)
            unet_s += share * (t1 - t0)
            vote_s += share * (t2 - t1)
            done_at[np.isnan(done_at) & plans.done] = t2
            calls = -(-len(errors) // ex.rows_per_call)
            stats.engine_calls += calls
            stats.rows_sent += calls * ex.rows_per_call
            stats.rows_padding += calls * ex.rows_per_call - len(errors)
    finally:
        ex.close()
    stats.images, stats.rows_needed, stats.host_syncs = m_count, int(plans.rows.sum()), ex.syncs
    errs, votes = plans.per_vote_errors(), plans.vote_counts()
    out = []
    for m, p in enumerate(plans.plans):
        cands = np.asarray(candidates[m], np.int64)
        out.append(Settled(m, cands, p.winner, int(cands[p.winner]), errs[m], votes[m], p.rows, p.stages,
                           float(unet_s[m]), float(vote_s[m]), float(when[m]), float(done_at[m]), float(first[m]),
                           p.rows * ex.evals_per_row))
    return out, stats
