"""``export_bundle``: everything ``dbmef-export`` does, as a library function."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError, ValidationError
from dbmef.runtime.bundle import BundleManifest, ComponentRecord, TensorInfo, sha256_file
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


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dbmef", "torch", "diffusers", "transformers", "timm", "onnx", "onnxruntime", "onnxruntime-gpu",
                "onnx-graphsurgeon", "tokenizers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _records(
    spec: Any, path: Path, precision: str, validation: dict[str, Any], source: dict[str, Any]
) -> ComponentRecord:
    data = path.with_name(path.name + ".data")
    return ComponentRecord(
        file=path.name,
        sha256=sha256_file(path),
        inputs=[TensorInfo(n, d, list(s)) for n, d, s in spec.contract.inputs],
        outputs=[TensorInfo(n, d, list(s)) for n, d, s in spec.contract.outputs],
        precision=precision,
        external_data=data.name if data.exists() else None,
        external_data_sha256=sha256_file(data) if data.exists() else None,
        source=source,
        validation=validation,
    )


def export_bundle(cfg: ExportConfig, progress: Any = None) -> Path:
    """Export a DBMEF system to a validated ONNX bundle and return its folder.

    Steps: resolve sources (offline) -> torch modules -> ONNX per component (dynamic batch,
    constant folding, shape inference, checker) -> ONNX Runtime vs torch per component ->
    decision check of the scorer -> tokenizer, class names, positive embeddings -> manifest.
    A failed validation raises ValidationError and leaves no manifest behind.
    """
    from dbmef.export.sources import offline_env

    offline_env()
    t_start = time.perf_counter()
    import torch

    from dbmef.export.onnx_tools import export_onnx, validate_component
    from dbmef.export.sources import imagenet_class_names, resolve_sd_source
    from dbmef.export.specs import CastIO, make_specs
    from dbmef.reference.loading import (
        backbone_data_config,
        load_backbone,
        load_sd,
        read_class_names,
        save_tokenizer_json,
    )
    from dbmef.reference.loading import latent_shape as latent_shape_of
    from dbmef.reference.modules import (
        BackboneModule,
        FusedScorerModule,
        TextEncoderModule,
        UNetModule,
        VaeEncoderModule,
    )
    from dbmef.runtime.schedule import NoiseSchedule

    def step(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    # -- 1. sources, all offline --------------------------------------------------------------
    step("resolving sources")
    if cfg.backbone == "tiny" and cfg.sd != "tiny":
        raise ExportError("--backbone tiny is the tiny system's classifier: use it with --sd tiny")
    # The backbone first: a missing cached classifier fails before any SD work.
    backbone_dir = None
    if cfg.backbone != "tiny":
        backbone = load_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init)
    sd_dir, sd_source = resolve_sd_source(cfg.sd, cfg.image_size, cfg.seed)
    if cfg.backbone == "tiny":
        backbone_dir = sd_dir.parent / "backbone"
        backbone = load_backbone(backbone_dir)
    sd = load_sd(sd_dir)
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # a half-rewritten bundle must not look valid

    # -- class names ------------------------------------------------------------------------
    num_classes = int(backbone.num_classes)
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
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for a backbone with {num_classes} classes "
                          f"(--class-names {cfg.class_names})")

    # -- sizes and specs --------------------------------------------------------------------
    data_cfg = backbone_data_config(backbone)
    vae_cfg = sd.vae.config
    image_size = cfg.image_size if sd_source["kind"] != "tiny" else int(sd_source["image_size"])
    latent_shape = latent_shape_of(vae_cfg, image_size)
    down = 2 ** (len(vae_cfg.block_out_channels) - 1)
    if image_size % down:
        raise ExportError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {down}")
    text_width = int(sd.text_encoder.config.hidden_size)
    specs = make_specs(image_size=image_size, backbone_size=tuple(data_cfg["input_size"][1:]),
                       text_width=text_width, latent_shape=latent_shape,
                       unet_batch=cfg.scoring.unet_batch, seed=cfg.seed)
    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    schedule = NoiseSchedule()  # SD's; _check_scheduler refuses a source trained with another
    abar = schedule.alphas_cumprod()

    # fp32 references stay in float32; the exported modules run in the bundle's precision.
    ref_modules = {
        "backbone": BackboneModule(backbone),
        "text_encoder": TextEncoderModule(sd.text_encoder),
        "vae_encoder": VaeEncoderModule(sd.vae),
    }

    def precision_of(name: str) -> str:
        return "fp32" if name in FP16_KEEP_FP32 else cfg.precision

    def exported(name: str) -> torch.nn.Module:
        if name == "scorer":
            import copy

            unet = sd.unet if dtype == torch.float32 else copy.deepcopy(sd.unet).to(dtype)
            return FusedScorerModule(unet, abar)  # noising and the error stay float32 inside
        if name == "unet":
            m: torch.nn.Module = UNetModule(sd.unet)
        else:
            m = ref_modules[name]
        if dtype == torch.float32 or precision_of(name) == "fp32":
            return m
        import copy

        return CastIO(copy.deepcopy(m), dtype)

    names = ["backbone", "text_encoder", "vae_encoder"]
    names += {"fused": ["scorer"], "unet": ["unet"], "both": ["scorer", "unet"]}[cfg.scorer]
    sources = {
        "backbone": {"id": cfg.backbone, "weights": cfg.weights, "random_init": cfg.random_init,
                     "num_classes": num_classes,
                     "weights_sha256": sha256_file(cfg.weights) if cfg.weights else None},
        "sd": {**sd_source, "unet_config_sha256": _config_hash(sd_dir / "unet" / "config.json"),
               "unet_config": {k: v for k, v in dict(sd.unet.config).items() if not k.startswith("_")},
               "unet_flops_per_evaluation": _unet_flops(sd.unet.config, latent_shape)},
    }
    records: dict[str, ComponentRecord] = {}
    timings: dict[str, float] = {}
    for name in names:
        spec = specs[name]
        step(f"exporting {name}")
        t0 = time.perf_counter()
        module = exported(name)
        path = export_onnx(module, spec, out / f"{name}.onnx", opset=cfg.opset,
                           small=precision_of(name) == "fp16", sample_batch=1 if precision_of(name) == "fp16" else 2)
        timings[f"export_{name}"] = time.perf_counter() - t0
        validation: dict[str, Any] = {"status": "skipped"}
        if cfg.validate:
            step(f"validating {name}")
            t0 = time.perf_counter()
            # fp16 graphs are compared against the fp32 torch model: what the user would otherwise run.
            ref = ref_modules.get(name) or (
                FusedScorerModule(sd.unet, abar) if name == "scorer" else UNetModule(sd.unet))
            validation = validate_component(ref, path, spec, precision_of(name))
            timings[f"validate_{name}"] = time.perf_counter() - t0
        records[name] = _records(spec, path, precision_of(name), validation,
                                 sources["backbone"] if name == "backbone" else sources["sd"])
        del module

    # -- tokenizer, positive embeddings -----------------------------------------------------
    step("tokenizer and positive embeddings")
    pad_id = save_tokenizer_json(sd.tokenizer, out / "tokenizer.json")
    from dbmef.runtime.prompts import positive_prompt
    from dbmef.runtime.tokenizer import ClipTokenizer

    tok = ClipTokenizer(out / "tokenizer.json", pad_id=pad_id)
    prompts = [positive_prompt(n, cfg.scoring.templates) for n in class_names]
    te = ref_modules["text_encoder"]
    with torch.no_grad():
        pos = np.concatenate([
            te(torch.from_numpy(tok(prompts[s : s + 64]))).float().numpy() for s in range(0, len(prompts), 64)
        ]).astype(np.float32)  # (C, 77, D)
    np.save(out / "positive_embeddings.npy", pos)

    scorer_component = "scorer" if "scorer" in records else "unet"
    manifest = BundleManifest(
        components=records,
        scorer_component=scorer_component,
        class_names=list(class_names),
        backbone_preprocess=data_cfg,
        vae={"image_size": image_size, "latent_shape": list(latent_shape),
             "scaling_factor": float(vae_cfg.scaling_factor)},
        scheduler={**schedule.to_dict(), "source_config": sd.scheduler_config},
        scoring=cfg.scoring,
        tokenizer={"file": "tokenizer.json", "sha256": sha256_file(out / "tokenizer.json"), "max_length": 77,
                   "pad_id": pad_id, "library": "tokenizers"},
        positive_embeddings={"file": "positive_embeddings.npy", "sha256": sha256_file(out / "positive_embeddings.npy"),
                             "shape": list(pos.shape), "dtype": "float32",
                             "template": cfg.scoring.templates.positive},
        protector=None,
        precision=cfg.precision,
        sources={**sources, "class_wnids": wnids},
        tools=tool_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    _check_scheduler(sd.scheduler_config)

    # -- the decision check: the exported scorer picks what torch picks ------------------------
    if cfg.validate and cfg.decision_cases > 0:
        step("decision check")
        t0 = time.perf_counter()
        decision = decision_check(out, manifest, sd, abar, cfg)
        manifest.components[scorer_component].validation["decision_check"] = decision
        timings["decision_check"] = time.perf_counter() - t0
    manifest.sources["export_seconds"] = round(time.perf_counter() - t_start, 2)
    manifest.sources["export_timings"] = {k: round(v, 3) for k, v in timings.items()}
    (out / "export_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    manifest.save(out)
    if sd_source["kind"] in ("tiny", "sd15-random-init"):
        import shutil

        # the generated source lives in a temp folder; it is rebuilt from its seed on demand
        shutil.rmtree(sd_dir.parent if sd_source["kind"] == "tiny" else sd_dir, ignore_errors=True)
    step(f"bundle written to {out}")
    return out


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


def _check_scheduler(sched: dict[str, Any]) -> None:
    """DBMEF assumes SD's scaled_linear schedule; refuse a source trained with another."""
    if not sched:
        return
    expected = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000}
    bad = {k: sched.get(k) for k, v in expected.items() if k in sched and sched[k] != v}
    if bad:
        raise ExportError(f"the SD source's scheduler_config.json has {bad}; DBMEF's scorer assumes {expected}")


def decision_check(out: Path, manifest: BundleManifest, sd: Any, abar: np.ndarray, cfg: ExportConfig) -> dict[str, Any]:
    """On random cases (latent, k candidates, conditions), the exported scorer through ONNX
    Runtime must pick the same candidate as the torch reference scorer."""
    from dbmef.reference.engines import TorchEngine
    from dbmef.reference.modules import FusedScorerModule, UNetModule
    from dbmef.runtime.engine import SCORER, UNET
    from dbmef.runtime.ort_backend import OrtEngine, OrtOptions
    from dbmef.runtime.scorer import DiffusionScorer

    comp = manifest.scorer_component
    k = min(cfg.scoring.k, len(manifest.class_names))
    latent_shape = tuple(manifest.vae["latent_shape"])
    # Each row costs two UNet evaluations on both sides. A real-size UNet (about 0.8 TFLOP per
    # evaluation at 64x64) gets a few cases on a coarse grid so the check takes minutes on a CPU;
    # the tiny system gets many.
    big = latent_shape[1] >= 32
    small = cfg.scoring.replace(k=k, n_timesteps=min(cfg.scoring.n_timesteps, 2 if big else 4),
                                votes=min(cfg.scoring.votes, 1 if big else 2),
                                # a CPU materialises attention: 64x64 latents take 0.5 GB per UNet sample
                                unet_batch=1 if big else min(cfg.scoring.unet_batch, 8))
    rng = np.random.default_rng(cfg.seed + 1)
    m = min(cfg.decision_cases, 2) if big else cfg.decision_cases
    latents = rng.standard_normal((m, *latent_shape)).astype(np.float32)
    cands = np.stack([rng.permutation(len(manifest.class_names))[:k] for _ in range(m)])
    pos_table = np.load(out / manifest.positive_embeddings["file"])
    neg = pos_table[rng.integers(0, len(pos_table), (m, k))]  # real text-encoder outputs as negatives
    ort_engine = OrtEngine(out / manifest.components[comp].file, comp, OrtOptions(device="cpu"))
    torch_engine = (TorchEngine(SCORER, FusedScorerModule(sd.unet, abar)) if comp == "scorer"
                    else TorchEngine(UNET, UNetModule(sd.unet)))
    a = DiffusionScorer(small, ort_engine, latent_shape).score(latents, cands, pos_table, neg)
    b = DiffusionScorer(small, torch_engine, latent_shape).score(latents, cands, pos_table, neg)
    agree = int((a.labels == b.labels).sum())
    rel = float(np.max(np.abs(a.errors - b.errors) / np.maximum(np.abs(b.errors), 1e-12)))
    # A random case can be a near tie; a disagreement only counts when the reference's margin
    # between its winner and runner-up exceeds the measured error difference.
    margins = np.sort(b.errors.mean(axis=1), axis=1)
    margin = margins[:, 1] - margins[:, 0]
    max_abs = float(np.max(np.abs(a.errors - b.errors)))
    real = [i for i in range(m) if a.labels[i] != b.labels[i] and margin[i] > 2 * max_abs]
    report = {"cases": m, "agree": agree, "max_rel_error_diff": rel, "max_abs_error_diff": max_abs,
              "near_ties": int(m - agree - len(real)), "config": small.to_dict()}
    if real:
        raise ValidationError(
            f"decision check failed: the exported {comp} picks a different candidate than torch in {len(real)} "
            f"of {m} random cases with clear margins (max error diff {max_abs:.3g}); the export is refused"
        )
    ort_engine.close()
    return report
