"""Early exit on the digits system: UNet evaluations against decisions (issue 13).

    python -m benchmarks.digits.early_exit                      # the committed bundle, k = 5, V = 5
    python -m benchmarks.digits.early_exit --all-images         # every test digit rethought (Prot 0)

Two measurements, both on the 597 held-out test digits:

1. **The runtime itself** (fused scorer graph, stage-wise scorer): ``DBMEFRuntime.classify`` with
   ``early_exit`` = off, exact and adaptive (its defaults): decisions, accuracy, UNet evaluations
   per rethought image (counted by the scorer, padding excluded), wall time.
2. **A sweep of the adaptive rule**: the full per-row error tensor of the rethought images is
   computed once through the bundle's plain UNet graph (``DiffusionScorer.score_terms``), and the
   planner is replayed over it for a grid of (z, interval, min_rows): evaluations and agreement
   with ``off`` for each, without another UNet pass. The replay is the scorer's own planner, so
   the runtime's numbers in (1) must match the sweep's row for its default point.

Writes ``benchmarks/digits/early_exit.json``, ``EARLY_EXIT.md`` and ``early_exit.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DigitsSplit, demo_bundle_dir, demo_test_split, render
from dbmef.runtime.early_exit import ExitPolicy
from dbmef.runtime.replay import replay

HERE = Path(__file__).parent
Z_GRID = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, float("inf"))
INTERVALS = (2, 3, 5)
MIN_ROWS = (4, 6, 10)


def full_errors(bundle: Path, split: DigitsSplit, k: int, votes: int, all_images: bool) -> dict[str, Any]:
    """Per-row errors (M, V, n, k) of the images the protector rethinks (or all of them), through the
    plain UNet graph, with the backbone's top-k and the labels."""
    from tqdm.auto import tqdm

    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.method import error_from_terms
    from dbmef.runtime.scorer import DiffusionScorer

    images = [render(a) for a in split.images]
    with DBMEFRuntime(bundle) as base:
        cfg = base.manifest.scoring.replace(k=k, votes=votes, early_exit="off")
    with DBMEFRuntime(bundle, scoring=cfg) as rt:
        pipe = rt.pipeline
        logits, _ = pipe.backbone_logits(images)
        gate = rt.protector.gate(logits, k)
        top = gate.top
        rethink = np.ones(len(images), bool) if all_images else gate.rethink
        sel = np.flatnonzero(rethink)
        latents = pipe.encode_latents([images[j] for j in sel])
        neg = pipe.negative_embeddings(top[sel])
        unet = open_engine(rt.bundle, "unet", "onnxruntime", None)
        scorer = DiffusionScorer(cfg, unet, rt.manifest.vae.latent_shape, rt.manifest.schedule)
        with tqdm(total=len(sel) * votes * cfg.n_timesteps * k, desc="full error tensor", unit="row",
                  mininterval=2) as bar:
            terms = scorer.score_terms(latents, top[sel], pipe.positive_embeddings, neg, bar.update)
        unet.close()
    return {"errors": error_from_terms(terms, cfg.lam).astype(np.float32), "top": top, "rethink": rethink,
            "labels": split.labels, "n_timesteps": cfg.n_timesteps}


def sweep(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Replay every policy over the full errors: evaluations per rethought image, agreement with off
    (over the rethought images and over all test images) and accuracy."""
    e, top, rethink, y = data["errors"], data["top"], data["rethink"], data["labels"]
    sel = np.flatnonzero(rethink)
    off = replay(e, ExitPolicy("off"))
    base_pred = top[:, 0].copy()

    def point(policy: ExitPolicy) -> dict[str, Any]:
        p = off if policy.mode == "off" else replay(e, policy)
        pred = base_pred.copy()
        pred[sel] = top[sel, p.winner]
        agree = int((p.winner == off.winner).sum())
        return {"mode": policy.mode, "z": policy.z, "interval": policy.interval, "min_rows": policy.min_rows,
                "unet_evals_per_rethought_image": float(2 * p.rows.mean()) if len(sel) else 0.0,
                "agreement_rethought": agree / max(len(sel), 1),
                "agreement_all": (agree + len(y) - len(sel)) / len(y),
                "disagreements": len(sel) - agree, "accuracy": float((pred == y).mean()), "stages": p.stages}

    points = [point(ExitPolicy("off")), point(ExitPolicy("exact"))]
    for z in Z_GRID:
        for interval in INTERVALS:
            for min_rows in MIN_ROWS:
                points.append(point(ExitPolicy("adaptive", z, interval, min_rows)))
    return points


def runtime_modes(bundle: Path, split: DigitsSplit, k: int, votes: int, all_images: bool) -> dict[str, Any]:
    """The product path: DBMEFRuntime.classify in each mode, the bundle's adaptive defaults."""
    from dbmef.runtime import RuntimeSpec

    images = [np.asarray(render(a)) for a in split.images]
    out: dict[str, Any] = {}
    for mode in ("off", "exact", "adaptive"):
        spec = RuntimeSpec(str(bundle), scoring={"k": k, "votes": votes, "early_exit": mode}, batch_size=64,
                           prot=0.0 if all_images else None)
        with spec.build() as rt:
            t0 = time.perf_counter()
            res = rt.classify(images)
            wall = time.perf_counter() - t0
            cfg = rt.config
        re = [r for r in res if r.rethought]
        out[mode] = {"labels": [r.label for r in res], "accuracy": float(np.mean([r.label == t for r, t in
                                                                                   zip(res, split.labels)])),
                     "rethought": len(re), "unet_evals_per_rethought_image": float(np.mean([r.unet_evals for r in re]))
                     if re else 0.0, "wall_s": wall,
                     "policy": {"z": cfg.exit_z, "interval": cfg.exit_interval, "min_rows": cfg.exit_min_rows}}
    off = np.array(out["off"]["labels"])
    for mode in ("exact", "adaptive"):
        out[mode]["decisions_differing_from_off"] = int((np.array(out[mode]["labels"]) != off).sum())
        out[mode]["evals_ratio_to_off"] = (out[mode]["unet_evals_per_rethought_image"]
                                           / max(out["off"]["unet_evals_per_rethought_image"], 1e-9))
    for v in out.values():
        v.pop("labels")
    return out


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    from dbmef.apps.report import pyplot, save_figure

    fig, ax = pyplot().subplots(1, 2, figsize=(11, 4))
    for interval, marker in zip(INTERVALS, "os^"):
        for min_rows, color in zip(MIN_ROWS, ("C0", "C1", "C2")):
            pts = [p for p in points if p["mode"] == "adaptive" and p["interval"] == interval
                   and p["min_rows"] == min_rows]
            x = [p["unet_evals_per_rethought_image"] for p in pts]
            ax[0].plot(x, [100 * p["agreement_rethought"] for p in pts], marker=marker, color=color, lw=0.8,
                       label=f"interval {interval}, min rows {min_rows}")
            ax[1].plot(x, [100 * p["accuracy"] for p in pts], marker=marker, color=color, lw=0.8)
    from dbmef.runtime.config import ScoringConfig

    d = ScoringConfig()
    for p in points:
        if p["mode"] == "adaptive" and (p["z"], p["interval"], p["min_rows"]) == (d.exit_z, d.exit_interval,
                                                                                  d.exit_min_rows):
            for a, key in ((ax[0], "agreement_rethought"), (ax[1], "accuracy")):
                a.scatter([p["unet_evals_per_rethought_image"]], [100 * p[key]], s=220, facecolors="none",
                          edgecolors="r", linewidths=1.5, zorder=5)
                a.annotate("default", (p["unet_evals_per_rethought_image"], 100 * p[key]), xytext=(6, -12),
                           textcoords="offset points", fontsize=8, color="r")
        if p["mode"] in ("off", "exact"):
            for a, key in ((ax[0], "agreement_rethought"), (ax[1], "accuracy")):
                a.scatter([p["unet_evals_per_rethought_image"]], [100 * p[key]], s=80, marker="*", color="k")
                a.annotate(p["mode"], (p["unet_evals_per_rethought_image"], 100 * p[key]), fontsize=8)
    ax[0].set_ylabel("% of rethought images decided as off")
    ax[1].set_ylabel("% test accuracy")
    for a in ax:
        a.set_xlabel("UNet evaluations per rethought image")
        a.set_xscale("log")
    ax[0].legend(fontsize=7)
    fig.suptitle(title + " (one point per z; z = inf is exact)")
    save_figure(fig, path)


def markdown(report: dict[str, Any]) -> str:
    rt, pts = report["runtime"], report["sweep"]
    lines = [f"# Early exit on the digits system ({report['title']})", "",
             f"Command: `{report['command']}`; {report['date']}, {report['machine']}.", "",
             "UNet evaluations are counted by the scorer (padding excluded) and are the same on every machine. "
             "The wall column is one run each, taken while another job (digits training) shared the 2 cores: "
             "it is not a speed measurement; `dbmef bench` measures speed (medians of repeats, ratios in one "
             "run, benchmarks/digits/STREAM.md).", ""]
    if rt:
        lines += ["## The runtime (fused scorer, stage-wise), every test digit", "",
                  "| mode | accuracy | rethought | UNet evals / rethought image | x off | decisions != off | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for mode, r in rt.items():
            lines.append(f"| {mode} | {r['accuracy']:.2%} | {r['rethought']} | "
                         f"{r['unet_evals_per_rethought_image']:.0f} | {r.get('evals_ratio_to_off', 1.0):.3f} | "
                         f"{r.get('decisions_differing_from_off', 0)} | {r['wall_s']:.1f} |")
        lines += ["", f"adaptive defaults: {rt['adaptive']['policy']}", ""]
    lines += ["## Sweep of the adaptive rule (replayed over the full per-row errors of the rethought images)", "",
              "| mode | z | interval | min rows | evals / rethought image | agree (rethought) | agree (all) "
              "| accuracy |", "|---|---|---|---|---|---|---|---|"]
    for p in pts:
        lines.append(f"| {p['mode']} | {p['z']} | {p['interval']} | {p['min_rows']} | "
                     f"{p['unet_evals_per_rethought_image']:.0f} | {p['agreement_rethought']:.2%} | "
                     f"{p['agreement_all']:.2%} | {p['accuracy']:.2%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import os
    import platform

    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.early_exit", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=demo_bundle_dir())
    p.add_argument("--split", type=Path, help="test split .npz (default: the committed one)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--votes", type=int, default=5)
    p.add_argument("--all-images", action="store_true", help="rethink every test digit (Prot 0)")
    p.add_argument("--out", type=Path, default=HERE, help="folder for early_exit{.json,.png}, EARLY_EXIT.md")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--no-runtime", action="store_true",
                   help="the sweep only (replayed planner), without timing the runtime in each mode")
    p.add_argument("--report-only", action="store_true", help="redraw the PNG and markdown from the saved JSON")
    a = p.parse_args(argv)
    if a.report_only:
        report = json.loads((a.out / f"early_exit{a.tag}.json").read_text())
        (a.out / f"EARLY_EXIT{a.tag.upper()}.md").write_text(markdown(report))
        plot(report["sweep"], a.out / f"early_exit{a.tag}.png", report["title"])
        return
    split = DigitsSplit.load(a.split) if a.split else demo_test_split()
    name = "committed digits bundle" if a.bundle == demo_bundle_dir() else str(a.bundle)
    title = f"{name}, k = {a.k}, V = {a.votes}, {'Prot 0' if a.all_images else 'calibrated protector'}"
    data = full_errors(a.bundle, split, a.k, a.votes, a.all_images)
    points = sweep(data)
    report = {"title": title, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python -m benchmarks.digits.early_exit " + " ".join(argv or []),
              "runtime": {} if a.no_runtime else runtime_modes(a.bundle, split, a.k, a.votes, a.all_images),
              "sweep": points}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"early_exit{a.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    (a.out / f"EARLY_EXIT{a.tag.upper()}.md").write_text(markdown(report))
    plot(points, a.out / f"early_exit{a.tag}.png", title)
    print(markdown(report))


if __name__ == "__main__":
    main()
