"""One spec per exported component: its I/O contract, sample inputs and dynamic axes (after
TensorRT's demo/Diffusion models and optimum's per-model configs). Export and validation read
these; TensorRT shape profiles come from the bundle's manifest (``dbmef.runtime.backends.trt_engines``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dbmef.runtime.contracts import BACKBONE, SCORER, TEXT_ENCODER, UNET, VAE_ENCODER, ComponentSpec

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
    # Inputs at a reduced spatial size with the spatial axes marked dynamic: tracing an fp16
    # module runs one forward pass in half precision, which on a CPU has no fast kernels (the SD
    # VAE at 512 px takes tens of minutes); the graph is the same at any size and is validated at
    # the real one.
    small_inputs: Callable[[int], tuple[torch.Tensor, ...]] | None = None
    spatial_axes: dict[str, dict[int, str]] | None = None

    @property
    def name(self) -> str:
        return self.contract.name

    def tolerance(self, precision: str) -> tuple[float, float]:
        return TOLERANCES[precision][self.name]


def _batch_axes(contract: ComponentSpec) -> dict[str, dict[int, str]]:
    """The contract's batch axes ("B" first) as torch.onnx.export's dynamic_axes."""
    return {t.name: {0: "B"} for t in (*contract.inputs, *contract.outputs) if t.shape and t.shape[0] == "B"}


def make_specs(
    *, image_size: int, backbone_size: tuple[int, int], text_width: int, latent_shape: tuple[int, int, int],
    seed: int = 0,
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

    def vae_inputs(b: int, size: int = image_size) -> tuple[torch.Tensor, ...]:
        return (torch.rand(b, 3, size, size, generator=g) * 2 - 1,)

    def unet_inputs(b: int, hh: int = h, ww: int = w) -> tuple[torch.Tensor, ...]:
        return (randn(b, c, hh, ww), torch.randint(0, 1000, (b,), generator=g), randn(b, L, text_width))

    def scorer_inputs(b: int, hh: int = h, ww: int = w) -> tuple[torch.Tensor, ...]:
        return (randn(b, c, hh, ww), randn(b, c, hh, ww), torch.randint(0, 1000, (b,), generator=g),
                randn(b, L, text_width), randn(b, L, text_width), torch.tensor([1.1]))

    small = min(h, 16)  # a latent the UNet's three downsamplings still divide

    return {
        "backbone": ExportSpec(BACKBONE, backbone_inputs, _batch_axes(BACKBONE)),
        "text_encoder": ExportSpec(TEXT_ENCODER, text_inputs, _batch_axes(TEXT_ENCODER)),
        "vae_encoder": ExportSpec(VAE_ENCODER, vae_inputs, _batch_axes(VAE_ENCODER),
                                  small_inputs=lambda b: vae_inputs(b, small * 8),
                                  spatial_axes={"image": {2: "H", 3: "W"}, "latent": {2: "h", 3: "w"}}),
        "scorer": ExportSpec(SCORER, scorer_inputs, _batch_axes(SCORER),
                             small_inputs=lambda b: scorer_inputs(b, small, small),
                             spatial_axes={"x0": {2: "h", 3: "w"}, "eps": {2: "h", 3: "w"}}),
        "unet": ExportSpec(UNET, unet_inputs, _batch_axes(UNET),
                           small_inputs=lambda b: unet_inputs(b, small, small),
                           spatial_axes={"sample": {2: "h", 3: "w"}, "noise_pred": {2: "h", 3: "w"}}),
    }
