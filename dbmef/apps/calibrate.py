"""``dbmef calibrate``: one rethink-all pass over a labelled set, the operating-point curve it
gives, the threshold a rule picks from it, written into the bundle with the curve and the rule.

Library function :func:`calibrate_operating_point`; the CLI and the digits demo wrap it. The pass
is an evaluation at Prot = 0 (``dbmef.runtime.evaluate.evaluate``, or Ray Data with ``ray``), so
it streams to a results file beside the bundle, resumes after an interruption, and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError, DBMEFError, missing_extra
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.bundle import Bundle, read_manifest
from dbmef.runtime.config import EXIT_SETTING_MODES, ScoringConfig
from dbmef.runtime.data import LabelledImage
from dbmef.runtime.evaluate import default_results, evaluate, read_results, records_for, write_protector
from dbmef.runtime.fusion import FusedFit, FusionInputs
from dbmef.runtime.operating_point import Choice, Point, RethinkAllPass, check_rule, choose, curve, point, sweep, wilson

log = logging.getLogger("dbmef")

MIN_SAMPLES = 100  # correctly classified calibration images a written threshold needs (--min-samples)


def calibrate_operating_point(
    spec: RuntimeSpec, items: Sequence[LabelledImage], rule: str, value: float, data: str,
    results: str | Path | None = None, resume: bool = True, ray: str | None = None, write: bool = True,
    progress: Callable[[int], None] | None = None, ray_options: dict[str, Any] | None = None,
    min_samples: int = MIN_SAMPLES,
) -> dict[str, Any]:
    """Rethink every item once, build the curve, choose by ``rule``/``value`` and (``write``) record
    the protector, the rule and the curve in the bundle. Returns the JSON-ready report.

    Everything that can be checked before the pass is (the rule and its value, the results path,
    enough images for ``min_samples``); a run that fails leaves the bundle as it was: the results
    file it created is removed (an interrupted run keeps it, to resume)."""
    check_rule(rule, value)
    check_min_samples(min_samples)
    if len(items) < min_samples:
        raise ConfigError(f"{len(items)} calibration images cannot give the {min_samples} correctly classified ones a "
                          "threshold needs; use more images, or --min-samples N to accept a noisier threshold")
    path = Path(results) if results else default_results(spec.bundle, data, "calibration")
    if path.is_dir():
        raise ConfigError(f"--results {path} is a folder; name a file (e.g. {path / 'calibration.jsonl'})")
    created = not path.exists()
    bundle = Bundle.open(spec.bundle, spec.verify, spec.expect_digest)
    try:
        report = _pass_and_choice(spec, bundle, items, rule, value, data, path, resume, ray, progress, ray_options)
        if report["n_correct"] < min_samples:
            raise ConfigError(f"only {report['n_correct']} of the {report['n_images']} calibration images are "
                              f"classified correctly, fewer than the {min_samples} a threshold needs; use more "
                              "images, or --min-samples N to accept a noisier threshold")
    except DBMEFError:
        if created:
            _remove_results(path)
        raise
    scoring = report.pop("_scoring")
    if write:
        write_protector(bundle, report.pop("_protector"), {k: v for k, v in report.items() if k != "bundle"}, scoring)
    report.pop("_protector", None)
    return report


def _pass_and_choice(spec: RuntimeSpec, bundle: Bundle, items: Sequence[LabelledImage], rule: str, value: float,
                     data: str, path: Path, resume: bool, ray: str | None, progress: Callable[[int], None] | None,
                     ray_options: dict[str, Any] | None) -> dict[str, Any]:
    cfg = spec.scoring_config(bundle)
    # the pass rethinks every image once under the paper's rule; the fused rule re-decides it from the
    # records for any beta, which needs every vote of every candidate: early exit off where V > 1
    pass_scoring = {**spec.scoring, "decision": "paper", "fused_beta": None}  # what it fits: not in its identity
    if cfg.decision == "fused" and cfg.votes > 1:
        pass_scoring = {k: v for k, v in pass_scoring.items() if k not in EXIT_SETTING_MODES}
        pass_scoring["early_exit"] = "off"
    every = dataclasses.replace(spec, prot=0.0, scoring=pass_scoring)
    if ray is not None:
        from dbmef.cluster.ray_eval import ray_evaluate

        ray_evaluate(every, items, path, address=None if ray == "local" else ray, resume=resume, progress=progress,
                     batch_size=spec.batch_size, **(ray_options or {}))
        device = f"Ray ({ray})"
    else:
        with every.build(bundle) as rt:
            evaluate(rt, items, path, resume=resume, progress=progress)
            device = describe_device(rt)
    recs = read_results(path)
    records = records_for(items, recs)
    passes = {"paper": RethinkAllPass.from_records(records)}
    fit = _fit_fused(records, cfg, passes)
    cp = passes[cfg.decision]
    choice = choose(cp, rule, value)
    n_correct = int((cp.backbone == cp.truth).sum())
    chosen = choice.to_dict()
    points = [p.to_dict() for p in curve(cp)]
    for p in [*points, chosen["point"]]:  # the other rule at the same thresholds (the curve shows both)
        for d in passes:
            if d != cfg.decision:
                p[f"accuracy_{d}"] = point(passes[d], float(p["threshold"])).accuracy
    return {
        "bundle": spec.bundle, "data": data, "results": str(path), "device": device,
        "n_images": len(cp), "n_unreadable": len(records) - len(cp), "n_correct": n_correct,
        "unet_evaluations": int(cp.unet_evals.sum()),  # the whole curve's cost: one slow path per image
        "unet_evals_per_image": float(cp.unet_evals.mean()), "decision": cfg.decision,
        "fused": None if fit is None else fit.to_dict(),
        "chosen": chosen, "curve": points, "sweep": sweep_for_plot(cp),
        "compare": {d: sweep_for_plot(q) for d, q in passes.items() if d != cfg.decision},
        "_protector": choice.protector(n_correct),
        "_scoring": None if fit is None else {"decision": cfg.decision, "fused_beta": fit.beta},
    }


def _fit_fused(records: Sequence[dict[str, Any]], cfg: ScoringConfig, passes: dict[str, RethinkAllPass]
               ) -> FusedFit | None:
    """The fused decision's beta fitted on the pass (``fusion.fit_beta``), and the pass re-decided by
    the fused rule (``passes["fused"]``); None where the pass lacks votes (a paper calibration with
    early exit and V > 1: rerun with --decision fused to fit it)."""
    ok = [r for r in records if r.get("error") is None]
    try:
        inputs = FusionInputs.from_records(ok, cfg.votes)
        fit = inputs.fit(passes["paper"].truth)
    except ConfigError as exc:
        if cfg.decision == "fused":
            raise
        log.info("no fused fit on this pass (%s)", exc)  # the paper's calibration does not need one
        return None
    if fit.at_bound:
        log.warning("the fused decision's beta stopped at the %s end of its range (%.4g): on this calibration set the "
                    "%s evidence %s", fit.at_bound, fit.beta, "diffusion" if fit.at_bound == "low" else "classifier's",
                    "does not help" if fit.at_bound == "low" else "adds nothing to the diffusion model's")
    passes["fused"] = dataclasses.replace(passes["paper"], dbmef=inputs.answers(fit.beta))
    return fit


def check_min_samples(n: int) -> None:
    """A threshold is a quantile of the correctly classified images' S: it needs at least one."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--min-samples {n} is invalid: a threshold needs at least 1 correctly classified "
                          f"calibration image (default {MIN_SAMPLES}; fewer gives a noisier threshold)")


def _remove_results(path: Path) -> None:
    """What a failed run wrote: its results file, the lock beside it, and the folder if now empty."""
    for p in (path, path.with_name(path.name + ".lock")):
        p.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # not empty (another data set's results) or not ours


def rule_from_args(args: Any) -> tuple[str, float]:
    for rule in ("max_rethink_rate", "target_accuracy", "latency_budget_ms"):
        if getattr(args, rule, None) is not None:
            return rule, float(getattr(args, rule))
    return "prot", float(args.prot)


def run_from_args(args: Any, spec: RuntimeSpec) -> int:
    """``dbmef calibrate``: the pass (or ``--backbone-only``), the table or JSON, the plot."""
    from dbmef.apps.report import interrupted, progress_bar, table
    from dbmef.runtime.data import load_labelled

    rule, value = rule_from_args(args)
    check_rule(rule, value)  # before anything is read
    check_min_samples(args.min_samples)
    m = read_manifest(spec.bundle)
    m.scoring.replace(**spec.scoring)  # the scoring overrides, checked before any data is read
    items = load_labelled(args.data, m.class_names, m.sources.get("class_wnids"))
    quiet = args.quiet or args.json
    if args.backbone_only:
        return _backbone_only(args, spec, items, rule, value)
    bar = progress_bar(len(items), "calibrate: rethink every image once", quiet)
    ray_options = {"fast_actors": args.ray_fast_actors, "rethink_actors": args.ray_rethink_actors,
                   "gpus_per_rethink_actor": args.ray_gpus_per_actor}
    results = args.results or str(default_results(spec.bundle, args.data, "calibration"))
    try:
        report = calibrate_operating_point(spec, items, rule, value, data=str(args.data), results=results,
                                           resume=not args.no_resume, ray=args.ray, write=not args.dry_run,
                                           progress=bar.update, ray_options=ray_options,
                                           min_samples=args.min_samples)
    except KeyboardInterrupt:
        bar.close()
        return interrupted("dbmef calibrate", results, len(items))
    bar.close()
    png = Path(args.plot) if args.plot else Path(report["results"]).with_suffix(".png")
    try:
        report["plot"] = str(plot_curve(report, png))
    except ModuleNotFoundError as exc:  # the threshold is written; only the picture needs matplotlib
        report["plot"] = None
        log.warning("no curve PNG: %s", missing_extra(exc, "dbmef calibrate") or exc)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = report["chosen"]
    print(f"{report['n_images']} calibration images, one slow pass: {report['unet_evaluations']} UNet evaluations "
          f"({report['unet_evals_per_image']:.0f} per image), latencies measured on {report['device']}")
    print(table(point_rows(report), headers(report)))
    p = c["point"]
    if report["fused"] is not None:
        f = report["fused"]
        print(f"fused decision: beta {f['beta']:.4g} fitted on {f['n_images']} images (mean negative log-likelihood "
              f"of the true label {f['nll']:.3f}, classifier alone {f['nll_classifier']:.3f})")
    print(f"\nchosen by {c['rule']} {c['value']:g} for the {report['decision']} decision: threshold "
          f"{_thr(p['threshold'])}, rethink rate "
          f"{p['rethink_rate']:.1%}, accuracy {p['accuracy']:.2%} (backbone {p['backbone_accuracy']:.2%})"
          f"{'' if args.dry_run else '; written to ' + str(spec.bundle)}")
    for w in c["warnings"]:
        print(f"note: {w}")
    print(f"curve: {report['plot'] or 'not drawn (see the warning above)'}")
    return 0


def _backbone_only(args: Any, spec: RuntimeSpec, items: Sequence[LabelledImage], rule: str, value: float) -> int:
    from dbmef.apps.report import progress_bar, table
    from dbmef.runtime.evaluate import calibrate

    if rule != "prot":
        raise ConfigError(f"--backbone-only calibrates by --prot only: --{rule.replace('_', '-')} needs the slow "
                          "pass's answers (drop --backbone-only)")
    with spec.build() as rt:
        bar = progress_bar(len(items), "calibrate (backbone only)", args.quiet or args.json)
        protector, stats = calibrate(rt, items, value, progress=bar.update)
        bar.close()
    if stats["n_correct"] < args.min_samples:
        raise ConfigError(f"only {stats['n_correct']} of the {stats['n_images']} calibration images are classified "
                          f"correctly, fewer than the {args.min_samples} a threshold needs; use more images, or "
                          "--min-samples N to accept a noisier threshold")
    if not args.dry_run:
        write_protector(spec.bundle, protector, {**stats, "data": str(args.data)})
    out = {**protector.to_dict(), **stats}
    print(json.dumps(out, indent=2) if args.json else table([[k, v] for k, v in out.items()], ["field", "value"]))
    return 0


def sweep_for_plot(cp: RethinkAllPass, max_points: int = 400) -> dict[str, list[float]]:
    """Every threshold's rethink rate, accuracy (with its Wilson interval) and mean latency,
    thinned to at most ``max_points`` (the table's points are exact; this is for the picture)."""
    sw = sweep(cp)
    keep = np.unique(np.linspace(0, len(sw["threshold"]) - 1, min(max_points, len(sw["threshold"]))).astype(int))
    n = len(cp)
    ci = [wilson(round(a * n), n) for a in sw["accuracy"][keep]]
    return {"rethink_rate": sw["rethink_rate"][keep].tolist(), "accuracy": sw["accuracy"][keep].tolist(),
            "ci_low": [c[0] for c in ci], "ci_high": [c[1] for c in ci], "mean_ms": sw["mean_ms"][keep].tolist()}


def describe_device(rt: Any) -> str:
    """Where the slow path ran: the scorer's provider and the machine."""
    provider = rt.describe()["providers"]["scorer"]
    return f"{provider} on {platform.processor() or platform.machine()} ({platform.node() or 'host'})"


def point_rows(report: dict[str, Any]) -> list[list[Any]]:
    """The curve as table rows, the chosen point marked."""
    chosen = report["chosen"]["point"]
    points = [p for p in report["curve"] if p["threshold"] != chosen["threshold"]] + [chosen]  # chosen shown once
    rows = []
    for p in sorted(points, key=lambda p: p["rethink_rate"]):
        mark = "<- chosen" if p is chosen else ""
        lo, hi = p["accuracy_ci"]
        other = [f"{p[k]:.2%}" for k in p if k.startswith("accuracy_") and k != "accuracy_ci"]
        rows.append([f"{p['prot']:.2f}" if p.get("prot") is not None else "", _thr(p["threshold"]),
                     f"{p['rethink_rate']:.1%}", f"{p['backbone_accuracy']:.2%}",
                     f"{p['accuracy']:.2%} [{lo:.1%}, {hi:.1%}]", *other, p["fixed"], p["broken"],
                     f"{p['unet_evals_per_image']:.0f}", f"{p['mean_ms']:.2f}", f"{p['p50_ms']:.2f}",
                     f"{p['p95_ms']:.2f}", f"{p['images_per_s']:.1f}", mark])
    return rows


HEADERS = ["Prot", "threshold", "rethink", "backbone acc", "DBMEF acc [95% CI]", "fixed", "broken",
           "UNet evals/img", "mean ms", "p50 ms", "p95 ms", "img/s", ""]


def headers(report: dict[str, Any]) -> list[str]:
    """The table's columns: with a fused fit, the decision calibrated and the other one's accuracy."""
    other = list(report.get("compare") or {})
    if not other:
        return HEADERS
    return [*HEADERS[:4], f"{report['decision']} acc [95% CI]", *(f"{d} acc" for d in other), *HEADERS[5:]]


def _thr(t: Any) -> str:
    return str(t) if isinstance(t, str) else f"{t:.4g}"


def plot_curve(report: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (with its 95 % band) and images/s against rethink rate; Prot points and the
    chosen point marked."""
    from dbmef.apps.report import pyplot, save_figure

    pts = sorted(report["curve"], key=lambda p: p["rethink_rate"])
    sw = report["sweep"]
    x = np.array(sw["rethink_rate"]) * 100
    acc, lo, hi = (np.array(sw[k]) * 100 for k in ("accuracy", "ci_low", "ci_high"))
    fig, ax = pyplot().subplots(figsize=(7.5, 5.2))
    ax.fill_between(x, lo, hi, alpha=0.2, color="C0", step="post", label="DBMEF accuracy, 95 % interval")
    ax.step(x, acc, where="post", color="C0", label=f"DBMEF accuracy ({report.get('decision', 'paper')} decision)")
    for j, (d, other) in enumerate((report.get("compare") or {}).items()):
        ax.step(np.array(other["rethink_rate"]) * 100, np.array(other["accuracy"]) * 100, where="post",
                color=f"C{4 + j}", lw=1, label=f"DBMEF accuracy ({d} decision)")
    ax.axhline(pts[0]["backbone_accuracy"] * 100, color="gray", ls=":", label="backbone alone")
    # neighbouring Prot points (0.97 and 0.99 often sit a fraction of a point apart) get their labels
    # on four different sides, so no two consecutive ones overlap
    sides = ((5, 5), (5, -12), (-50, 5), (-50, -12))
    for j, p in enumerate(q for q in pts if q.get("prot") is not None):
        ax.plot(p["rethink_rate"] * 100, p["accuracy"] * 100, "o", color="C0", ms=4)
        ax.annotate(f"Prot {p['prot']:.2f}", (p["rethink_rate"] * 100, p["accuracy"] * 100), fontsize=7,
                    xytext=sides[j % len(sides)], textcoords="offset points")
    c = report["chosen"]["point"]
    ax.plot(c["rethink_rate"] * 100, c["accuracy"] * 100, "*", color="C3", ms=14,
            label=f"chosen ({report['chosen']['rule']} {report['chosen']['value']:g})")
    ax.set_xlabel("rethink rate on the calibration set (%)")
    ax.set_ylabel("accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(x, 1e3 / np.array(sw["mean_ms"]), "--", color="C2", label="images/s (expected)")
    ax2.set_yscale("log")
    ax2.set_ylabel("images/s at that rethink rate (expected, log)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # below the axes, never over the curve
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax.set_title(f"operating points: {report['n_images']} calibration images, one slow pass "
                 f"({report['unet_evaluations']} UNet evaluations)\n{report['device']}", fontsize=9)
    return save_figure(fig, path)


__all__ = ["Choice", "Point", "calibrate_operating_point", "plot_curve", "point_rows"]
