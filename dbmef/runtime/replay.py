"""Many images' early-exit plans driven together over precomputed errors: ``replay`` runs the
planner over a full error tensor (ablations, Table 1, the calibration choices), ``LockstepPlans``
drives M ``ImagePlan``s in lockstep stages (``replay`` and the batch-synchronous baseline of
``dbmef bench``). Per image exactly ``early_exit.ImagePlan``: the decisions and row counts the
slow path makes on the same errors, whatever the scheduling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.early_exit import ExitPolicy, ImagePlan, Index


class LockstepPlans:
    """M images' plans driven in lockstep stages (``replay``, ablations, the batch-synchronous
    baseline of ``dbmef bench``): stage s holds every open image's s-th stage. Per image exactly
    ``ImagePlan``; the arrays below gather them. offsets: (M, k) the fused decision's classifier
    terms (``method.fused_offsets``), None for the paper's rule."""

    def __init__(self, m_count: int, votes: int, n_timesteps: int, k: int, policy: ExitPolicy,
                 offsets: np.ndarray | None = None):
        self.M, self.V, self.n, self.k = m_count, votes, n_timesteps, k
        self.policy = policy
        self.plans = [ImagePlan(votes, n_timesteps, k, policy, None if offsets is None else offsets[m])
                      for m in range(m_count)]
        self.stage_rows: list[int] = []  # rows of each stage, all images together

    @property
    def done(self) -> np.ndarray:
        return np.array([p.done for p in self.plans], dtype=bool)

    @property
    def winner(self) -> np.ndarray:
        return np.array([p.winner for p in self.plans], dtype=np.int64)

    @property
    def rows(self) -> np.ndarray:
        return np.array([p.rows for p in self.plans], dtype=np.int64)

    @property
    def alive(self) -> np.ndarray:
        return np.array([p.alive for p in self.plans], dtype=bool).reshape(self.M, self.k)

    @property
    def stages(self) -> int:
        return len(self.stage_rows)

    def next_rows(self) -> Index:
        """The next stage's rows (m, v, i, c), each (R,) int64, in (m, v, i, c) order."""
        parts = [np.column_stack([np.full(len(r), m), r]) for m, p in enumerate(self.plans)
                 if len(r := p.next_rows())]
        rows = np.concatenate(parts) if parts else np.empty((0, 4), np.int64)
        return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]

    def feed(self, index: Index, errors: np.ndarray) -> None:
        """Record a stage's errors (R,) for rows ``index`` (as from ``next_rows``)."""
        m = index[0]
        rows = np.column_stack(index[1:]) if len(m) else np.empty((0, 3), np.int64)
        for mm in np.unique(m):
            sel = m == mm
            self.plans[int(mm)].feed(rows[sel], np.asarray(errors)[sel])
        self.stage_rows.append(len(m))

    def per_vote_errors(self) -> np.ndarray:
        """(M, V, k): ``ImagePlan.per_vote_errors`` of every image."""
        return np.array([p.per_vote_errors() for p in self.plans], np.float32).reshape(self.M, self.V, self.k)

    def vote_counts(self) -> np.ndarray:
        """(M, k): ``ImagePlan.vote_counts`` of every image."""
        return np.array([p.vote_counts() for p in self.plans], np.int64).reshape(self.M, self.k)


def run_planner(planner: LockstepPlans, evaluate: Callable[[Index], np.ndarray]) -> LockstepPlans:
    """Drive ``planner`` to the end: ``evaluate(index) -> errors (R,)`` once per stage."""
    while not planner.done.all():
        index = planner.next_rows()
        if len(index[0]) == 0:  # cannot happen with a consistent planner; never loop forever
            raise ConfigError("early-exit planner asked for no rows while images are still open")
        planner.feed(index, evaluate(index))
    return planner


def replay(errors: np.ndarray, policy: ExitPolicy, offsets: np.ndarray | None = None) -> LockstepPlans:
    """Run the planner over a full error tensor (M, V, n, k), as if each requested row had been
    evaluated then: the decisions and row counts the scorer makes on the same errors, whatever
    the scheduling."""
    M, V, n, k = errors.shape
    p = LockstepPlans(M, V, n, k, policy, offsets)
    return run_planner(p, lambda idx: errors[idx])
