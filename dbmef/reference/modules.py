"""nn.Module wrappers with the component contracts of ``dbmef.runtime.engine``.

Each wrapper takes and returns plain tensors with the contract's names and order, so the same
module serves the torch engine, ONNX export and validation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class BackboneModule(nn.Module):
    """timm classifier: pixel_values (B,3,H,W) -> logits (B,C)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


class TextEncoderModule(nn.Module):
    """CLIP text model: input_ids (B,77) -> last_hidden_state (B,77,D) (after the final layer norm,
    as Stable Diffusion conditions on it)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=True).last_hidden_state


class VaeEncoderModule(nn.Module):
    """AutoencoderKL encoder: image (B,3,H,W) in [-1,1] -> latent_dist.mean * scaling_factor
    (B,4,H/8,W/8). The mean, not a sample: the latent is deterministic."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * self.scaling_factor


class UNetModule(nn.Module):
    """UNet2DConditionModel with a per-row timestep: (sample, timestep[B], encoder_hidden_states)
    -> noise_pred."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class FusedScorerModule(nn.Module):
    """One DBMEF error per row (docs/design.md §1.5-1.7), in one graph.

    x0, eps: (B,4,h,w); timestep: (B,) int64; emb_pos, emb_neg: (B,L,D); lam: (1,).
    x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps; both conditions run as one 2B UNet batch;
    eps_hat = neg + lam (pos - neg); error = mean over (4,h,w) of (eps - eps_hat)^2 -> (B,).
    The noising and the error are computed in float32 whatever the UNet's precision.
    """

    def __init__(self, unet: nn.Module, abar: np.ndarray):
        super().__init__()
        self.unet = unet
        # Square roots in float64 then cast: the same tables as the runtime's host-side kernel.
        self.register_buffer("sqrt_abar", torch.from_numpy(np.sqrt(abar).astype(np.float32)), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_abar", torch.from_numpy(np.sqrt(1.0 - abar).astype(np.float32)), persistent=False
        )

    def forward(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        timestep: torch.Tensor,
        emb_pos: torch.Tensor,
        emb_neg: torch.Tensor,
        lam: torch.Tensor,
    ) -> torch.Tensor:
        sqrt_abar: torch.Tensor = self.sqrt_abar  # type: ignore[assignment]
        sqrt_1m: torch.Tensor = self.sqrt_one_minus_abar  # type: ignore[assignment]
        a = sqrt_abar[timestep].view(-1, 1, 1, 1)  # (B,1,1,1)
        s = sqrt_1m[timestep].view(-1, 1, 1, 1)
        x_t = a * x0.float() + s * eps.float()  # (B,4,h,w) float32
        dtype = next(self.unet.parameters()).dtype
        pred = self.unet(
            torch.cat([x_t, x_t]).to(dtype),  # (2B,4,h,w)
            torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([emb_pos, emb_neg]).to(dtype),
            return_dict=False,
        )[0].float()
        pos, neg = pred.chunk(2)  # (B,4,h,w) each
        eps_hat = neg + lam.float() * (pos - neg)
        return ((eps.float() - eps_hat) ** 2).mean(dim=(1, 2, 3))  # (B,)


def component_module(name: str, backbone: nn.Module, sd: Any, abar: np.ndarray) -> nn.Module:
    """The float32 module of component ``name`` for a loaded system (``backbone``: the timm model,
    ``sd``: the diffusers components, ``abar``: the schedule's cumulative alphas). The one place
    modules are assembled: export traces these, validation and the torch reference run them."""
    makers = {"backbone": lambda: BackboneModule(backbone),
              "text_encoder": lambda: TextEncoderModule(sd.text_encoder),
              "vae_encoder": lambda: VaeEncoderModule(sd.vae),
              "scorer": lambda: FusedScorerModule(sd.unet, abar), "unet": lambda: UNetModule(sd.unet)}
    if name not in makers:
        raise KeyError(f"no module for component {name!r}; components: {list(makers)}")
    return makers[name]()

