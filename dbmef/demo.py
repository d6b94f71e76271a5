"""The embedded default job: build the tiny system and classify the bundled sample image."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_image_path() -> Path:
    return Path(str(resources.files("dbmef") / "assets" / "sample.png"))


def run_demo(out: str | Path = "engines/demo") -> str:
    from dbmef.reference.engines import reference_pipeline
    from dbmef.reference.tiny import build_tiny_system
    from dbmef.runtime import Protector, ScoringConfig

    root = Path(out) / "tiny-system"
    if not (root / "class_names.json").is_file():
        build_tiny_system(root)
    cfg = ScoringConfig(n_timesteps=10, votes=3)
    pipe = reference_pipeline(root, cfg, Protector(float("inf"), 0.0))
    r = pipe.classify([sample_image_path()])[0]
    lines = [
        f"image       {r.image}",
        f"backbone    {r.topk[0][0]} {pipe.class_names[r.topk[0][0]]} (p={r.topk[0][1]:.3f})" if r.topk else "",
        f"rethought   {r.rethought}",
        f"candidates  {[pipe.class_names[c] for c in r.candidates]}",
        f"votes       {r.votes}",
        f"answer      {r.class_name} (class {r.label})",
    ]
    return "\n".join(x for x in lines if x)
