"""What ``dbmef classify`` shows and writes: the table's rows and the ``--output`` file (CSV or
JSONL by extension)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dbmef.errors import ConfigError

COLUMNS = ["image", "label", "class_name", "rethought", "p_label", "backbone", "p_backbone", "votes", "unet_evals",
           "error"]


def label_probability(r: Any) -> float | None:
    """The backbone's probability of the final label: its top-1 probability where the label is the
    backbone's, the label's top-k probability where DBMEF changed it (None if outside the top-k)."""
    if r.label is None:
        return None
    if r.label == r.backbone_label:
        return r.max_prob
    return next((p for c, p in r.topk if c == r.label), None)


def vote_share(r: Any) -> str | None:
    """``won/completed`` votes of the final label where a rethink voted (e.g. ``4/5``)."""
    if not r.rethought or not r.votes or r.label not in r.candidates:
        return None
    return f"{r.votes[r.candidates.index(r.label)]}/{sum(r.votes)}"


def rows(results: Sequence[Any], class_names: Sequence[str]) -> list[list[Any]]:
    return [[r.name, r.label, r.class_name, r.rethought, label_probability(r),
             class_names[r.backbone_label] if r.backbone_label is not None else None, r.max_prob, vote_share(r),
             r.unet_evals, r.error] for r in results]


def check_output(path: str | Path | None) -> None:
    """Refuse an --output the writer cannot write, before any image is classified."""
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"--output {p}: the extension says the format: .csv (the table's columns) or .jsonl "
                          "(one full result per line)")
    if p.is_dir():
        raise ConfigError(f"--output {p} is a folder; name a file (e.g. {p / 'results.csv'})")


def write_output(path: str | Path, results: Sequence[Any], class_names: Sequence[str]) -> Path:
    """The results as CSV (the table's columns) or JSONL (``ImageResult.to_dict`` per line)."""
    check_output(path)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".jsonl":
        p.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in results))
        return p
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([["" if v is None else v for v in row] for row in rows(results, class_names)])
    return p
