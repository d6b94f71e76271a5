"""Diffusion features (Mukhopadhyay et al., "Diffusion Models Beat GANs on Image Classification"):
the frozen UNet's activations at one block and one noise level, pooled, as an image's feature vector.

What defines a feature vector, as plain data (``FeatureSpec``): the block (a stable name: ``down.0``,
``down.1``, ..., ``mid``, ``up.0``, ...), the timestep t, the pooled size p (adaptive average pooling
to p x p, flattened channel-major) and the seed of the one fixed noise every image is noised with.
The prompt is the empty one (the unconditional embedding), as in the paper. The bundle's
``features`` component computes the whole chain in one graph (VAE mean latent -> noised to t ->
UNet up to the block -> pooled); this module holds what the host needs to state and check it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError

BLOCK_NAME = re.compile(r"^(down\.\d+|mid|up\.\d+)$")
FEATURE_NOISE_STREAM = 0x66656174  # "feat": the noise's own PCG64 stream, apart from the slow path's votes


@dataclass(frozen=True)
class FeatureSpec:
    """One feature definition. ``block``: ``down.i`` (the i-th down block's output, after its
    downsampler), ``mid``, ``up.i`` (the i-th up block's output, after its upsampler); ``timestep``:
    0..T-1; ``pool``: the p of the p x p adaptive average pool (1: global average); ``seed``: the
    fixed noise's seed."""

    block: str
    timestep: int
    pool: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not BLOCK_NAME.match(self.block):
            raise ConfigError(f"feature block {self.block!r} is not a block name: use down.<i>, mid or up.<i> "
                              "(the UNet's down_blocks[i], mid_block, up_blocks[i])")
        for name, lo in (("timestep", 0), ("pool", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"feature {name} = {v!r} is invalid: it must be an integer >= {lo}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"feature seed = {self.seed!r} is invalid: it must be an integer >= 0")

    @property
    def module(self) -> str:
        """The diffusers module the block names (``up.1`` -> ``up_blocks.1``)."""
        return block_module(self.block)

    def label(self) -> str:
        return f"{self.block} t={self.timestep} pool={self.pool}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> FeatureSpec:
        if not isinstance(d, dict) or not {"block", "timestep"} <= set(d):
            raise ConfigError(f"feature record {d!r} needs at least 'block' and 'timestep'; re-run dbmef features")
        return cls(str(d["block"]), int(d["timestep"]), int(d.get("pool", 1)), int(d.get("seed", 0)))


def block_module(block: str) -> str:
    """``down.0`` -> ``down_blocks.0``, ``mid`` -> ``mid_block``, ``up.1`` -> ``up_blocks.1``."""
    if not BLOCK_NAME.match(block):
        raise ConfigError(f"feature block {block!r} is not a block name: use down.<i>, mid or up.<i>")
    if block == "mid":
        return "mid_block"
    side, i = block.split(".")
    return f"{side}_blocks.{i}"


def feature_noise(seed: int, latent_shape: tuple[int, ...]) -> np.ndarray:
    """The one noise every image is noised with, (1, C, H, W) float32: a pure function of the seed."""
    rng = np.random.Generator(np.random.PCG64([int(seed), FEATURE_NOISE_STREAM]))
    return rng.standard_normal((1, *latent_shape), dtype=np.float32)


def noised(latent: np.ndarray, eps: np.ndarray, abar_t: float) -> np.ndarray:
    """sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in float32 as the graph computes it."""
    a, b = np.float32(np.sqrt(abar_t)), np.float32(np.sqrt(1.0 - abar_t))
    return (latent.astype(np.float32) * a + eps.astype(np.float32) * b).astype(np.float32)


def pool_features(activation: np.ndarray, pool: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C * p * p): the mean of each of p x p equal tiles, channel-major (torch's
    ``adaptive_avg_pool2d(x, p).flatten(1)`` when p divides H and W, the only case accepted)."""
    a = np.asarray(activation)
    if a.ndim != 4:
        raise ConfigError(f"a block activation is (B, C, H, W), got shape {a.shape}")
    b, c, h, w = a.shape
    if h % pool or w % pool:
        raise ConfigError(f"pool {pool} does not divide the block's {h} x {w} activation: choose a pool size "
                          f"that divides both (e.g. 1, or a divisor of {np.gcd(h, w)})")
    tiles = a.reshape(b, c, pool, h // pool, pool, w // pool).astype(np.float64).mean(axis=(3, 5))
    return tiles.reshape(b, c * pool * pool).astype(np.float32)
