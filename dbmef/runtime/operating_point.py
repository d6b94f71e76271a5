"""The operating point: which protector threshold to deploy, chosen by what it costs and buys.

Whether an image is rethought depends on the threshold; what DBMEF answers for it when rethought
does not (the answer is a function of the image and its top-k). So one pass that rethinks every
calibration image once (``dbmef calibrate``: an evaluation at Prot = 0) gives, for every
threshold at once, the rethink rate, the accuracy, the answers fixed and broken and the latency:
at threshold t an image's answer is the slow path's if ``S <= t``, else the backbone's, and its
latency is its fast-path time plus, if rethought, its slow-path time, both measured in that pass.

Four rules choose a threshold from the curve: ``prot`` (the paper's: the lower 1 - Prot quantile
of S over correct answers, ``Protector.calibrate``), ``max_rethink_rate`` (the best accuracy whose
rethink rate is at most R), ``target_accuracy`` (the cheapest threshold reaching A) and
``latency_budget_ms`` (the highest rethink rate whose expected mean latency fits L).
Accuracies carry 95 % Wilson intervals; a choice whose gain over the backbone, or over a cheaper
threshold, is not significant on this calibration set (a paired McNemar test: both answer the same
images) says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.method import rethinks
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import SLOW_STAGES

RULES = ("prot", "max_rethink_rate", "target_accuracy", "latency_budget_ms")
PROT_POINTS = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
RATE_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95 % at z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


@dataclass(frozen=True)
class RethinkAllPass:
    """Per calibration image (readable ones only): its top probability ``s``, the backbone's and
    the slow path's answers, the true label, the UNet evaluations its rethink cost, and its
    fast-path and slow-path seconds (its share of the batch stages, as measured)."""

    s: np.ndarray
    backbone: np.ndarray
    dbmef: np.ndarray
    truth: np.ndarray
    unet_evals: np.ndarray
    fast_s: np.ndarray
    slow_s: np.ndarray

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> RethinkAllPass:
        """From evaluation records of a run that rethought every image (Prot = 0)."""
        ok = [r for r in records if r.get("error") is None]
        if not ok:
            raise ConfigError("no readable calibration images: nothing to calibrate on")
        if not all(r["rethought"] for r in ok):
            raise ConfigError("the calibration pass must rethink every image (Prot = 0); these records come from "
                              "a run with a protector: rerun `dbmef calibrate` without --results of an eval")
        def t(r: dict[str, Any], slow: bool) -> float:
            return sum(v for k, v in r["timings"].items() if (k in SLOW_STAGES) == slow)
        return cls(
            s=np.array([r["max_prob"] for r in ok], np.float64),
            backbone=np.array([r["backbone_label"] for r in ok], np.int64),
            dbmef=np.array([r["label"] for r in ok], np.int64), truth=np.array([r["label_true"] for r in ok], np.int64),
            unet_evals=np.array([r.get("unet_evals", 0) for r in ok], np.int64),
            fast_s=np.array([t(r, False) for r in ok]), slow_s=np.array([t(r, True) for r in ok]),
        )

    def __len__(self) -> int:
        return len(self.s)

    def rethink(self, threshold: float) -> np.ndarray:
        return rethinks(self.s, threshold)

    def answers(self, threshold: float) -> np.ndarray:
        """What DBMEF at ``threshold`` answers for each image (the rule a runtime applies)."""
        return np.where(self.rethink(threshold), self.dbmef, self.backbone)

    def protector(self, prot: float) -> Protector:
        """The paper's rule on this pass: ``Protector.calibrate`` over the backbone's answers."""
        return Protector.calibrate(self.s, self.backbone == self.truth, prot)

    @cached_property
    def _sweep(self) -> dict[str, np.ndarray]:
        """``sweep``'s table, computed once per pass (the curve, the choice, its notes and the plot
        all read it)."""
        ts = thresholds(self)
        order = np.argsort(self.s, kind="stable")
        n_re = np.searchsorted(self.s[order], ts, side="right")  # images with S <= t
        right_d, right_b = (self.dbmef == self.truth)[order], (self.backbone == self.truth)[order]
        # cumulative over images in increasing S: rethinking these helps (fixes) or hurts (breaks)
        fixes = np.concatenate([[0], np.cumsum(right_d & ~right_b)])
        breaks = np.concatenate([[0], np.cumsum(~right_d & right_b)])
        slow = np.concatenate([[0.0], np.cumsum(self.slow_s[order])])
        n = len(self)
        acc = (int(right_b.sum()) + fixes[n_re] - breaks[n_re]) / n
        mean_ms = (self.fast_s.sum() + slow[n_re]) / n * 1e3
        return {"threshold": ts, "rethink_rate": n_re / n, "accuracy": acc, "mean_ms": mean_ms,
                "n_rethought": n_re, "fixes": fixes, "breaks": breaks}


@dataclass(frozen=True)
class Point:
    """DBMEF at one threshold on the calibration set. Latencies in ms per image."""

    threshold: float
    rethink_rate: float
    backbone_accuracy: float
    accuracy: float
    accuracy_ci: tuple[float, float]
    fixed: int
    broken: int
    unet_evals_per_image: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    images_per_s: float
    prot: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threshold"] = self.threshold if math.isfinite(self.threshold) else str(self.threshold)
        d["accuracy_ci"] = list(self.accuracy_ci)
        return d


def point(cp: RethinkAllPass, threshold: float, prot: float | None = None) -> Point:
    re = cp.rethink(threshold)
    ans = cp.answers(threshold)
    right, b_right = ans == cp.truth, cp.backbone == cp.truth
    lat = (cp.fast_s + cp.slow_s * re) * 1e3
    n = len(cp)
    return Point(
        threshold=float(threshold), rethink_rate=float(re.mean()), backbone_accuracy=float(b_right.mean()),
        accuracy=float(right.mean()), accuracy_ci=wilson(int(right.sum()), n),
        fixed=int((right & ~b_right).sum()), broken=int((~right & b_right).sum()),
        unet_evals_per_image=float((cp.unet_evals * re).mean()), mean_ms=float(lat.mean()),
        p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
        images_per_s=float(1e3 / lat.mean()) if lat.mean() > 0 else math.inf, prot=prot,
    )


def thresholds(cp: RethinkAllPass) -> np.ndarray:
    """Every threshold that gives a different rethink set: -inf (none) and each distinct S."""
    return np.concatenate([[-math.inf], np.unique(cp.s)])


def sweep(cp: RethinkAllPass) -> dict[str, np.ndarray]:
    """Rethink rate, accuracy and mean latency (ms) at every threshold of ``thresholds``, in one
    sorted pass (cumulative sums), so a 50 000-image validation set costs no more than a sort.
    Also ``n_rethought`` per threshold and the cumulative ``fixes``/``breaks`` (indexed by the
    number of images rethought, in increasing S) the paired tests read."""
    return cp._sweep


def curve(cp: RethinkAllPass) -> list[Point]:
    """The report's points: the Prot points and the thresholds nearest the rethink-rate grid."""
    sw = sweep(cp)
    pts = [point(cp, cp.protector(p).threshold, prot=p) for p in PROT_POINTS]
    for r in RATE_GRID:
        j = int(np.argmin(np.abs(sw["rethink_rate"] - r)))
        pts.append(point(cp, float(sw["threshold"][j])))
    uniq: dict[tuple[float, float | None], Point] = {}
    for p in pts:
        uniq.setdefault((p.threshold, p.prot), p)
    return sorted(uniq.values(), key=lambda p: (p.rethink_rate, p.prot or 0.0))


@dataclass(frozen=True)
class Choice:
    rule: str
    value: float
    point: Point
    warnings: tuple[str, ...]

    def protector(self, n_correct: int) -> Protector:
        return Protector(self.point.threshold, self.value if self.rule == "prot" else None, n_correct)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "value": self.value, "point": self.point.to_dict(), "warnings": list(self.warnings)}


def check_rule(rule: str, value: float) -> None:
    """Refuse a rule or value no pass can satisfy, before any work is done."""
    flag = "--" + rule.replace("_", "-")
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is not one of {RULES}")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag} {value} must be a finite number")
    if rule in ("prot", "max_rethink_rate") and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} {value} must lie in [0, 1]" + (" (a share of the traffic)" if rule != "prot" else
                                                                   " (the paper's Prot = 1 - alpha, e.g. 0.95)"))
    if rule == "target_accuracy" and not 0.0 < value <= 1.0:
        raise ConfigError(f"{flag} {value} must lie in (0, 1] (an accuracy, e.g. 0.93)")
    if rule == "latency_budget_ms" and value <= 0:
        raise ConfigError(f"{flag} {value} must be a positive number of milliseconds per image")


def choose(cp: RethinkAllPass, rule: str, value: float) -> Choice:
    """The threshold ``rule`` picks with ``value`` (see the module docstring), with its warnings."""
    check_rule(rule, value)
    sw = sweep(cp)
    rate, acc, ms, ts = sw["rethink_rate"], sw["accuracy"], sw["mean_ms"], sw["threshold"]
    if rule == "prot":
        threshold, prot = cp.protector(value).threshold, value
    elif rule == "max_rethink_rate":
        ok = np.flatnonzero(rate <= value + 1e-12)
        best = ok[acc[ok] == acc[ok].max()]
        threshold, prot = float(ts[best[np.argmin(rate[best])]]), None  # best accuracy, then the cheapest
    elif rule == "target_accuracy":
        ok = np.flatnonzero(acc >= value - 1e-12)
        if not len(ok):
            raise ConfigError(f"no threshold reaches accuracy {value:.2%} on the calibration set (the best is "
                              f"{acc.max():.2%} at rethink rate {rate[np.argmax(acc)]:.1%}); lower --target-accuracy")
        threshold, prot = float(ts[ok[np.argmin(rate[ok])]]), None
    else:  # latency_budget_ms
        ok = np.flatnonzero(ms <= value)
        if not len(ok):
            raise ConfigError(f"even rethinking nothing costs {ms.min():.2f} ms per image on average here, over the "
                              f"--latency-budget-ms {value}")
        threshold, prot = float(ts[ok[np.argmax(rate[ok])]]), None
    chosen = point(cp, threshold, prot)
    return Choice(rule, float(value), chosen, _warnings(cp, chosen, rule, value, sw))


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test for paired answers on the same images: ``b`` images one
    choice gets right and the other wrong, ``c`` the reverse. Exact (binomial) up to 400 discordant
    images, then the continuity-corrected chi-square (normal) approximation."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    if n <= 400:
        tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
                   for i in range(k + 1))
        return min(1.0, 2 * tail)
    z = (abs(b - c) - 1) / math.sqrt(n)
    return math.erfc(z / math.sqrt(2))


def _warnings(cp: RethinkAllPass, c: Point, rule: str, value: float, sw: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Choices that this calibration set cannot tell apart. Both choices answer the same images, so
    they are compared paired (McNemar), which resolves far smaller differences than comparing the
    two accuracies' intervals would."""
    n = len(cp)
    out = []
    fixes, breaks, n_re = sw["fixes"], sw["breaks"], sw["n_rethought"]
    n_c = round(c.rethink_rate * n)
    if n_c and mcnemar_p(c.fixed, c.broken) >= 0.05:
        gain = c.accuracy - c.backbone_accuracy
        out.append(f"on {n} calibration images the gain over the backbone alone ({gain:+.2%}: {c.fixed} fixed, "
                   f"{c.broken} broken) is not significant (paired test p >= 0.05)")
    # the cheapest point that rethinks something and is not significantly worse than the chosen one
    # (rethinking nothing is the backbone alone, covered above)
    for j in np.flatnonzero((n_re > 0) & (n_re < n_c)):
        b, w = int(fixes[n_c] - fixes[n_re[j]]), int(breaks[n_c] - breaks[n_re[j]])
        if mcnemar_p(b, w) >= 0.05:
            out.append(f"the threshold {sw['threshold'][j]:.4g} (rethink rate {sw['rethink_rate'][j]:.1%}, accuracy "
                       f"{sw['accuracy'][j]:.2%}) cannot be told apart from the chosen point ({c.rethink_rate:.1%}, "
                       f"{c.accuracy:.2%}) on {n} images (paired test p >= 0.05)")
            break
    lo, hi = c.accuracy_ci
    if rule == "target_accuracy" and lo < value:
        out.append(f"the target {value:.2%} lies inside the chosen point's interval [{lo:.2%}, {hi:.2%}]: "
                   "new data may fall short of it; calibrate on more images to be sure")
    return tuple(out)
