"""Typed scoring configuration, round-tripped through JSON and saved beside what it produced."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmef.errors import ConfigError

DEFAULT_POSITIVE_TEMPLATE = "a photo of a {name}."
DEFAULT_NEGATIVE_TEMPLATE = "the features of {names}."


@dataclass(frozen=True)
class PromptTemplates:
    """How class names become text conditions (DESIGN.md §1.6).

    ``positive`` is formatted with ``name``; ``negative`` with ``names``, the other k-1
    candidates in rank order joined by ``separator``.
    """

    positive: str = DEFAULT_POSITIVE_TEMPLATE
    negative: str = DEFAULT_NEGATIVE_TEMPLATE
    separator: str = ","

    def __post_init__(self) -> None:
        if "{name}" not in self.positive:
            raise ConfigError(
                f"prompt template 'positive' = {self.positive!r} has no '{{name}}' placeholder; "
                "write it like 'a photo of a {name}.'"
            )
        if "{names}" not in self.negative:
            raise ConfigError(
                f"prompt template 'negative' = {self.negative!r} has no '{{names}}' placeholder; "
                "write it like 'the features of {names}.'"
            )


@dataclass(frozen=True)
class ScoringConfig:
    """Everything that decides a rethink's answer (DESIGN.md §1.3-1.8).

    k: candidates taken from the backbone's top-k. n_timesteps: timesteps per vote on the uniform
    grid. lam: guidance weight (>= 1; 1 is positive-only). votes: independent repeats V, each with
    its own noise bank. seed: root of every noise bank. unet_batch: rows per UNet engine call (a
    fixed size; the tail is padded). Paper defaults: k=5, n=30, lam=1.1, V=5.
    """

    k: int = 5
    n_timesteps: int = 30
    lam: float = 1.1
    votes: int = 5
    seed: int = 0
    unet_batch: int = 32
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    templates: PromptTemplates = field(default_factory=PromptTemplates)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, value: Any, rule: str) -> None:
            if not cond:
                raise ConfigError(f"scoring config field '{name}' = {value!r} is invalid: {rule}")

        need(self.k >= 2, "k", self.k, "need at least 2 candidates to re-rank")
        need(self.n_timesteps >= 1, "n_timesteps", self.n_timesteps, "must be >= 1")
        need(
            self.n_timesteps <= self.num_train_timesteps,
            "n_timesteps",
            self.n_timesteps,
            f"must be <= num_train_timesteps ({self.num_train_timesteps})",
        )
        need(self.lam >= 1.0, "lam", self.lam, "must be >= 1 (1 is positive-only)")
        need(self.votes >= 1, "votes", self.votes, "must be >= 1")
        need(self.unet_batch >= 1, "unet_batch", self.unet_batch, "must be >= 1")
        need(self.seed >= 0, "seed", self.seed, "must be >= 0")
        need(0 < self.beta_start < self.beta_end < 1, "beta_start/beta_end",
             (self.beta_start, self.beta_end), "need 0 < beta_start < beta_end < 1")

    @property
    def unet_evaluations_per_image(self) -> int:
        """UNet forward rows one rethink costs: V * n * k * 2 (positive and negative)."""
        return self.votes * self.n_timesteps * self.k * 2

    def replace(self, **changes: Any) -> ScoringConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"scoring config has unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        data = dict(data)
        if "templates" in data and isinstance(data["templates"], dict):
            data["templates"] = PromptTemplates(**data["templates"])
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
