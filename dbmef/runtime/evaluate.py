"""Calibration and evaluation over labelled sets, as library functions (the CLI wraps them).

Evaluation streams one JSON line per image to a results file, flushed after every batch, so an
interrupted run resumes where it stopped; the summary is computed from the file, so a resumed run
reports the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.bundle import Bundle
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


def write_protector(bundle: str | Path | Bundle, protector: Protector, record: dict[str, Any],
                    scoring: dict[str, Any] | None = None) -> Bundle:
    """Record a calibrated protector in the bundle's manifest, with ``record`` (the data, the sample
    counts, and for an operating-point rule the rule, the curve and the pass's cost: ``dbmef info``
    shows it) and ``scoring``: scoring fields calibrated with it (the decision and its fused_beta).
    The manifest is re-read first, so nothing another writer changed meanwhile is lost."""
    b = Bundle.open(bundle.dir if isinstance(bundle, Bundle) else bundle, verify=False)
    m = b.manifest
    changes: dict[str, Any] = {"scoring": m.scoring.replace(**scoring)} if scoring else {}
    return b.save(m.replace(protector=protector, sources={**m.sources, "calibration": record}, **changes))


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
_INT, _NUM, _OPT_STR = (int,), (int, float), (str, type(None))
# every field a record must carry, and the JSON types it may have (what ``summarize`` and a resume read)
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "image": (str,), "label": (int, type(None)), "label_true": _INT, "rethought": (bool,),
    "correct": (bool, type(None)), "backbone_correct": (bool, type(None)), "backbone_label": (int, type(None)),
    "max_prob": (*_NUM, type(None)), "topk": (list,), "candidates": (list,), "noise_errors": (list,),
    "votes": (list,), "unet_evals": _INT, "timings": (dict,), "error": _OPT_STR, "class_name": _OPT_STR,
}


def valid_record(rec: dict[str, Any]) -> bool:
    """Whether a results-file line is a whole record of the right shape (else its image is redone)."""
    for key, kinds in RECORD_FIELDS.items():
        v = rec.get(key, ...)
        if v is ... or not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            return False
    if rec["error"] is None and (rec["label"] is None or rec["correct"] is None):
        return False
    return all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in rec["timings"].values())


def image_key(path: str) -> str:
    """What identifies an image across runs: its resolved absolute path, so `digits/3.png` and
    `/home/u/digits/3.png` (or a path through a symlink) are one image to a resume (records keep the
    spelling they were given). ``os.path.realpath``: a symbolic-link loop stays a path (Path.resolve
    raises on one, and such a file must get its own error record, not stop the run)."""
    return os.path.realpath(path)


def records_for(items: Sequence[LabelledImage], done: Records) -> list[dict[str, Any]]:
    """The records of ``items`` in their order (those that have one)."""
    return [done[k] for it in items if (k := image_key(it.path)) in done]


def read_results_file(path: Path) -> tuple[dict[str, Any] | None, Records]:
    """The header (or None) and the records of a results file, keyed by ``image_key``; torn,
    unparseable or malformed lines are skipped (their images are redone), and of two records of one
    image the later is kept."""
    header: dict[str, Any] | None = None
    done: Records = {}
    if not path.is_file():
        return header, done
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue
            if not isinstance(rec, dict):
                continue
            if HEADER_KEY in rec and isinstance(rec.get("identity"), dict):
                header = rec
            elif valid_record(rec):
                done[image_key(rec["image"])] = rec
    return header, done


def read_results(path: Path) -> Records:
    """The records already in a results file, keyed by image."""
    return read_results_file(path)[1]


def results_home() -> Path:
    """Where results files go unless ``--results`` says otherwise: ``$DBMEF_HOME``, else
    ``$XDG_CACHE_HOME/dbmef``, else ``~/.cache/dbmef``; never inside a bundle, which may be inside
    the installed package (the committed digits bundle) or read-only."""
    if os.environ.get("DBMEF_HOME"):
        return Path(os.environ["DBMEF_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbmef"


def default_results(bundle: str | Path, data: str | Path, kind: str) -> Path:
    """Where ``dbmef eval`` (kind ``eval``) and ``dbmef calibrate`` (``calibration``) keep their
    results file by default: ``<results_home>/<kind>/<bundle name>-<digest[:12]>/<data name>.jsonl``
    (the digest keeps two bundles of one name apart; a recalibrated bundle keeps its eval files)."""
    from dbmef.runtime.bundle import read_manifest

    digest = read_manifest(bundle).digest(calibration=False)[:12]
    data_name = Path(str(data).rstrip("/\\")).resolve().name or "data"
    return results_home() / kind / f"{Path(bundle).resolve().name}-{digest}" / f"{data_name}.jsonl"


class ResultsFile:
    """A results file being written by this process: locked against a second writer, rewritten
    with its whole records once (dropping any torn line), then appended to one record at a time and
    synced to disk every ``sync_every`` records. Used as a context manager.

    The file starts with a header holding the runtime's ``identity`` (bundle digest, scoring
    config, protector); resuming under another identity is refused, naming the fields that differ.
    """

    def __init__(self, path: str | Path, items: Sequence[LabelledImage], resume: bool, identity: dict[str, Any],
                 sync_every: int = 16):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--results {self.path} is a folder; name a file (e.g. {self.path / 'results.jsonl'})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync_every = max(1, sync_every)
        self._lock = _lock(self.path)
        try:
            self.done, self.todo = self._prepare(items, resume, identity)
            self._f = open(self.path, "a")
        except BaseException:
            self._lock.close()
            raise
        self._unsynced = 0

    def _prepare(self, items: Sequence[LabelledImage], resume: bool, identity: dict[str, Any]
                 ) -> tuple[Records, list[LabelledImage]]:
        if not resume:
            self.path.unlink(missing_ok=True)
        header, done = read_results_file(self.path)
        if self.path.exists() and (header is not None or done):
            if header is None:
                raise ConfigError(f"results file {self.path} has no header (written by an older dbmef): its "
                                  "configuration cannot be checked; pass --no-resume to start over (or another "
                                  "--results file)")
            if header["identity"] != identity:
                raise ConfigError(f"results file {self.path} was written with another configuration ("
                                  f"{', '.join(_differences(header['identity'], identity))}); resuming would mix "
                                  "two configurations in one file: pass --no-resume to start over, or another "
                                  "--results")
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:  # header + every whole record: drops a torn last line, even a lone one
                f.write(json.dumps({HEADER_KEY: 1, "identity": identity}) + "\n")
                for rec in done.values():
                    f.write(json.dumps(rec) + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if done:
            log.info("resuming: %d of %d images already in %s", len(done), len(items), self.path)
        return done, [it for it in items if image_key(it.path) not in done]

    def add(self, rec: dict[str, Any]) -> None:
        self.done[image_key(rec["image"])] = rec
        self._f.write(json.dumps(rec) + "\n")
        self._unsynced += 1
        if self._unsynced >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._unsynced = 0

    def close(self) -> None:
        try:
            self.sync()
            self._f.close()
        finally:
            self._lock.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(path: Path) -> Any:
    """An exclusive lock on ``<path>.lock`` for as long as the returned file stays open: two
    processes never rewrite or append to one results file at once."""
    import fcntl

    f = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"another dbmef process is writing {path} (it holds {path.name}.lock); wait for it to "
                          "finish, or pass another --results file") from None
    return f


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: file {a!r}, now {b!r}")
    return out


def evaluate(runtime: Any, items: Sequence[LabelledImage], results_path: str | Path, resume: bool = True,
             progress: Callable[[int], None] | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Classify every item, appending per-image records to ``results_path`` (JSONL) in the order
    they are answered (``runtime.stream``: a kept answer does not wait for the rethinks of its
    batch), and return the summary. The file is synced every ``batch_size`` records, so a crash
    loses at most those. ``stop_after``: stop after that many new images (tests of resuming)."""
    with ResultsFile(results_path, items, resume, runtime.identity(), runtime.batch_size) as out:
        if progress and len(out.done):
            progress(len(items) - len(out.todo))
        todo = out.todo
        for new, r in enumerate(runtime.stream([it.path for it in todo]), start=1):
            it = todo[r.index]
            out.add(record(it.path, it.label, r))
            if progress:
                progress(1)
            if stop_after is not None and new >= stop_after:
                break
        done = out.done
    return summarize(records_for(items, done), total=len(items))


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
