"""The ``dbmef`` sub-commands that inspect, measure and build rather than classify: info, bench,
build-engines, demo, features, quantize (their parsers and their thin command functions)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from dbmef.apps.args import add_runtime_args, runtime_spec
from dbmef.apps.report import table
from dbmef.errors import DBMEFError


def cmd_info(args: argparse.Namespace) -> int:
    from dbmef.runtime.bundle import Bundle
    from dbmef.runtime.contracts import kind_of_component

    b = Bundle.open(args.bundle, verify=not args.no_verify)
    m = b.manifest
    if args.json:
        print(json.dumps({**m.to_dict(), "digest": m.digest()}, indent=2))
        return 0
    rows = []
    for name, rec in m.components.items():
        size = sum(b.path(f).stat().st_size for f, _ in rec.files())
        val = rec.validation.get("status", "-")
        worst = max((c.get("max_abs", 0) for c in rec.validation.get("checks", [])), default=None)
        rows.append([name, rec.file, rec.precision, round(size / 2**20, 2), val, worst,
                     ", ".join(f"{t.name}{tuple(t.shape)}" for t in rec.inputs)])
    print(f"bundle      {args.bundle} (format v{m.format_version}, created {m.created})")
    print(f"digest      {m.digest()}")
    print(f"classes     {len(m.class_names)}: {', '.join(m.class_names[:5])}{' ...' if len(m.class_names) > 5 else ''}")
    sd = m.sources.get("sd", {})
    via = f" (diffusion side copied from the bundle {sd['bundle']})" if sd.get("bundle") else ""
    print(f"sources     backbone={m.sources.get('backbone', {}).get('id')}  sd={sd.get('id')}{via}")
    print(f"scorer      {kind_of_component(m.scorer_component)}; latent {m.vae.latent_shape} from {m.vae.image_size}px")
    print(f"scoring     {json.dumps({k: v for k, v in m.scoring.to_dict().items() if k != 'templates'})}")
    print(f"protector   {m.protector.to_dict() if m.protector else 'not calibrated (rethinks everything)'}")
    cal = m.sources.get("calibration", {})
    if "chosen" in cal:
        c, p = cal["chosen"], cal["chosen"]["point"]
        print(f"chosen by   {c['rule']} {c['value']:g} on {cal['n_images']} images ({cal['data']}): rethink rate "
              f"{p['rethink_rate']:.1%}, accuracy {p['accuracy']:.2%} (backbone {p['backbone_accuracy']:.2%}), "
              f"{p['mean_ms']:.2f} ms/image expected on {cal['device']}")
        for w in c.get("warnings", []):
            print(f"            note: {w}")
    if cal.get("fused"):
        f = cal["fused"]
        print(f"fused       beta {f['beta']:.4g} fitted on {f['n_images']} images by likelihood (true-label NLL "
              f"{f['nll']:.3f}, classifier alone {f['nll_classifier']:.3f}); serving the {m.scoring.decision} "
              f"decision{'' if m.scoring.decision == 'fused' else ' (--decision fused to use it)'}")
    _print_features(m)
    _print_quantized(m)
    print(f"tools       {', '.join(f'{k} {v}' for k, v in m.tools.items())}")
    print()
    print(table(rows, ["component", "file", "precision", "MiB", "validation", "max_abs_err", "inputs"]))
    return 0


def _print_features(m: Any) -> None:
    """The features component's definition and, where the backbone is a head over it, the fit."""
    if "features" in m.components:
        f = m.components["features"].source
        print(f"features    {f.get('block')} at t={f.get('timestep')}, pool {f.get('pool')}x{f.get('pool')}, "
              f"noise seed {f.get('seed')}, empty prompt -> {f.get('dim')} numbers per image")
    src = m.components["backbone"].source if "backbone" in m.components else {}
    if src.get("kind") == "diffusion-features-head":
        h = src["head"]
        print(f"backbone    linear head on those features: fitted on {h.get('n_train')} images of {h.get('data')}, "
              f"l2 {h.get('l2')}, train accuracy {h.get('train_accuracy', 0):.2%}")


def _print_quantized(m: Any) -> None:
    """Each quantized graph's recipe and the decision agreement its gate measured."""
    for name, rec in m.components.items():
        q, gate = rec.source.get("quantization"), rec.validation.get("decision_gate")
        if q and gate:
            print(f"quantized   {name} {rec.precision} ({q['format']}, {q['ranges']} ranges from "
                  f"{q['calibration_rows']} rows of {q['calibration']['images']} images): decisions agree with "
                  f"{rec.source['quantized_from']['precision']} on {gate['agree']}/{gate['images']} "
                  f"calibration images ({gate['agreement']:.2%}, allowed {1 - gate['max_disagree']:.1%})")


def cmd_bench(args: argparse.Namespace) -> int:
    from dbmef.apps.bench import plot, run_bench

    bar = None if (args.quiet or args.json) else (lambda msg: print(f"[bench] {msg}", file=sys.stderr))
    if args.images is not None and args.images < 1:
        raise DBMEFError(f"--images {args.images} is invalid: keep at least 1 image of the data")
    report = run_bench(runtime_spec(args), data=args.data, source=args.source, n_images=args.images,
                       repeats=args.repeats, modes=args.modes, baselines=tuple(args.baselines), profile=args.profile,
                       progress=bar)
    if args.plot:
        report["plot"] = str(plot(report, args.plot))
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    d = report["data"]
    print(f"{d['images']} images from {d['source']}, {d['rethought']} rethought; --batch-size {report['batch_size']}")
    rows = []
    for m, v in report["modes"].items():
        for p in ("sync", "scheduler"):
            st = v["stream"][p]
            rows.append([m, p, st["slow_path_s"], st["unet_evals_per_rethought_image"],
                         st["rows"]["rows_sent_per_row_needed"], st["rows"]["engine_calls"],
                         st["latency_rethought_s"]["p50"], st["latency_rethought_s"]["p95"]])
    print(table(rows, ["mode", "slow path", "slow s", "UNet evals/img", "rows sent/needed", "calls",
                       "latency p50 s", "p95 s"]))
    print()
    once = [[m, v["all_at_once"]["wall_s"]["p50"], v["all_at_once"]["latency_s"]["p50"],
             v["all_at_once"]["median_over_last"], v.get("at_rate", {}).get("latency_s", {}).get("p50", math.nan),
             v.get("speedup_vs_paper_scripts", math.nan)] for m, v in report["modes"].items()]
    print(table(once, ["mode", "all rethought at once: wall s", "latency p50 s", "median/last",
                       "at 50% load: p50 s", "speed-up vs paper_scripts"]))
    for k in ("speedup_vs_paper_scripts_equal_decisions", "speedup_vs_paper_scripts_equal_work",
              "speedup_vs_paper_scripts_adaptive", "speedup_vs_paper_scripts", "speedup_vs_torch_batched"):
        if k in report:
            print(f"{k} {report[k]:.2f}x")
    for k, v in report["roofline"].items():
        if isinstance(v, dict) and "fraction_of_peak" in v:
            print(f"fraction of peak ({k}) {v['fraction_of_peak']:.1%}")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from dbmef.export.trt_build import build_engines

    recs = build_engines(args.bundle, components=args.components, force=args.force,
                         workspace_bytes=int(args.workspace_gb * 2**30), unet_batch=args.unet_batch,
                         optimization_level=args.opt_level, device=args.device_id, tf32=args.tf32)
    rows = [[n, r.file, r.precision, r.gpu, r.compute_capability, r.trt_version, r.build_seconds]
            for n, r in recs.items()]
    print(table(rows, ["component", "engine", "precision", "gpu", "cc", "tensorrt", "build_s"]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dbmef.apps.demo import run_demo

    if args.write_splits:
        from dbmef.apps.digits import SPLITS, write_image_folder

        for name, split in SPLITS.items():
            print(f"{name:12s} {len(split().labels):5d} digits -> "
                  f"{write_image_folder(split(), Path(args.write_splits) / name)}")
        return 0

    report = run_demo(args.out, bundle=args.bundle, limit=args.limit, progress=not args.quiet, curve=args.curve)
    if args.json:
        import dataclasses

        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(report).items()},
                         indent=1))
    else:
        print("\n".join(report.lines()))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from dbmef.apps.features import FeaturesConfig, run_features
    from dbmef.apps.report import progress_bar

    cfg = FeaturesConfig(bundle=args.bundle, data=args.data, out=args.out, block=args.block, timestep=args.timestep,
                         pool=args.pool, seed=args.seed, l2=args.l2, eval_data=args.eval_data, backend=args.backend,
                         batch_size=args.batch_size)
    report = run_features(cfg, progress=lambda n, desc: progress_bar(n, desc, args.quiet or args.json))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [[split, report[split]["n"], report[split]["failed"], 100 * report[split]["accuracy"]]
            for split in ("train", "eval") if split in report]
    f = report["features"]
    print(f"features  {f['block']} at t={f['timestep']}, pool {f['pool']}x{f['pool']} -> {report['dim']} numbers "
          f"per image (1 VAE encoding + 1 UNet evaluation)")
    print(f"head      linear, l2 {report['head']['l2']}, {report['head']['iterations']} L-BFGS iterations")
    print(table(rows, ["data", "images", "unreadable", "head accuracy %"]))
    print(f"bundle    {report['bundle']} (its backbone is now this head; calibrate its protector: dbmef calibrate "
          f"--bundle {report['bundle']} --data CALIBRATION_DATA --prot 0.95)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dbmef.export.quantize import QuantizeConfig, quantize_bundle

    report = quantize_bundle(QuantizeConfig(bundle=args.bundle, data=args.data, out=args.out, to=args.to,
                                            images=args.images, max_disagree=args.max_disagree,
                                            max_batches=args.calibration_batches, ranges=args.ranges,
                                            ops=tuple(args.ops)))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"quantized {', '.join(report['components'])} to {report['to']} (Q/DQ), calibrated on the slow-path rows "
          f"of {report['calibration']['images']} images")
    for name, g in report["gates"].items():
        print(f"gate      {name}: {g['agree']}/{g['images']} decisions agree with the source bundle "
              f"({g['agreement']:.2%}; allowed {1 - g['max_disagree']:.1%})")
    print(f"bundle    {report['bundle']} (TensorRT: dbmef build-engines --bundle {report['bundle']})")
    return 0


def add_tools(sub: Any) -> None:
    """info, bench, build-engines, demo, features, quantize."""
    i = sub.add_parser("info", help="show what a bundle holds")
    i.add_argument("--bundle", required=True, help="bundle folder written by dbmef-export")
    i.add_argument("--json", action="store_true", help="print the manifest and its digest as JSON")
    i.add_argument("--no-verify", action="store_true", help="skip the check of every file's sha256")
    i.set_defaults(func=cmd_info)

    n = sub.add_parser("bench", help="the slow path on real data: batch-synchronous vs the row scheduler, latency, "
                                     "paper_scripts, roofline")
    add_runtime_args(n)
    n.add_argument("--data", help="images to measure on: a labelled ImageFolder / file list or any image folder "
                                  "(default: the digits test split for the digits system, else synthetic pictures)")
    n.add_argument("--source", help="the system folder the bundle was exported from (enables the torch baselines)")
    n.add_argument("--images", type=int, default=None, help="keep the first N images of the data (default: all; "
                                                            "4 synthetic pictures)")
    n.add_argument("--modes", nargs="+", choices=["off", "exact", "adaptive"], default=["off", "exact", "adaptive"],
                   help="early-exit modes to measure (default: all three)")
    n.add_argument("--repeats", type=int, default=3)
    n.add_argument("--baselines", nargs="*", default=["paper_scripts", "torch_batched"])
    n.add_argument("--profile", action="store_true", help="ONNX Runtime profile of the scorer by op type")
    n.add_argument("--plot", help="write a PNG here")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=cmd_bench)

    b = sub.add_parser("build-engines", help="build TensorRT engines for this GPU (export once, build per target)")
    b.add_argument("--bundle", required=True)
    b.add_argument("--components", nargs="+", help="default: backbone, text_encoder, vae_encoder and the scorer")
    b.add_argument("--force", action="store_true", help="rebuild even when the engine key matches")
    b.add_argument("--workspace-gb", type=float, default=8.0, help="TensorRT workspace memory-pool limit")
    b.add_argument("--unet-batch", type=int, help="static scorer batch (default: the bundle's)")
    b.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    b.add_argument("--tf32", action="store_true",
                   help="allow TF32 math in fp32 engines (faster, ~1e-3 relative error; off by default)")
    b.add_argument("--device-id", type=int, default=0)
    b.set_defaults(func=cmd_build_engines)

    d = sub.add_parser("demo", help="classify the digits test split with the committed digits bundle: backbone "
                       "accuracy -> DBMEF accuracy, flips, and a PNG of the rethought digits")
    d.add_argument("--out", default="engines/demo", help="folder for the PNG grid of rethought digits")
    d.add_argument("--bundle", default=None, help="another digits bundle (default: the committed one)")
    d.add_argument("--limit", type=int, default=None, help="only the first N test digits")
    d.add_argument("--curve", action="store_true",
                   help="also rethink the 200 calibration digits once (36 000 UNet evaluations, about 2 minutes "
                        "on 2 CPU cores) and show where the bundle's threshold sits on the operating-point curve")
    d.add_argument("--write-splits", metavar="DIR",
                   help="only write the digits train (1 000), calibration (200) and test (597) splits as ImageFolders "
                        "under DIR/train, DIR/calibration, DIR/test (what --data of eval, calibrate and features read)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("features", help="diffusion features (a UNet block at one timestep, pooled) of a labelled set, "
                       "a linear head fitted on them, and a copy of the bundle whose classifier is that head")
    f.add_argument("--bundle", required=True, help="a bundle with the plain UNet graph (unet.onnx)")
    f.add_argument("--data", required=True, help="the labelled images the head is fitted on (ImageFolder or file list)")
    f.add_argument("--out", required=True, help="the new bundle's folder (the source bundle is never modified)")
    f.add_argument("--eval-data", help="labelled images to score the head on")
    f.add_argument("--block", default="mid", help="down.<i>, mid or up.<i> (default mid: chosen on the digits "
                   "calibration split, docs/features.md)")
    f.add_argument("--timestep", type=int, default=10, help="the noise level t, 0..999 (default 10)")
    f.add_argument("--pool", type=int, default=4, help="average-pool the block's activation to P x P (default 4)")
    f.add_argument("--seed", type=int, default=0, help="seed of the one fixed noise")
    f.add_argument("--l2", type=float, default=1e-4, help="the head's L2 penalty (default 1e-4)")
    f.add_argument("--backend", default="onnxruntime", help="the runtime backend that runs the features graph")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_features)

    q = sub.add_parser("quantize", help="a copy of a bundle whose UNet graphs are INT8 (Q/DQ), calibrated on its own "
                       "slow-path rows and refused when its decisions differ from the source's")
    q.add_argument("--bundle", required=True, help="the source bundle (never modified)")
    q.add_argument("--data", required=True, help="calibration images (a folder, ImageFolder or file list)")
    q.add_argument("--out", required=True, help="the quantized bundle's folder (must be new or empty)")
    q.add_argument("--to", default="int8", choices=["int8", "fp8"],
                   help="the precision of the UNet graphs (fp8: not on this path yet, docs/quantization.md)")
    q.add_argument("--images", type=int, default=64,
                   help="calibration images whose rethinks give the ranges and feed the gate (default 64)")
    q.add_argument("--calibration-batches", type=int, default=64,
                   help="scorer calls whose activations set the ranges, spread over the pass (default 64)")
    q.add_argument("--ranges", default="minmax", choices=["minmax", "percentile", "entropy"],
                   help="how activation ranges are read from the calibration rows (default minmax)")
    q.add_argument("--ops", nargs="+", default=["Conv"], choices=["Conv", "MatMul", "Gemm"],
                   help="op types that get Q/DQ pairs; the rest stays float (default Conv: chosen on the digits "
                   "calibration split, docs/quantization.md)")
    q.add_argument("--max-disagree", type=float, default=0.005,
                   help="refuse when more than this fraction of the gate's decisions differ (default 0.005)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)
