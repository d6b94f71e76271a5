"""Latency and throughput measurements of the runtime (lean: no torch). Warm-up first, then
medians and p95 over repetitions; the clock is read after outputs are on the host (every engine
call here returns host arrays, so the device is synchronised)."""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime.preprocess import ImageInput
from dbmef.runtime.results import STAGES


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else math.nan


def timed_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_stages(rt: Any, images: Sequence[ImageInput], repeats: int = 3, warmup: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every image rethought (``rt`` built with Prot = 0): per-stage seconds per image (p50/p95
    over repeats), the slow path's wall time, and scorer rows/s over the rows early exit really
    evaluated."""
    if not np.isposinf(rt.protector.threshold):
        raise ConfigError("bench_stages needs a runtime that rethinks every image: build it with prot=0")
    per_rep: list[dict[str, float]] = []
    walls: list[float] = []
    evals = 0
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        res = rt.classify(list(images))
        wall = time.perf_counter() - t0
        evals = sum(x.unet_evals for x in res)  # the same every repetition: answers are deterministic
        if r >= warmup:
            walls.append(wall)
            # each image carries its share of every stage: the shares sum to the batch's stage time
            per_rep.append({s: sum(x.timings.get(s, 0.0) for x in res) / len(images) for s in STAGES})
        if progress:
            progress(1)
    rows = evals // 2  # scorer rows actually evaluated (early exit included, padding excluded)
    unet_s = [p["unet_scoring"] * len(images) for p in per_rep]
    return {
        "images": len(images),
        "stages_s_per_image": {s: {"p50": pct([p[s] for p in per_rep], 50), "p95": pct([p[s] for p in per_rep], 95)}
                               for s in STAGES},
        "wall_s": {"p50": pct(walls, 50), "p95": pct(walls, 95), "all": walls},
        "scorer_rows": rows,
        "unet_evaluations": 2 * rows,
        "scorer_rows_per_s": rows / statistics.median(unet_s) if unet_s else math.nan,
        "unet_evaluations_per_s": 2 * rows / statistics.median(unet_s) if unet_s else math.nan,
    }


def bench_throughput(rt: Any, images: Sequence[ImageInput], thresholds: dict[str, float], repeats: int = 2,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Images/s at controlled rethink rates, each given as a protector threshold."""
    out = {}
    from dbmef.runtime.protector import Protector

    for label, thr in thresholds.items():
        gated = rt.with_protector(Protector(thr, None, None))
        res: list[Any] = []

        def run(res: list[Any] = res, gated: Any = gated) -> None:
            res[:] = gated.classify(list(images))

        walls = timed_runs(run, repeats, warmup=1)
        out[label] = {"threshold": thr, "rethink_rate": sum(r.rethought for r in res) / len(images),
                      "images_per_s": len(images) / statistics.median(walls), "wall_s_p50": statistics.median(walls)}
        if progress:
            progress(1)
    return out


def numpy_matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s through numpy's BLAS (median of repeats)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    walls = timed_runs(lambda: a @ b, repeats, warmup=2)
    return 2 * n**3 / statistics.median(walls)


def ort_profile_by_op(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int = 0) -> dict[str, Any]:
    """Run one ONNX model once under ONNX Runtime's profiler; total kernel time by op type."""
    from dbmef.runtime.ort_backend import import_onnxruntime

    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up inside the profile is excluded below by taking the last run
        sess.run(None, feeds)
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last_start:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
    total = sum(by_op.values())
    return {"total_s": total, "by_op_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])} if total else {}}
