"""``export_bundle``: everything ``dbmef-export`` does, as a library function."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError
from dbmef.export.manifest import component_record, new_manifest
from dbmef.runtime.bundle import (
    Bundle,
    BundleManifest,
    ComponentRecord,
    VaeRecord,
    sha256_file,
    with_validation,
)
from dbmef.runtime.config import ScoringConfig

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Components kept in float32 inside an fp16 bundle. The CLIP text encoder: it runs k prompts per
# rethought image (about 13 GFLOP each, nothing beside the UNet's 1500 evaluations), and its fp16
# trace mixes float32 attention-mask arithmetic into fp16 LayerNorms, which ONNX Runtime rejects.
FP16_KEEP_FP32 = frozenset({"text_encoder"})
SCORER_KINDS = ("fused", "unet", "both")


@dataclass
class ExportConfig:
    """What ``dbmef-export`` was asked to do; saved beside the bundle as ``export_config.json``.

    backbone: a timm model name, a local timm folder, or ``tiny`` (the tiny system's classifier).
    sd: ``auto`` (SD v1.5 from the local HF cache), ``sd15`` (architecture, random weights),
    ``tiny``, or a local diffusers folder. scorer: ``fused`` (one error per row, the runtime's
    default), ``unet`` (plain UNet, errors on the host) or ``both``.
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

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: use one of {PRECISIONS}")
        if self.scorer not in SCORER_KINDS:
            raise ExportError(f"--scorer {self.scorer!r}: use one of {SCORER_KINDS}")
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


def export_bundle(cfg: ExportConfig, progress: Any = None) -> Path:
    """Export a DBMEF system to a validated ONNX bundle and return its folder.

    Steps: resolve and load the sources (offline) -> ONNX per component (dynamic batch, constant
    folding, shape inference, checker) with ONNX Runtime vs torch validation -> tokenizer and
    positive embeddings -> manifest -> decision check of the scorer -> write the manifest.
    A failed validation raises ValidationError and leaves no manifest behind.
    """
    from dbmef.export.checks import check_scheduler, decision_check
    from dbmef.export.onnx_io import release_memory
    from dbmef.export.sources import offline_env
    from dbmef.runtime.schedule import NoiseSchedule

    def step(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    offline_env()
    t_start = time.perf_counter()
    step("resolving sources")
    system = load_system(cfg)
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # a half-rewritten bundle must not look valid
    schedule = NoiseSchedule()  # SD's; check_scheduler refuses a source trained with another
    records, timings = export_components(cfg, system, schedule.alphas_cumprod(), out, step)
    step("tokenizer and positive embeddings")
    pad_id, pos = write_text_side(cfg, system, out)
    manifest = make_manifest(cfg, system, records, schedule, pad_id, pos, out)
    check_scheduler(system.sd.scheduler_config)
    release_memory()
    if cfg.validate and cfg.decision_cases > 0:
        step("decision check")
        t0 = time.perf_counter()
        decision = decision_check(out, manifest, system.sd, schedule.alphas_cumprod(), cfg)
        manifest = with_validation(manifest, manifest.scorer_component, decision_check=decision)
        timings["decision_check"] = time.perf_counter() - t0
    manifest = manifest.replace(sources={**manifest.sources, "export_seconds": round(time.perf_counter() - t_start, 2),
                                         "export_timings": {k: round(v, 3) for k, v in timings.items()}})
    (out / "export_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    Bundle(out, manifest).save(manifest)
    if system.sd_source["kind"] in ("tiny", "sd15-random-init"):
        import shutil

        # the generated source lives in a temp folder; it is rebuilt from its seed on demand
        shutil.rmtree(system.sd_dir.parent if system.sd_source["kind"] == "tiny" else system.sd_dir,
                      ignore_errors=True)
    step(f"bundle written to {out}")
    return out


def load_system(cfg: ExportConfig) -> LoadedSystem:
    """Resolve the sources (offline), load the torch modules once, and derive names, sizes and specs."""
    from dbmef.export.sources import resolve_sd_source
    from dbmef.export.specs import make_specs
    from dbmef.reference.loading import backbone_data_config, load_backbone, load_sd
    from dbmef.reference.loading import latent_shape as latent_shape_of

    if cfg.backbone == "tiny" and cfg.sd != "tiny":
        raise ExportError("--backbone tiny is the tiny system's classifier: use it with --sd tiny")
    no_backbone = cfg.backbone == "none"  # a zero-shot bundle: the diffusion side alone
    if no_backbone and not cfg.class_names:
        raise ExportError("--backbone none (a zero-shot bundle) needs --class-names: with no classifier, nothing "
                          "else names the classes")
    # The backbone first: a missing cached classifier fails before any SD work.
    backbone_dir = None
    backbone: Any = None
    if cfg.backbone not in ("tiny", "none"):
        backbone = load_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init)
    sd_dir, sd_source = resolve_sd_source(cfg.sd, cfg.image_size, cfg.seed)
    if cfg.backbone == "tiny":
        backbone_dir = sd_dir.parent / "backbone"
        backbone = load_backbone(backbone_dir)
    sd = load_sd(sd_dir)
    if no_backbone:
        class_names, wnids = _class_names(cfg, None, None)
        data_cfg = None
    else:
        class_names, wnids = _class_names(cfg, int(backbone.num_classes), backbone_dir)
        data_cfg = backbone_data_config(backbone)
    vae_cfg = sd.vae.config
    image_size = cfg.image_size if sd_source["kind"] != "tiny" else int(sd_source["image_size"])
    latent_shape = latent_shape_of(vae_cfg, image_size)
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    if image_size % down:
        raise ExportError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {down}")
    specs = make_specs(image_size=image_size,
                       backbone_size=tuple(data_cfg["input_size"][1:]) if data_cfg else (image_size, image_size),
                       text_width=int(sd.text_encoder.config.hidden_size), latent_shape=latent_shape,
                       seed=cfg.seed)
    sources = {
        "backbone": None if no_backbone else {
            "id": cfg.backbone, "weights": cfg.weights, "random_init": cfg.random_init,
            "num_classes": int(backbone.num_classes),
            "weights_sha256": sha256_file(cfg.weights) if cfg.weights else None},
        "sd": {**sd_source, "unet_config_sha256": _config_hash(sd_dir / "unet" / "config.json"),
               "unet_config": {k: v for k, v in dict(sd.unet.config).items() if not k.startswith("_")},
               "unet_flops_per_evaluation": _unet_flops(sd.unet.config, latent_shape)},
    }
    return LoadedSystem(backbone, sd, sd_dir, sd_source, class_names, wnids, data_cfg, image_size, latent_shape,
                        specs, sources)


def _class_names(cfg: ExportConfig, num_classes: int | None, backbone_dir: Path | None
                 ) -> tuple[list[str], list[str] | None]:
    from dbmef.export.sources import imagenet_class_names
    from dbmef.reference.loading import read_class_names

    wnids: list[str] | None = None
    if cfg.class_names:
        class_names = read_class_names(cfg.class_names)
    elif backbone_dir is not None:
        class_names = read_class_names(backbone_dir.parent / "class_names.json")
    elif num_classes == 1000:
        class_names, wnids = imagenet_class_names()
    else:
        raise ExportError(
            f"backbone '{cfg.backbone}' has {num_classes} classes and no class names are known; "
            "pass --class-names FILE (JSON list or one name per line, in the classifier's class order)"
        )
    if num_classes is not None and len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for a backbone with {num_classes} classes "
                          f"(--class-names {cfg.class_names})")
    return list(class_names), wnids


def reference_module(name: str, system: LoadedSystem, abar: np.ndarray) -> Any:
    """The float32 torch module a component is exported from and validated against."""
    from dbmef.reference.modules import component_module

    return component_module(name, system.backbone, system.sd, abar)


def exported_module(name: str, cfg: ExportConfig, system: LoadedSystem, abar: np.ndarray, reference: Any) -> Any:
    """The module traced for component ``name`` in the bundle's precision (fp16 keeps float32 I/O)."""
    import torch

    from dbmef.export.specs import CastIO
    from dbmef.reference.modules import FusedScorerModule

    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    if name == "scorer":
        unet = system.sd.unet if dtype == torch.float32 else cast_copy(system.sd.unet, dtype)
        return FusedScorerModule(unet, abar)  # noising and the error stay float32 inside
    if dtype == torch.float32 or _precision_of(name, cfg) == "fp32":
        return reference
    return CastIO(cast_copy(reference, dtype), dtype)


def cast_copy(module: Any, dtype: Any) -> Any:
    """A copy of ``module`` with its floating-point tensors in ``dtype``, made without a float32
    copy on the way (``deepcopy(m).to(dtype)`` holds a second float32 model for a moment: 3.2 GiB
    for SD v1.5's UNet): deepcopy's memo hands it the converted tensors."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and id(t) not in memo:
            c = t.detach().to(dtype)
            is_param = isinstance(t, torch.nn.Parameter)
            memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if is_param else c
    return copy.deepcopy(module, memo)


def _precision_of(name: str, cfg: ExportConfig) -> str:
    return "fp32" if name in FP16_KEEP_FP32 else cfg.precision


def export_components(cfg: ExportConfig, system: LoadedSystem, abar: np.ndarray, out: Path,
                      step: Any) -> tuple[dict[str, ComponentRecord], dict[str, float]]:
    """Export and validate every component; returns their manifest records and the seconds taken."""
    from dbmef.export.onnx_tools import finish_onnx, release_memory, trace_onnx, validate_component

    names = (["backbone"] if system.backbone is not None else []) + ["text_encoder", "vae_encoder"]
    names += {"fused": ["scorer"], "unet": ["unet"], "both": ["scorer", "unet"]}[cfg.scorer]
    records: dict[str, ComponentRecord] = {}
    timings: dict[str, float] = {}
    for name in names:
        spec, precision = system.specs[name], _precision_of(name, cfg)
        step(f"exporting {name}")
        t0 = time.perf_counter()
        # fp32 references stay in float32; the exported modules run in the bundle's precision.
        ref = reference_module(name, system, abar)
        with tempfile.TemporaryDirectory(prefix=f"dbmef-{name}-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            module = exported_module(name, cfg, system, abar, ref)
            trace_onnx(module, spec, raw, opset=cfg.opset, small=precision == "fp16",
                       sample_batch=1 if precision == "fp16" else 2)
            del module  # an fp16 copy (SD v1.5's UNet: 1.7 GB) is not needed past tracing
            release_memory()
            path = finish_onnx(raw, out / f"{name}.onnx")
        release_memory()
        timings[f"export_{name}"] = time.perf_counter() - t0
        validation: dict[str, Any] = {"status": "skipped"}
        if cfg.validate:
            step(f"validating {name}")
            t0 = time.perf_counter()
            # fp16 graphs are compared against the fp32 torch model: what the user would otherwise run.
            # They have dynamic spatial axes, so the second batch size is checked at the small size:
            # SD v1.5's fp16 scorer at batch 2 and 64 x 64 took 8 GiB on ONNX Runtime's CPU provider.
            sizes = {"batches": (1,), "small_batches": (2,)} if precision == "fp16" else {}
            validation = validate_component(ref, path, spec, precision, **sizes)
            timings[f"validate_{name}"] = time.perf_counter() - t0
        records[name] = component_record(spec.contract, path, precision, validation,
                                 system.sources["backbone" if name == "backbone" else "sd"])
    return records, timings


def write_text_side(cfg: ExportConfig, system: LoadedSystem, out: Path) -> tuple[int | None, np.ndarray]:
    """tokenizer.json and the positive embedding of every class (C, 77, D), computed once here."""
    import torch

    from dbmef.reference.loading import save_tokenizer_json
    from dbmef.runtime.method import positive_prompt
    from dbmef.runtime.tokenizer import ClipTokenizer

    pad_id = save_tokenizer_json(system.sd.tokenizer, out / "tokenizer.json")
    tok = ClipTokenizer(out / "tokenizer.json", pad_id=pad_id)
    prompts = [positive_prompt(n, cfg.scoring.templates) for n in system.class_names]
    te = reference_module("text_encoder", system, np.empty(0))
    with torch.no_grad():
        pos = np.concatenate([
            te(torch.from_numpy(tok(prompts[s : s + 64]))).float().numpy() for s in range(0, len(prompts), 64)
        ]).astype(np.float32)  # (C, 77, D)
    np.save(out / "positive_embeddings.npy", pos)
    return pad_id, pos


def make_manifest(cfg: ExportConfig, system: LoadedSystem, records: dict[str, ComponentRecord], schedule: Any,
                  pad_id: int | None, pos: np.ndarray, out: Path) -> BundleManifest:
    vae = VaeRecord(system.image_size, system.latent_shape, float(system.sd.vae.config.scaling_factor))
    return new_manifest(out, records, system.class_names, system.data_cfg, vae, schedule, system.sd.scheduler_config,
                        cfg.scoring, pad_id, pos, cfg.precision, {**system.sources, "class_wnids": system.wnids})


def _unet_flops(unet_config: Any, latent_shape: tuple[int, int, int]) -> float | None:
    """Analytic FLOPs of one UNet evaluation at the bundle's latent size (for rooflines)."""
    try:
        from dbmef.reference.baselines import unet_flops_per_evaluation

        return unet_flops_per_evaluation(dict(unet_config), latent_shape[1:])
    except Exception as exc:  # a counting failure must not fail the export
        log.warning("could not count UNet FLOPs: %s", exc)
        return None


def _config_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def export_backbone_only(backbone: str, weights: str | None, random_init: bool, class_names: str | None,
                         out_dir: Path, opset: int = 17) -> tuple[Path, dict[str, Any], Path]:
    """A timm classifier exported and validated alone (the torch half of ``--sd ONNX_FOLDER`` with a
    timm ``--backbone``): its ONNX file, its data config and a class-names file."""
    from dbmef.export.onnx_tools import export_onnx, validate_component
    from dbmef.export.specs import make_specs
    from dbmef.reference.loading import backbone_data_config, load_backbone
    from dbmef.reference.modules import BackboneModule

    model = load_backbone(backbone, weights=weights, random_init=random_init)
    cfg = ExportConfig(backbone=backbone, class_names=class_names)
    names, _ = _class_names(cfg, int(model.num_classes), None)
    data_cfg = backbone_data_config(model)
    spec = make_specs(image_size=64, backbone_size=tuple(data_cfg["input_size"][1:]), text_width=8,
                      latent_shape=(4, 8, 8))["backbone"]
    out_dir.mkdir(parents=True, exist_ok=True)
    module = BackboneModule(model)
    path = export_onnx(module, spec, out_dir / "backbone.onnx", opset=opset)
    validate_component(module, path, spec, "fp32")
    names_file = out_dir / "class_names.json"
    names_file.write_text(json.dumps(names))
    return path, data_cfg, names_file
