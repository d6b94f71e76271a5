"""The row scheduler on the digits system (issue 22): batch-synchronous vs continuous rows.

    python -m benchmarks.digits.stream                 # measure (dbmef bench, k = 5, V = 5) and write the report
    python -m benchmarks.digits.stream --from-json F   # write the report from a saved `dbmef bench --json`

The measurement is exactly ``dbmef bench --bundle dbmef/assets/digits/bundle --k 5 --votes 5 --json``:
the committed bundle on its 597 test digits at its protector, ``--batch-size 16``, ONNX Runtime on
this machine's CPU. Writes ``benchmarks/digits/stream.json``, ``STREAM.md`` and ``stream.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
COMMAND = "dbmef bench --bundle dbmef/assets/digits/bundle --k 5 --votes 5 --json --plot benchmarks/digits/stream.png"


def measure() -> dict[str, Any]:
    from dbmef.apps.bench import run_bench
    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.runtime import RuntimeSpec

    spec = RuntimeSpec(str(demo_bundle_dir()), scoring={"k": 5, "votes": 5})
    return run_bench(spec, progress=print)


def report(r: dict[str, Any]) -> str:
    d, sc = r["data"], r["scoring"]
    lines = [
        "# The row scheduler on the digits system", "",
        f"Command: `{COMMAND}` ({r['date']}, {r['machine']['cpus']} CPU cores, "
        f"{r['machine']['providers']['scorer']}). {d['images']} images from {d['source']}, {d['rethought']} "
        f"rethought at the bundle's protector; k = {sc['k']}, V = {sc['votes']}, n = {sc['n_timesteps']}, "
        f"{sc['unet_batch']} rows per engine call, `--batch-size {r['batch_size']}`. Every figure below comes "
        "from this one run.", "",
        "## The whole stream: batch-synchronous vs the row scheduler", "",
        "Each mode classifies all the images in fast-path batches of 16. *batch-synchronous* is the earlier slow "
        "path (each batch's rethought images in lockstep stages, every stage's last engine call padded, no answer "
        "before its batch is done); *row scheduler* is `DBMEFRuntime.stream`. Slow-path seconds: the VAE, text "
        "encoder, UNet and vote stages summed over the rethought images. Latency: from an image's fast-path "
        "batch to its answer.", "",
        "| mode | slow path | slow-path s | UNet evals / rethought image | rows sent / rows needed | engine calls "
        "| rows ahead (used) | latency p50 / p95 s | images with another answer or row count |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, v in r["modes"].items():
        for p, name in (("sync", "batch-synchronous"), ("scheduler", "row scheduler")):
            st = v["stream"][p]
            rows = st["rows"]
            lines.append(
                f"| {m} | {name} | {st['slow_path_s']:.1f} | {st['unet_evals_per_rethought_image']:.1f} | "
                f"{rows['rows_sent_per_row_needed']:.3f} ({rows['rows_sent']} / {rows['rows_needed']}) | "
                f"{rows['engine_calls']} | {rows['rows_ahead']} ({rows['rows_ahead_used']}) | "
                f"{st['latency_rethought_s']['p50']:.2f} / {st['latency_rethought_s']['p95']:.2f} | "
                f"{v['images_differing_sync_vs_scheduler'] if p == 'scheduler' else '-'} |")
    ex, ad = r["modes"].get("exact"), r["modes"].get("adaptive")
    if ex and ad:
        a_s, e_s = ad["stream"]["scheduler"], ex["stream"]["scheduler"]
        evals = a_s["unet_evals_per_rethought_image"] / e_s["unet_evals_per_rethought_image"]
        sync = ad["stream"]["sync"]["slow_path_s"] / ex["stream"]["sync"]["slow_path_s"]
        lines += ["", f"adaptive's slow path takes **{r['adaptive_over_exact_slow_path_s']:.2f}x** exact's "
                  f"({a_s['slow_path_s']:.1f} s vs {e_s['slow_path_s']:.1f} s) for {evals:.2f}x its UNet evaluations; "
                  f"batch-synchronous it took {sync:.2f}x."]
    lines += [
        "", "## The rethought images: all at once, at 50 % load, and against the paper's scripts", "",
        f"The {d['rethought']} rethought images submitted together to a `ClassifierWorker` (wall: median of "
        f"{len(next(iter(r['modes'].values()))['all_at_once']['wall_s']['all'])} runs after a warm-up; latency from "
        "submission, of the median run), then arriving as a Poisson process at half the rate the all-at-once run "
        "sustained. `paper_scripts`: the official scripts' structure over the bundle's own engines (one image at a "
        "time, VAE before the gate, prompts encoded per image, positive and negative in separate UNet calls of up "
        f"to 30 rows, every vote): {r['paper_scripts_engines']['wall_s']['p50']:.1f} s.", "",
        "| mode | wall s | speed-up vs paper_scripts | decisions != paper_scripts | latency p50 / p95 / last s "
        "| median / last | at 50 % load: p50 / p95 s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, v in r["modes"].items():
        o, a = v["all_at_once"], v.get("at_rate", {})
        lines.append(f"| {m} | {o['wall_s']['p50']:.1f} | {v.get('speedup_vs_paper_scripts', float('nan')):.2f}x | "
                     f"{v.get('decisions_differing_from_paper_scripts', '-')} | {o['latency_s']['p50']:.1f} / "
                     f"{o['latency_s']['p95']:.1f} / {o['latency_s']['max']:.1f} | {o['median_over_last']:.2f} | "
                     f"{a.get('latency_s', {}).get('p50', float('nan')):.1f} / "
                     f"{a.get('latency_s', {}).get('p95', float('nan')):.1f} |")
    lines += ["", "Headline keys of the JSON: " + ", ".join(
        f"`{k}` = {r[k]:.4g}" for k in ("rows_sent_per_row_needed", "speedup_vs_paper_scripts_equal_decisions",
                                        "speedup_vs_paper_scripts_equal_work", "speedup_vs_paper_scripts_adaptive")
        if k in r) + ".", "", "![row scheduler](stream.png)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-json", help="a saved `dbmef bench --json` report")
    args = ap.parse_args()
    r = json.loads(Path(args.from_json).read_text()) if args.from_json else measure()
    (HERE / "stream.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    from dbmef.apps.bench import plot

    plot(r, HERE / "stream.png")
    (HERE / "STREAM.md").write_text(report(r))
    print(f"wrote {HERE / 'STREAM.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
