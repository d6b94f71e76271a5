"""Diffusion features computed by torch from the diffusers modules: the reference the ``features``
graph is checked against. The block's output is taken with a forward hook on the module itself
(not by name matching in a graph), the pooling with torch's own ``adaptive_avg_pool2d``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dbmef.runtime.features import block_module


def empty_prompt_embedding(sd: Any, ids: np.ndarray) -> np.ndarray:
    """The text encoder's last hidden state for the empty prompt's token ids (1, L) -> (1, L, D)."""
    import torch

    with torch.no_grad():
        return sd.text_encoder(torch.from_numpy(ids))[0].float().numpy()


def torch_block_activations(sd: Any, pixel_values: np.ndarray, blocks: Sequence[str], timestep: int, abar_t: float,
                            eps: np.ndarray, embedding: np.ndarray) -> dict[str, np.ndarray]:
    """Each block's output (B, C, H, W) for images in [-1, 1]: VAE mean latent * scaling, noised to
    ``timestep`` with ``eps``, the UNet run with the ``embedding`` condition."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
    got: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def grab(_module: Any, _inputs: Any, output: Any) -> None:
            got[name] = output[0] if isinstance(output, tuple) else output  # a down block returns (h, residuals)
        return grab

    handles = [sd.unet.get_submodule(block_module(b)).register_forward_hook(hook(b)) for b in blocks]
    try:
        with torch.no_grad():
            latent = sd.vae.encode(x).latent_dist.mean * float(sd.vae.config.scaling_factor)
            xt = latent * float(np.sqrt(abar_t)) + torch.from_numpy(eps) * float(np.sqrt(1.0 - abar_t))
            b = x.shape[0]
            sd.unet(xt, torch.full((b,), timestep, dtype=torch.int64),
                    encoder_hidden_states=torch.from_numpy(embedding).expand(b, -1, -1), return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return {b: got[b].float().numpy() for b in blocks}


def torch_pooled(activation: np.ndarray, pool: int) -> np.ndarray:
    """torch's adaptive average pool to pool x pool, flattened: (B, C p p)."""
    import torch

    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(activation), pool).flatten(1).numpy()
