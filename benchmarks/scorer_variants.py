#!/usr/bin/env python3
"""The export's design call, measured: the fused scoring graph (one error per row leaves the
engine) against the plain UNet graph (noise predictions leave the engine; noising, the lam
combination and the error run on the host). Same bundle (exported with --scorer both), same rows.

    .venv/bin/python benchmarks/scorer_variants.py --bundle B [--unet-batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()

    from dbmef.runtime.backends.onnxruntime import OrtEngine, OrtOptions
    from dbmef.runtime.bundle import load_manifest
    from dbmef.runtime.scorer import DiffusionScorer
    from dbmef.runtime.slow_path import SlowPath

    def score(sc: DiffusionScorer) -> dict[str, Any]:
        with SlowPath(sc.executor(pos, len(lat)), sc.config) as slow:
            settled = slow.run(lat, cands, neg)
            return {"labels": np.array([s.label for s in settled]), "errors": np.stack([s.errors for s in settled]),
                    "rows": sum(s.rows for s in settled), "engine_calls": slow.stats.engine_calls}

    b = Path(args.bundle)
    m = load_manifest(b)
    if not {"scorer", "unet"} <= set(m.components):
        sys.exit("export the bundle with --scorer both")
    cfg = m.scoring.replace(unet_batch=args.unet_batch, n_timesteps=10, votes=2)
    latent = m.vae.latent_shape
    rng = np.random.default_rng(0)
    pos = np.load(b / m.positive_embeddings.file)
    lat = rng.standard_normal((args.images, *latent)).astype(np.float32)
    cands = np.stack([rng.permutation(len(pos))[: cfg.k] for _ in range(args.images)])
    neg = pos[rng.integers(0, len(pos), (args.images, cfg.k))]
    out = {}
    results = {}
    for comp in ("scorer", "unet"):
        sc = DiffusionScorer(cfg, OrtEngine(b / m.components[comp].file, comp, OrtOptions(device="cpu")), latent)
        score(sc)  # warm-up
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            results[comp] = score(sc)
            walls.append(time.perf_counter() - t0)
        rows = results[comp]["rows"]
        out[comp] = {"wall_s_p50": statistics.median(walls), "rows_per_s": rows / statistics.median(walls),
                     "engine_calls": results[comp]["engine_calls"]}
    out["fused_speedup"] = out["unet"]["wall_s_p50"] / out["scorer"]["wall_s_p50"]
    out["same_decisions"] = bool((results["scorer"]["labels"] == results["unet"]["labels"]).all())
    out["max_rel_error_diff"] = float(np.max(np.abs(results["scorer"]["errors"] - results["unet"]["errors"])
                                             / np.abs(results["unet"]["errors"])))
    out["config"] = {"bundle": str(b), "unet_batch": args.unet_batch, "images": args.images,
                     "rows": results["scorer"]["rows"]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
