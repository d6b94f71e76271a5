"""INT8 UNet graphs (issue 37) on the committed digits system: decisions and speed against fp32.

    python -m benchmarks.digits.quantize select   # calibration split only: the recipe's grid, the choice
    python -m benchmarks.digits.quantize test     # the chosen recipe on the 597 test digits, once

``select`` quantizes with each (calibration images, range method) of a small grid and measures how many
of the 200 calibration digits' decisions each INT8 graph changes (``quantize_select.json``); the rule
and the choice are written in docs/quantization.md and become ``dbmef quantize``'s defaults.
``test`` quantizes the committed bundle with those defaults on the 200 calibration digits, then on the
597 test digits, once:

* decisions of the INT8 and the fp32 bundle with every digit rethought (``--prot 0``), for the fused
  scorer and for the plain UNet graph (``scorer="unet"``), and at the bundle's own protector;
* UNet evaluations per second of each graph, fp32 against INT8, on the scorer rows the runtime
  feeds when it rethinks test digits (ONNX Runtime, this machine's CPU; runs interleaved, median of 5);

and writes ``quantize.json``, ``QUANTIZE.md`` and ``quantize.png`` (each candidate's noise error,
fp32 against INT8).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import SPLITS, demo_bundle_dir, write_image_folder

HERE = Path(__file__).parent
REPEATS = 5


def run(bundle: Path, images: list[str], **settings: Any) -> list[dict[str, Any]]:
    from dbmef.runtime import DBMEFRuntime

    t0 = time.perf_counter()
    with DBMEFRuntime(bundle, backend="onnxruntime", **settings) as rt:
        out = [r.to_dict() for r in rt.classify(images)]
    print(f"  {bundle.name} {settings}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def compare(ref: list[dict[str, Any]], got: list[dict[str, Any]], y: np.ndarray) -> dict[str, Any]:
    rethought = [i for i, r in enumerate(ref) if r["rethought"]]
    assert rethought == [i for i, r in enumerate(got) if r["rethought"]]  # the same fp32 backbone and gate
    differ = [i for i in rethought if ref[i]["label"] != got[i]["label"]]
    margins = {i: margin(ref[i]) for i in rethought}
    ranked = sorted(m for m in margins.values() if m is not None)
    return {"images": len(ref),
            # how close fp32's own decision was: the flipped images' margins, as a percentile among all
            "flipped_margin_percentile": [100 * sum(x < m for x in ranked) / len(ranked)
                                          for i in differ if (m := margins[i]) is not None],
            "rethought": len(rethought), "differ": len(differ),
            "agreement_rethought": 1 - len(differ) / max(len(rethought), 1),
            "accuracy_fp32": float(np.mean([r["label"] == t for r, t in zip(ref, y, strict=True)])),
            "accuracy_int8": float(np.mean([r["label"] == t for r, t in zip(got, y, strict=True)])),
            "unet_evals_fp32": int(sum(r["unet_evals"] for r in ref)),
            "unet_evals_int8": int(sum(r["unet_evals"] for r in got)),
            "differ_images": [{"image": ref[i]["image"], "true": int(y[i]), "fp32": ref[i]["label"],
                               "int8": got[i]["label"]} for i in differ]}


def margin(r: dict[str, Any]) -> float | None:
    """fp32's relative margin: (second-lowest - lowest) / lowest mean noise error over the votes."""
    rows = np.array([[np.nan if e is None else e for e in v] for v in r["noise_errors"]], float)
    if rows.size == 0:
        return None
    mean = np.sort(np.nanmean(rows, axis=0)[~np.isnan(np.nanmean(rows, axis=0))])
    return float((mean[1] - mean[0]) / mean[0]) if len(mean) >= 2 else None


def speed(fp32: Path, int8: Path, images: list[str]) -> dict[str, Any]:
    """UNet evaluations per second of each graph on the runtime's own scorer rows for ``images``."""
    from dbmef.export.feature_bundle import session
    from dbmef.export.quantize import record_scorer_feeds, unet_feeds
    from dbmef.runtime.bundle import Bundle

    m = Bundle.open(fp32).manifest
    feeds = record_scorer_feeds(fp32, images).feeds
    rows = {"scorer": feeds, "unet": unet_feeds(feeds, m.schedule)}
    evals_per_row = {"scorer": 2, "unet": 1}  # the fused graph runs the positive and the negative condition
    out: dict[str, Any] = {}
    for name, batches in rows.items():
        sessions = {p: session(b / m.components[name].file) for p, b in (("fp32", fp32), ("int8", int8))}
        n_rows = sum(len(next(iter(f.values()))) for f in batches)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(REPEATS + 1):  # the first round warms both up and is dropped
            for p, s in sessions.items():
                t0 = time.perf_counter()
                for f in batches:
                    s.run(None, f)
                times[p].append(time.perf_counter() - t0)
        med = {p: float(np.median(t[1:])) for p, t in times.items()}
        out[name] = {"rows": n_rows, "evals_per_row": evals_per_row[name], "seconds_median": med,
                     "evals_per_second": {p: n_rows * evals_per_row[name] / s for p, s in med.items()},
                     "int8_speedup": med["fp32"] / med["int8"], "repeats": REPEATS}
    return out


def plot(pairs: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.scatter(pairs[:, 0], pairs[:, 1], s=4, alpha=0.4)
    lo, hi = float(pairs.min()), float(pairs.max())
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xlabel("fp32 noise error (fused scorer)")
    ax.set_ylabel("INT8 noise error")
    r = np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]
    ax.set_title(f"597 test digits x k candidates, every digit rethought\nPearson r = {r:.5f}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def error_pairs(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> np.ndarray:
    pairs = []
    for a, b in zip(ref, got, strict=True):
        for va, vb in zip(a["noise_errors"], b["noise_errors"], strict=True):
            pairs += [(x, z) for x, z in zip(va, vb, strict=True) if x is not None and z is not None]
    return np.asarray(pairs, np.float64)


GRID_IMAGES = (64, 200)
GRID_RANGES = ("minmax", "percentile", "entropy")
ALL_OPS = ("Conv", "MatMul", "Gemm")
# cells: (calibration images, ranges, quantized op types)
Cell = tuple[int, str, tuple[str, ...]]
GRID: list[Cell] = [(n, r, ALL_OPS) for n in GRID_IMAGES for r in GRID_RANGES]
# added after the first six cells all changed more than 1 of 200 decisions: the attention matmuls
# (both operands activations) left in float
GRID_OPS: list[Cell] = [(64, "minmax", ("Conv", "Gemm")), (64, "minmax", ("Conv",))]


def select(work: Path, cells: list[Cell]) -> None:
    """Every grid cell's INT8 graphs against fp32 on all 200 calibration digits (Prot = 0)."""
    from dbmef.export.quantize import QuantizeConfig, decisions, quantize_bundle

    fp32 = demo_bundle_dir()
    cal = write_image_folder(SPLITS["calibration"](), work / "calibration")
    from dbmef.runtime.data import expand_inputs

    images = expand_inputs([cal])
    ref = {kind: decisions(fp32, images, kind) for kind in ("fused", "unet")}
    path = HERE / "quantize_select.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for n, ranges, ops in cells:
        out = work / f"int8-{n}-{ranges}-{'-'.join(ops)}"
        t0 = time.perf_counter()
        quantize_bundle(QuantizeConfig(str(fp32), str(cal), str(out), images=n, ranges=ranges, ops=ops,
                                       max_disagree=1.0))
        row: dict[str, Any] = {"images": n, "ranges": ranges, "ops": list(ops), "seconds": time.perf_counter() - t0}
        for kind in ("fused", "unet"):
            got = decisions(out, images, kind)
            row[kind] = [{"image": images[i], "fp32": a, "int8": b}
                         for i, (a, b) in enumerate(zip(ref[kind], got, strict=True)) if a != b]
        print(f"images {n} ranges {ranges} ops {ops}: changed fused {len(row['fused'])}, unet {len(row['unet'])} "
              f"of {len(images)} ({row['seconds']:.0f} s)", flush=True)
        rows = [r for r in rows if (r["images"], r["ranges"], r.get("ops", list(ALL_OPS))) != (n, ranges, list(ops))]
        rows.append(row)
        shutil.rmtree(out)
        path.write_text(json.dumps({"calibration_digits": len(images), "rows": rows}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["select", "select-ops", "test"])
    p.add_argument("--work", default="engines/quantize")
    p.add_argument("--smoke", action="store_true", help="check the script on 40 calibration digits (never the test "
                   "split), writing into --work only")
    a = p.parse_args()
    if a.phase.startswith("select"):
        select(Path(a.work), GRID if a.phase == "select" else GRID_OPS)
        return
    from dbmef.export.quantize import QuantizeConfig, quantize_bundle

    work, fp32 = Path(a.work), demo_bundle_dir()
    cal = write_image_folder(SPLITS["calibration"](), work / "calibration")
    test = cal if a.smoke else write_image_folder(SPLITS["test"](), work / "test")
    dest = work if a.smoke else HERE
    from dbmef.runtime.bundle import Bundle
    from dbmef.runtime.data import load_labelled

    items = load_labelled(test, Bundle.open(fp32).manifest.class_names)
    items = items[::5] if a.smoke else items
    images, y = [it.path for it in items], np.array([it.label for it in items])
    t0 = time.perf_counter()
    # the defaults (docs/quantization.md), but the gate only measured here: its verdict is reported
    built = quantize_bundle(QuantizeConfig(str(fp32), str(cal), str(work / "int8"), max_disagree=1.0))
    quantize_s = time.perf_counter() - t0
    int8 = Path(built["bundle"])
    results: dict[str, Any] = {}
    for label, settings in (("fused_prot0", {"prot": 0.0}), ("unet_prot0", {"prot": 0.0, "scorer": "unet"}),
                            ("fused_bundle_protector", {})):
        ref, got = run(fp32, images, **settings), run(int8, images, **settings)
        results[label] = compare(ref, got, y)
        if label == "fused_prot0":
            plot(error_pairs(ref, got), dest / "quantize.png")
            results[label]["error_pearson"] = float(np.corrcoef(error_pairs(ref, got).T)[0, 1])
    out = {"quantize": {**built, "seconds": quantize_s}, "test": results,
           "speed": speed(fp32, int8, images[::20]), "test_images": len(images),
           "machine": {"platform": platform.platform(), "cpus": 2}, "date": time.strftime("%Y-%m-%d")}
    (dest / "quantize.json").write_text(json.dumps(out, indent=1) + "\n")
    (dest / "QUANTIZE.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    q, t, s = out["quantize"], out["test"], out["speed"]
    rows = "\n".join(
        f"| {name} | {r['rethought']} | {r['differ']} | {100 * r['agreement_rethought']:.2f} | "
        f"{100 * r['accuracy_fp32']:.2f} | {100 * r['accuracy_int8']:.2f} | "
        f"{', '.join(f'{p:.0f}' for p in sorted(r['flipped_margin_percentile'])) or '-'} |" for name, r in t.items())
    sp = "\n".join(
        f"| {name} | {v['rows']} x {v['evals_per_row']} | {v['evals_per_second']['fp32']:.0f} | "
        f"{v['evals_per_second']['int8']:.0f} | {v['int8_speedup']:.2f}x |" for name, v in s.items())
    gates = ", ".join(f"{n} {g['agree']}/{g['images']}" for n, g in q["gates"].items())
    refused = [n for n, g in q["gates"].items() if g["images"] - g["agree"] > 0.005 * g["images"]]
    verdict = (f"at the default 0.5 % the gate refuses it ({', '.join(refused)})" if refused else
               "the default 0.5 % gate accepts it")
    return f"""# INT8 UNet graphs on the digits system

Regenerate: `python -m benchmarks.digits.quantize select`, then `... test`
({out['machine']['platform']}, 2 CPU cores, no GPU; written {out['date']}). Raw numbers:
`benchmarks/digits/quantize.json`. Recipe and its choice (fixed on the calibration split before any
test digit): `docs/quantization.md`.

`dbmef quantize` with its defaults on the 200 calibration digits took {q['seconds']:.0f} s here; its
gate (run here with no limit, to measure) agreed on {gates} calibration decisions:
{verdict}.

## Decisions on the {out['test_images']} test digits (scored once)

| setting | rethought | changed | agreement % | fp32 accuracy % | INT8 accuracy % | changed: fp32 margin pct |
|---|---:|---:|---:|---:|---:|---|
{rows}

`fused_prot0`: every digit rethought by the fused scorer; `unet_prot0`: the same with the plain
UNet graph (`scorer="unet"`); `fused_bundle_protector`: the bundle's calibrated threshold. Noise
errors of every candidate, fp32 against INT8: Pearson r = {t['fused_prot0']['error_pearson']:.5f}
(`quantize.png`). "changed" counts rethought images whose decision differs. The last column places
each changed image's fp32 margin (second-lowest minus lowest mean error, over the lowest) among all
rethought images' margins, as a percentile: 0 is the closest call.

## Speed (ONNX Runtime CPU provider, this machine: AMD EPYC, AVX2, no AVX-512 and no VNNI)

| graph | rows x UNet evaluations per row | fp32 evaluations/s | INT8 evaluations/s | INT8 speed-up |
|---|---:|---:|---:|---:|
{sp}

The runtime's own scorer rows for every 20th test digit, median of {s['scorer']['repeats']} interleaved runs.

![errors](quantize.png)
"""


if __name__ == "__main__":
    main()
