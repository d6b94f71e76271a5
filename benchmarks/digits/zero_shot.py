"""Diffusion Classifier mode on the digits system (issue 25): every class a candidate, the positive
condition only (lam = 1), no classifier, at a fraction of the exhaustive method's cost.

    python -m benchmarks.digits.zero_shot            # the committed bundle; writes ZERO_SHOT.md, zero_shot.json/png

Every policy sees the same noise and the same budget of n timesteps per candidate (one vote):

* **exhaustive**: all 10 candidates x n timesteps (Li et al.'s method without pruning);
* **Li et al.'s schedule** (their CIFAR-10 ``--to_keep 5 1 --n_samples 50 500``, scaled to the
  budget: keep 5 after n/10 timesteps, then the winner after n);
* **adaptive**: dbmef's paired sequential test (drop a candidate once its mean excess error over the
  leader is z standard errors above zero), its z and interval chosen on the calibration split (200
  digits) and reported on the 597 held-out test digits; beside it the same rule over a calibrated
  timestep order (the grid positions whose paired differences separate the candidates best on the
  calibration split first), a measured negative result.

The full per-row error tensor of each split is computed once through the bundle's plain UNet graph
(positive condition only: one UNet evaluation per row), and each policy is the runtime's own planner
replayed over it (``replay.replay``); ``DBMEFRuntime`` in zero-shot mode then runs the chosen
policies on the first test digits and must make exactly the replayed decisions and row counts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import demo_bundle_dir, demo_calibration_split, demo_test_split, render
from dbmef.apps.exit_tuning import choose_adaptive, evaluate_policy, li_schedule, zero_shot_config
from dbmef.runtime.config import ScoringConfig

HERE = Path(__file__).parent


def full_errors(images: list[Any], n: int) -> np.ndarray:
    """(M, 1, n, C) positive-only errors of every (image, timestep, class), through the runtime's
    own executor and kernel."""
    from tqdm.auto import tqdm

    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.scorer import evaluate_rows

    cfg = zero_shot_config(n, early_exit="off")
    with DBMEFRuntime(demo_bundle_dir(), scoring=cfg) as rt:
        pipe = rt.pipeline
        assert pipe.scorer.evals_per_row == 1  # positive only
        batch = pipe.fast_path(images)
        idx = pipe.to_rethink(batch)
        latents, _ = pipe.slow_inputs(batch, idx)
        C = len(rt.class_names)
        ex = pipe.scorer.executor(pipe.positive_embeddings, len(idx))
        for j in range(len(idx)):
            ex.load(j, latents[j], np.arange(C), None)
        rows = np.array([(m, 0, i, c) for m in range(len(idx)) for i in range(n) for c in range(C)], np.int64)
        with tqdm(total=len(rows), desc="full error tensor", unit="row", mininterval=2) as bar:
            out = evaluate_rows(ex, rows, bar.update)
    return out.reshape(len(idx), 1, n, C)


def cached_errors(cache: Path | None, split: str, images: list[Any], n: int) -> np.ndarray:
    """``full_errors``, read from ``cache`` when it holds this split's tensor for this budget."""
    path = cache / f"zero_shot_errors_{split}_n{n}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    errors = full_errors(images, n)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, errors)
    return errors


def runtime_check(images: list[Any], n: int, policies: dict[str, ScoringConfig], want: dict[str, dict[str, Any]],
                  limit: int) -> dict[str, Any]:
    """DBMEFRuntime in zero-shot mode on the first ``limit`` test digits: the replay's decisions and rows."""
    from dbmef.runtime import DBMEFRuntime

    out = {}
    for name, cfg in policies.items():
        with DBMEFRuntime(demo_bundle_dir(), scoring=cfg) as rt:
            t0 = time.perf_counter()
            res = rt.classify(images[:limit])
            wall = time.perf_counter() - t0
        out[name] = {"images": limit, "wall_s": wall,
                     "decisions_differing_from_replay": int(sum(r.label != w for r, w in
                                                                zip(res, want[name]["winners"][:limit]))),
                     "evals_differing_from_replay": int(sum(r.unet_evals != w for r, w in
                                                            zip(res, want[name]["rows"][:limit])))}
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    from dbmef.apps.report import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    grid = report["adaptive_selection"]["grid"]
    cal = report["calibration"]
    ax.scatter([g["unet_evals_per_image"] for g in grid], [g["accuracy"] for g in grid], c="C0", alpha=0.4, s=18,
               label="adaptive (calibration split, z x interval x min rows x test x order)")
    for name, color in (("exhaustive", "k"), ("li_schedule", "C1"), ("adaptive", "C2")):
        t = report["test"][name]
        ax.scatter([t["unet_evals_per_image"]], [t["accuracy"]], c=color, s=60, marker="*", zorder=3,
                   label=f"{name} (test): {t['unet_evals_per_image']:.0f} evals, {t['accuracy']:.1%}")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image")
    ax.set_ylabel("accuracy")
    ax.set_title(f"zero-shot digits, n = {report['n']} timesteps per class, lam = 1 (exhaustive "
                 f"{cal['exhaustive']['accuracy']:.1%} on calibration)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def markdown(r: dict[str, Any]) -> str:
    t, n = r["test"], r["n"]
    ex = t["exhaustive"]
    lines = [
        "# Zero-shot: the Diffusion Classifier mode on the digits system", "",
        f"Command: `python -m benchmarks.digits.zero_shot` ({r['date']}). The committed digits bundle's diffusion "
        f"side alone (no classifier), every one of the 10 classes a candidate, the positive condition only (lam = "
        f"1: one UNet evaluation per row), one vote of n = {n} timesteps per class, the same noise for every "
        "policy. Per-row errors computed once per split through the plain UNet graph; each policy is the "
        "runtime's planner replayed over them.", "",
        "| policy | UNet evaluations / image | vs exhaustive | accuracy (597 held-out test digits) |",
        "|---|---:|---:|---:|"]
    for name, label in (("exhaustive", "exhaustive (all classes, all timesteps)"),
                        ("li_schedule", f"Li et al.'s schedule (keep 5 after {max(1, n // 10)}, then 1 after {n})"),
                        ("adaptive", "adaptive (z {z:g}, {test} test, interval {interval}, min rows {min_rows}, "
                                     "{order} order, chosen on calibration)"),
                        ("adaptive_z_test", "adaptive, normal threshold only (z {z:g}, interval {interval}, min "
                                            "rows {min_rows}, chosen on calibration by the same rule)"),
                        ("adaptive_calibrated_order", "adaptive, calibrated order (z {z:g}, {test} test, interval "
                                                      "{interval}, min rows {min_rows}, chosen on calibration by "
                                                      "the same rule)")):
        if name not in t:
            continue
        sel = r["adaptive_selection"]
        point = {"adaptive": sel["chosen"], "adaptive_z_test": sel.get("chosen_z_test")}.get(
            name, sel.get("chosen_calibrated_order")) or {}
        label = label.format(**point) if point else label
        v = t[name]
        lines.append(f"| {label} | {v['unet_evals_per_image']:.0f} | "
                     f"{ex['unet_evals_per_image'] / v['unet_evals_per_image']:.1f}x fewer | {v['accuracy']:.2%} |")
    c = r["calibration"]
    per_order = sum(g["order"] == "van der Corput" for g in r["adaptive_selection"]["grid"])
    zt, tt = t["adaptive_z_test"], t["adaptive"]
    better = "more" if tt["accuracy"] < zt["accuracy"] else "less"
    lines += ["", f"The adaptive setting is the cheapest of the {per_order} settings in "
              "van der Corput order (z, interval, min rows, test and variance: z is the normal threshold, t "
              "Student's t at z's level with the standard error's degrees of freedom; the variance is each "
              "candidate's own paired differences or the residual pooled over all candidates) whose accuracy on the "
              f"200 calibration digits is within 0.5 points of the exhaustive method's there "
              f"({c['exhaustive']['accuracy']:.2%}); the test split never took part in the choice. On 200 digits "
              "0.5 points is one digit: on the test split the chosen setting is "
              f"{100 * (ex['accuracy'] - tt['accuracy']):.2f} points below the exhaustive method.", "",
              "Student's t against the normal threshold: the test drops a candidate when its mean paired excess over "
              "the leader is z standard errors above zero, but with a handful of rows the standard error is itself "
              "a rough estimate, and t prices that in. On the calibration digits the normal threshold's cheapest "
              f"admissible setting costs {r['adaptive_selection']['chosen_z_test']['unet_evals_per_image']:.0f} "
              f"evaluations, the t threshold's {r['adaptive_selection']['chosen']['unet_evals_per_image']:.0f}; on "
              f"the test split the t pick loses {better} accuracy than the normal one ({tt['accuracy']:.2%} vs "
              f"{zt['accuracy']:.2%}).", "",
              "The calibrated order (`exit_order`) ranks the timestep grid positions by the signal-to-noise ratio "
              "of the paired excess error of the losing candidates over each calibration digit's exhaustive winner "
              f"(no labels used): {r['adaptive_selection']['calibrated_order'][:12]} ... first. Chosen by the same "
              "rule it looked as good as the exhaustive method on calibration, but it is fitted on those very "
              "digits and its first rows come from neighbouring, correlated timesteps (so the paired test's "
              "standard error is too small): on the test split its pick loses "
              f"{100 * (t['exhaustive']['accuracy'] - t['adaptive_calibrated_order']['accuracy']):.1f} points. The "
              "benchmark keeps van der Corput, and `exit_order` stays an option, not a default.", "",
              "The runtime itself (`DBMEFRuntime`, `--zero-shot`) on the first test digits:", "",
              "| policy | images | decisions != replay | UNet evaluation counts != replay | wall s |",
              "|---|---:|---:|---:|---:|"]
    for name, v in r["runtime"].items():
        lines.append(f"| {name} | {v['images']} | {v['decisions_differing_from_replay']} | "
                     f"{v['evals_differing_from_replay']} | {v['wall_s']:.1f} |")
    lines += ["", "![zero-shot trade-off](zero_shot.png)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="timesteps per class (the budget)")
    ap.add_argument("--runtime-images", type=int, default=60)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each split's error tensor here (.npy) and reuse it: the tensors take most of the time")
    args = ap.parse_args()
    n = args.n
    splits = {"calibration": demo_calibration_split(), "test": demo_test_split()}
    images = {k: [np.asarray(render(a)) for a in s.images] for k, s in splits.items()}
    errors = {k: cached_errors(args.cache, k, images[k], n) for k in splits}
    r: dict[str, Any] = {"n": n, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    for k, s in splits.items():
        r[k] = {"exhaustive": evaluate_policy(errors[k], s.labels, zero_shot_config(n, early_exit="off")),
                "li_schedule": evaluate_policy(errors[k], s.labels, zero_shot_config(n, **li_schedule(n)))}
    r["adaptive_selection"] = sel = choose_adaptive(errors["calibration"], splits["calibration"].labels, n,
                                                    r["calibration"]["exhaustive"]["accuracy"])
    def policy(point: dict[str, Any]) -> ScoringConfig:
        return zero_shot_config(n, early_exit="adaptive", exit_z=point["z"], exit_interval=point["interval"],
                                exit_min_rows=point["min_rows"], exit_test=point["test"],
                                exit_order=tuple(point["exit_order"]))

    adaptive = policy(sel["chosen"])
    for k, s in splits.items():
        r[k]["adaptive"] = evaluate_policy(errors[k], s.labels, adaptive)
        r[k]["adaptive_calibrated_order"] = evaluate_policy(errors[k], s.labels, policy(sel["chosen_calibrated_order"]))
        r[k]["adaptive_z_test"] = evaluate_policy(errors[k], s.labels, policy(sel["chosen_z_test"]))
    policies = {"exhaustive": zero_shot_config(n, early_exit="off"),
                "li_schedule": zero_shot_config(n, **li_schedule(n)), "adaptive": adaptive}
    r["runtime"] = runtime_check(images["test"], n, policies, r["test"], args.runtime_images)
    (HERE / "zero_shot.json").write_text(json.dumps(r, indent=1) + "\n")
    plot(r, HERE / "zero_shot.png")
    (HERE / "ZERO_SHOT.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
