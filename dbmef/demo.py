"""The embedded default job: export the tiny demo bundle once, then classify the sample image
with the lean ONNX Runtime runtime, exactly as a service would."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path


def sample_image_path() -> Path:
    return Path(str(resources.files("dbmef") / "assets" / "sample.png"))


def run_demo(out: str | Path = "engines/demo-tiny") -> str:
    from dbmef.runtime.bundle import MANIFEST
    from dbmef.runtime.protector import Protector
    from dbmef.runtime.runtime import DBMEFRuntime

    bundle = Path(out)
    if not (bundle / MANIFEST).is_file():
        from dbmef.export.exporter import ExportConfig, export_bundle

        export_bundle(ExportConfig(backbone="tiny", sd="tiny", out=str(bundle)))
    # Prot = 0: the demo rethinks its image so the slow path is shown.
    with DBMEFRuntime(bundle, protector=Protector(math.inf, 0.0, None)) as rt:
        r = rt.classify([sample_image_path()])[0]
        names = rt.class_names
        t = rt.last_timings
    lines = [
        f"bundle      {bundle}",
        f"image       {r.image}",
        f"backbone    {names[r.topk[0][0]]} (p={r.topk[0][1]:.3f}); top-5 {[names[c] for c, _ in r.topk]}",
        f"rethought   {r.rethought}",
        f"votes       {dict(zip([names[c] for c in r.candidates], r.votes))}",
        f"answer      {r.class_name} (class {r.label})",
        "timings     " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items() if v > 0),
        "note        the tiny system has random weights: the answer shows the mechanism, not accuracy",
    ]
    return "\n".join(lines)
