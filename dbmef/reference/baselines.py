"""Counting what the benchmarks compare: the analytic FLOPs of one UNet evaluation (rooflines).

The baselines themselves: ``paper_scripts`` (the official scripts' structure, over torch or a
bundle's engines) is ``dbmef.reference.paper_scripts``; ``torch_batched`` (torch eager behind
dbmef's own pipeline) is ``dbmef.reference.engines.reference_pipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def unet_flops_per_evaluation(unet_config: dict[str, Any], latent_hw: tuple[int, int], text_len: int = 77) -> float:
    """Analytic FLOPs of one UNet evaluation (one sample, one condition): the UNet is built on
    torch's meta device (no weights, no compute) and run under FlopCounterMode, which counts the
    multiply-adds of every convolution and matmul from their shapes (2 FLOPs each)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**cfg)
        x = torch.empty(1, int(cfg.get("in_channels", 4)), *latent_hw)
        t = torch.zeros(1, dtype=torch.long)
        e = torch.empty(1, text_len, int(cfg["cross_attention_dim"]))
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, encoder_hidden_states=e)
    return float(counter.get_total_flops())


def read_unet_config(system: str | Path) -> dict[str, Any]:
    return json.loads((Path(system) / "sd" / "unet" / "config.json").read_text())
