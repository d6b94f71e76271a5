"""Seeded noise banks: one Gaussian per (vote, timestep), shared by every candidate and image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dbmef.errors import ConfigError


class NoiseBank:
    """Fixed noise ``eps[v, i]`` of shape (V, n, C, H, W), float32.

    Vote ``v`` draws from its own generator seeded by ``(seed, v)``, so votes are independent and
    a vote's noise does not depend on how many votes there are. The bank is generated once and
    reused for every image: an image's answer never depends on what else is in its batch.
    """

    def __init__(self, votes: int, n_timesteps: int, latent_shape: Sequence[int], seed: int = 0):
        if votes < 1 or n_timesteps < 1:
            raise ConfigError(f"noise bank needs votes >= 1 and n_timesteps >= 1, got {votes}, {n_timesteps}")
        if len(latent_shape) != 3:
            raise ConfigError(f"latent_shape must be (C, H, W), got {tuple(latent_shape)}")
        self.votes = votes
        self.n_timesteps = n_timesteps
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.seed = seed
        self.eps = np.stack([self.vote_noise(v) for v in range(votes)])  # (V, n, C, H, W)

    def vote_noise(self, vote: int) -> np.ndarray:
        """The noise of one vote, (n, C, H, W) float32; a pure function of (seed, vote)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, vote]))
        return rng.standard_normal((self.n_timesteps, *self.latent_shape), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.eps.nbytes)
