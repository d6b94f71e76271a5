"""``dbmef-export``: a thin argparse wrapper over :func:`dbmef.export.exporter.export_bundle`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dbmef.errors import DBMEFError, missing_extra
from dbmef.export.config import SCORER_CHOICES
from dbmef.logs import configure as configure_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbmef-export",
        description="Export a DBMEF system (timm backbone + Stable Diffusion) to a validated ONNX bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="resnet50",
                   help="timm model name, a local timm folder (save_for_hf layout), 'tiny' (with --sd tiny), or "
                        "'none': a zero-shot bundle, the diffusion side alone (with --class-names)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="backbone weights file (.safetensors or .pth state dict)")
    w.add_argument("--random-init", action="store_true", help="backbone architecture only, random weights")
    p.add_argument("--sd", default="auto",
                   help="'auto' (SD v1.5 from the local Hugging Face cache), a local diffusers folder, an ONNX folder "
                        "in optimum's layout (no torch needed; with --backbone-onnx), a dbmef bundle (its diffusion "
                        "side reused as it is: only --backbone is exported; docs/bundle.md), 'sd15' (SD v1.5 "
                        "architecture, "
                        "random weights) or 'tiny' (the test system)")
    o = p.add_argument_group("a classifier already in ONNX (with an ONNX --sd folder)")
    o.add_argument("--backbone-onnx", metavar="FILE", help="the classifier graph: one image input, logits first")
    o.add_argument("--backbone-data-config", metavar="JSON",
                   help="its preprocessing as timm's data config: a JSON file or inline JSON (input_size, "
                        "interpolation, mean, std, crop_pct, crop_mode)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=None,
                   help="fp32 or fp16 graphs (default fp32; from an ONNX folder: the folder's own)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="VAE input size, a multiple of the VAE's downsampling: 512 (latent 64x64, the default for SD "
                        "v1.5), 256 (32x32, the paper's low-resolution setting), 16 for the digits system; "
                        "default: the system's own")
    p.add_argument("--class-names", help="class names for a non-ImageNet backbone: JSON list or one per line")
    p.add_argument("--out", help="bundle folder (default: engines/<backbone>-<sd>-<size>-<precision>)")
    p.add_argument("--scorer", choices=list(SCORER_CHOICES), default=None,
                   help="fused (the default): one error per row leaves the graph; unet: the plain UNet, errors on the "
                        "host; both")
    f = p.add_argument_group("diffusion features (dbmef features fits a classifier head on them; "
                             "needs --scorer unet or both)")
    f.add_argument("--features", metavar="BLOCK", help="also write the features component: the UNet block down.<i>, "
                   "mid or up.<i> whose pooled activation is the feature vector")
    f.add_argument("--features-timestep", type=int, default=10, metavar="T",
                   help="its noise level (chosen on the digits calibration split, docs/features.md)")
    f.add_argument("--features-pool", type=int, default=4, metavar="P", help="pooled to P x P")
    p.add_argument("--unet-batch", type=int, default=32, help="rows per scorer call (static TensorRT profile)")
    p.add_argument("--trt", action="store_true",
                   help="after export, build TensorRT engines for the GPU this runs on (same as dbmef build-engines)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch validation")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    say = None if args.quiet else (lambda msg: print(f"[dbmef-export] {msg}", file=sys.stderr, flush=True))
    # Offline before anything imports huggingface_hub: a missing weight fails now, never hangs.
    from dbmef.export.sources import offline_env

    offline_env()
    torch_path = True
    try:
        t0 = time.perf_counter()
        kind = _source_kind(args)
        torch_path = kind != "onnx"
        export = {"torch": _export_torch, "onnx": _export_onnx_folder, "bundle": _export_from_bundle}[kind]
        out = export(args, say)
        if args.trt:
            from dbmef.export.trt_build import build_engines

            build_engines(out, unet_batch=args.unet_batch)
    except DBMEFError as exc:
        print(f"dbmef-export: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        msg = missing_extra(exc, "dbmef-export", "export,cpu" if torch_path else "cpu,onnx")
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _source_kind(args: argparse.Namespace) -> str:
    """torch (diffusers or generated sources), onnx (an optimum folder) or bundle (a dbmef bundle)."""
    from dbmef.export.from_bundle import is_bundle
    from dbmef.export.onnx_folder import is_onnx_sd_folder

    if is_onnx_sd_folder(args.sd):
        return "onnx"
    if args.backbone_onnx or args.backbone_data_config:
        raise DBMEFError("--backbone-onnx and --backbone-data-config go with an ONNX Stable Diffusion folder as --sd "
                         f"(optimum's layout: unet/model.onnx, ...); {args.sd} is not one")
    return "bundle" if is_bundle(args.sd) else "torch"


def _export_from_bundle(args: argparse.Namespace, say: Any) -> Any:
    """A new classifier in front of a bundle's diffusion side, which comes as it is: its graphs,
    precision, image size, scorer graphs, features and scoring settings."""
    from dbmef.export.exporter import ExportConfig
    from dbmef.export.from_bundle import export_with_bundle_diffusion

    given = [flag for flag, v in (("--precision", args.precision), ("--image-size", args.image_size),
                                  ("--scorer", args.scorer), ("--features", args.features)) if v is not None]
    if given:
        raise DBMEFError(f"{', '.join(given)}: with a bundle as --sd ({args.sd}) the diffusion side is copied as it "
                         "is, so these come from that bundle; leave them out, or export from the diffusers folder")
    cfg = ExportConfig(backbone=args.backbone, weights=args.weights, random_init=args.random_init, sd=args.sd,
                       class_names=args.class_names, out=args.out, opset=args.opset, validate=not args.no_validate,
                       seed=args.seed)
    return export_with_bundle_diffusion(cfg, progress=say)


def _export_onnx_folder(args: argparse.Namespace, say: Any) -> Any:
    """The torch-free path: graphs already in ONNX."""
    from dbmef.export.onnx_bundle import OnnxExportConfig, export_from_onnx_folder
    from dbmef.runtime.config import ScoringConfig

    out = Path(args.out or f"engines/{Path(args.sd).name}-onnx")
    if args.backbone_onnx:
        missing = [f for f, v in (("--class-names", args.class_names),
                                  ("--backbone-data-config", args.backbone_data_config)) if not v]
        if missing:
            raise DBMEFError(f"--backbone-onnx needs {' and '.join(missing)}: the graph carries neither its class "
                             "names nor its preprocessing")
        backbone, data_config, names = args.backbone_onnx, args.backbone_data_config, args.class_names
    else:  # a timm backbone: only it goes through torch
        import json

        from dbmef.export.exporter import export_backbone_only

        path, data_cfg, names_file = export_backbone_only(args.backbone, args.weights, args.random_init,
                                                          args.class_names, out / "_backbone", args.opset)
        backbone, data_config, names = str(path), json.dumps(data_cfg), str(names_file)
    cfg = OnnxExportConfig(sd=args.sd, backbone_onnx=backbone, class_names=names, data_config=data_config, out=str(out),
                           scorer=args.scorer or "fused", image_size=args.image_size, precision=args.precision,
                           validate=not args.no_validate, seed=args.seed,
                           scoring=ScoringConfig(unet_batch=args.unet_batch), features=_features(args))
    bundle = export_from_onnx_folder(cfg, progress=say)
    if not args.backbone_onnx:
        import shutil

        shutil.rmtree(out / "_backbone", ignore_errors=True)  # the bundle holds its own copy
    return bundle


def _export_torch(args: argparse.Namespace, say: Any) -> Any:
    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.runtime.config import ScoringConfig

    cfg = ExportConfig(
        backbone=args.backbone, weights=args.weights, random_init=args.random_init, sd=args.sd,
        precision=args.precision or "fp32", image_size=args.image_size or 512, class_names=args.class_names,
        out=args.out,
        scorer=args.scorer or "fused", opset=args.opset, validate=not args.no_validate, seed=args.seed,
        scoring=ScoringConfig(unet_batch=args.unet_batch), features=_features(args),
    )
    return export_bundle(cfg, progress=say)


def _features(args: argparse.Namespace) -> Any:
    from dbmef.runtime.features import FeatureSpec

    if args.features is None:
        return None
    return FeatureSpec(args.features, args.features_timestep, args.features_pool, args.seed)


if __name__ == "__main__":
    sys.exit(main())
