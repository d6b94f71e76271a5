#!/usr/bin/env python3
"""Regenerate benchmarks/RESULTS.md (and results/*.json, results/*.png) with one command:

    .venv/bin/python benchmarks/run_benchmarks.py            # tiny system + sd15 architecture at 256 px
    .venv/bin/python benchmarks/run_benchmarks.py --only tiny

Each system is built from its config with seeded random weights, saved as a system folder and
exported from that folder, so the bundle (ONNX Runtime) and the baselines (torch eager) run the
same weights. The sd15 system uses the paper's low-resolution setting (256 px, latent 32x32) and a
reduced n and V so a run takes minutes on a 2-core CPU; the baselines get the same reductions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 64, "scoring": {"n_timesteps": 10, "votes": 2, "unet_batch": 32}, "images": 4,
             "repeats": 3},
    # 256 px: latent 32x32 (0.18 TFLOP per UNet evaluation). unet_batch 2: a CPU materialises the
    # attention matrices, and ONNX Runtime's arena grows with the batch.
    "sd15": {"image_size": 256, "scoring": {"n_timesteps": 2, "votes": 1, "unet_batch": 2}, "images": 2,
             "repeats": 2},
}


def build_system(name: str, root: Path) -> Path:
    """A system folder (sd/, backbone/, class_names.json) with seeded random weights."""
    if (root / "class_names.json").is_file():
        return root
    if name == "tiny":
        from dbmef.reference.tiny import build_tiny_system

        return build_tiny_system(root)
    import timm
    from timm.models import save_for_hf

    from dbmef.export.sources import build_sd15_random, imagenet_class_names

    build_sd15_random(root / "sd", SYSTEMS[name]["image_size"], seed=0)
    save_for_hf(timm.create_model("resnet50", pretrained=False).eval(), str(root / "backbone"))
    (root / "class_names.json").write_text(json.dumps(imagenet_class_names()[0]))
    return root


def export(name: str, system: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    import resource

    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.runtime.config import ScoringConfig

    t0 = time.perf_counter()
    if not (out / "manifest.json").is_file():
        cfg = SYSTEMS[name]
        export_bundle(ExportConfig(backbone=str(system / "backbone"), sd=str(system / "sd"),
                                   class_names=str(system / "class_names.json"), image_size=cfg["image_size"],
                                   out=str(out), scoring=ScoringConfig(unet_batch=cfg["scoring"]["unet_batch"])))
    return out, {"export_s": time.perf_counter() - t0,
                 "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def section(name: str, r: dict[str, Any], cmd: str) -> str:
    sc, d = r["scoring"], r["data"]
    lines = [f"## {name}", "",
             f"Bundle `{r['bundle']}` ({r['precision']}), k={sc['k']}, n={sc['n_timesteps']}, V={sc['votes']}, "
             f"lam={sc['lam']}, scorer batch {sc['unet_batch']}; {d['images']} images from {d['source']}, "
             f"{d['rethought']} rethought. Command: `{cmd}`", "",
             "| slow path | wall s (p50) | speed-up of dbmef | fraction of matmul peak |", "|---|---:|---:|---:|"]
    roof = r["roofline"]
    eq = r.get("dbmef_equal_work_wall_s")
    if eq is not None:
        lines.append(f"| dbmef, equal work (early exit off) | {eq:.3f} | - | - |")
    for b in ("paper_scripts", "torch_batched"):
        if b in r.get("baselines", {}):
            w = r["baselines"][b]["wall_s"]["p50"]
            f = roof.get(b, {}).get("fraction_of_peak")
            lines.append(f"| {b} (torch eager) | {w:.3f} | {r[f'speedup_vs_{b}']:.2f}x | "
                         f"{'-' if f is None else f'{f:.1%}'} |")
    lines += ["", "| mode | all rethought at once: wall s | UNet evals / image | rows sent / needed (stream) |",
              "|---|---:|---:|---:|"]
    for m, v in r["modes"].items():
        lines.append(f"| {m} | {v['all_at_once']['wall_s']['p50']:.3f} | "
                     f"{v['all_at_once']['unet_evals_per_rethought_image']:.0f} | "
                     f"{v['stream']['scheduler']['rows']['rows_sent_per_row_needed']:.3f} |")
    main = r["modes"].get(r["early_exit"]) or next(iter(r["modes"].values()))
    st = main["all_at_once"]["stages_s_per_image"]
    lines += ["", "| dbmef stage (default mode) | ms/image |", "|---|---:|"]
    lines += [f"| {k} | {v * 1e3:.2f} |" for k, v in st.items()]
    rates = roof["matmul_flops_per_s"]
    if roof.get("flops_per_unet_evaluation"):
        lines += ["", f"{roof['flops_per_unet_evaluation'] / 1e9:.3g} GFLOP per UNet evaluation (analytic); machine "
                  f"matmul rate (float32 GEMM 2048, best of numpy/torch/ONNX Runtime) {rates['peak'] / 1e9:.1f} "
                  f"GFLOP/s; dbmef's slow path reaches {roof['dbmef']['fraction_of_peak']:.1%} of it."]
    if "scorer_profile" in r:
        share = list(r["scorer_profile"]["share"].items())[:8]
        lines += ["", "Scorer time by ONNX Runtime op type: " + ", ".join(f"{k} {v:.0%}" for k, v in share)]
    if "export" in r:
        e = r["export"]
        lines += ["", f"Export of this bundle: {e['export_s']:.0f} s, peak RSS {e['peak_rss_gib']:.1f} GiB."]
    lines += ["", f"![{name}](results/{name}.png)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(SYSTEMS), action="append")
    ap.add_argument("--work", default="engines/bench")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results/*.json")
    args = ap.parse_args()
    from dbmef.apps.bench import plot, run_bench
    from dbmef.runtime import RuntimeSpec

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    names = [] if args.report_only else (args.only or list(SYSTEMS))
    cmd = "python benchmarks/run_benchmarks.py" + "".join(f" --only {n}" for n in (args.only or []))
    for name in names:
        cfg = SYSTEMS[name]
        work = Path(args.work) / name
        system = build_system(name, work / "system")
        bundle, exp = export(name, system, work / "bundle")
        print(f"[{name}] benchmarking", file=sys.stderr)
        spec = RuntimeSpec(str(bundle), scoring=cfg["scoring"], prot=0.0)  # random weights: rethink every image
        r = run_bench(spec, source=system, n_images=cfg["images"], repeats=cfg["repeats"], modes=("off", "exact"),
                      profile=True, progress=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr))
        r["export"] = exp
        r["command"] = cmd
        (results / f"{name}.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
        plot(r, results / f"{name}.png")
    parts = ["# Benchmarks", "",
             f"Regenerate: `.venv/bin/python benchmarks/run_benchmarks.py` (per system: `--only tiny|sd15`). "
             f"Machine: {platform.platform()}, {platform.machine()}, 2 cores, no GPU. Report assembled "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from results/*.json (each section names the "
             "command that measured it). All figures of a section come from one run on "
             "the same images, models and amount of UNet work; times are medians after a warm-up.", ""]
    for name in SYSTEMS:
        p = results / f"{name}.json"
        if p.is_file():
            r = json.loads(p.read_text())
            parts.append(section(name, r, r.get("command", cmd)))
    serve_json = results / "serve.json"
    if serve_json.is_file():
        sys.path.insert(0, str(HERE))
        from serve_load import section as serve_section

        parts.append(serve_section(json.loads(serve_json.read_text())))
    extra = HERE / "NOTES.md"
    if extra.is_file():
        parts.append(extra.read_text())
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
