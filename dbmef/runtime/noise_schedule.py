"""The DDPM noise schedule of Stable Diffusion and DBMEF's uniform timestep grid (docs/design.md §1.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """SD's ``scaled_linear`` betas: linear in sqrt(beta), squared. Shape (T,), float64."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)``. Shape (T,), float64.

    Computed in float64; diffusers computes the same product in float32, so the two agree to
    about 1e-6 relative (checked in the tests).
    """
    return np.cumprod(1.0 - scaled_linear_betas(num_train_timesteps, beta_start, beta_end))


def timestep_grid(n: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The paper's uniform grid ``t_i = T//n//2 + i*(T//n)``, i = 0..n-1. Shape (n,), int64."""
    if not 1 <= n <= num_train_timesteps:
        raise ConfigError(f"n_timesteps = {n} must lie in [1, {num_train_timesteps}]")
    step = num_train_timesteps // n
    return (step // 2 + step * np.arange(n)).astype(np.int64)


@dataclass(frozen=True)
class NoiseSchedule:
    """The bundle's DDPM schedule (``manifest.scheduler``): what the UNet was trained with and what
    the fused scorer graph baked in at export. One object feeds both the host UNet path and the
    checks, so the two paths cannot disagree."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        if self.beta_schedule != "scaled_linear":
            raise ConfigError(f"scheduler beta_schedule {self.beta_schedule!r} is not supported; DBMEF uses SD's "
                              "'scaled_linear'")
        if not 0 < self.beta_start < self.beta_end < 1 or self.num_train_timesteps < 1:
            raise ConfigError(f"scheduler constants T={self.num_train_timesteps}, beta {self.beta_start}.."
                              f"{self.beta_end} are invalid: need T >= 1 and 0 < beta_start < beta_end < 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        try:
            return cls(int(d["num_train_timesteps"]), float(d["beta_start"]), float(d["beta_end"]),
                       str(d.get("beta_schedule", "scaled_linear")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"scheduler record {d!r} is malformed ({exc}); re-export the bundle") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule}

    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float64."""
        return alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end)

    def grid(self, n: int) -> np.ndarray:
        """The paper's n timesteps on this schedule's T. (n,) int64."""
        return timestep_grid(n, self.num_train_timesteps)
