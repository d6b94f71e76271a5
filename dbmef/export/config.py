"""What ``dbmef-export`` is asked to do (``ExportConfig``, saved beside the bundle) and what it
loaded to do it (``LoadedSystem``): the records the exporter and the per-component export share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmef.errors import ExportError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.contracts import SCORER_KINDS
from dbmef.runtime.features import FeatureSpec

# The torch module each component is exported from (an attribute of the SD components but the backbone).
TORCH_SOURCE = {"backbone": "backbone", "text_encoder": "text_encoder", "vae_encoder": "vae", "scorer": "unet",
                "unet": "unet"}

PRECISIONS = ("fp32", "fp16")
SCORER_CHOICES = (*SCORER_KINDS, "both")  # the runtime's scorer kinds, or both graphs


@dataclass
class ExportConfig:
    """What ``dbmef-export`` was asked to do; saved beside the bundle as ``export_config.json``.

    backbone: a timm model name, a local timm folder, or ``tiny`` (the tiny system's classifier).
    sd: ``auto`` (SD v1.5 from the local HF cache), ``sd15`` (architecture, random weights),
    ``tiny``, or a local diffusers folder. scorer: ``fused`` (one error per row, the runtime's
    default), ``unet`` (plain UNet, errors on the host) or ``both``. features: also write the
    ``features`` component (diffusion features of one block at one timestep; needs the plain UNet).
    """

    backbone: str = "resnet50"
    weights: str | None = None
    random_init: bool = False
    sd: str = "auto"
    precision: str = "fp32"
    image_size: int = 512
    class_names: str | None = None
    out: str | None = None
    scorer: str = "fused"
    opset: int = 17
    validate: bool = True
    decision_cases: int = 8
    seed: int = 0
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    features: FeatureSpec | None = None

    def __post_init__(self) -> None:
        check_features(self.features, self.scorer)
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: use one of {PRECISIONS}")
        if self.scorer not in SCORER_CHOICES:
            raise ExportError(f"--scorer {self.scorer!r}: use one of {SCORER_CHOICES}")
        if self.image_size % 8 or self.image_size < 8:
            raise ExportError(f"--image-size {self.image_size}: use a multiple of 8 (512 or 256 for SD v1.5)")

    def default_out(self) -> Path:
        name = Path(self.backbone).name if Path(self.backbone).is_dir() else self.backbone
        sd = {"auto": "sd15", "sd15": "sd15-random"}.get(self.sd, Path(self.sd).name)
        return Path("engines") / f"{name}-{sd}-{self.image_size}-{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scoring"] = self.scoring.to_dict()
        return d


def check_features(features: FeatureSpec | None, scorer: str) -> None:
    if features is not None and scorer == "fused":
        raise ExportError("--features cuts the plain UNet graph, which --scorer fused does not write: "
                          "add --scorer both (or unet)")


@dataclass
class LoadedSystem:
    """Everything export needs from the sources, loaded once: the torch modules, the class names and
    the sizes and component specs they imply."""

    backbone: Any  # None: a zero-shot bundle (--backbone none)
    sd: Any
    sd_dir: Path
    sd_source: dict[str, Any]
    class_names: list[str]
    wnids: list[str] | None
    data_cfg: dict[str, Any] | None
    image_size: int
    latent_shape: tuple[int, int, int]
    specs: dict[str, Any]
    sources: dict[str, Any]
    vae_scaling_factor: float

    def release(self, component: str, later: list[str]) -> None:
        """Drop the torch module ``component`` is exported from unless a component in ``later`` is
        exported from it too: SD v1.5's float32 UNet (3.2 GiB) must not sit beside the exporter's
        and ONNX Runtime's peaks. Past ``export_components`` the torch modules are gone."""
        if any(TORCH_SOURCE[c] == TORCH_SOURCE[component] for c in later):
            return
        if component == "backbone":
            self.backbone = None
        else:
            setattr(self.sd, TORCH_SOURCE[component], None)
