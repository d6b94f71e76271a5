"""Stage-wise scoring: which (image, vote, timestep, candidate) rows to evaluate next, and when an
image's answer is settled (issue 13).

An image is rethought in *stages*: its plan (:class:`ImagePlan`) names the rows it needs next, the
slow path evaluates them (in fixed-size engine calls shared with other images) and feeds the errors
back. The policies (``ScoringConfig.early_exit``):

* ``off``: every row of every vote in one stage: the paper's full method.
* ``exact`` (default): vote rounds. The first ``V//2 + 1`` votes of every image, then one vote
  at a time while undecided. An image is settled once its leading candidate has more votes than
  any other could still reach (``lead > runner_up + votes_left``): the remaining votes cannot
  change the majority, and the least-mean-error tie-break only applies to a tie, which is then
  impossible. Decisions are identical to ``off``.
* ``adaptive`` (opt-in): timesteps visited ``exit_interval`` at a time in van der Corput order (any
  prefix spans the whole grid) and, after each stage, a paired sequential test (every candidate
  shares the image's noise and timesteps): a candidate whose mean excess error over the leader,
  over all rows so far (at least ``exit_min_rows``), exceeds the threshold in standard errors gets
  no further rows; votes and the tie-break count the survivors. Its parts (issue 39): which votes
  a stage serves (``exit_votes_open``: exact's ``rounds``, or ``all`` votes from the first stage
  with vote v's order shifted by v n / V positions), the standard error (``exit_variance``:
  ``candidate``, ``pooled`` or ``stratified``: ``paired_test.paired_standard_error``) and the
  threshold (``exit_test``: ``z``, ``t`` or the always-valid ``mixture``). With ``exit_z = inf``
  nothing is dropped and the decisions are ``off``'s.
* ``keep_best`` (Li et al.'s Diffusion Classifier, for comparison; called ``schedule`` before, a
  name still read): one vote; after ``exit_samples[j]`` timesteps the ``exit_keep[j]`` candidates
  with the least mean error go on.

Everything here is per image: the rows an image gets depend on its own errors only, never on the
other images of the batch, so an image alone gets the same answer as inside any batch.
``replay.replay`` runs the same plans over a full precomputed error tensor (ablations, Table 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.method import vote, vote_means
from dbmef.runtime.paired_test import paired_standard_error, threshold

POLICIES = ("off", "exact", "adaptive", "keep_best")
RENAMED_POLICIES = {"schedule": "keep_best"}  # old name -> new: still read from manifests and flags
TESTS = ("z", "t", "mixture")
VOTE_OPENINGS = ("rounds", "all")
VARIANCES = ("candidate", "pooled", "stratified")
Index = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rows (m, v, i, c) of M images, each (R,) int64


def renamed_policy(mode: str) -> str:
    """The current name of an early-exit mode given by its old name, with a FutureWarning."""
    new = RENAMED_POLICIES[mode]
    warnings.warn(f"early_exit {mode!r} is now called {new!r}; the old name will stop working in a later release",
                  FutureWarning, stacklevel=4)
    return new


def is_grid_order(order: tuple[int, ...], n: int) -> bool:
    """Whether ``order`` is a visiting order of the n timestep grid positions (empty: the default)."""
    return not order or sorted(order) == list(range(n))


def van_der_corput_order(n: int) -> np.ndarray:
    """Grid positions 0..n-1 in bit-reversed (base-2 van der Corput) order: every prefix is spread
    over the whole range. n=8 -> [0, 4, 2, 6, 1, 5, 3, 7]."""
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    rev = [int(format(j, f"0{bits}b")[::-1], 2) for j in range(1 << bits)]
    return np.array([r for r in rev if r < n], dtype=np.int64)


@dataclass(frozen=True)
class ExitPolicy:
    """The early-exit part of a scoring config. ``interval``: timesteps per vote per stage
    (adaptive); ``z``: elimination threshold in standard errors; ``min_rows``: paired rows needed
    before any elimination. ``keep_best`` (Li et al.'s Diffusion Classifier, for comparison): one vote;
    stage j evaluates the surviving candidates up to ``samples[j]`` timesteps (van der Corput order)
    and keeps the ``keep[j]`` with the least mean error; the last keeps one."""

    mode: str = "exact"
    # adaptive's defaults, chosen on the committed digits bundle's 200 calibration digits, never on test
    # images (benchmarks/digits/EXIT_DEFAULTS.md, issue 39: the cheapest of 576 settings of 12 families
    # that, with z - 0.5 and z - 1 as slack, decides every one of them as off does at k = 3, 5 and
    # V = 1, 5: 260 UNet evaluations per digit instead of 1 500 at k = 5, V = 5, where the first
    # round's defaults (rounds / candidate / z 2.5 / interval 5 / min rows 6) needed 304);
    # benchmarks/digits/EXIT_HELDOUT.md reports them on held-out digits.
    z: float = 3.0
    interval: int = 1
    min_rows: int = 10
    keep: tuple[int, ...] = ()
    samples: tuple[int, ...] = ()
    # adaptive and keep_best: the order in which a vote visits the timestep grid; () is van der Corput.
    # An order that puts the best-separating timesteps first drops candidates sooner but, measured on
    # the zero-shot digits (benchmarks/digits/ZERO_SHOT.md), loses accuracy: its first rows are
    # correlated, so the paired test's standard error is too small. An option, not a default.
    order: tuple[int, ...] = ()
    # adaptive: the elimination threshold, "z" (the normal: z itself), "t" (Student's t at z's level with
    # the standard error's degrees of freedom) or "mixture" (an always-valid boundary). "t" is what the
    # zero-shot benchmark chose on its calibration split (ZERO_SHOT_EXIT); DBMEF mode's choice is "z".
    test: str = "z"
    # adaptive: which votes a stage serves. "rounds": the first V//2 + 1 votes, then one more while
    # undecided (exact's rounds). "all": every vote from the first stage, so row r of every vote comes
    # before row r + 1 of any and the pooled test sees all V noise draws at once.
    votes_open: str = "all"
    # adaptive: the paired test's standard error. "candidate": each candidate's own paired differences
    # to the leader (rows - 1 degrees of freedom). "pooled": the residual variance of the two-way
    # (row x candidate) layout over all survivors, (rows - 1)(survivors - 1) degrees of freedom: a
    # few rows give a usable estimate because every candidate contributes to it.
    variance: str = "stratified"

    def __post_init__(self) -> None:
        if self.mode in RENAMED_POLICIES:
            object.__setattr__(self, "mode", renamed_policy(self.mode))
        if self.mode not in POLICIES:
            raise ConfigError(f"early_exit = {self.mode!r} is not one of {POLICIES}")
        if self.test not in TESTS:
            raise ConfigError(f"early-exit test {self.test!r} is not one of {TESTS} (z: normal threshold, t: "
                              "Student's t at z's level, mixture: an always-valid normal-mixture boundary)")
        if self.votes_open not in VOTE_OPENINGS:
            raise ConfigError(f"early-exit votes_open {self.votes_open!r} is not one of {VOTE_OPENINGS} (rounds: "
                              "V//2 + 1 votes first, then one at a time; all: every vote from the first stage)")
        if self.variance not in VARIANCES:
            raise ConfigError(f"early-exit variance {self.variance!r} is not one of {VARIANCES} (candidate: each "
                              "candidate's paired differences; pooled: the two-way residual over all survivors)")
        if self.mode == "keep_best":
            k, s = tuple(self.keep), tuple(self.samples)
            if not k or len(k) != len(s) or k[-1] != 1 or any(a <= b for a, b in zip(s[1:], s)) or s[0] < 1 \
                    or any(a >= b for a, b in zip(k[1:], k)) or k[0] < 1:
                raise ConfigError(f"early_exit 'keep_best' needs keep {k} and samples {s} of one length, samples "
                                  "increasing, keep decreasing to 1 (Li et al.'s CIFAR-10: keep 5 1, samples 50 500)")


class ImagePlan:
    """One image's stage-wise rethink (V votes, n timesteps, k candidates): which rows it needs next
    and when its answer is settled.

    A row is (v, i, c): vote v, position i on the timestep grid, candidate c. ``errors`` (V, n, k)
    holds every evaluated row's error, NaN elsewhere. The plan sees nothing but its own errors, so
    the rows it asks for and its answer never depend on other images, the engine batch or the
    order in which a scheduler serves it.
    """

    def __init__(self, votes: int, n_timesteps: int, k: int, policy: ExitPolicy, offsets: np.ndarray | None = None):
        self.V, self.n, self.k = votes, n_timesteps, k
        self.policy = policy
        # the fused decision's classifier term per candidate (method.fused_offsets), added to every
        # mean error the plan compares (votes, tie-break, the paired test); None: the paper's rule
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64).reshape(k)
        self.errors = np.full((votes, n_timesteps, k), np.nan, dtype=np.float32)
        self.alive = np.ones(k, dtype=bool)
        self.done = False
        self.winner = -1  # candidate position once settled
        self.rows = 0  # rows evaluated (each 2 UNet evaluations, 1 positive-only at lam = 1)
        self.stages = 0  # stages fed
        every = policy.mode == "off" or (policy.mode == "adaptive" and policy.votes_open == "all")
        self.opened = votes if every else votes // 2 + 1  # votes opened so far
        self.cursor = np.zeros(votes, dtype=np.int64)  # timesteps visited per vote
        spread = policy.mode in ("adaptive", "keep_best")
        if not is_grid_order(policy.order, n_timesteps):
            raise ConfigError(f"early-exit order {list(policy.order)} is not a permutation of the {n_timesteps} "
                              "timestep grid positions 0..n-1")
        self.order = (np.array(policy.order, np.int64) if spread and policy.order else
                      van_der_corput_order(n_timesteps) if spread else np.arange(n_timesteps))
        # votes opened all at once visit the order shifted by v * n / V positions: every stage spreads
        # over the grid (the first of V = 5, n = 30 sees positions 0, 6, 12, 18, 24)
        shift = policy.mode == "adaptive" and policy.votes_open == "all"
        self.orders = np.stack([(self.order + (v * n_timesteps) // votes) % n_timesteps if shift else self.order
                                for v in range(votes)])
        # the strata of "stratified": V blocks of the grid, one per vote's shift, as rows (v, i) flatten
        self.strata = np.tile(np.arange(n_timesteps) * votes // n_timesteps, votes)
        self.step = max(1, policy.interval) if policy.mode == "adaptive" else n_timesteps
        if policy.mode == "keep_best":
            if votes != 1 or policy.samples[-1] != n_timesteps or policy.keep[0] > k:
                raise ConfigError(f"early_exit 'keep_best' runs one vote over n_timesteps = samples[-1] with "
                                  f"keep[0] <= k; got votes {votes}, n_timesteps {n_timesteps}, samples "
                                  f"{policy.samples}, keep {policy.keep}, k {k}")
            self.opened = 1

    # -- what to evaluate --------------------------------------------------------------------------
    def _stage(self, cursor: np.ndarray, opened: int, alive: np.ndarray) -> np.ndarray:
        """(R, 3) rows (v, i, c) of the stage that follows state (cursor, opened), in (v, i, c) order."""
        cand = np.flatnonzero(alive)
        parts = []
        for v in range(opened):
            a = int(cursor[v])
            if a >= self.n:
                continue
            pos = np.sort(self.orders[v, a : self._stage_end(a)])
            # every (position, candidate) pair, position-major: (steps * |cand|, 3) rows (v, i, c)
            parts.append(np.column_stack([np.full(len(pos) * len(cand), v), np.repeat(pos, len(cand)),
                                          np.tile(cand, len(pos))]))
        return np.concatenate(parts).astype(np.int64) if parts else np.empty((0, 3), np.int64)

    def next_rows(self) -> np.ndarray:
        """The next stage's rows (R, 3) int64 (v, i, c); empty once settled."""
        if self.done:
            return np.empty((0, 3), np.int64)
        return self._stage(self.cursor, int(self.opened), self.alive)

    def upcoming(self, limit: int) -> np.ndarray:
        """Up to ``limit`` rows (v, i, c) the stages after ``next_rows`` will ask for if no candidate
        is dropped and the answer is not settled before: what a scheduler may evaluate ahead, in
        the order they would be asked for. Asking changes nothing."""
        if self.done or limit <= 0:
            return np.empty((0, 3), np.int64)
        cursor, opened = self.cursor.copy(), int(self.opened)
        out: list[np.ndarray] = []
        count = 0
        while count < limit:
            live = np.flatnonzero(cursor[:opened] < self.n)
            cursor[live] = [self._stage_end(int(a)) for a in cursor[live]]  # the stage before is done
            if (cursor[:opened] >= self.n).all():
                if opened >= self.V:
                    break
                opened += 1  # the round is over and undecided: one more vote
            rows = self._stage(cursor, opened, self.alive)
            if not len(rows):
                break
            out.append(rows)
            count += len(rows)
        return np.concatenate(out)[:limit] if out else np.empty((0, 3), np.int64)

    def feed(self, rows: np.ndarray, errors: np.ndarray) -> None:
        """Record a whole stage: errors (R,) of rows (R, 3) as from ``next_rows``; then settle what
        can be settled and open what must be opened."""
        v, i, c = rows[:, 0], rows[:, 1], rows[:, 2]
        self.errors[v, i, c] = errors
        self.rows += len(rows)
        self.stages += 1
        for vv in np.unique(v):
            self.cursor[vv] = self._stage_end(int(self.cursor[vv]))
        if len(rows):
            self._update()

    def _stage_end(self, a: int) -> int:
        """Where a stage that starts at grid position ``a`` of a vote's order ends."""
        if self.policy.mode == "keep_best":
            return next(s for s in self.policy.samples if s > a)
        return min(self.n, a + self.step)

    # -- decisions ---------------------------------------------------------------------------------
    def _update(self) -> None:
        if self.policy.mode == "keep_best":
            self._keep_best()
            return
        if self.policy.mode == "adaptive":
            self._eliminate()
        alive = np.flatnonzero(self.alive)
        if len(alive) == 1:
            self._settle(int(alive[0]))
            return
        complete = [v for v in range(int(self.opened)) if self.cursor[v] >= self.n]
        if self.policy.mode != "off" and complete:
            means = self._offset(vote_means(self.errors[complete][:, :, alive]), alive)  # (votes done, |alive|)
            counts = np.bincount(means.argmin(axis=1), minlength=len(alive))
            order = np.sort(counts)[::-1]
            left = self.V - len(complete)
            if order[0] > order[1] + left:
                self._settle(int(alive[int(np.argmax(counts))]))
                return
        if len(complete) == self.V:
            means = self._offset(vote_means(self.errors[:, :, alive]), alive)  # (V, |alive|)
            self._settle(int(alive[vote(means)[0]]))
            return
        if len(complete) == int(self.opened):  # the round is over and undecided: one more vote
            self.opened += 1

    def _eliminate(self) -> None:
        """Drop candidates significantly worse than the leader (paired rows of this image)."""
        z, alive = self.policy.z, np.flatnonzero(self.alive)
        if not math.isfinite(z) or len(alive) < 2:
            return
        e = self.errors[:, :, alive].reshape(-1, len(alive)).astype(np.float64)
        have = ~np.isnan(e).any(axis=1)  # rows every survivor has: all rows since they were dropped
        e = e[have]
        r = len(e)
        if r < max(2, self.policy.min_rows):
            return
        lead = int(np.argmin(self._offset(e.mean(axis=0), alive)))
        excess = (e - e[:, [lead]]).mean(axis=0)  # mean paired excess error over the leader
        if self.offsets is not None:  # the fused rule's margin: plus the classifier's term, known exactly
            excess = excess + self.offsets[alive] - self.offsets[alive[lead]]
        se, df = paired_standard_error(e, lead, self.policy.variance, self.strata[have])
        drop = (excess > self._threshold(r, df) * se) & (np.arange(len(alive)) != lead)
        self.alive[alive[drop]] = False

    def _threshold(self, rows: int, df: int) -> float:
        return threshold(self.policy.test, self.policy.z, rows, df, self.policy.min_rows)

    def _keep_best(self) -> None:
        """Li et al.'s rule after a stage: the ``keep[j]`` candidates with the least mean error over
        the timesteps so far go on (ties to the better rank); the last stage keeps the winner."""
        alive = np.flatnonzero(self.alive)
        j = self.policy.samples.index(int(self.cursor[0]))
        means = self.errors[0][:, alive].astype(np.float64)
        means = self._offset(np.nanmean(means, axis=0), alive)  # (|alive|,) over the timesteps evaluated
        best = alive[np.argsort(means, kind="stable")[: self.policy.keep[j]]]
        self.alive[:] = False
        self.alive[best] = True
        if len(best) == 1:
            self._settle(int(best[0]))

    def _offset(self, means: np.ndarray, alive: np.ndarray) -> np.ndarray:
        """Mean errors (..., |alive|) as the decision compares them: plus the fused rule's offsets."""
        return means if self.offsets is None else means + self.offsets[alive]

    def _settle(self, winner: int) -> None:
        self.done = True
        self.winner = winner

    # -- outputs -----------------------------------------------------------------------------------
    def per_vote_errors(self) -> np.ndarray:
        """(V, k) mean error of each candidate in each vote over the timesteps evaluated for it;
        NaN where nothing was evaluated (a vote never opened, a candidate dropped before it)."""
        with np.errstate(invalid="ignore"):
            filled = np.where(np.isnan(self.errors), 0.0, self.errors).sum(axis=1, dtype=np.float64)
            count = (~np.isnan(self.errors)).sum(axis=1)
            out = np.where(count > 0, filled / np.maximum(count, 1), np.nan)
        full = count == self.n
        out[full] = vote_means(self.errors)[full]  # completed votes: exactly the voting numbers
        return out.astype(np.float32)

    def vote_counts(self) -> np.ndarray:
        """(k,) votes each candidate won among completed votes (over the candidates still alive)."""
        counts = np.zeros(self.k, dtype=np.int64)
        alive = np.flatnonzero(self.alive)
        complete = [v for v in range(self.V) if self.cursor[v] >= self.n]
        if complete and len(alive):
            means = self._offset(vote_means(self.errors[complete][:, :, alive]), alive)
            counts[alive] = np.bincount(means.argmin(axis=1), minlength=len(alive))
        return counts
