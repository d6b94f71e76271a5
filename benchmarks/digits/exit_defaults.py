"""Choose ``adaptive``'s defaults on the calibration split, never on test images (issue 25.4).

    python -m benchmarks.digits.exit_defaults            # the committed bundle's 200 calibration digits

Every calibration digit is rethought (Prot 0: the protector was calibrated on these same digits, so
its own rethink set among them is a handful) with the paper's scoring at k = 3 and 5 and V = 5
votes; the full per-row errors are computed once per k (``early_exit.full_errors``, kept in
``--cache``) and V = 1 is their first vote (noise banks are prefix-stable). Over the grid of
(z, interval, min rows), the rule: **the cheapest setting (UNet evaluations summed over the four
(k, V) settings) that decides every calibration digit as ``off`` does in all four, and whose two
next lower z values in the grid do too** (slack: most calibration digits are easy, the protector
rethinks the hard ones; one step of slack was not enough on a held-out system, see ``choose``). Table 1
(``benchmarks.digits.table``) then reports the chosen defaults on the 12 held-out systems.
Writes ``benchmarks/digits/exit_defaults.json`` and ``EXIT_DEFAULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.digits.early_exit import INTERVALS, full_errors
from dbmef.apps.digits import demo_bundle_dir, demo_calibration_split
from dbmef.runtime.early_exit import ExitPolicy, replay

HERE = Path(__file__).parent
Z_GRID = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
MIN_ROWS = (4, 6, 10, 15)
SETTINGS = ((3, 1), (3, 5), (5, 1), (5, 5))  # (k, V) as in Table 1
# the defaults before this choice, picked on the seed-0 bundle's rethought *test* digits (EARLY_EXIT.md)
PREVIOUS = {"z": 2.5, "interval": 2, "min_rows": 6}
SLACK = 2  # lower z steps of the grid that must be clean too (see choose)


def errors_for(bundle: Path, k: int, cache: Path) -> np.ndarray:
    path = cache / f"calibration_errors_k{k}_V5.npy"
    if path.exists():
        return np.load(path)
    e = full_errors(bundle, demo_calibration_split(), k, 5, all_images=True)["errors"]
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, e)
    return e


def grid(errors: dict[int, np.ndarray]) -> list[dict[str, Any]]:
    """Every (z, interval, min rows): evaluations per image and disagreements with off per (k, V)."""
    per = {(k, v): errors[k][:, :v] for k, v in SETTINGS}
    off = {s: replay(e, ExitPolicy("off")).winner for s, e in per.items()}
    points = []
    for z in Z_GRID:
        for interval in INTERVALS:
            for min_rows in MIN_ROWS:
                pol = ExitPolicy("adaptive", z, interval, min_rows)
                res = {s: replay(e, pol) for s, e in per.items()}
                points.append({"z": z, "interval": interval, "min_rows": min_rows,
                               "evals": {f"k{k} V{v}": float(2 * res[(k, v)].rows.mean()) for k, v in SETTINGS},
                               "disagreements": {f"k{k} V{v}": int((res[(k, v)].winner != off[(k, v)]).sum())
                                                 for k, v in SETTINGS}})
    return points


def choose(points: list[dict[str, Any]], slack: int = SLACK) -> dict[str, Any]:
    """The cheapest point that, and the ``slack`` next more aggressive z values of the grid (same
    interval and min rows), decide every calibration digit as off does. Slack, because the 200
    calibration digits are mostly easy ones (all rethought) while the protector sends only the
    hard ones: with one step the choice (z 2, interval 5) lost 1-2 decisions on a held-out system
    (seed 2, RESULTS.md), so the rule takes two."""
    clean = {(p["z"], p["interval"], p["min_rows"]) for p in points if not any(p["disagreements"].values())}

    def slack_ok(p: dict[str, Any]) -> bool:
        i = Z_GRID.index(p["z"])
        return i >= slack and all((Z_GRID[i - j], p["interval"], p["min_rows"]) in clean for j in range(slack + 1))

    ok = [p for p in points if slack_ok(p)]
    if not ok:
        raise SystemExit("no setting of the grid decides every calibration digit as off does: widen the grid")
    return min(ok, key=lambda p: (sum(p["evals"].values()), -p["z"]))


def markdown(r: dict[str, Any]) -> str:
    c = r["chosen"]
    lines = ["# adaptive's defaults, chosen on the calibration split", "",
             f"Command: `python -m benchmarks.digits.exit_defaults` ({r['date']}). The committed digits bundle's 200 "
             "calibration digits (the protector's calibration set, disjoint from the 597 test digits), all rethought, "
             "the paper's scoring (lam 1.1, n = 30). Rule: the cheapest (z, interval, min rows) that decides every "
             "calibration digit as `off` does at k = 3 and 5, V = 1 and 5, and whose two next lower z values (same "
             "interval and min rows) do too: slack, since most of these digits are easy and the protector rethinks "
             "the hard ones. With one step of slack the rule chose z = 2, interval 5, min rows 6, which decided 1 of "
             "12 and 1 (V 1) and 2 (V 5) of 79 rethought test digits of the held-out seed-2 systems (k = 3) unlike "
             "`off` (benchmarks/digits/RESULTS.md asks at least 99.5 %): two steps since.", "",
             f"**Chosen: z = {c['z']:g}, interval {c['interval']}, min rows {c['min_rows']}** (before: z = "
             f"{r['previous']['z']:g}, interval {r['previous']['interval']}, min rows {r['previous']['min_rows']}, "
             "chosen on the seed-0 bundle's rethought test digits).", "",
             "| z | interval | min rows | " + " | ".join(f"evals {s}" for s in c["evals"]) + " | "
             + " | ".join(f"!= off {s}" for s in c["disagreements"]) + " |",
             "|---:|---:|---:|" + "---:|" * (2 * len(c["evals"]))]
    ranked = sorted(r["grid"], key=lambda p: sum(p["evals"].values()))
    key = (c["z"], c["interval"], c["min_rows"])
    for p in ranked[:25] + [p for p in ranked[25:] if (p["z"], p["interval"], p["min_rows"]) == key]:
        mark = "**" if (p["z"], p["interval"], p["min_rows"]) == (c["z"], c["interval"], c["min_rows"]) else ""
        lines.append(f"| {mark}{p['z']:g}{mark} | {p['interval']} | {p['min_rows']} | "
                     + " | ".join(f"{v:.0f}" for v in p["evals"].values()) + " | "
                     + " | ".join(str(v) for v in p["disagreements"].values()) + " |")
    lines += ["", f"(the 25 cheapest of {len(r['grid'])} settings and the chosen one; UNet evaluations per "
              "calibration digit; `off` "
              f"costs {', '.join(f'{2 * 30 * k * v}' for k, v in SETTINGS)} at the four settings)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from dbmef.runtime.config import ScoringConfig

    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.exit_defaults", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=demo_bundle_dir())
    p.add_argument("--cache", type=Path, default=Path("engines/digits/calibration-errors"),
                   help="the per-row error tensors are kept here and reused")
    a = p.parse_args(argv)
    errors = {k: errors_for(a.bundle, k, a.cache) for k in (3, 5)}
    points = grid(errors)
    d = ScoringConfig()
    r = {"date": time.strftime("%Y-%m-%d"), "grid": points, "chosen": choose(points), "previous": PREVIOUS,
         "runtime_defaults": {"z": d.exit_z, "interval": d.exit_interval, "min_rows": d.exit_min_rows}}
    (HERE / "exit_defaults.json").write_text(json.dumps(r, indent=1) + "\n")
    (HERE / "EXIT_DEFAULTS.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
