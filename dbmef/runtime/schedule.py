"""The DDPM noise schedule of Stable Diffusion and DBMEF's uniform timestep grid (DESIGN.md §1.5)."""

from __future__ import annotations

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
