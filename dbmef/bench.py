"""``dbmef bench``: the runtime's slow path side by side with what a user would otherwise run.

Library function :func:`run_bench` (the CLI and ``benchmarks/run_benchmarks.py`` wrap it). The
dbmef side needs only the runtime; the baselines (``paper_scripts``, ``torch_batched``) need the
torch source of the same bundle (``source``: the system folder the bundle was exported from).
Every measurement of one report comes from the same run on the same machine and images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.runtime import RuntimeSpec
from dbmef.runtime.bench import bench_stages, bench_throughput, numpy_matmul_rate, ort_profile_by_op, timed_runs
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.results import STAGES

log = logging.getLogger(__name__)


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

        from dbmef.runtime.ort_backend import import_onnxruntime

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

        flops = unet_flops_per_evaluation(read_unet_config(source), tuple(rt.manifest.vae["latent_shape"][1:]))
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
    from dbmef.paper_scripts import PaperScriptsOnEngines

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
    c, h, w = m.vae["latent_shape"]
    L, D = m.positive_embeddings["shape"][1:]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
