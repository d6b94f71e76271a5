"""What flows through the pipeline (``Batch``, arrays) and what leaves it (``ImageResult``).

A ``Batch`` holds N inputs as row-aligned arrays: row i is input i, whether it was readable or
not. The fast path fills the candidates and the gate, the slow path the rethought rows' scores.
Every field is an array or a list with one entry per row, so a batch can be cut into rows
(``columns``/``from_columns``) and shipped between processes (Ray Data stages) as it is, and the
rethink half never decodes an image again: it reads ``vae_pixels``.

``ImageResult`` is built only at the edge (``Batch.results``), for callers and results files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dbmef.runtime.row_scheduler import Settled

STAGES = ("decode_preprocess", "backbone", "protector", "vae_encode", "text_encoder", "unet_scoring", "vote")
SLOW_STAGES = ("vae_encode", "text_encoder", "unet_scoring", "vote")


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding arrays of different shapes: one column of a Ray Data batch."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


@dataclass
class ImageResult:
    """The answer for one input. ``label`` is None only when ``error`` says why.

    name: the input's name (its path, or ``describe``'s summary of an in-memory input).
    noise_errors: (V opened, k) mean noise-prediction error per vote and candidate (None where
    early exit evaluated none). timings: seconds, this image's share of each batch stage.
    """

    index: int
    name: str
    label: int | None = None
    class_name: str | None = None
    rethought: bool = False
    backbone_label: int | None = None
    max_prob: float | None = None
    topk: list[tuple[int, float]] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    noise_errors: list[list[float | None]] = field(default_factory=list)
    votes: list[int] = field(default_factory=list)  # (k,) votes won among completed votes
    unet_evals: int = 0  # UNet evaluations this image's rethink cost (0 when not rethought)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    latency_s: float | None = None  # from the input's submission to its answer (slow path included)
    rethink_skipped: str | None = None  # why a rethink the gate asked for was not done (overload, deadline)

    def to_dict(self) -> dict[str, Any]:
        # The name is written as "image": the key results files have always used, so resuming a
        # file written by an earlier version still finds its images.
        return {
            "index": self.index, "image": self.name, "label": self.label, "class_name": self.class_name,
            "rethought": self.rethought, "backbone_label": self.backbone_label, "max_prob": self.max_prob,
            "topk": [[c, p] for c, p in self.topk], "candidates": self.candidates,
            "noise_errors": self.noise_errors, "votes": self.votes, "unet_evals": self.unet_evals,
            "timings": self.timings, "error": self.error, "latency_s": self.latency_s,
            **({"rethink_skipped": self.rethink_skipped} if self.rethink_skipped else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageResult:
        """Inverse of ``to_dict`` (extra keys, such as an evaluation record's, are ignored; the
        ``errors`` key of earlier versions is read as ``noise_errors``)."""
        noise = d.get("noise_errors", d.get("errors", []))
        return cls(
            index=int(d["index"]), name=str(d["image"]), label=d.get("label"), class_name=d.get("class_name"),
            rethought=bool(d.get("rethought", False)), backbone_label=d.get("backbone_label"),
            max_prob=d.get("max_prob"), topk=[(int(c), float(p)) for c, p in d.get("topk", [])],
            candidates=list(d.get("candidates", [])), noise_errors=[list(e) for e in noise],
            votes=list(d.get("votes", [])), unet_evals=int(d.get("unet_evals", 0)),
            timings=dict(d.get("timings", {})), error=d.get("error"), latency_s=d.get("latency_s"),
            rethink_skipped=d.get("rethink_skipped"),
        )


@dataclass
class Batch:
    """N inputs in flight, row-aligned. Rows with ``error`` set carry no answer (label -1).

    top, top_p: (N, k) candidates in rank order and their probabilities. rethink: (N,) bool.
    label: (N,) int64 answer so far (the backbone's, then the slow path's). vae_pixels: per row,
    the (3, S, S) VAE input of a rethought image, None otherwise. noise_errors (N, V, k) float32,
    votes (N, k), unet_evals (N,): the slow path's record (NaN / 0 where not scored).
    seconds: (N,) per stage, each row's share of the stage's batch time (NaN: not charged).
    index: (N,) each row's position in the caller's input stream. submitted / latency: (N,) clock
    reading when the row entered the fast path, and seconds from then to its answer (NaN: none yet).
    """

    names: list[str]
    error: list[str | None]
    top: np.ndarray
    top_p: np.ndarray
    rethink: np.ndarray
    label: np.ndarray
    vae_pixels: list[np.ndarray | None]
    noise_errors: np.ndarray
    votes: np.ndarray
    unet_evals: np.ndarray
    seconds: dict[str, np.ndarray]
    scoring: dict[str, Any] = field(default_factory=dict)  # engine-level cost of the last slow path
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    submitted: np.ndarray = field(default_factory=lambda: np.zeros(0))
    latency: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.index) != n:
            self.index = np.arange(n, dtype=np.int64)
        if len(self.submitted) != n:
            self.submitted = np.full(n, np.nan)
        if len(self.latency) != n:
            self.latency = np.full(n, np.nan)

    @classmethod
    def empty(cls, names: list[str], k: int, votes: int) -> Batch:
        n = len(names)
        return cls(
            names=list(names), error=[None] * n, top=np.full((n, k), -1, np.int64),
            top_p=np.full((n, k), np.nan, np.float32), rethink=np.zeros(n, bool), label=np.full(n, -1, np.int64),
            vae_pixels=[None] * n, noise_errors=np.full((n, votes, k), np.nan, np.float32),
            votes=np.zeros((n, k), np.int64), unet_evals=np.zeros(n, np.int64),
            seconds={s: np.full(n, np.nan) for s in STAGES},
        )

    def __len__(self) -> int:
        return len(self.names)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: the readable rows."""
        return np.array([e is None for e in self.error], dtype=bool)

    def charge(self, stage: str, seconds: float, rows: np.ndarray) -> None:
        """The one timing rule: a stage's batch time is split evenly over the rows it served and
        added to what those rows were charged for the stage before."""
        if rows.any():
            t = self.seconds[stage]
            t[rows] = np.nan_to_num(t[rows]) + seconds / int(rows.sum())

    def settle(self, i: int, s: Settled, clock: float | None = None) -> None:
        """Record the slow path's answer ``s`` for row i (its latency up to ``clock``, default the
        moment it settled)."""
        self.label[i], self.noise_errors[i], self.votes[i] = s.label, s.errors, s.votes
        self.unet_evals[i] = s.unet_evals
        for stage, secs in (("unet_scoring", s.unet_seconds), ("vote", s.vote_seconds)):
            self.seconds[stage][i] = np.nan_to_num(self.seconds[stage][i]) + secs
        self.latency[i] = (s.settled if clock is None else clock) - self.submitted[i]

    def result(self, i: int, class_names: list[str]) -> ImageResult:
        """Row i as an ``ImageResult`` (its ``index`` the row's position in the input stream)."""
        r = ImageResult(int(self.index[i]), self.names[i], error=self.error[i])
        if not np.isnan(self.latency[i]):
            r.latency_s = float(self.latency[i])
        if r.error is None:
            if not np.isnan(self.top_p[i, 0]):  # NaN: no classifier ranked the candidates (zero-shot)
                r.backbone_label, r.max_prob = int(self.top[i, 0]), float(self.top_p[i, 0])
                r.topk = [(int(c), float(p)) for c, p in zip(self.top[i], self.top_p[i])]
            r.rethought, r.label = bool(self.rethink[i]), int(self.label[i])
            r.class_name = class_names[r.label]
            r.timings = {s: float(v[i]) for s, v in self.seconds.items() if not np.isnan(v[i])}
        if r.rethought and self.unet_evals[i] > 0:
            r.candidates = [int(c) for c in self.top[i]]
            opened = ~np.isnan(self.noise_errors[i]).all(axis=1)  # votes early exit never opened are left out
            r.noise_errors = [[None if np.isnan(e) else float(e) for e in row]
                              for row in self.noise_errors[i][opened]]
            r.votes = [int(v) for v in self.votes[i]]
            r.unet_evals = int(self.unet_evals[i])
        return r

    def results(self, class_names: list[str]) -> list[ImageResult]:
        """One ``ImageResult`` per row, in row order."""
        return [self.result(i, class_names) for i in range(len(self))]

    # -- rows as columns (Ray Data batches) --------------------------------------------------
    def columns(self) -> dict[str, Any]:
        """Row-aligned columns of numpy arrays (ragged ``vae_pixels`` as an object array)."""
        vae = ragged([np.zeros(0, np.float32) if v is None else v for v in self.vae_pixels])
        cols = {"name": np.array(self.names, dtype=object), "error": np.array([e or "" for e in self.error]),
                "top": self.top, "top_p": self.top_p, "rethink": self.rethink, "pred": self.label, "vae": vae,
                "noise_errors": self.noise_errors, "votes": self.votes, "unet_evals": self.unet_evals}
        cols.update({f"t_{s}": v for s, v in self.seconds.items()})
        return cols

    @classmethod
    def from_columns(cls, cols: dict[str, Any]) -> Batch:
        """Inverse of ``columns`` (for any subset or regrouping of rows)."""
        return cls(
            names=[str(n) for n in cols["name"]], error=[str(e) or None for e in cols["error"]],
            top=np.asarray(cols["top"], np.int64), top_p=np.asarray(cols["top_p"], np.float32),
            rethink=np.asarray(cols["rethink"], bool), label=np.asarray(cols["pred"], np.int64).copy(),
            vae_pixels=[v if v.size else None for v in cols["vae"]],
            noise_errors=np.asarray(cols["noise_errors"], np.float32).copy(),
            votes=np.asarray(cols["votes"], np.int64).copy(),
            unet_evals=np.asarray(cols["unet_evals"], np.int64).copy(),
            seconds={s: np.asarray(cols[f"t_{s}"], np.float64).copy() for s in STAGES},
        )
