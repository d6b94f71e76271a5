"""The digits DBMEF system end to end: its networks trained (``digits_train``), exported with
``dbmef-export``'s code path and calibrated; the bundles ``dbmef demo`` and the tests use are its output."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DIGIT_NAMES, IMAGE_SIZE, DigitsSplit, render
from dbmef.apps.digits_train import (
    TrainConfig,
    accuracy,
    backbone_inputs,
    build_tokenizer,
    encode_latents,
    make_splits,
    train_classifier,
    train_unet,
    train_vae,
    vae_inputs,
)

log = logging.getLogger(__name__)


def train_system(cfg: TrainConfig) -> dict[str, Any]:
    """Train both classifiers and the diffusion side, save them as timm/diffusers folders under
    ``cfg.out``/system, export and calibrate both bundles: the training report (also saved)."""
    from dbmef.reference.loading import quiet_hf_logging

    quiet_hf_logging()
    out = Path(cfg.out)
    system = out / "system"
    if cfg.export_only:
        _, calib, _ = make_splits()
        saved = out / "train_report.json"
        for name in ("weak", "strong"):
            export_and_calibrate(cfg, system, name, out / f"bundle-{name}", calib)
        return json.loads(saved.read_text()) if saved.is_file() else {}
    (system / "sd").mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    clf, calib, test = make_splits()
    for name, s in (("train", clf), ("calibration", calib), ("test", test)):
        s.save(out / f"{name}_split.npz")
    report: dict[str, Any] = {"seed": cfg.seed, "n_train": len(clf.labels), "n_calibration": len(calib.labels),
                              "n_test": len(test.labels), "seconds": {}}
    train_classifiers(cfg, clf, test, system, report)
    if cfg.diffusion_from:
        report["diffusion_from"] = cfg.diffusion_from
    else:  # the diffusion side trains on the whole training split (classifier part + calibration part)
        train_diffusion(cfg, DigitsSplit(np.concatenate([clf.images, calib.images]),
                                         np.concatenate([clf.labels, calib.labels]),
                                         np.concatenate([clf.indices, calib.indices])), system, report)
    secs = report["seconds"]
    if cfg.export:
        for name in ("weak", "strong"):
            t0 = time.perf_counter()
            export_and_calibrate(cfg, system, name, out / f"bundle-{name}", calib)
            secs[f"export_{name}"] = time.perf_counter() - t0
    secs["total"] = sum(secs.values())
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def train_classifiers(cfg: TrainConfig, clf: DigitsSplit, test: DigitsSplit, system: Path,
                      report: dict[str, Any]) -> None:
    """The weak and the strong backbone, saved as timm folders; their accuracies into ``report``."""
    from timm.models import save_for_hf

    t0 = time.perf_counter()
    xb_clf, xb_test = backbone_inputs(clf), backbone_inputs(test)
    # The weak backbone sees a small stratified part of the training split, briefly.
    rng = np.random.default_rng(cfg.seed)
    per_class = max(1, cfg.weak_train_images // len(DIGIT_NAMES))
    weak_ix = np.concatenate([rng.permutation(np.flatnonzero(clf.labels == c))[:per_class]
                              for c in range(len(DIGIT_NAMES))])
    weak = train_classifier(cfg.weak_model, xb_clf[weak_ix], clf.labels[weak_ix], cfg.weak_epochs, cfg.seed, 0)
    strong = train_classifier(cfg.strong_model, xb_clf, clf.labels, cfg.strong_epochs, cfg.seed, cfg.max_shift)
    report["seconds"]["classifiers"] = time.perf_counter() - t0
    report["torch_test_accuracy"] = {"weak": accuracy(weak, xb_test, test.labels),
                                     "strong": accuracy(strong, xb_test, test.labels)}
    log.info("classifiers: %s", report["torch_test_accuracy"])
    for name, model in (("weak", weak), ("strong", strong)):
        save_for_hf(model, str(system / f"backbone_{name}"))



def train_diffusion(cfg: TrainConfig, train_all: DigitsSplit, system: Path, report: dict[str, Any]) -> None:
    """The VAE, the tokenizer, the UNet and the text encoder, saved as a diffusers folder."""
    from diffusers import DDPMScheduler

    from dbmef.reference.tiny import write_model_index

    sd, secs = system / "sd", report["seconds"]
    xv = vae_inputs(train_all)
    t0 = time.perf_counter()
    vae, scaling = train_vae(xv, cfg)
    secs["vae"] = time.perf_counter() - t0
    report["vae_scaling_factor"] = scaling
    vae.save_pretrained(sd / "vae")
    tokenizer = build_tokenizer(sd)
    latents = encode_latents(vae, xv, cfg.augment_copies, cfg.max_shift, cfg.seed)
    t0 = time.perf_counter()
    unet, text = train_unet(latents, train_all.labels, tokenizer, cfg)
    secs["unet"] = time.perf_counter() - t0
    unet.save_pretrained(sd / "unet")
    text.save_pretrained(sd / "text_encoder")
    sched: Any = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear")
    sched.save_pretrained(sd / "scheduler")
    write_model_index(sd)
    (system / "class_names.json").write_text(json.dumps(DIGIT_NAMES, indent=1))


def export_and_calibrate(cfg: TrainConfig, system: Path, backbone: str, bundle: Path, calib: DigitsSplit) -> Path:
    """``dbmef-export``'s library path with the digits defaults, then the protector calibrated on
    the calibration split, as ``dbmef calibrate`` does."""
    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.export.from_bundle import export_with_bundle_diffusion
    from dbmef.runtime.config import ScoringConfig
    from dbmef.runtime.evaluate import calibrate, write_protector
    from dbmef.runtime.system import DBMEFRuntime

    scoring = ScoringConfig(k=cfg.k, n_timesteps=cfg.n_timesteps, votes=cfg.votes, lam=cfg.lam, unet_batch=64)
    # scorer "both": the fused graph serves; the plain UNet graph lets the Table 1 ablations get
    # every lam and the negative-only error from one pass (DiffusionScorer.score_terms).
    export = ExportConfig(backbone=str(system / f"backbone_{backbone}"), sd=cfg.diffusion_from or str(system / "sd"),
                          image_size=IMAGE_SIZE, out=str(bundle), scoring=scoring, seed=cfg.seed, scorer="both",
                          class_names=None if cfg.diffusion_from else str(system / "class_names.json"))
    if cfg.diffusion_from:  # the bundle's graphs and scoring as they are (the committed one has both graphs)
        export_with_bundle_diffusion(export)
    else:
        export_bundle(export)
    prot = cfg.prot_strong if backbone == "strong" else cfg.prot
    with DBMEFRuntime(bundle) as rt:
        protector, stats = calibrate(rt, labelled(calib), prot)
    data = "digits calibration split (200 images of load_digits' train split)"
    write_protector(bundle, protector, {**stats, "data": data})
    return bundle


def labelled(split: DigitsSplit) -> list[Any]:
    """The split as the runtime's labelled items (images given as arrays)."""
    from dbmef.runtime.data import LabelledImage

    # LabelledImage.path is any ImageInput here: the calibration reads arrays as it reads files
    return [LabelledImage(np.asarray(render(a)), int(y)) for a, y in zip(split.images, split.labels)]  # type: ignore[arg-type]
