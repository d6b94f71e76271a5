"""The early-exit planner as it stood before the row scheduler (commit 976f8a3), frozen: M images
driven in lockstep stages by one vectorised state. The scheduler's per-image plans must make
exactly its decisions and row counts (issue 22); it is kept here as that reference only."""

from __future__ import annotations

import math

import numpy as np

from dbmef.runtime.early_exit import ExitPolicy, van_der_corput_order
from dbmef.runtime.method import vote, vote_means


class RowPlanner:
    """Per-image state of a stage-wise rethink of M images (V votes, n timesteps, k candidates).

    Rows are (m, v, i, c) with i the position on the timestep grid. ``errors`` (M,V,n,k) holds
    every evaluated row's error, NaN elsewhere.
    """

    def __init__(self, m_count: int, votes: int, n_timesteps: int, k: int, policy: ExitPolicy):
        self.M, self.V, self.n, self.k = m_count, votes, n_timesteps, k
        self.policy = policy
        self.errors = np.full((m_count, votes, n_timesteps, k), np.nan, dtype=np.float32)
        self.alive = np.ones((m_count, k), dtype=bool)
        self.done = np.zeros(m_count, dtype=bool)
        self.winner = np.full(m_count, -1, dtype=np.int64)  # candidate position once settled
        self.rows = np.zeros(m_count, dtype=np.int64)  # rows evaluated per image (2 UNet evals each)
        self.stage_rows: list[int] = []  # rows of each stage, all images together
        first = votes if policy.mode == "off" else votes // 2 + 1
        self.opened = np.full(m_count, first, dtype=np.int64)  # votes opened so far
        self.cursor = np.zeros((m_count, votes), dtype=np.int64)  # timesteps visited per vote
        adaptive = policy.mode == "adaptive"
        self.order = van_der_corput_order(n_timesteps) if adaptive else np.arange(n_timesteps)
        self.step = max(1, policy.interval) if adaptive else n_timesteps
        if m_count == 0:
            self.done[:] = True

    # -- what to evaluate --------------------------------------------------------------------------
    def next_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The next stage's rows (m, v, i, c), each (R,) int64, in (m, v, i, c) order; empty when
        every image is settled."""
        parts: list[np.ndarray] = []
        for m in np.flatnonzero(~self.done):
            cand = np.flatnonzero(self.alive[m])
            for v in range(int(self.opened[m])):
                a = int(self.cursor[m, v])
                if a >= self.n:
                    continue
                pos = np.sort(self.order[a : a + self.step])
                grid = np.stack(np.meshgrid(pos, cand, indexing="ij"), -1).reshape(-1, 2)  # (steps*|cand|, 2)
                parts.append(np.column_stack([np.full(len(grid), m), np.full(len(grid), v), grid]))
        if not parts:
            e = np.empty(0, dtype=np.int64)
            return e, e, e, e
        rows = np.concatenate(parts).astype(np.int64)
        return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]

    def feed(self, index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], errors: np.ndarray) -> None:
        """Record a stage's errors (R,) for rows ``index`` (as from ``next_rows``), then settle
        what can be settled and open what must be opened."""
        m, v, i, c = index
        self.errors[m, v, i, c] = errors
        np.add.at(self.rows, m, 1)
        touched = np.unique(np.stack([m, v], 1), axis=0) if len(m) else np.empty((0, 2), np.int64)
        for mm, vv in touched:
            self.cursor[mm, vv] = min(self.n, self.cursor[mm, vv] + self.step)
        self.stage_rows.append(len(m))
        for mm in np.unique(m):
            self._update(int(mm))

    # -- decisions ---------------------------------------------------------------------------------
    def _update(self, m: int) -> None:
        if self.policy.mode == "adaptive":
            self._eliminate(m)
        alive = np.flatnonzero(self.alive[m])
        if len(alive) == 1:
            self._settle(m, int(alive[0]))
            return
        complete = [v for v in range(int(self.opened[m])) if self.cursor[m, v] >= self.n]
        if self.policy.mode != "off" and complete:
            means = vote_means(self.errors[m, complete][:, :, alive])  # (votes done, |alive|)
            counts = np.bincount(means.argmin(axis=1), minlength=len(alive))
            order = np.sort(counts)[::-1]
            left = self.V - len(complete)
            if order[0] > order[1] + left:
                self._settle(m, int(alive[int(np.argmax(counts))]))
                return
        if len(complete) == self.V:
            means = vote_means(self.errors[m][:, :, alive])  # (V, |alive|)
            self._settle(m, int(alive[vote(means)[0]]))
            return
        if len(complete) == int(self.opened[m]):  # the round is over and undecided: one more vote
            self.opened[m] += 1

    def _eliminate(self, m: int) -> None:
        """Drop candidates significantly worse than the leader (paired rows of this image)."""
        z, alive = self.policy.z, np.flatnonzero(self.alive[m])
        if not math.isfinite(z) or len(alive) < 2:
            return
        e = self.errors[m][:, :, alive].reshape(-1, len(alive)).astype(np.float64)
        e = e[~np.isnan(e).any(axis=1)]  # rows every survivor has: all rows since they were dropped
        r = len(e)
        if r < max(2, self.policy.min_rows):
            return
        lead = int(np.argmin(e.mean(axis=0)))
        d = e - e[:, [lead]]  # (r, |alive|) paired excess error over the leader
        mean = d.mean(axis=0)
        se = d.std(axis=0, ddof=1) / math.sqrt(r)
        drop = (mean > z * se) & (np.arange(len(alive)) != lead)
        self.alive[m, alive[drop]] = False

    def _settle(self, m: int, winner: int) -> None:
        self.done[m] = True
        self.winner[m] = winner

    # -- outputs -----------------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return len(self.stage_rows)

    def per_vote_errors(self) -> np.ndarray:
        """(M, V, k) mean error of each candidate in each vote over the timesteps evaluated for it;
        NaN where nothing was evaluated (a vote never opened, a candidate dropped before it)."""
        with np.errstate(invalid="ignore"):
            filled = np.where(np.isnan(self.errors), 0.0, self.errors).sum(axis=2, dtype=np.float64)
            count = (~np.isnan(self.errors)).sum(axis=2)
            out = np.where(count > 0, filled / np.maximum(count, 1), np.nan)
        full = count == self.n
        out[full] = vote_means(self.errors)[full]  # completed votes: exactly the voting numbers
        return out.astype(np.float32)

    def vote_counts(self) -> np.ndarray:
        """(M, k) votes each candidate won among completed votes (over the candidates still alive)."""
        counts = np.zeros((self.M, self.k), dtype=np.int64)
        for m in range(self.M):
            alive = np.flatnonzero(self.alive[m])
            complete = [v for v in range(self.V) if self.cursor[m, v] >= self.n]
            if complete and len(alive):
                means = vote_means(self.errors[m, complete][:, :, alive])
                counts[m, alive] = np.bincount(means.argmin(axis=1), minlength=len(alive))
        return counts


def replay_v1(errors: np.ndarray, policy: ExitPolicy) -> RowPlanner:
    M, V, n, k = errors.shape
    p = RowPlanner(M, V, n, k, policy)
    while not p.done.all():
        index = p.next_rows()
        p.feed(index, errors[index])
    return p
