"""Issue 39's held-out report: adaptive's families, chosen on the calibration split
(``benchmarks.digits.exit_defaults``, EXIT_DEFAULTS.md), replayed once on test digits.

    python -m benchmarks.digits.exit_heldout    # after exit_defaults; writes EXIT_HELDOUT.md, exit_heldout.json, .png

The committed bundle is the seed-0 weak system of Table 1 (RESULTS.md). Its 597 test digits, its
protector: the rethought digits' full per-row errors at k = 3 and 5 (V = 5; V = 1 is the first vote)
are computed once through the plain UNet graph (kept in ``--cache``), and every policy is the
runtime's planner replayed over them (``replay.replay``): UNet evaluations per rethought digit,
decisions unlike ``off``'s, accuracy over all 597. Policies: ``off``, ``exact``, adaptive's previous
defaults, the chosen defaults, and each family's own choice on calibration. The plot: evaluations
per rethought image against agreement with ``off`` at k = 5, V = 5, one curve per family (its z
swept at its chosen interval and min rows), calibration split and held-out test digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.digits.early_exit import full_errors
from benchmarks.digits.exit_defaults import PREVIOUS, SETTINGS, Z_GRID, errors_for, policy_of
from dbmef.apps.digits import demo_bundle_dir, demo_test_split
from dbmef.runtime.early_exit import ExitPolicy
from dbmef.runtime.replay import replay

HERE = Path(__file__).parent
def test_errors(bundle: Path, k: int, cache: Path) -> dict[str, Any]:
    path = cache / f"test_rethought_k{k}_V5.npz"
    if path.exists():
        return dict(np.load(path))
    d = full_errors(bundle, demo_test_split(), k, 5, all_images=False)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{n: np.asarray(d[n]) for n in ("errors", "top", "rethink", "labels")})
    return d


def measure(e: np.ndarray, policy: ExitPolicy, off: np.ndarray, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluations per image, decisions unlike off and (with the test data) accuracy over all digits."""
    p = replay(e, policy)
    out = {"unet_evals_per_rethought_image": float(2 * p.rows.mean()), "images": len(e),
           "disagreements": int((p.winner != off).sum()), "agreement": float((p.winner == off).mean())}
    if data is not None:
        top, sel, y = data["top"], np.flatnonzero(data["rethink"]), data["labels"]
        pred = top[:, 0].copy()
        pred[sel] = top[sel, p.winner]
        out["accuracy"] = float((pred == y).mean())
    return out


def separation(e: np.ndarray) -> dict[str, Any]:
    """How far the full method's winner is from its runner-up in the image's own evidence: the
    paired z of the two over all V n rows. An image at z < 3 cannot be decided by any test at
    z ~ 3 before nearly all its rows of both candidates are in (a prefix of r rows has an expected
    z of z_full sqrt(r / (V n)))."""
    x = e.astype(np.float64).reshape(len(e), -1, e.shape[-1])
    order = np.argsort(x.mean(axis=1), axis=1)
    m = np.arange(len(e))
    d = x[m, :, order[:, 1]] - x[m, :, order[:, 0]]
    z = d.mean(axis=1) / d.std(axis=1, ddof=1) * math.sqrt(x.shape[1])
    return {"median_z": float(np.median(z)), **{f"share_z_below_{t}": float((z < t).mean()) for t in (3, 5, 8)}}


def run(bundle: Path, cache: Path) -> dict[str, Any]:
    chosen = json.loads((HERE / "exit_defaults.json").read_text())
    cal = {k: errors_for(bundle, k, cache / "calibration-errors") for k in (3, 5)}
    test = {k: test_errors(bundle, k, cache / "test-errors") for k in (3, 5)}
    policies: dict[str, ExitPolicy] = {"off": ExitPolicy("off"), "exact": ExitPolicy("exact"),
                                       "adaptive, previous defaults": policy_of(PREVIOUS),
                                       "adaptive, chosen defaults": policy_of(chosen["chosen"])}
    for p in chosen["family_best"]:
        policies.setdefault(f"adaptive {p['votes_open']} / {p['variance']} / {p['test']}", policy_of(p))
    off = {(k, v): replay(test[k]["errors"][:, :v], ExitPolicy("off")).winner for k, v in SETTINGS}
    table: dict[str, Any] = {}
    for name, pol in policies.items():
        table[name] = {"policy": dataclasses.asdict(pol)}
        for k, v in SETTINGS:
            table[name][f"k{k} V{v}"] = measure(test[k]["errors"][:, :v], pol, off[(k, v)], test[k])
    splits = {"calibration": cal[5], "test": test[5]["errors"]}
    full = {"calibration": replay(cal[5], ExitPolicy("off")).winner, "test": off[(5, 5)]}
    curves: dict[str, Any] = {}
    for p in chosen["family_best"]:
        fam = f"{p['votes_open']} / {p['variance']} / {p['test']}"
        curves[fam] = {}
        for split, e in splits.items():
            curves[fam][split] = [{"z": z, **measure(e, policy_of(p, z=z), full[split])} for z in Z_GRID]
    sep = {"calibration": separation(cal[5]), "test": separation(test[5]["errors"])}
    return {"date": time.strftime("%Y-%m-%d"), "rethought": int(test[5]["rethink"].sum()), "separation": sep,
            "test_images": len(test[5]["labels"]), "table": table, "curves": curves,
            "chosen": chosen["chosen"], "family_best": chosen["family_best"]}


def plot(r: dict[str, Any], path: Path) -> Path:
    from dbmef.apps.report import pyplot

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 5.6), sharey=True)
    for ax, split in zip(axes, ("calibration", "test")):
        for j, (fam, c) in enumerate(r["curves"].items()):
            pts = c[split]
            ax.plot([q["unet_evals_per_rethought_image"] for q in pts], [q["agreement"] for q in pts],
                    "o-" if j < 10 else "s--", ms=3, color=f"C{j % 10}", label=fam)
        c = r["chosen"]
        fam = f"{c['votes_open']} / {c['variance']} / {c['test']}"
        best = next(q for q in r["curves"][fam][split] if q["z"] == c["z"])
        ax.plot([best["unet_evals_per_rethought_image"]], [best["agreement"]], "k*", ms=12, zorder=5,
                label="the chosen defaults")
        full = 2 * 30 * 5 * 5
        ax.axvline(full / 10, color="k", ls=":", lw=1)
        ax.text(full / 10, 0.02, " 0.1x the full method", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations per rethought image (k 5, V 5; full method 1500)")
        what = "200 calibration digits, all rethought" if split == "calibration" else \
            f"{r['rethought']} rethought test digits (held out)"
        ax.set_title(what, fontsize=9)
    axes[0].set_ylabel("decisions equal to the full method's")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, title="votes / variance / test, z swept "
               f"over {list(Z_GRID)} at the family's chosen interval and min rows", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def markdown(r: dict[str, Any]) -> str:
    c = r["chosen"]
    head = ("| policy | " + " | ".join(f"evals k{k} V{v}" for k, v in SETTINGS)
            + " | != off k5 V5 (of rethought) | != off k3 V1, k3 V5, k5 V1 | accuracy k5 V5 |")
    lines = ["# adaptive on held-out digits (issue 39)", "",
             f"Command: `python -m benchmarks.digits.exit_heldout` ({r['date']}). The committed bundle (Table 1's "
             f"seed-0 weak system), its protector, its {r['test_images']} test digits, of which it rethinks "
             f"{r['rethought']}; the paper's scoring (lam 1.1, n 30). Policies chosen on the calibration split only "
             "(EXIT_DEFAULTS.md, committed before this file was first written); each replayed once here. Chosen "
             f"defaults: votes {c['votes_open']}, variance {c['variance']}, test {c['test']}, z {c['z']:g}, interval "
             f"{c['interval']}, min rows {c['min_rows']}.", "", head, "|---|" + "---:|" * (len(SETTINGS) + 3)]
    for name, row in r["table"].items():
        ev = " | ".join(f"{row[f'k{k} V{v}']['unet_evals_per_rethought_image']:.0f}" for k, v in SETTINGS)
        other = ", ".join(str(row[f"k{k} V{v}"]["disagreements"]) for k, v in SETTINGS if (k, v) != (5, 5))
        main = row["k5 V5"]
        lines.append(f"| {name} | {ev} | {main['disagreements']} of {main['images']} | {other} | "
                     f"{main['accuracy']:.2%} |")
    costs = ", ".join(str(2 * 30 * k * v) for k, v in SETTINGS)
    t, prev, sep = r["table"], r["table"]["adaptive, previous defaults"], r["separation"]
    new = t["adaptive, chosen defaults"]
    lines += ["", f"UNet evaluations per rethought digit; `off` costs {costs}.", "",
              "**The result, a negative one against issue 39's target.** The chosen defaults make the full method's "
              f"decision on all {new['k5 V5']['images']} rethought test digits at every (k, V) (and so on all held-out "
              f"rows available here), but cost {new['k5 V5']['unet_evals_per_rethought_image']:.0f} UNet evaluations "
              f"per rethought digit at k 5, V 5 ({new['k5 V5']['unet_evals_per_rethought_image'] / 1500:.2f}x the full "
              f"method; the first round's defaults: {prev['k5 V5']['unet_evals_per_rethought_image']:.0f}), not the "
              "150 (0.10x) the issue asks. On the calibration digits they cost "
              f"{r['chosen']['evals']['k5 V5']:.0f}; the rethought test digits are harder, and no family reaches "
              "0.10x on either split without changing decisions (the plot).", "",
              "Why: a sequential test can stop only when the image's own rows separate the winner from the runner-up, "
              "and the protector sends exactly the images where they are close. Over all V n = 150 rows of both "
              "candidates, the paired z of the full method's winner over its runner-up has "
              "median "
              f"{sep['test']['median_z']:.1f} on the rethought test digits "
              f"({sep['calibration']['median_z']:.1f} on the calibration digits); "
              f"{sep['test']['share_z_below_3']:.0%} of the rethought test digits are below 3 "
              f"({sep['calibration']['share_z_below_3']:.0%} of the calibration "
              "digits), "
              f"{sep['test']['share_z_below_5']:.0%} below 5. A digit at z 3 after 150 rows is at about "
              "3 sqrt(r / 150) after r rows: no test at the confidence that keeps every decision stops it before "
              "nearly all rows of "
              "both candidates (600 evaluations) are in, and a third of the digits like that alone cost about 200 "
              "evaluations per rethought digit. Reaching 0.10x here takes either accepting disagreements on "
              "near-ties "
              "(where the full method's own answer is close to a coin flip of its noise) or a cheaper evaluation, "
              "not a sharper test.", "",
              "![evaluations against agreement](exit_heldout.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.digits.exit_heldout", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=demo_bundle_dir())
    ap.add_argument("--cache", type=Path, default=Path("engines/digits"),
                    help="error tensors are kept under here (calibration-errors/ is exit_defaults' cache)")
    a = ap.parse_args(argv)
    r = run(a.bundle, a.cache)
    (HERE / "exit_heldout.json").write_text(json.dumps(r, indent=1) + "\n")
    plot(r, HERE / "exit_heldout.png")
    (HERE / "EXIT_HELDOUT.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
