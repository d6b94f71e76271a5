"""Torch engines: the reference backend of the Engine interface."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.contracts import BACKBONE, SCORER, TEXT_ENCODER, UNET, VAE_ENCODER, ComponentSpec
from dbmef.runtime.engine import Engine
from dbmef.runtime.noise_schedule import NoiseSchedule


class TorchEngine(Engine):
    """Runs an nn.Module whose forward takes the spec's inputs in order and returns its output."""

    def __init__(self, spec: ComponentSpec, module: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.name = spec.name
        self.input_names = spec.input_names
        self.output_names = spec.output_names
        self.module = module.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.calls = 0

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.device}"]

    @torch.inference_mode()
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        out = self.module(*(self._tensor(feeds[n]) for n in self.input_names))
        return {self.output_names[0]: out.float().cpu().numpy()}


def torch_engines(system: str | Path, fused: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Load a system folder (see ``loading``) and wrap each network in a TorchEngine.

    Returns a dict with the engines and what a pipeline needs: ``engines`` (PipelineEngines),
    ``tokenizer_json`` (path), ``class_names``, ``data_config``, ``vae_image_size``,
    ``latent_shape`` and the raw ``sd`` components.
    """
    import tempfile

    from dbmef.reference.loading import (
        backbone_data_config,
        latent_shape,
        load_backbone,
        load_sd,
        read_class_names,
        save_tokenizer_json,
    )
    from dbmef.reference.modules import component_module
    from dbmef.runtime.pipeline import PipelineEngines

    root = Path(system)
    sd = load_sd(root / "sd")
    backbone = load_backbone(root / "backbone")
    abar = NoiseSchedule().alphas_cumprod()  # the system's scheduler is SD's (checked at export)

    def engine(spec: ComponentSpec) -> TorchEngine:
        return TorchEngine(spec, component_module(spec.name, backbone, sd, abar), device)

    engines = PipelineEngines(backbone=engine(BACKBONE), text_encoder=engine(TEXT_ENCODER),
                              vae_encoder=engine(VAE_ENCODER), scorer=engine(SCORER if fused else UNET))
    tok_dir = Path(tempfile.mkdtemp(prefix="dbmef-tok-"))
    save_tokenizer_json(sd.tokenizer, tok_dir / "tokenizer.json")
    image_size = int(sd.vae.config.sample_size)
    return {
        "engines": engines,
        "tokenizer_json": tok_dir / "tokenizer.json",
        "class_names": read_class_names(root / "class_names.json"),
        "data_config": backbone_data_config(backbone),
        "vae_image_size": image_size,
        "latent_shape": latent_shape(sd.vae.config, image_size),
        "sd": sd,
        "backbone": backbone,
    }


def reference_pipeline(system: str | Path, config: ScoringConfig, protector: Any = None, fused: bool = True,
                       device: str = "cpu") -> Any:
    """A DBMEFPipeline over torch engines for a system folder: the parity reference."""
    from dbmef.runtime.pipeline import DBMEFPipeline
    from dbmef.runtime.preprocess import BackbonePreprocess
    from dbmef.runtime.protector import Protector
    from dbmef.runtime.tokenizer import ClipTokenizer

    parts = torch_engines(system, fused=fused, device=device)
    return DBMEFPipeline(
        engines=parts["engines"],
        tokenizer=ClipTokenizer(parts["tokenizer_json"]),
        class_names=parts["class_names"],
        config=config,
        protector=protector if protector is not None else Protector(0.5, 0.95, None),
        backbone_preprocess=BackbonePreprocess.from_data_config(parts["data_config"]),
        vae_image_size=parts["vae_image_size"],
        latent_shape=parts["latent_shape"],
    )
