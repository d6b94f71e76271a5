"""The embedded default job: classify the digits test split with the committed digits bundle
(a weak classifier + a small diffusion model, both trained by ``benchmarks/digits/train.py``) and
show what DBMEF changes, exactly as a service would run it: the lean runtime on ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dbmef.apps.report import progress_bar
from dbmef.errors import DBMEFError


@dataclass
class DemoReport:
    n_images: int
    backbone_accuracy: float
    dbmef_accuracy: float
    rethink_rate: float
    fixed: int  # rethought images the backbone got wrong and DBMEF got right
    broken: int  # the reverse
    seconds: float
    unet_evals_per_rethought_image: float
    early_exit: str
    grid: Path | None
    bundle: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per rethought image
    operating_point: dict[str, Any] | None = None  # the bundle's Prot on the calibration curve vs the test split

    def lines(self) -> list[str]:
        return [
            f"bundle      {self.bundle}",
            f"images      {self.n_images} digits (scikit-learn load_digits test split, never seen in training)",
            f"backbone accuracy {self.backbone_accuracy:.1%} -> DBMEF accuracy {self.dbmef_accuracy:.1%}",
            f"rethought   {self.rethink_rate:.1%} of the images (protector threshold from the bundle)",
            f"flips       {self.fixed} fixed, {self.broken} broken",
            f"slow path   {self.unet_evals_per_rethought_image:.0f} UNet evaluations per rethought image "
            f"(early exit: {self.early_exit})",
            f"time        {self.seconds:.1f} s ({self.seconds / max(self.n_images, 1) * 1e3:.1f} ms per image, "
            "ONNX Runtime on this CPU)",
            *([f"grid        {self.grid}"] if self.grid else []),
            *(_operating_point_lines(self.operating_point) if self.operating_point else []),
        ]


def run_demo(out: str | Path = "engines/demo", bundle: str | Path | None = None, limit: int | None = None,
             progress: bool = True, curve: bool = True) -> DemoReport:
    """Classify the committed digits test split; write a PNG grid of the rethought digits to ``out``.
    ``curve``: also rethink the committed calibration split once and show where the bundle's
    threshold sits on the operating-point curve, against what the test split measured."""
    import time

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.runtime import DBMEFRuntime

    bundle = Path(bundle) if bundle else demo_bundle_dir()
    split = demo_test_split()
    images, labels = split.images[:limit], split.labels[:limit]
    pils = [render(a) for a in images]
    t0 = time.perf_counter()
    with DBMEFRuntime(bundle) as rt:
        bar = progress_bar(len(pils), "classifying", quiet=not progress)
        results = rt.classify(pils, names=[f"digits[{i}]" for i in split.indices[: len(pils)]], progress=bar.update)
        bar.close()
        names = rt.class_names
        early_exit = rt.config.early_exit
    seconds = time.perf_counter() - t0
    bad = [r for r in results if r.error]
    if bad:
        raise DBMEFError(f"{len(bad)} demo images failed: {bad[0].error}")
    backbone = np.array([r.backbone_label for r in results])
    final = np.array([r.label for r in results])
    rethought = np.array([r.rethought for r in results])
    rows = [{"index": int(split.indices[j]), "truth": names[labels[j]], "backbone": names[backbone[j]],
             "dbmef": names[final[j]], "max_prob": results[j].max_prob} for j in np.flatnonzero(rethought)]
    report = DemoReport(
        n_images=len(results), backbone_accuracy=float((backbone == labels).mean()),
        dbmef_accuracy=float((final == labels).mean()), rethink_rate=float(rethought.mean()),
        fixed=int(((final == labels) & (backbone != labels) & rethought).sum()),
        broken=int(((final != labels) & (backbone == labels) & rethought).sum()),
        seconds=seconds, grid=None, bundle=bundle, rows=rows, early_exit=early_exit,
        unet_evals_per_rethought_image=float(np.mean([r.unet_evals for r in results if r.rethought]))
        if rethought.any() else 0.0,
    )
    if rows:
        Path(out).mkdir(parents=True, exist_ok=True)
        report.grid = rethought_grid([pils[j] for j in np.flatnonzero(rethought)], rows,
                                     Path(out) / "digits_rethought.png")
    if curve and limit is None:
        report.operating_point = operating_point(bundle, Path(out), report, progress)
    return report


def operating_point(bundle: Path, out: Path, test: DemoReport, progress: bool) -> dict[str, Any]:
    """``dbmef calibrate``'s pass on the committed calibration split (results kept in ``out``, so
    a second demo resumes it), the bundle's Prot located on its curve, and the calibration point
    against the test split's numbers (two-proportion z: within sampling error when |z| < 2)."""
    from dbmef.apps.calibrate import calibrate_operating_point, plot_curve
    from dbmef.apps.digits import demo_calibration_split, write_image_folder
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.bundle import read_manifest
    from dbmef.runtime.data import load_labelled

    m = read_manifest(bundle)
    if m.protector is None or m.protector.prot is None:
        raise DBMEFError(f"{bundle} has no Prot-calibrated protector to locate on the curve")
    items = load_labelled(write_image_folder(demo_calibration_split(), out / "calibration"), m.class_names)
    bar = progress_bar(len(items), "calibration curve", quiet=not progress)
    cal = calibrate_operating_point(RuntimeSpec(str(bundle)), items, "prot", float(m.protector.prot),
                                    data="digits calibration split", results=out / "calibration.jsonl",
                                    write=False, progress=bar.update)
    bar.close()
    p = cal["chosen"]["point"]
    n_cal, n_test = cal["n_images"], test.n_images
    pairs = {"rethink_rate": test.rethink_rate, "backbone_accuracy": test.backbone_accuracy,
             "accuracy": test.dbmef_accuracy}
    return {
        "prot": m.protector.prot, "threshold_stored": m.protector.threshold, "threshold_curve": p["threshold"],
        "n_calibration": n_cal, "calibration": {k: p[k] for k in pairs}, "accuracy_ci": p["accuracy_ci"],
        "test": pairs, "z": {k: two_proportion_z(p[k], n_cal, v, n_test) for k, v in pairs.items()},
        "unet_evaluations": cal["unet_evaluations"], "plot": str(plot_curve(cal, out / "operating_points.png")),
    }


def two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> float:
    """(p2 - p1) in standard errors of the difference of two independent proportions."""
    se = np.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return float((p2 - p1) / se) if se > 0 else 0.0


def _operating_point_lines(op: dict[str, Any]) -> list[str]:
    c, t, z = op["calibration"], op["test"], op["z"]
    lo, hi = op["accuracy_ci"]
    return [
        f"operating   Prot {op['prot']} on {op['n_calibration']} calibration digits: threshold "
        f"{op['threshold_curve']:.4f} (stored {op['threshold_stored']:.4f})",
        f"  cal/test  rethink {c['rethink_rate']:.1%} / {t['rethink_rate']:.1%} (z {z['rethink_rate']:+.1f}); "
        f"backbone {c['backbone_accuracy']:.1%} / {t['backbone_accuracy']:.1%} (z {z['backbone_accuracy']:+.1f}); "
        f"DBMEF {c['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] / {t['accuracy']:.1%} (z {z['accuracy']:+.1f})",
        f"curve       {op['plot']} (one slow pass: {op['unet_evaluations']} UNet evaluations)",
    ]


def rethought_grid(images: list[Image.Image], rows: list[dict[str, Any]], path: Path, cols: int = 10,
                   cell: int = 96) -> Path:
    """A PNG of the rethought digits, each captioned backbone -> DBMEF (truth) and "right" or "WRONG"
    (not colour alone: green and red read the same to many eyes); green where DBMEF is right, red
    where it is wrong."""
    font = ImageFont.load_default()
    h = cell + 30
    n = len(images)
    grid = Image.new("RGB", (cols * cell, -(-n // cols) * h + 24), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "rethought digits: backbone -> DBMEF (truth), right / WRONG", fill="black", font=font)
    for j, (img, r) in enumerate(zip(images, rows)):
        x, y = (j % cols) * cell, (j // cols) * h + 24
        grid.paste(img.resize((cell - 16, cell - 16), Image.Resampling.NEAREST), (x + 8, y + 2))
        ok = r["dbmef"] == r["truth"]
        color = (0, 140, 0) if ok else (200, 0, 0)
        draw.text((x + 4, y + cell - 12), f"{r['backbone']}->{r['dbmef']}", fill=color, font=font)
        draw.text((x + 4, y + cell + 2), f"({r['truth']}) {'right' if ok else 'WRONG'}", fill=(90, 90, 90) if ok
                  else color, font=font)
    grid.save(path)
    return path
