"""``dbmef features``: diffusion features of a labelled image set through the runtime, a linear
head fitted on them, and a bundle whose classifier is that head (``docs/features.md``).

Only the head is trained. Extraction runs the bundle's ``features`` component on the runtime's
backend, in batches, and keeps its results in a cache folder one part per 256 images, so an
interrupted run resumes where it stopped; an unreadable image is reported and left out, never the
batch it came in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError, DBMEFError
from dbmef.runtime.data import LabelledImage

log = logging.getLogger(__name__)
PART = 256  # images per cache part


@dataclass
class FeatureSet:
    x: np.ndarray  # (N_ok, F) float32
    y: np.ndarray  # (N_ok,) int64
    paths: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def items_key(items: Sequence[LabelledImage]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()


def extract_features(bundle_dir: str | Path, items: Sequence[LabelledImage], cache: str | Path,
                     backend: str = "onnxruntime", options: Any = None, batch_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> FeatureSet:
    """The ``features`` component on every image of ``items``; parts already in ``cache`` (for the
    same features graph and the same list) are read back instead of recomputed."""
    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.bundle import Bundle
    from dbmef.runtime.preprocess import VaePreprocess, load_image

    bundle = Bundle.open(bundle_dir)
    if "features" not in bundle.manifest.components:
        raise ConfigError(f"bundle {bundle.dir} has no features component; run `dbmef features` to add one")
    cache = Path(cache)
    meta = {"features_sha256": bundle.manifest.components["features"].sha256, "items": items_key(items),
            "n": len(items), "part": PART}
    meta_file = cache / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
        raise ConfigError(f"feature cache {cache} holds another graph's or another list's features; delete it or "
                          "pass another --cache")
    cache.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta))
    pre = VaePreprocess(bundle.manifest.vae.image_size)
    engine = None
    try:
        for start in range(0, len(items), PART):
            part = cache / f"part-{start // PART:05d}.npz"
            chunk = items[start:start + PART]
            if not part.is_file():
                if engine is None:
                    engine = open_engine(bundle, "features", backend, options)
                _write_part(part, chunk, engine, pre, load_image, batch_size)
            if progress is not None:
                progress(len(chunk))
    finally:
        if engine is not None:
            engine.close()
    return _read_parts(cache, items)


def _write_part(part: Path, chunk: Sequence[LabelledImage], engine: Any, pre: Any, load: Any, batch_size: int) -> None:
    feats: list[np.ndarray] = []
    ok, errors = np.zeros(len(chunk), bool), [""] * len(chunk)
    for s in range(0, len(chunk), batch_size):
        arrays, rows = [], []
        for j in range(s, min(s + batch_size, len(chunk))):
            try:
                arrays.append(pre(load(chunk[j].path)))
                rows.append(j)
            except (DBMEFError, OSError, ValueError) as exc:
                errors[j] = str(exc) or type(exc).__name__
        if arrays:
            feats.append(engine({"pixel_values": np.stack(arrays)})["features"])
            ok[rows] = True
    x = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    tmp = part.with_suffix(".tmp.npz")
    np.savez(tmp, features=x, ok=ok, errors=np.array(errors))
    tmp.replace(part)  # a part is whole or absent: an interrupted run never leaves half of one


def _read_parts(cache: Path, items: Sequence[LabelledImage]) -> FeatureSet:
    xs, ys, paths, failed = [], [], [], []
    for start in range(0, len(items), PART):
        chunk = items[start:start + PART]
        with np.load(cache / f"part-{start // PART:05d}.npz") as z:
            if len(z["ok"]) != len(chunk):
                raise ConfigError(f"feature cache part {start // PART} in {cache} is damaged; delete the cache")
            if z["features"].size:
                xs.append(z["features"])
            for it, good, err in zip(chunk, z["ok"], z["errors"]):
                if good:
                    ys.append(it.label)
                    paths.append(it.path)
                else:
                    failed.append((it.path, str(err)))
    if not xs:
        raise DBMEFError(f"none of the {len(items)} images could be read (first: {failed[0] if failed else None})")
    return FeatureSet(np.concatenate(xs).astype(np.float32), np.array(ys, np.int64), paths, failed)


@dataclass
class FeaturesConfig:
    """Everything ``dbmef features`` does, as data (saved beside the bundle it wrote)."""

    bundle: str
    data: str
    out: str
    # the defaults: the digits calibration split's choice (docs/features.md)
    block: str = "mid"
    timestep: int = 10
    pool: int = 4
    seed: int = 0
    l2: float = 1e-4
    eval_data: str | None = None
    backend: str = "onnxruntime"
    batch_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _extract(out: Path, items: Sequence[LabelledImage], name: str, cfg: FeaturesConfig,
             progress: Callable[[int, str], Any] | None) -> FeatureSet:
    """``extract_features`` for ``run_features``: cached beside the bundle (OUT.cache/NAME), with a bar."""
    bar = progress(len(items), f"features ({name})") if progress else None
    fs = extract_features(out, items, out.parent / f"{out.name}.cache" / name, cfg.backend, None,
                          cfg.batch_size, bar.update if bar else None)
    if bar:
        bar.close()
    for path, why in fs.failed:
        log.warning("left out %s: %s", path, why)
    return fs


def run_features(cfg: FeaturesConfig, progress: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
    """Copy the bundle to ``cfg.out``, add the features graph, extract features of ``cfg.data``,
    fit the head, make it the bundle's backbone, and score it on ``cfg.eval_data``: the report."""
    from dbmef.apps.linear_head import fit_linear_head
    from dbmef.export.feature_bundle import add_features, add_head, bundle_copy
    from dbmef.runtime.bundle import read_manifest
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.features import FeatureSpec

    spec = FeatureSpec(cfg.block, cfg.timestep, cfg.pool, cfg.seed)
    src, out = Path(cfg.bundle), Path(cfg.out)
    m = read_manifest(src)
    train = load_labelled(cfg.data, m.class_names, m.sources.get("class_wnids"))
    test = load_labelled(cfg.eval_data, m.class_names, m.sources.get("class_wnids")) if cfg.eval_data else []
    # the whole build in the copy: an interrupted or failed run leaves no half-built bundle behind, and
    # the feature cache beside it (OUT.cache) lets the next run resume
    with bundle_copy(src, out):
        add_features(out, spec)
        fit_set = _extract(out, train, "train", cfg, progress)
        head = fit_linear_head(fit_set.x, fit_set.y, len(m.class_names), cfg.l2)
        report: dict[str, Any] = {"features": spec.to_dict(), "dim": int(fit_set.x.shape[1]), "bundle": str(out),
                                  "train": {"n": len(fit_set.y), "failed": len(fit_set.failed),
                                            "accuracy": head.info["train_accuracy"]},
                                  "head": head.info, "config": cfg.to_dict()}
        add_head(out, head.weight, head.bias, {**head.info, "data": cfg.data, "n_failed": len(fit_set.failed)})
        if test:
            ev = _extract(out, test, "eval", cfg, progress)
            report["eval"] = {"n": len(ev.y), "failed": len(ev.failed),
                              "accuracy": float((head.predict(ev.x) == ev.y).mean())}
        (out / "features_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return report
