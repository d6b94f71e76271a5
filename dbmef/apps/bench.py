"""``dbmef bench``: the runtime's slow path side by side with what a user would otherwise run.

Measurements are warm-up first, then medians and p95 over repetitions; the clock is read after
outputs are on the host (every engine call returns host arrays, so the device is synchronised).

Library function :func:`run_bench` (the CLI and ``benchmarks/run_benchmarks.py`` wrap it). The
dbmef side needs only the runtime; the baselines (``paper_scripts``, ``torch_batched``) need the
torch source of the same bundle (``source``: the system folder the bundle was exported from).
Every measurement of one report comes from the same run on the same machine and images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ConfigError
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.preprocess import ImageInput
from dbmef.runtime.results import STAGES

log = logging.getLogger(__name__)


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
    from dbmef.runtime.backends.onnxruntime import import_onnxruntime

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


def bench_images(n: int, seed: int = 0, size: tuple[int, int] = (256, 320)) -> list[np.ndarray]:
    """Seeded synthetic photos-to-be (smooth gradients and noise) of a fixed size."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for j in range(n):
        a = np.stack([(xx * (1 + j % 5)) % 256, (yy * (1 + j % 7)) % 256, ((xx + yy) * (j % 3 + 1)) % 256], -1)
        out.append(np.clip(a + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8))
    return out


def machine_matmul_rate() -> dict[str, float]:
    """float32 GEMM rate through every library at hand; the best is the machine's reference peak."""
    rates = {"numpy": numpy_matmul_rate()}
    try:
        import torch

        a = torch.randn(2048, 2048)
        walls = timed_runs(lambda: a @ a, 5, warmup=2)
        rates["torch"] = 2 * 2048**3 / statistics.median(walls)
    except ImportError:
        pass
    try:
        import onnx
        from onnx import TensorProto, helper

        from dbmef.runtime.backends.onnxruntime import import_onnxruntime

        ort = import_onnxruntime()
        g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [2048, 2048])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2048, 2048])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
        walls = timed_runs(lambda: sess.run(None, {"a": x, "b": x}), 5, warmup=2)
        rates["onnxruntime"] = 2 * 2048**3 / statistics.median(walls)
        del onnx
    except ImportError:
        pass
    rates["peak"] = max(rates.values())
    return rates


def run_bench(spec: RuntimeSpec, source: str | Path | None = None, n_images: int = 4, repeats: int = 3,
              baselines: tuple[str, ...] = ("paper_scripts", "torch_batched"), profile: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the runtime ``spec`` describes (its backend, options and scoring overrides). Returns
    a JSON-ready report (see ``benchmarks/RESULTS.md``)."""

    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            progress(msg)

    # Prot = 0: every image rethought; the protector is set per measurement below.
    rt = dataclasses.replace(spec, prot=0.0).build()
    cfg: ScoringConfig = rt.config
    bundle = spec.bundle
    images = bench_images(n_images)
    say(f"dbmef stages ({n_images} images x {repeats} repeats, all rethought, early exit {cfg.early_exit})")
    stages = bench_stages(rt, images, repeats)
    say("throughput at controlled rethink rates")
    probs, _ = rt.backbone_scores(images)
    s = np.sort(probs.max(axis=1))
    thresholds = {"0%": -math.inf, "50%": float(s[len(s) // 2 - 1]) if len(s) > 1 else -math.inf, "100%": math.inf}
    if rt.manifest.protector is not None:
        thresholds["calibrated"] = rt.manifest.protector.threshold
    throughput = bench_throughput(rt, images, thresholds, repeats=max(1, repeats - 1))
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "providers": rt.describe()["providers"]},
        "bundle": str(bundle), "backend": spec.backend, "precision": rt.manifest.precision,
        "scoring": cfg.to_dict(), "unet_evals_per_rethought_image": stages["unet_evaluations"] / n_images,
        "dbmef": {"stages": stages, "throughput": throughput},
    }
    if "paper_scripts" in baselines and "unet" in rt.manifest.components:
        report.update(equal_decisions(spec, rt, images, repeats, say))
    slow = {"dbmef": stages["wall_s"]["p50"]}
    if source is not None and baselines:
        report["baselines"] = torch_baselines(source, cfg, images, repeats, baselines, say)
        for name, b in report["baselines"].items():
            slow[name] = b["wall_s"]["p50"]
            report[f"speedup_vs_{name}"] = slow[name] / slow["dbmef"]
    say("machine matmul rate")
    rates = machine_matmul_rate()
    flops = rt.manifest.sources.get("sd", {}).get("unet_flops_per_evaluation")
    if flops is None and source is not None:
        from dbmef.reference.baselines import read_unet_config, unet_flops_per_evaluation

        flops = unet_flops_per_evaluation(read_unet_config(source), rt.manifest.vae_spec.latent_shape[1:])
    evals = stages["unet_evaluations"]
    roof: dict[str, Any] = {"flops_per_unet_evaluation": flops, "matmul_flops_per_s": rates}
    if flops:
        for name, wall in slow.items():
            # the slow path's whole wall time: UNet work over everything a rethink costs
            achieved = flops * evals / wall
            roof[name] = {"achieved_flops_per_s": achieved, "fraction_of_peak": achieved / rates["peak"]}
        unet_only = flops * evals / (stages["stages_s_per_image"]["unet_scoring"]["p50"] * n_images)
        roof["dbmef_unet_stage"] = {"achieved_flops_per_s": unet_only, "fraction_of_peak": unet_only / rates["peak"]}
    report["roofline"] = roof
    if profile:
        say("ONNX Runtime profile of the scorer by op type")
        report["scorer_profile"] = profile_scorer(rt, int(spec.options.get("intra_op_threads", 0)))
    rt.close()
    return report


def torch_baselines(source: str | Path, cfg: ScoringConfig, images: list[np.ndarray], repeats: int,
                    baselines: tuple[str, ...], say: Callable[[str], None]) -> dict[str, Any]:
    """The torch-eager baselines on the bundle's source system, at equal work (early exit off)."""
    from dbmef.reference.baselines import PaperScriptsBaseline
    from dbmef.reference.engines import reference_pipeline
    from dbmef.runtime.protector import Protector

    work = cfg.replace(early_exit="off")  # the torch baselines do the full method: compare at equal work
    out: dict[str, Any] = {}
    if "torch_batched" in baselines:
        say("baseline torch_batched")
        tb = reference_pipeline(source, work, Protector.fixed(0.0))
        res: list[Any] = []

        def run_tb() -> None:
            res[:] = tb.classify(images)

        walls = timed_runs(run_tb, repeats, warmup=1)
        out["torch_batched"] = {"wall_s": {"p50": statistics.median(walls), "all": walls},
                                "stages_s": {s: sum(r.timings.get(s, 0.0) for r in res) for s in STAGES}}
    if "paper_scripts" in baselines:
        say("baseline paper_scripts (torch)")
        ps = PaperScriptsBaseline(source, work)
        walls = timed_runs(lambda: ps.classify(images), repeats, warmup=1)
        out["paper_scripts"] = {"wall_s": {"p50": statistics.median(walls), "all": walls},
                                "stages_s": dict(ps.timings)}
    return out


def equal_decisions(spec: RuntimeSpec, rt: Any, images: list[np.ndarray], repeats: int,
                    say: Callable[[str], None]) -> dict[str, Any]:
    """The paper's scripts (full method, over the bundle's own engines) against the runtime in every
    early-exit mode, all measured here on the same images, every one rethought. ``equal decisions``:
    the runtime's default mode makes the full method's decisions with less UNet work; ``equal
    work``: mode off."""
    from dbmef.reference.paper_scripts import PaperScriptsOnEngines

    say("baseline paper_scripts (the bundle's engines, one image at a time, full method)")
    paper = PaperScriptsOnEngines(rt)
    labels: list[int] = []

    def run_paper() -> None:
        labels[:] = paper.classify(images)

    walls = timed_runs(run_paper, repeats, warmup=1)
    out: dict[str, Any] = {"paper_scripts_engines": {
        "wall_s": {"p50": statistics.median(walls), "all": walls}, "stages_s": dict(paper.timings),
        "unet_evals_per_rethought_image": paper.unet_evals / len(images)}}
    paper.close()
    default = rt.config.early_exit
    modes: dict[str, Any] = {}
    for mode in dict.fromkeys(("off", default, "adaptive")):
        say(f"dbmef, early exit {mode}")
        mrt = dataclasses.replace(spec, prot=0.0, scoring={**spec.scoring, "early_exit": mode}).build()
        last: list[Any] = []

        def run(mrt: Any = mrt, last: list[Any] = last) -> None:
            last[:] = [mrt.pipeline.rethink(mrt.pipeline.fast_path(images))]  # one batch: its engine cost

        mwalls = timed_runs(run, repeats, warmup=1)
        res = last[0].results(mrt.class_names)
        mrt.close()
        modes[mode] = {"wall_s": {"p50": statistics.median(mwalls), "all": mwalls},
                       "unet_evals_per_rethought_image": float(np.mean([r.unet_evals for r in res])),
                       "decisions_differing_from_paper_scripts": int(sum(r.label != p for r, p in zip(res, labels))),
                       "scorer": dict(last[0].scoring),
                       "speedup_vs_paper_scripts": statistics.median(walls) / statistics.median(mwalls)}
    out["early_exit_modes"] = modes
    out["speedup_vs_paper_scripts_equal_work"] = modes["off"]["speedup_vs_paper_scripts"]
    out["speedup_vs_paper_scripts_equal_decisions"] = modes[default]["speedup_vs_paper_scripts"]
    out["speedup_vs_paper_scripts_adaptive"] = modes["adaptive"]["speedup_vs_paper_scripts"]
    return out


def profile_scorer(rt: Any, threads: int = 0) -> dict[str, Any]:
    m = rt.manifest
    comp = m.scorer_component
    b = rt.config.unet_batch
    c, h, w = m.vae_spec.latent_shape
    L, D = m.embeddings_spec.shape[1:]
    rng = np.random.default_rng(0)
    if comp == "scorer":
        feeds = {"x0": rng.standard_normal((b, c, h, w), dtype=np.float32),
                 "eps": rng.standard_normal((b, c, h, w), dtype=np.float32),
                 "timestep": np.full((b,), 500, np.int64),
                 "emb_pos": rng.standard_normal((b, L, D), dtype=np.float32),
                 "emb_neg": rng.standard_normal((b, L, D), dtype=np.float32), "lam": np.array([1.1], np.float32)}
    else:
        feeds = {"sample": rng.standard_normal((2 * b, c, h, w), dtype=np.float32),
                 "timestep": np.full((2 * b,), 500, np.int64),
                 "encoder_hidden_states": rng.standard_normal((2 * b, L, D), dtype=np.float32)}
    return ort_profile_by_op(rt.bundle_dir / m.components[comp].file, feeds, threads)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Stage latency, throughput vs rethink rate and slow-path wall time per method, one PNG."""
    from dbmef.apps.report import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    st = report["dbmef"]["stages"]["stages_s_per_image"]
    names = [k for k in st if st[k]["p50"] > 0]
    axes[0].barh(names, [st[k]["p50"] * 1e3 for k in names], xerr=[(st[k]["p95"] - st[k]["p50"]) * 1e3 for k in names])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ms per rethought image (p50, bar to p95)")
    axes[0].set_title("dbmef stages")
    th = report["dbmef"]["throughput"]
    axes[1].bar(list(th), [v["images_per_s"] for v in th.values()])
    axes[1].set_ylabel("images/s")
    axes[1].set_title("throughput by rethink rate")
    walls = {"dbmef": report["dbmef"]["stages"]["wall_s"]["p50"]}
    walls.update({k: v["wall_s"]["p50"] for k, v in report.get("baselines", {}).items()})
    axes[2].bar(list(walls), list(walls.values()), color=["C2", "C1", "C3"][: len(walls)])
    axes[2].set_ylabel("s for the same images and UNet work")
    axes[2].set_title("slow path, equal work")
    fig.suptitle(f"{Path(report['bundle']).name}: k={report['scoring']['k']} n={report['scoring']['n_timesteps']} "
                 f"V={report['scoring']['votes']}")
    return save_figure(fig, path)
