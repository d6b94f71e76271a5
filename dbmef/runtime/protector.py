"""The confidence protector (docs/design.md §1.2): which answers of the backbone get rethought."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.method import Gate, gate, rethinks


@dataclass(frozen=True)
class Protector:
    """Rethink an image iff its top softmax probability ``S(x) <= threshold``.

    ``threshold`` is ``S_alpha``, the lower ``alpha = 1 - prot`` quantile of ``S`` over calibration
    images the backbone classifies correctly. ``prot = 0`` rethinks everything (threshold +inf),
    ``prot = 1`` nothing (threshold -inf).
    """

    threshold: float
    prot: float | None = None
    n_samples: int | None = None

    def __post_init__(self) -> None:
        # A NaN compares false with everything: "S <= NaN" would silently switch the slow path off.
        t = self.threshold
        if not isinstance(t, (int, float)) or math.isnan(t):
            raise ConfigError(f"protector threshold {t!r} is not a number; recalibrate with `dbmef calibrate`")
        if math.isinf(t) and self.prot not in (None, 0.0, 1.0):
            raise ConfigError(f"protector threshold {t} with prot {self.prot}: only Prot 0 (+inf) and 1 (-inf) have an "
                              "infinite threshold; recalibrate with `dbmef calibrate`")
        if math.isfinite(t) and not 0.0 <= t <= 1.0:
            raise ConfigError(f"protector threshold {t} is not a probability in [0, 1]; recalibrate with "
                              "`dbmef calibrate`")
        if self.prot is not None and not (isinstance(self.prot, (int, float)) and 0.0 <= self.prot <= 1.0):
            raise ConfigError(f"protector prot {self.prot!r} must lie in [0, 1]")

    @classmethod
    def calibrate(cls, max_probs: np.ndarray, correct: np.ndarray, prot: float) -> Protector:
        """Fit the threshold from calibration data.

        max_probs: (N,) top softmax probability per calibration image. correct: (N,) bool, whether
        the backbone's top-1 was right. The quantile uses numpy's ``lower`` method so that the
        threshold is an observed S value: exactly ``ceil``-free and reproducible.
        """
        if not 0.0 <= prot <= 1.0:
            raise ConfigError(f"prot = {prot} must lie in [0, 1] (paper default 0.95)")
        s = np.asarray(max_probs, dtype=np.float64).reshape(-1)
        ok = np.asarray(correct, dtype=bool).reshape(-1)
        if s.shape != ok.shape:
            raise ConfigError(f"max_probs has {s.size} entries but correct has {ok.size}")
        n_correct = int(ok.sum())
        if prot <= 0.0:
            return cls(math.inf, prot, n_correct)
        if prot >= 1.0:
            return cls(-math.inf, prot, n_correct)
        if n_correct == 0:
            raise ConfigError(
                "cannot calibrate the protector: the backbone classified none of the "
                f"{s.size} calibration images correctly; check the labels and class order"
            )
        alpha = 1.0 - prot
        threshold = float(np.quantile(s[ok], alpha, method="lower"))
        return cls(threshold, prot, n_correct)

    @classmethod
    def fixed(cls, prot: float) -> Protector:
        """Prot = 0 rethinks every image (threshold +inf), Prot = 1 none (-inf), whatever the data."""
        if prot not in (0.0, 1.0):
            raise ConfigError(f"prot = {prot}: only 0 (rethink all) and 1 (rethink none) need no calibration")
        return cls(math.inf if prot == 0.0 else -math.inf, prot, None)

    def rethink(self, max_probs: np.ndarray) -> np.ndarray:
        """(B,) bool: True where the image is rethought (``S <= threshold``)."""
        return rethinks(max_probs, self.threshold)

    def gate(self, logits: np.ndarray, k: int) -> Gate:
        """docs/design.md §1.1-1.3 in one place: softmax, S(x) = max p, rethink iff S <= threshold, and
        the top-k candidates. (N, C) logits -> Gate."""
        return gate(logits, self.threshold, k)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinities: encode them as strings that float() reads back.
        thr: float | str = self.threshold if math.isfinite(self.threshold) else str(self.threshold)
        alpha = None if self.prot is None else round(1.0 - self.prot, 12)
        return {"threshold": thr, "prot": self.prot, "alpha": alpha, "n_samples": self.n_samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protector:
        try:
            return cls(float(data["threshold"]), data.get("prot"), data.get("n_samples"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"protector record {data!r} is invalid: {exc}") from exc
