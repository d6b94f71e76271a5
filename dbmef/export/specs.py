"""One spec per exported component: the module to trace, sample inputs, dynamic axes, the
TensorRT shape profile and the validation tolerance (after TensorRT's demo/Diffusion models and
optimum's per-model configs). Export, validation and engine building all read these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dbmef.runtime.engine import BACKBONE, SCORER, TEXT_ENCODER, UNET, VAE_ENCODER, ComponentSpec

# (atol, rtol) per precision, compared as |a - b| <= atol + rtol * |b| (numpy's allclose rule).
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fp32": {"backbone": (1e-4, 1e-4), "text_encoder": (1e-4, 1e-4), "vae_encoder": (1e-4, 1e-4),
             "unet": (1e-4, 1e-4), "scorer": (1e-4, 1e-4)},
    "fp16": {"backbone": (5e-2, 5e-2), "text_encoder": (5e-2, 5e-2), "vae_encoder": (5e-2, 5e-2),
             "unet": (5e-2, 5e-2), "scorer": (2e-2, 2e-2)},
}


class CastIO(nn.Module):
    """Run ``module`` in ``dtype`` with float32 inputs and outputs, so every bundle has the same
    float32 I/O contract whatever its internal precision."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        cast = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        return self.module(*cast).float()


@dataclass
class ExportSpec:
    contract: ComponentSpec
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]]  # batch -> sample inputs
    dynamic_axes: dict[str, dict[int, str]]
    profile: dict[str, Any]  # TensorRT: min/opt/max batch or a static batch

    @property
    def name(self) -> str:
        return self.contract.name

    def tolerance(self, precision: str) -> tuple[float, float]:
        return TOLERANCES[precision][self.name]


def _batch_axes(contract: ComponentSpec) -> dict[str, dict[int, str]]:
    axes = {n: {0: "B"} for n, _, shape in contract.inputs if shape and shape[0] == "B"}
    axes.update({n: {0: "B"} for n, _, shape in contract.outputs if shape and shape[0] == "B"})
    return axes


def make_specs(
    *, image_size: int, backbone_size: tuple[int, int], text_width: int, latent_shape: tuple[int, int, int],
    unet_batch: int, seed: int = 0,
) -> dict[str, ExportSpec]:
    """Specs for the system's sizes. Sample inputs are seeded so validation is reproducible."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = latent_shape
    L = 77

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def backbone_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (randn(b, 3, *backbone_size),)

    def text_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 400, (b, L), generator=g),)

    def vae_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.rand(b, 3, image_size, image_size, generator=g) * 2 - 1,)

    def unet_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (randn(b, c, h, w), torch.randint(0, 1000, (b,), generator=g), randn(b, L, text_width))

    def scorer_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (randn(b, c, h, w), randn(b, c, h, w), torch.randint(0, 1000, (b,), generator=g),
                randn(b, L, text_width), randn(b, L, text_width), torch.tensor([1.1]))

    return {
        "backbone": ExportSpec(BACKBONE, backbone_inputs, _batch_axes(BACKBONE),
                               {"min": 1, "opt": 32, "max": 64}),
        "text_encoder": ExportSpec(TEXT_ENCODER, text_inputs, _batch_axes(TEXT_ENCODER),
                                   {"min": 1, "opt": 8, "max": 64}),
        "vae_encoder": ExportSpec(VAE_ENCODER, vae_inputs, _batch_axes(VAE_ENCODER),
                                  {"min": 1, "opt": 4, "max": 8}),
        # The scorer runs at the runtime's fixed batch: a static profile lets CUDA graphs apply.
        "scorer": ExportSpec(SCORER, scorer_inputs, _batch_axes(SCORER), {"static": unet_batch}),
        "unet": ExportSpec(UNET, unet_inputs, _batch_axes(UNET), {"static": 2 * unet_batch}),
    }
