#!/usr/bin/env python3
"""End-to-end validation of the TensorRT path on the first NVIDIA GPU it meets.

On a machine with a GPU and ``pip install 'dbmef[gpu,export]'``:

    python benchmarks/gpu_check.py                 # tiny system + resnet50/sd15 (random weights, fp16)
    python benchmarks/gpu_check.py --skip-sd15     # the tiny system only (a minute)
    python benchmarks/gpu_check.py --bundle B ...  # reuse bundles exported before

For each bundle it builds TensorRT engines for this GPU, classifies the same images with the
native TensorRT backend and with ONNX Runtime (CUDA provider), requires identical decisions and
per-candidate errors within tolerance (fp32 1e-3, fp16 3e-2 relative), times every stage (warm-up
first, median of repeats), and writes a report (JSON and Markdown) to benchmarks/results/.
Exit code 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        h, w = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * (1 + j % 5)) % 256, (yy * (1 + j % 7)) % 256, ((xx + yy) * (j % 3 + 1)) % 256], -1)
        out.append(np.clip(a + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8))
    return out


def time_runtime(rt: Any, images: list[np.ndarray], repeats: int) -> tuple[list[Any], dict[str, float], float]:
    rt.classify(images[:1])  # warm-up: engine set-up, CUDA graph capture, caches
    walls, stages = [], []
    results: list[Any] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = rt.classify(images)
        walls.append(time.perf_counter() - t0)
        stages.append(dict(rt.last_timings))
    med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    return results, med, statistics.median(walls)


def check_bundle(bundle: Path, n_images: int, scoring: dict[str, int], repeats: int) -> dict[str, Any]:
    from dbmef.apps.roofline import fitting_unet_batch
    from dbmef.export.checks import clear_decision
    from dbmef.export.trt_build import build_engines
    from dbmef.runtime.backends.cuda import device_info
    from dbmef.runtime.backends.onnxruntime import OrtOptions
    from dbmef.runtime.bundle import load_manifest
    from dbmef.runtime.protector import Protector
    from dbmef.runtime.system import DBMEFRuntime

    # one scorer batch for both backends: the TensorRT scorer engine is built static at it
    unet_batch = fitting_unet_batch(load_manifest(bundle), device_info()["total_memory"],
                                    scoring.get("unet_batch", load_manifest(bundle).scoring.unet_batch))
    scoring = {**scoring, "unet_batch": unet_batch}
    t0 = time.perf_counter()
    engines = build_engines(bundle, unet_batch=unet_batch)
    build_s = time.perf_counter() - t0
    images = synthetic_images(n_images)
    rethink_all = Protector.fixed(0.0)
    trt_rt = DBMEFRuntime(bundle, backend="tensorrt", protector=rethink_all)
    # early exit off: parity compares every vote's errors; the decision rule below discounts near ties
    cfg = trt_rt.manifest.scoring.replace(**scoring, early_exit="off")
    trt_rt = DBMEFRuntime(bundle, backend="tensorrt", protector=rethink_all, scoring=cfg)
    ort_rt = DBMEFRuntime(bundle, backend="onnxruntime", protector=rethink_all, scoring=cfg,
                          options=OrtOptions(device="cuda", strict=True))
    trt_res, trt_stages, trt_wall = time_runtime(trt_rt, images, repeats)
    ort_res, ort_stages, ort_wall = time_runtime(ort_rt, images, repeats)
    # issue 24.10: ONNX Runtime on the CPU is the reference a CUDA provider is itself checked against:
    # a subset (the CPU is slow at SD's size) must make the same decisions as TensorRT
    subset = images[: max(1, min(2, len(images)))]
    with DBMEFRuntime(bundle, backend="onnxruntime", protector=rethink_all, options=OrtOptions(device="cpu"),
                      scoring=cfg.replace(unet_batch=min(cfg.unet_batch, 2))) as cpu_rt:
        cpu_labels = [r.label for r in cpu_rt.classify(subset)]
    precision = trt_rt.manifest.precision
    tol = 3e-2 if precision == "fp16" else 1e-3
    same = [a.label == b.label for a, b in zip(trt_res, ort_res)]
    diffs = [(np.asarray(a.noise_errors, float), np.asarray(b.noise_errors, float)) for a, b in zip(trt_res, ort_res)]
    rel = max(float(np.max(np.abs(x - y) / np.abs(y))) for x, y in diffs)
    # The exporter's rule (export/checks.clear_decision): a different decision counts only where
    # ONNX Runtime's decision, every vote and the tie-break, survives twice the measured difference.
    max_abs = max(float(np.max(np.abs(x - y))) for x, y in diffs)
    real = [i for i, ok in enumerate(same)
            if not ok and clear_decision(np.asarray(ort_res[i].noise_errors, float), max_abs)]
    scorer = trt_rt.pipeline.engines.scorer
    graphs = {n: e.graph is not None for n, e in trt_rt.pipeline.engines.items()}
    rows = len(images) * cfg.unet_evaluations_per_image // 2
    return {
        "bundle": str(bundle), "precision": precision, "images": len(images), "scoring": cfg.to_dict(),
        "engine_build_s": round(build_s, 1), "engines": {k: v.to_dict() for k, v in engines.items()},
        "identical_decisions": all(same), "decisions_agree": f"{sum(same)}/{len(same)}",
        "decisions_differing_beyond_near_ties": len(real), "max_abs_error_diff": max_abs,
        "max_rel_error_diff": rel, "tolerance": tol, "passed": not real and rel <= tol,
        "decisions_vs_onnxruntime_cpu": f"{sum(a == b.label for a, b in zip(cpu_labels, trt_res))}/{len(subset)}",
        "cuda_graph_replayed": graphs,
        # steady state: the one sync before each graph capture is warm-up, not a per-call cost
        "scorer_host_syncs_per_engine_call": (scorer.syncs - scorer.warmup_syncs) / max(scorer.calls, 1),
        "scorer_calls_queued_behind_one_in_flight": scorer.overlapped,
        "tensorrt": {"wall_s": trt_wall, "stages_s": trt_stages,
                     "scorer_rows_per_s": rows / max(trt_stages["unet_scoring"], 1e-9)},
        "onnxruntime_cuda": {"wall_s": ort_wall, "stages_s": ort_stages,
                             "scorer_rows_per_s": rows / max(ort_stages["unet_scoring"], 1e-9)},
        "speedup_trt_vs_ort": ort_wall / trt_wall,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['gpu']['name']} ({report['date']})", "",
             f"Command: `{report['command']}`", "", f"Overall: **{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    for r in report["bundles"]:
        lines += [f"## {r['bundle']} ({r['precision']}, {r['images']} images, rethink all)", "",
                  f"- decisions TensorRT vs ONNX Runtime CUDA: {r['decisions_agree']}; max rel error diff "
                  f"{r['max_rel_error_diff']:.3g} (tolerance {r['tolerance']})",
                  f"- engine build: {r['engine_build_s']} s; end-to-end speed-up TensorRT vs ORT-CUDA: "
                  f"{r['speedup_trt_vs_ort']:.2f}x", "",
                  "| stage | TensorRT ms | ORT CUDA ms |", "|---|---:|---:|"]
        for st, v in r["tensorrt"]["stages_s"].items():
            lines.append(f"| {st} | {v * 1e3:.1f} | {r['onnxruntime_cuda']['stages_s'][st] * 1e3:.1f} |")
        lines += [f"| scorer rows/s | {r['tensorrt']['scorer_rows_per_s']:.1f} | "
                  f"{r['onnxruntime_cuda']['scorer_rows_per_s']:.1f} |", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", help="reuse an exported bundle (repeatable)")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--work", default="engines/gpu_check")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from dbmef.runtime.backends.cuda import device_info, require_gpu

    require_gpu()
    work = Path(args.work)
    bundles: list[tuple[Path, dict[str, int]]] = [(Path(b), {}) for b in (args.bundle or [])]
    if not args.bundle:
        from dbmef.export.exporter import ExportConfig, export_bundle

        tiny = work / "tiny"
        if not (tiny / "manifest.json").exists():
            export_bundle(ExportConfig(backbone="tiny", sd="tiny", out=str(tiny)))
        bundles.append((tiny, {"n_timesteps": 30, "votes": 5}))
        if not args.skip_sd15:
            big = work / "resnet50-sd15-fp16"
            if not (big / "manifest.json").exists():
                export_bundle(ExportConfig(backbone="resnet50", random_init=True, sd="sd15", precision="fp16",
                                           out=str(big)))
            bundles.append((big, {"n_timesteps": 30, "votes": 5}))
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": device_info(),
        "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "bundles": [check_bundle(b, args.images, s, args.repeats) for b, s in bundles],
    }
    report["passed"] = all(b["passed"] for b in report["bundles"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check-{report['gpu']['name'].replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    from dbmef.errors import DBMEFError

    try:
        sys.exit(main())
    except DBMEFError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        sys.exit(2)
