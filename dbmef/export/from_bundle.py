"""``dbmef-export --backbone B --sd BUNDLE``: a new classifier in front of an existing bundle's
diffusion side.

Why: the diffusion side is the slow part of an export (SD v1.5's UNet traced, validated and
decision-checked in minutes to an hour, its TensorRT engines built in more) and it does not depend
on the classifier: the text encoder, the VAE encoder, the scorer and UNet graphs, the tokenizer and
the class names' positive embeddings are the same whichever classifier picks the candidates. So
they are copied byte for byte (their sha256 checked on the way in) and only the backbone is
exported, validated against torch and recorded.

What does not carry over: the protector and the fused decision's beta were fitted on the old
classifier's probabilities, so the new bundle is uncalibrated (``dbmef calibrate`` next; until
then it rethinks every image by the paper's rule). TensorRT engines of the copied graphs do carry
over (with the timing cache): an engine's key is its graph's sha256 with the TensorRT version, the
GPU and the shape profile, all unchanged, so ``dbmef build-engines`` reuses them and builds the
classifier's alone (on another GPU or TensorRT the keys differ and it rebuilds, as it always does).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbmef.errors import ExportError
from dbmef.export.config import ExportConfig
from dbmef.runtime.bundle import MANIFEST, Bundle, TensorRTRecord, sha256_file

log = logging.getLogger(__name__)


def is_bundle(path: str | Path) -> bool:
    """A dbmef bundle folder (told apart from a diffusers or an optimum ONNX folder by its manifest)."""
    return (Path(path) / MANIFEST).is_file()


def export_with_bundle_diffusion(cfg: ExportConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Export ``cfg.backbone`` (validated against torch) into a copy of the diffusion side of the
    bundle ``cfg.sd``; the class names are the bundle's (``cfg.class_names``, if given, must equal
    them). Returns the new, uncalibrated bundle's folder."""
    from dbmef.export.manifest import component_record, tool_versions
    from dbmef.runtime.preprocess import BackbonePreprocess

    def step(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    step(f"reading the diffusion side of {cfg.sd} (every file's sha256 checked)")
    src = Bundle.open(cfg.sd)
    m = src.manifest
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    if out.resolve() == src.dir.resolve():
        raise ExportError(f"--out {out} is the --sd bundle itself: write the new bundle to another folder")
    if cfg.backbone in ("tiny", "none"):
        raise ExportError(f"--backbone {cfg.backbone} cannot go with a bundle as --sd: give a timm model name or "
                          "folder (a zero-shot bundle needs no re-export: `dbmef classify --zero-shot`)")
    step(f"exporting backbone {cfg.backbone}")
    spec, path, validation, data_cfg, source = _backbone(cfg, m, out)
    step("copying the text encoder, VAE encoder, scorer graphs, tokenizer and embeddings")
    old_backbone = {rel for rel, _ in m.components["backbone"].files()} if "backbone" in m.components else set()
    for rel, _ in m.files():
        if rel not in old_backbone:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.path(rel), out / rel)
    record = component_record(spec.contract, path, "fp32", validation, source)
    manifest = m.replace(
        components={**m.components, "backbone": record},
        backbone_preprocess=BackbonePreprocess.from_data_config(data_cfg),
        protector=None, tensorrt=_copy_engines(src, out),
        scoring=m.scoring.replace(decision="paper", fused_beta=None),
        sources={"backbone": source, "sd": {**m.sources.get("sd", {}), "bundle": str(src.dir),
                                            "bundle_digest": src.digest(calibration=False)}},
        tools=tool_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    (out / "export_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    Bundle(out, manifest).save(manifest)
    step(f"bundle written to {out} (uncalibrated: run `dbmef calibrate --bundle {out} --data DIR`)")
    return out


def _backbone(cfg: ExportConfig, m: Any, out: Path) -> tuple[Any, Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The classifier traced to ``out/backbone.onnx`` and validated against torch at two batch sizes
    (``exporter.trace_backbone``): (its export spec, path, validation, timm data config, source
    record). Refuses a classifier whose classes are not the bundle's: the bundle's positive
    embeddings are of its class names, row for row."""
    from dbmef.export.exporter import trace_backbone
    from dbmef.reference.loading import load_backbone, read_class_names

    model = load_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init)
    n = int(model.num_classes)
    names = tuple(m.class_names)
    if n != len(names):
        raise ExportError(f"backbone {cfg.backbone} has {n} classes, the bundle {cfg.sd} has {len(names)} "
                          f"({', '.join(names[:3])}, ...): its text side is of those classes; export the diffusion "
                          "side anew for this classifier (--sd with a diffusers or ONNX folder)")
    if cfg.class_names and tuple(read_class_names(cfg.class_names)) != names:
        raise ExportError(f"--class-names {cfg.class_names} differ from the class names of the bundle {cfg.sd} (in "
                          "name or order); its positive embeddings are of its own names: leave --class-names out, or "
                          "export the diffusion side anew")
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a half-rewritten bundle must not look valid
    spec, path, validation, data_cfg = trace_backbone(model, out, cfg.opset, cfg.validate, cfg.seed)
    source = {"id": cfg.backbone, "weights": cfg.weights, "random_init": cfg.random_init, "num_classes": n,
              "weights_sha256": sha256_file(cfg.weights) if cfg.weights else None}
    return spec, path, validation, data_cfg, source


def _copy_engines(src: Bundle, out: Path) -> TensorRTRecord:
    """The source's TensorRT engines but the classifier's, each copied only if its file is present
    and unaltered (a damaged one is left for ``build-engines`` to rebuild), and its timing cache."""
    trt = src.manifest.tensorrt
    kept = {}
    for name, rec in trt.engines.items():
        file = src.dir / rec.file
        if name == "backbone" or not file.is_file() or sha256_file(file) != rec.sha256:
            continue
        (out / rec.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, out / rec.file)
        kept[name] = rec
    cache = trt.timing_cache if trt.timing_cache and (src.dir / trt.timing_cache).is_file() else None
    if cache is not None:
        (out / cache).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.dir / cache, out / cache)
    if kept:
        log.info("TensorRT engines carried over: %s", ", ".join(sorted(kept)))
    return TensorRTRecord(kept, cache)
