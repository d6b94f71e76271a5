"""Calibration and evaluation over labelled sets, as library functions (the CLI wraps them).

Evaluation streams one JSON line per image to a results file, flushed after every batch, so an
interrupted run resumes where it stopped; the summary is computed from the file, so a resumed run
reports the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.bundle import load_manifest
from dbmef.runtime.data import LabelledImage
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import STAGES

log = logging.getLogger(__name__)


def calibrate(runtime: Any, items: Sequence[LabelledImage], prot: float,
              progress: Callable[[int], None] | None = None) -> tuple[Protector, dict[str, Any]]:
    """Fit the protector on labelled images: S_alpha over the correctly classified ones."""
    if not items:
        raise ConfigError("no calibration images")
    probs_all = []
    errs_all: list[str | None] = []
    bs = runtime.batch_size
    for s in range(0, len(items), bs):
        probs, errs = runtime.backbone_scores([it.path for it in items[s : s + bs]])
        probs_all.append(probs)
        errs_all.extend(errs)
        if progress:
            progress(len(errs))
    probs = np.concatenate(probs_all)
    ok = np.array([e is None for e in errs_all])
    labels = np.array([it.label for it in items])
    for it, e in zip(items, errs_all):
        if e is not None:
            log.warning("calibration skips %s: %s", it.path, e)
    if not ok.any():
        raise ConfigError("none of the calibration images could be read")
    s = probs[ok].max(axis=1)
    correct = probs[ok].argmax(axis=1) == labels[ok]
    protector = Protector.calibrate(s, correct, prot)
    stats = {"n_images": int(ok.sum()), "n_unreadable": int((~ok).sum()), "n_correct": int(correct.sum()),
             "backbone_accuracy": float(correct.mean()),
             "rethink_rate_on_calibration": float(protector.rethink(s).mean())}
    return protector, stats


def write_protector(bundle_dir: str | Path, protector: Protector, stats: dict[str, Any], data: str) -> None:
    """Record the protector (threshold, Prot, alpha, sample count, data) in the bundle's manifest."""
    m = load_manifest(bundle_dir)
    m.protector = protector
    m.sources["calibration"] = {**stats, "data": str(data)}
    m.save(bundle_dir)


def write_operating_point(bundle_dir: str | Path, protector: Protector, report: dict[str, Any]) -> None:
    """Record the threshold an operating-point rule chose, with the rule, the curve and the
    calibration pass's cost, in the bundle's manifest (``dbmef info`` shows it)."""
    m = load_manifest(bundle_dir)
    m.protector = protector
    m.sources["calibration"] = report
    m.save(bundle_dir)


def record(path: str, label: int, r: Any) -> dict[str, Any]:
    """One results-file line: the image's ``ImageResult`` plus its true label and correctness."""
    d = r.to_dict()
    d.pop("index", None)
    d["image"] = path
    d["label_true"] = label
    d["correct"] = None if r.error else (r.label == label)
    d["backbone_correct"] = None if r.error else (r.backbone_label == label)
    return d


Records = dict[str, dict[str, Any]]
HEADER_KEY = "dbmef_results"  # the first line of a results file: {HEADER_KEY: 1, "identity": {...}}


def open_results(path: Path, items: Sequence[LabelledImage], resume: bool, identity: dict[str, Any],
                 progress: Callable[[int], None] | None = None) -> tuple[Records, list[LabelledImage]]:
    """Prepare a results file for (re)starting: the records already done, keyed by image, and the
    items still to do. The file starts with a header holding the runtime's ``identity`` (bundle
    digest, scoring config, protector); resuming under another identity is refused, naming the
    fields that differ. A resumed file is rewritten without any torn line (a crash mid-write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not resume and path.exists():
        path.unlink()
    header, done = read_results_file(path)
    if path.exists() and (header is not None or done):
        if header is None:
            raise ConfigError(f"results file {path} has no header (written by an older dbmef): its configuration "
                              "cannot be checked; pass --no-resume to start over (or another --results file)")
        if header["identity"] != identity:
            raise ConfigError(f"results file {path} was written with another configuration ("
                              f"{', '.join(_differences(header['identity'], identity))}); resuming would mix "
                              "two configurations in one file: pass --no-resume to start over, or another --results")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:  # header + every whole record: drops a torn last line, even a lone one
        f.write(json.dumps({HEADER_KEY: 1, "identity": identity}) + "\n")
        for rec in done.values():
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    if done:
        log.info("resuming: %d of %d images already in %s", len(done), len(items), path)
    todo = [it for it in items if it.path not in done]
    if progress and len(items) - len(todo):
        progress(len(items) - len(todo))
    return done, todo


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: file {a!r}, now {b!r}")
    return out


def read_results_file(path: Path) -> tuple[dict[str, Any] | None, Records]:
    """The header (or None) and the records of a results file, keyed by image; torn or unparseable
    lines are skipped (their images are redone)."""
    header: dict[str, Any] | None = None
    done: Records = {}
    if not path.is_file():
        return header, done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if HEADER_KEY in rec:
                header = rec
            elif "image" in rec:
                done[rec["image"]] = rec
    return header, done


def read_results(path: Path) -> Records:
    """The records already in a results file, keyed by image."""
    return read_results_file(path)[1]


def evaluate(runtime: Any, items: Sequence[LabelledImage], results_path: str | Path, resume: bool = True,
             progress: Callable[[int], None] | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Classify every item, appending per-image records to ``results_path`` (JSONL) in the order
    they are answered (``runtime.stream``: a kept answer does not wait for the rethinks of its
    batch), and return the summary. The file is flushed to disk every ``batch_size`` records, so
    a crash loses at most those. ``stop_after``: stop after that many new images (tests of resuming)."""
    path = Path(results_path)
    done, todo = open_results(path, items, resume, runtime.identity(), progress)
    new = 0
    with open(path, "a") as f:
        for r in runtime.stream([it.path for it in todo]):
            it = todo[r.index]
            rec = record(it.path, it.label, r)
            done[it.path] = rec
            f.write(json.dumps(rec) + "\n")
            new += 1
            if new % runtime.batch_size == 0:
                _sync(f)
            if progress:
                progress(1)
            if stop_after is not None and new >= stop_after:
                break
        _sync(f)
    return summarize([done[it.path] for it in items if it.path in done], total=len(items))


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def summarize(records: Sequence[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    """Accuracy, rethink rate, flips and mean per-stage latency from per-image records."""
    ok = [r for r in records if r.get("error") is None]
    n = len(ok)
    rethought = [r for r in ok if r["rethought"]]
    per_stage = {s: float(np.mean([r["timings"].get(s, 0.0) for r in ok])) if ok else 0.0 for s in STAGES}
    per_stage_rethought = {s: float(np.mean([r["timings"].get(s, 0.0) for r in rethought])) if rethought else 0.0
                           for s in STAGES}
    out = {
        "n_images": n,
        "n_total": total if total is not None else len(records),
        "n_done": len(records),
        "n_errors": len(records) - n,
        "backbone_accuracy": float(np.mean([r["backbone_correct"] for r in ok])) if n else 0.0,
        "dbmef_accuracy": float(np.mean([r["correct"] for r in ok])) if n else 0.0,
        "rethink_rate": len(rethought) / n if n else 0.0,
        # slow-path work in machine-independent units: 2 per scorer row (positive and negative)
        "unet_evals_per_rethought_image": float(np.mean([r.get("unet_evals", 0) for r in rethought]))
        if rethought else 0.0,
        "flips_true_to_false": sum(1 for r in ok if r["backbone_correct"] and not r["correct"]),
        "flips_false_to_true": sum(1 for r in ok if not r["backbone_correct"] and r["correct"]),
        "latency_s_per_image": per_stage,
        "latency_s_per_rethought_image": per_stage_rethought,
        "errors": [{"image": r["image"], "error": r["error"]} for r in records if r.get("error")][:50],
    }
    return out
