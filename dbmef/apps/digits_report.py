"""Table 1's report: the markdown of a results file of ``benchmarks/digits/table.py`` (the
per-seed training table, one block per backbone and k, the early-exit and fused-decision sections),
and the hand-written notes kept across regenerations. The numbers come from ``digits_table``."""

from __future__ import annotations

from typing import Any

import numpy as np

from dbmef.apps.digits_table import COLUMNS

TITLES = {
    "top1": "top-1", "no_protector": "w/o protector", "neg_only": "prot + neg", "pos_only": "prot + pos",
    "combined": "prot + both", "combined_votes": "prot + both + 5 votes",
}


def markdown(data: dict[str, Any], raw: str = "benchmarks/digits/results.json") -> str:
    res = data["results"]
    seeds = sorted({r["seed"] for r in res})
    spe = data["unet_seconds_per_eval"]
    shared = sorted({r["diffusion_from"] for r in res if r.get("diffusion_from")})
    lines = _header(data, raw, shared)
    for seed in seeds:
        r = next(x for x in res if x["seed"] == seed)
        t = r.get("train_seconds", {})
        acc = r.get("torch_test_accuracy", {})
        lines.append(f"| {seed} | {t.get('classifiers', 0):.0f} | {t.get('vae', 0):.0f} | {t.get('unet', 0):.0f} | "
                     f"{t.get('total', 0):.0f} | {acc.get('weak', 0) * 100:.1f} | {acc.get('strong', 0) * 100:.1f} |")
    lines += [
        "",
        "## Table 1 on the digits test split (597 images)",
        "",
        f"Mean ± standard deviation over training seeds {seeds} "
        f"({'each seed retrains the classifiers; one diffusion side' if shared else 'each seed retrains every model'}"
        "); "
        "accuracy in %. Below each block: UNet evaluations per test image (exact counts) and the UNet "
        f"milliseconds per image they cost at {spe * 1e3:.3f} ms per evaluation (the bundle's UNet on ONNX "
        f"Runtime, {data['machine']['cpus']} CPU cores, median of repeated calls of 128 samples, measured when "
        "the report was written on an otherwise idle machine).",
        "",
    ]
    for backbone in ("weak", "strong"):
        for k in sorted({r["k"] for r in res}):
            rs = [r for r in res if r["backbone"] == backbone and r["k"] == k]
            if rs:
                lines += table_block(backbone, k, rs, spe)
    lines += early_exit_markdown(res)
    lines += fused_markdown(res)
    return "\n".join(lines)


def _header(data: dict[str, Any], raw: str, shared: list[str]) -> list[str]:
    """Title, how to regenerate, what the columns are, and the training table's head. ``shared``: the
    bundles whose diffusion side the runs reused (``--diffusion-from``), none for full runs."""
    res = data["results"]
    # Each bundle's Prot is in its results; the header says what was run rather than what was meant.
    prots = ", ".join(
        f"Prot {'/'.join(f'{p:g}' for p in sorted({r['prot'] for r in res if r['backbone'] == b}))} "
        f"for the {b} backbone" for b in ("weak", "strong") if any(r["backbone"] == b for r in res))
    if shared:
        title = "# Digits: Table 1 on systems that share one diffusion side"
        regen = (f"Regenerate: `for s in 0 1 2; do python -m benchmarks.digits.train --seed $s --diffusion-from "
                 f"{shared[0]} --out engines/digits/clf-seed$s; done` then `python -m benchmarks.digits.table "
                 f"engines/digits/clf-seed{{0,1,2}} --json {raw} --markdown ...`. Each seed trains the weak and "
                 f"the strong classifier; the text encoder, VAE and UNet are those of {', '.join(shared)} "
                 "(`dbmef-export --sd BUNDLE`), so the spread below is the classifiers' alone.")
    else:
        title = "# Digits: the paper's Table 1 on real held-out images"
        regen = ("Regenerate: `for s in 0 1 2; do python -m benchmarks.digits.train --seed $s --out "
                 "engines/digits/seed$s; done` then `python -m benchmarks.digits.table engines/digits/seed{0,1,2} "
                 "--markdown benchmarks/digits/RESULTS.md`.")
    return [
        title, "",
        f"{regen} Machine: {data['machine']['platform']}, {data['machine']['cpus']} CPU "
        f"cores, no GPU; written {data['date']}. Raw numbers: `{raw}`.",
        "",
        "Columns: **top-1** the backbone alone; **w/o protector** every image rethought (lam 1.1, V 1), i.e. "
        "the diffusion classifier alone on the backbone's top-k; **prot + neg / + pos / + both** the calibrated "
        f"protector ({prots}) with the rethought images re-ranked by the negative condition only (the "
        "candidate whose negative predicts the noise worst wins), the positive only (lam 1), or both "
        "(lam 1.1); **+ 5 votes** the same with V = 5. n = 30 timesteps everywhere. The prot + both column is "
        "what `DBMEFRuntime.classify` serves (checked in the same run, below each block).",
        "",
        "## Training",
        "",
        "| seed | classifiers s | VAE s | UNet + text encoder s | total s | weak test acc (torch) | "
        "strong test acc (torch) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]


def table_block(backbone: str, k: int, rs: list[dict[str, Any]], spe: float) -> list[str]:
    """One backbone's Table 1 block at one k over its seeds ``rs``: accuracies, costs, the runtime check."""
    lines = [f"### {backbone} backbone, k = {k}", "",
              "| | " + " | ".join(TITLES[c] for c in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    accs = np.array([[r["accuracy"][c] * 100 for c in COLUMNS] for r in rs])
    lines.append("| accuracy | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in
                                               zip(accs.mean(0), accs.std(0))) + " |")
    for r in rs:
        cells = " | ".join(f"{r['accuracy'][c] * 100:.2f}" for c in COLUMNS)
        lines.append(f"| seed {r['seed']} | {cells} |")
    gain = accs[:, COLUMNS.index("combined")] - accs[:, 0]
    ev = np.mean([[r["unet_evals_per_image"][c] for c in COLUMNS] for r in rs], axis=0)
    sec = ev * spe * 1e3
    lines.append("| UNet evals / image | " + " | ".join(f"{v:.1f}" for v in ev) + " |")
    lines.append("| UNet ms / image | " + " | ".join(f"{v:.1f}" for v in sec) + " |")
    rate = np.array([r["rethink_rate"] for r in rs]) * 100
    chk = [r["runtime_check"] for r in rs if r["runtime_check"]]
    lines += ["", f"Rethink rate {rate.mean():.1f} % (per seed {', '.join(f'{x:.1f}' for x in rate)}); "
                  f"gain of prot + both over top-1: {', '.join(f'{g:+.2f}' for g in gain)} points; "
                  "fixed/broken by prot + both: "
                  + ", ".join(f"{r['flips']['fixed']}/{r['flips']['broken']}" for r in rs) + "."]
    if chk:
        lines.append("Runtime check (`DBMEFRuntime.classify`, fused graph): accuracy "
                     + ", ".join(f"{c['runtime_accuracy'] * 100:.2f}" for c in chk)
                     + " %, decisions differing from the table's prot + both: "
                     + ", ".join(str(c["differences"]) for c in chk)
                     + f"; wall time {np.mean([c['seconds_per_image'] for c in chk]) * 1e3:.1f} ms "
                     "per test image.")
    lines.append("")
    return lines


def early_exit_markdown(res: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in res if r.get("early_exit")]
    if not rows:
        return []
    pol = rows[0]["early_exit"]["V1"]["adaptive"]["policy"]
    low = [f"{r['backbone']} k={r['k']} V={vk[1:]} seed {r['seed']} ({e['adaptive']['agreement_with_off']:.1%})"
           for r in rows for vk, e in r["early_exit"].items() if e["adaptive"]["agreement_with_off"] < AGREEMENT]
    lines = ["## Early exit (issue 13)", "",
             "The rethought images' full per-row errors (the prot + both / + 5 votes columns above) replayed "
             "through the runtime's early-exit planner (`dbmef.runtime.replay.replay`, the code the scorer "
             f"runs): UNet evaluations per rethought image, decisions equal to `off` on the rethought images, and "
             f"test accuracy. adaptive at the runtime's defaults (z = {pol['z']}, interval {pol['interval']}, "
             f"min rows {pol['min_rows']}), chosen on the 200 calibration digits of the committed (seed-0 weak) "
             "bundle (`python -m benchmarks.digits.exit_defaults`, EXIT_DEFAULTS.md): every row below is held out. "
             f"Held-out systems where adaptive agrees with off on fewer than {AGREEMENT:.1%} of the rethought "
             f"images: {', '.join(low) or 'none'}.",
             "", "| backbone | k | V | seed | evals off | exact | adaptive | agree exact | agree adaptive | "
             "acc off | acc adaptive |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["backbone"] != "weak", r["k"], r["seed"])):
        for vk, e in r["early_exit"].items():
            lines.append(
                f"| {r['backbone']} | {r['k']} | {vk[1:]} | {r['seed']} | "
                + " | ".join(f"{e[m]['unet_evals_per_rethought_image']:.0f}" for m in ("off", "exact", "adaptive"))
                + f" | {e['exact']['agreement_with_off']:.1%} | {e['adaptive']['agreement_with_off']:.1%} | "
                f"{e['off']['accuracy']:.2%} | {e['adaptive']['accuracy']:.2%} |")
    return [*lines, ""]


def fused_markdown(res: list[dict[str, Any]]) -> list[str]:
    """The fused decision's columns (issue 34) and its done-when per held-out row: no worse than the
    better of the paper's rule and rethink-all minus 0.1 points, never below the backbone alone."""
    rows = [r for r in res if r.get("fused")]
    if not rows:
        return []
    lines = ["## The fused decision (issue 34)", "",
             "beta fitted by maximum likelihood on each system's own 200 calibration digits, every one rethought "
             "(`fusion.fit_beta`, docs/fused_decision.md); the test digits are held out. Columns: rethink-all "
             "(Prot 0, V 1) and the protector at V 1 and V 5, paper's rule / fused rule; **ok** is the done-when: "
             "fused >= max(paper, paper rethink-all) - 0.1 points and >= top-1, at every V. **cost**: the "
             "protector's rethink rate and UNet evaluations per test image at V 1 / V 5, the same for both rules "
             "(they rethink the same images; `exact` early exit spends slightly different amounts on each).", "",
             "| backbone | k | seed | beta V1 / V5 | top-1 | Prot 0 paper / fused | prot V1 paper / fused | "
             "prot V5 paper / fused | cost | ok |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    gains: dict[str, list[float]] = {"weak": [], "strong": []}
    for r in sorted(rows, key=lambda r: (r["backbone"] != "weak", r["k"], r["seed"])):
        f, a = r["fused"], r["fused"]["accuracy"]
        vs = sorted(int(v[1:]) for v in f["beta"])
        ok = all(a[f"fused_V{v}"] >= max(a[f"paper_V{v}"], a["paper_prot0"]) - 0.001 and
                 a[f"fused_V{v}"] >= a["top1"] for v in vs)
        gains[r["backbone"]] += [a[f"fused_V{v}"] - a[f"paper_V{v}"] for v in vs]
        cols = ("prot0", *(f"V{v}" for v in vs))
        cells = " | ".join(f"{a['paper_' + c]:.2%} / {a['fused_' + c]:.2%}" for c in cols)
        betas = " / ".join(f"{f['beta']['V' + str(v)]:.0f}" for v in vs)
        ev = r["unet_evals_per_image"]
        cost = f"{r['rethink_rate']:.1%}, {ev['combined']:.1f} / {ev['combined_votes']:.1f}"
        lines.append(f"| {r['backbone']} | {r['k']} | {r['seed']} | {betas} | {a['top1']:.2%} | {cells} | {cost} | "
                     f"{'yes' if ok else 'NO'} |")
    lines += ["", "Mean gain of the fused rule over the paper's at the protector's threshold: "
              + "; ".join(f"{b} {np.mean(g) * 100:+.2f} points" for b, g in gains.items() if g) + ".", ""]
    return lines


NOTES = "## Notes"
AGREEMENT = 0.995  # issue 25: adaptive must agree with off on at least this share of each held-out system's images


def with_notes(generated: str, previous: str) -> str:
    """The generated report followed by the hand-written ``## Notes`` section of the previous one.

    The tables are regenerated whenever a run is added; the notes (what the numbers mean, what is
    missing) are written by people and must survive that, so everything from the heading on is kept.
    """
    lines = previous.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == NOTES), None)
    body = generated.rstrip("\n") + "\n"
    return body if start is None else body + "\n" + "".join(lines[start:])
