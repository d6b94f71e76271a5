"""The runtime's typed configurations: scoring (what decides an answer; round-tripped through JSON and
saved beside what it produced) and the service worker's (how it batches and bounds its load)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.early_exit import POLICIES as EARLY_EXIT_MODES
from dbmef.runtime.early_exit import (
    RENAMED_POLICIES,
    VARIANCES,
    VOTE_OPENINGS,
    ExitPolicy,
    is_grid_order,
    renamed_policy,
)
from dbmef.runtime.early_exit import TESTS as EXIT_TESTS
from dbmef.runtime.method import DECISIONS, PromptTemplates, fused_offsets

# Sanity bounds on user-supplied numbers: far beyond any sensible setting, small enough that a typo
# (--votes 1e9, --lam 1e30) is refused with a message instead of running out of memory or giving inf.
MAX_TIMESTEPS = 1000
MAX_VOTES = 1000
MAX_LAM = 100.0
MAX_UNET_BATCH = 65536
# Fields of older manifests' scoring configs that now live in the bundle's scheduler record.
SCHEDULER_FIELDS = ("num_train_timesteps", "beta_start", "beta_end")


# Zero-shot mode's adaptive settings (every class a candidate, one vote, lam 1), chosen on the committed
# digits bundle's 200 calibration digits by benchmarks/digits/zero_shot.py (ZERO_SHOT.md): a bundle's
# DBMEF settings were chosen for k = 3-5 candidates and 5 votes. `--zero-shot --early-exit adaptive`
# uses these unless a setting is given (RuntimeSpec.scoring_config).
# Issue 39's grid (with the variance pooled over the candidates, interval 1 and min rows 2) chose on
# calibration: t / pooled / z 2 / interval 1 / min rows 2, 103 evaluations per calibration digit (the
# first round's t / candidate / z 2 / interval 2 / min rows 3 needed 159 there).
ZERO_SHOT_EXIT: dict[str, Any] = {"exit_z": 2.0, "exit_interval": 1, "exit_min_rows": 2, "exit_test": "t",
                                  "exit_variance": "pooled", "exit_votes_open": "rounds"}


# The early-exit settings and the modes that read them: a setting given for another mode would be
# silently ignored, so a command line that does so is refused (RuntimeSpec.scoring_config).
EXIT_SETTING_MODES: dict[str, tuple[str, ...]] = {
    **{name: ("adaptive",) for name in ("exit_z", "exit_interval", "exit_min_rows", "exit_test", "exit_votes_open",
                                        "exit_variance")},
    "exit_order": ("adaptive", "keep_best"), "exit_keep": ("keep_best",), "exit_samples": ("keep_best",),
}


@dataclass(frozen=True)
class ScoringConfig:
    """Everything that decides a rethink's answer (docs/design.md §1.3-1.8) and how much UNet work it
    may skip (issue 13).

    k: candidates taken from the backbone's top-k. n_timesteps: timesteps per vote on the uniform
    grid. lam: guidance weight (>= 1; 1 is positive-only). votes: independent repeats V, each with
    its own noise bank. seed: root of every noise bank. unet_batch: rows per UNet engine call (a
    fixed size; the tail is padded). Paper defaults: k=5, n=30, lam=1.1, V=5.

    early_exit: ``off`` (every row: the paper), ``exact`` (vote rounds; the same decisions as
    ``off``), ``adaptive`` (vote rounds + paired elimination of clearly losing candidates, with
    ``exit_z`` standard errors, ``exit_interval`` timesteps per vote between checkpoints and at
    least ``exit_min_rows`` paired rows), ``keep_best`` (Li et al.'s fixed pruning: ``exit_keep``
    candidates kept after ``exit_samples`` timesteps; formerly ``schedule``). See
    ``dbmef.runtime.early_exit``.

    The noise schedule (T, betas) is not here: it is the bundle's (``manifest.scheduler``), since
    the fused scorer graph bakes it in at export and the two paths must not disagree.
    """

    k: int = 5
    n_timesteps: int = 30
    lam: float = 1.1
    votes: int = 5
    seed: int = 0
    unet_batch: int = 32
    # the early-exit defaults are ExitPolicy's (written there once)
    early_exit: str = ExitPolicy.mode
    exit_z: float = ExitPolicy.z
    exit_interval: int = ExitPolicy.interval
    exit_min_rows: int = ExitPolicy.min_rows
    exit_keep: tuple[int, ...] = ()  # early_exit = keep_best: Li et al.'s to_keep
    exit_samples: tuple[int, ...] = ()  # ... and n_samples
    exit_order: tuple[int, ...] = ()  # adaptive/keep_best: timestep visiting order (() = van der Corput)
    exit_test: str = ExitPolicy.test  # adaptive: "z" (normal), "t" (Student's t) or "mixture" (always valid)
    exit_votes_open: str = ExitPolicy.votes_open  # adaptive: "rounds" (exact's) or "all" (every vote at once)
    exit_variance: str = ExitPolicy.variance  # adaptive: "candidate" (own differences) or "pooled" (two-way)
    # Diffusion Classifier (Li et al.): every class a candidate, the positive condition only (lam 1),
    # no protector; the backbone, where the bundle has one, only orders the candidates.
    zero_shot: bool = False
    # what decides a rethought image (issue 34): "paper" (the least diffusion error, by vote) or "fused"
    # (the backbone's log-probability minus fused_beta times the error, by vote: method.fused_vote); fused_beta
    # is fitted by `dbmef calibrate` on the calibration pass (fusion.fit_beta), never trained
    decision: str = "paper"
    fused_beta: float | None = None
    templates: PromptTemplates = field(default_factory=PromptTemplates)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, value: Any, rule: str) -> None:
            if not cond:
                raise ConfigError(f"scoring config field '{name}' = {value!r} is invalid: {rule}")

        if self.early_exit in RENAMED_POLICIES:  # an older manifest or flag: the mode's new name
            object.__setattr__(self, "early_exit", renamed_policy(self.early_exit))
        for name in ("k", "n_timesteps", "votes", "seed", "unet_batch", "exit_interval", "exit_min_rows"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        need(self.k >= 2, "k", self.k, "need at least 2 candidates to re-rank")
        need(1 <= self.n_timesteps <= MAX_TIMESTEPS, "n_timesteps", self.n_timesteps,
             f"must lie in [1, {MAX_TIMESTEPS}]")
        need(math.isfinite(self.lam) and 1.0 <= self.lam <= MAX_LAM, "lam", self.lam,
             f"must be finite and in [1, {MAX_LAM:g}] (1 is positive-only; the paper uses 1.1)")
        need(1 <= self.votes <= MAX_VOTES, "votes", self.votes, f"must lie in [1, {MAX_VOTES}]")
        need(1 <= self.unet_batch <= MAX_UNET_BATCH, "unet_batch", self.unet_batch,
             f"must lie in [1, {MAX_UNET_BATCH}]")
        need(0 <= self.seed < 2**63, "seed", self.seed, "must be >= 0")
        need(self.early_exit in EARLY_EXIT_MODES, "early_exit", self.early_exit, f"must be one of {EARLY_EXIT_MODES}")
        # exit_z = inf is allowed on purpose: adaptive with no elimination (it equals exact).
        need(not math.isnan(self.exit_z) and self.exit_z > 0, "exit_z", self.exit_z, "must be > 0 (inf: never drop)")
        need(self.exit_interval >= 1, "exit_interval", self.exit_interval, "must be >= 1")
        need(self.exit_min_rows >= 2, "exit_min_rows", self.exit_min_rows, "must be >= 2")
        need(self.exit_test in EXIT_TESTS, "exit_test", self.exit_test, f"must be one of {EXIT_TESTS}")
        need(self.exit_votes_open in VOTE_OPENINGS, "exit_votes_open", self.exit_votes_open,
             f"must be one of {VOTE_OPENINGS}")
        need(self.exit_variance in VARIANCES, "exit_variance", self.exit_variance, f"must be one of {VARIANCES}")
        for name in ("exit_keep", "exit_samples"):
            value = getattr(self, name)
            need(isinstance(value, tuple) and all(isinstance(x, int) and x >= 1 for x in value), name, value,
                 "must be a list of positive integers")
        need(isinstance(self.exit_order, tuple) and is_grid_order(self.exit_order, self.n_timesteps), "exit_order",
             self.exit_order,
             f"must be empty or a permutation of 0..{self.n_timesteps - 1} (the timestep grid positions)")
        need(isinstance(self.zero_shot, bool), "zero_shot", self.zero_shot, "must be true or false")
        need(not self.zero_shot or self.lam == 1.0, "lam", self.lam,
             "must be 1 in zero-shot mode (the positive condition only: there are no negatives)")
        need(self.decision in DECISIONS, "decision", self.decision, f"must be one of {DECISIONS}")
        need(self.fused_beta is None or (isinstance(self.fused_beta, (int, float)) and not isinstance(
             self.fused_beta, bool) and math.isfinite(self.fused_beta) and self.fused_beta > 0), "fused_beta",
             self.fused_beta, "must be a finite number > 0 (fitted by `dbmef calibrate --decision fused`)")
        need(not (self.zero_shot and self.decision == "fused"), "decision", self.decision,
             "cannot be 'fused' in zero-shot mode (no classifier's probabilities to fuse); use 'paper'")
        self.exit_policy  # noqa: B018 - the policy's own checks (a schedule's keep and samples)

    @property
    def exit_policy(self) -> ExitPolicy:
        return ExitPolicy(self.early_exit, self.exit_z, self.exit_interval, self.exit_min_rows, self.exit_keep,
                          self.exit_samples, self.exit_order, self.exit_test, self.exit_votes_open,
                          self.exit_variance)

    def decision_offsets(self, probs: np.ndarray | None) -> np.ndarray | None:
        """What the decision adds to the mean errors it compares (``early_exit.ImagePlan``): the fused
        rule's classifier terms (``method.fused_offsets``) of candidates with backbone probabilities
        ``probs`` ((k,) or (M, k)); None under the paper's rule."""
        if self.decision != "fused":
            return None
        if probs is None or self.fused_beta is None:
            raise ConfigError("the fused decision needs each candidate's backbone probability and the bundle's "
                              "fused_beta: run `dbmef calibrate --decision fused`, or give --fused-beta B")
        return fused_offsets(probs, self.fused_beta)

    @property
    def unet_evaluations_per_image(self) -> int:
        """UNet evaluations of one full rethink (``early_exit = off``): V * n * k * 2 (positive and
        negative); the other modes cost at most this."""
        return self.votes * self.n_timesteps * self.k * 2

    def replace(self, **changes: Any) -> ScoringConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (tuples as lists, as they come back from a file)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        moved = sorted(set(unknown) & set(SCHEDULER_FIELDS))
        if moved:
            raise ConfigError(
                f"scoring config field(s) {moved} belong to the bundle's noise schedule (manifest 'scheduler'), "
                "which the exported scorer graph bakes in; they cannot be overridden at run time (re-export to "
                "change them)"
            )
        if unknown:
            raise ConfigError(
                f"scoring config has unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        data = dict(data)
        if "templates" in data and isinstance(data["templates"], dict):
            data["templates"] = PromptTemplates(**data["templates"])
        for name in ("exit_keep", "exit_samples", "exit_order"):  # JSON lists
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ScoringConfig:
        p = Path(text_or_path)
        try:
            text = p.read_text() if p.suffix == ".json" or p.exists() else str(text_or_path)
        except OSError:
            text = str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"scoring config is not valid JSON ({exc}): {str(text)[:80]!r}") from exc
        return cls.from_dict(data)


ON_OVERLOAD = ("fast_answer", "reject")


@dataclass(frozen=True)
class WorkerConfig:
    """How a ``ClassifierWorker`` batches and bounds its load (``ServeConfig.worker`` is one).

    batch_size: requests per fast-path batch. batch_wait_s: after the first waiting request, how
    long the fast path waits for more. max_queued: requests waiting for the fast path, then
    ``submit`` raises ``OverloadedError``. max_rethinking: images waiting for or in the slow path,
    then rethinks are skipped. deadline_s: default per-request deadline (None: none); a rethink
    that cannot end before it is skipped. on_overload: ``"fast_answer"`` (the fast label, with
    ``rethink_skipped`` saying why) or ``"reject"`` (``OverloadedError``). fill_wait_s: how long an
    engine call that would not be full waits for rows the fast path is producing. How many images
    rethink at once is the runtime's ``window`` (``RuntimeSpec.window``, ``--window``).
    """

    batch_size: int = 16
    batch_wait_s: float = 0.002
    max_queued: int = 4096
    max_rethinking: int = 1024
    deadline_s: float | None = None
    on_overload: str = "fast_answer"
    fill_wait_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_queued", "max_rethinking"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"worker option {name} = {value!r} must be an integer >= 1")
        for name in ("batch_wait_s", "fill_wait_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"worker option {name} = {value!r} must be a finite number of seconds >= 0")
        if self.deadline_s is not None and not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ConfigError(f"worker option deadline_s = {self.deadline_s} must be a positive number of seconds "
                              "(or None)")
        if self.on_overload not in ON_OVERLOAD:
            raise ConfigError(f"worker option on_overload = {self.on_overload!r} must be one of {ON_OVERLOAD}")
