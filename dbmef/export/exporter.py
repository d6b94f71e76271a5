"""``export_bundle``: everything ``dbmef-export`` does, as a library function."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError
from dbmef.export.config import ExportConfig, LoadedSystem
from dbmef.export.manifest import new_manifest
from dbmef.runtime.bundle import (
    Bundle,
    BundleManifest,
    ComponentRecord,
    VaeRecord,
    sha256_file,
    with_validation,
)

log = logging.getLogger(__name__)

def export_bundle(cfg: ExportConfig, progress: Any = None) -> Path:
    """Export a DBMEF system to a validated ONNX bundle and return its folder.

    Steps: resolve and load the sources (offline) -> tokenizer and positive embeddings -> ONNX per
    component (dynamic batch, constant folding, shape inference, checker) with ONNX Runtime vs
    torch validation, and the decision check of the scorer -> write the manifest.
    A failed validation raises ValidationError and leaves no manifest behind.
    """
    from dbmef.export.sources import offline_env

    def step(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    offline_env()
    with frozen_imports():
        return _export(cfg, step)


@contextlib.contextmanager
def frozen_imports() -> Iterator[None]:
    """Keep the imported libraries out of the garbage collector's way while exporting. torch,
    diffusers, transformers and onnx leave about half a million objects that live as long as the
    process; ``release_memory`` collects after every component (the freed multi-GB torch modules
    must go before the next trace), and each full collection walked all of them: 0.3 s a time, 8 s
    of a tiny system's export. Frozen, a collection walks only what the export itself allocated."""
    import gc

    import diffusers  # noqa: F401 - imported before the freeze: the objects it covers
    import onnx  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _export(cfg: ExportConfig, step: Callable[[str], None]) -> Path:
    from dbmef.export.checks import check_scheduler
    from dbmef.export.components import export_components
    from dbmef.runtime.noise_schedule import NoiseSchedule

    t_start = time.perf_counter()
    step("resolving sources")
    system = load_system(cfg)
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # a half-rewritten bundle must not look valid
    schedule = NoiseSchedule()  # SD's; check_scheduler refuses a source trained with another
    check_scheduler(system.sd.scheduler_config)
    # The text side first: the decision check's reference needs the positive embeddings before the
    # UNet is exported and its torch module dropped.
    step("tokenizer and positive embeddings")
    pad_id, pos = write_text_side(cfg, system, out)
    records, timings, decision = export_components(cfg, system, schedule.alphas_cumprod(), out, step, pos)
    manifest = make_manifest(cfg, system, records, schedule, pad_id, pos, out)
    if decision is not None:
        manifest = with_validation(manifest, manifest.scorer_component, decision_check=decision)
    manifest = manifest.replace(sources={**manifest.sources, "export_seconds": round(time.perf_counter() - t_start, 2),
                                         "export_timings": {k: round(v, 3) for k, v in timings.items()}})
    (out / "export_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    Bundle(out, manifest).save(manifest)
    if cfg.features is not None:
        from dbmef.export.feature_bundle import with_features

        step(f"features component ({cfg.features.label()}), checked against torch")
        with_features(out, cfg.features, check=lambda b: torch_feature_check(b, system.sd_dir, cfg.features))
    if system.sd_source["kind"] in ("tiny", "sd15-random-init"):
        import shutil

        # the generated source lives in a temp folder; it is rebuilt from its seed on demand
        shutil.rmtree(system.sd_dir.parent if system.sd_source["kind"] == "tiny" else system.sd_dir,
                      ignore_errors=True)
    step(f"bundle written to {out}")
    return out


def torch_feature_check(bundle: Bundle, sd_dir: Path, spec: Any) -> dict[str, Any]:
    """The bundle's features graph against torch (the diffusers modules reloaded: the export's own
    were released component by component) on seeded images: the block's output taken by a forward
    hook, pooled by ``adaptive_avg_pool2d``, the empty prompt through torch's text encoder."""
    from dbmef.export.feature_bundle import sample_images, session
    from dbmef.export.onnx_io import compare
    from dbmef.reference.features import empty_prompt_embedding, torch_block_activations, torch_pooled
    from dbmef.reference.loading import load_sd
    from dbmef.runtime.features import feature_noise
    from dbmef.runtime.tokenizer import ClipTokenizer

    m = bundle.manifest
    sd = load_sd(sd_dir)
    ids = ClipTokenizer(bundle.path(m.tokenizer.file), m.tokenizer.max_length, m.tokenizer.pad_id)([""])
    images = sample_images(m.vae.image_size, seed=1)
    abar = float(m.schedule.alphas_cumprod()[spec.timestep])
    act = torch_block_activations(sd, images, [spec.block], spec.timestep, abar,
                                  feature_noise(spec.seed, m.vae.latent_shape), empty_prompt_embedding(sd, ids))
    got = session(bundle.path("features.onnx")).run(None, {"pixel_values": images})[0]
    return {**compare("features", got, torch_pooled(act[spec.block], spec.pool), 1e-4, 1e-4), "batch": len(images)}


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
                        specs, sources, float(vae_cfg.scaling_factor))


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


def write_text_side(cfg: ExportConfig, system: LoadedSystem, out: Path) -> tuple[int | None, np.ndarray]:
    """tokenizer.json and the positive embedding of every class (C, 77, D), computed once here."""
    import torch

    from dbmef.export.components import reference_module
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
    vae = VaeRecord(system.image_size, system.latent_shape, system.vae_scaling_factor)
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
    from dbmef.reference.loading import load_backbone

    model = load_backbone(backbone, weights=weights, random_init=random_init)
    cfg = ExportConfig(backbone=backbone, class_names=class_names)
    names, _ = _class_names(cfg, int(model.num_classes), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, path, _, data_cfg = trace_backbone(model, out_dir, opset)
    names_file = out_dir / "class_names.json"
    names_file.write_text(json.dumps(names))
    return path, data_cfg, names_file


def trace_backbone(model: Any, out_dir: Path, opset: int = 17, validate: bool = True, seed: int = 0
                   ) -> tuple[Any, Path, dict[str, Any], dict[str, Any]]:
    """A loaded timm classifier traced to ``out_dir/backbone.onnx`` and, with ``validate``, checked
    against torch at two batch sizes: (its export spec, path, validation record, timm data config).
    The backbone's spec depends only on the classifier's input size; the other sizes are placeholders."""
    from dbmef.export.onnx_tools import export_onnx, validate_component
    from dbmef.export.specs import make_specs
    from dbmef.reference.loading import backbone_data_config
    from dbmef.reference.modules import BackboneModule

    data_cfg = backbone_data_config(model)
    spec = make_specs(image_size=64, backbone_size=tuple(data_cfg["input_size"][1:]), text_width=8,
                      latent_shape=(4, 8, 8), seed=seed)["backbone"]
    module = BackboneModule(model)
    path = export_onnx(module, spec, out_dir / "backbone.onnx", opset=opset)
    validation = validate_component(module, path, spec, "fp32") if validate else {"status": "skipped"}
    return spec, path, validation, data_cfg
