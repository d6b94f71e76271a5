"""``dbmef bench``: the slow path measured on the data a bundle is for, against what a user would
otherwise run, in UNet evaluations, engine rows and seconds.

On one set of images (``--data``; the committed digits bundle defaults to its test split; a bundle
with random weights to seeded synthetic pictures), for each early-exit mode:

* **stream**: every image through ``--batch-size`` fast-path batches, once through the earlier
  batch-synchronous slow path (each batch's rethought images in lockstep stages, every stage's
  last call padded, no answer before its batch) and once through the row scheduler
  (``DBMEFRuntime.stream``): slow-path seconds, rows sent per row needed, engine calls, per-image
  latency of the rethought images.
* **rethought, all at once**: the images the protector rethinks submitted together to a
  ``ClassifierWorker`` (median of ``repeats`` walls; latency of each image from submission), and
  the same images through ``paper_scripts`` (the official scripts' structure over the bundle's
  own engines): the speed-ups and whether the decisions agree.
* **rethought, at a rate**: the same images arriving as a Poisson process at half the capacity
  the all-at-once run measured: latency p50/p95 of a service at 50 % load.

Library function :func:`run_bench` (the CLI, ``benchmarks/run_benchmarks.py`` and
``benchmarks/digits/stream.py`` wrap it). Every figure of one report comes from the same run on
the same machine and images; walls are read after outputs are on the host.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.lockstep import rethink_lockstep
from dbmef.apps.roofline import machine_matmul_rate, profile_scorer, roofline, timed_runs
from dbmef.errors import ConfigError
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.preprocess import ImageInput
from dbmef.runtime.results import SLOW_STAGES, STAGES, ImageResult
from dbmef.runtime.row_scheduler import SchedulerStats

log = logging.getLogger(__name__)
MODES = ("off", "exact", "adaptive")


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


def spread(xs: Sequence[float]) -> dict[str, float]:
    """p50, p95 and max of a list of seconds."""
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "max": max(xs) if len(xs) else math.nan}


# -- the data ---------------------------------------------------------------------------------------
@dataclass
class BenchData:
    images: list[ImageInput]
    names: list[str]
    labels: np.ndarray | None  # (N,) class ids when the data is labelled
    source: str


def bench_images(n: int, seed: int = 0, size: tuple[int, int] = (256, 320)) -> list[np.ndarray]:
    """Seeded synthetic photos-to-be (smooth gradients and noise) of a fixed size: the data of a
    bundle with random weights, which no real picture suits better."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for j in range(n):
        a = np.stack([(xx * (1 + j % 5)) % 256, (yy * (1 + j % 7)) % 256, ((xx + yy) * (j % 3 + 1)) % 256], -1)
        out.append(np.clip(a + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8))
    return out


def bench_data(manifest: Any, data: str | Path | None, limit: int | None) -> BenchData:
    """The images to measure on: ``data`` (a labelled ImageFolder / file list, or any folder of
    images), else the digits test split for the digits system, else synthetic pictures."""
    from dbmef.apps.digits import demo_test_split, is_digits_system, render

    if data is not None:
        from dbmef.runtime.data import expand_inputs, load_labelled

        try:
            items = load_labelled(data, manifest.class_names)
            paths, labels = [it.path for it in items], np.array([it.label for it in items])
        except ConfigError:
            paths, labels = expand_inputs([str(data)]), None  # a plain folder of images
        paths = paths[:limit]
        return BenchData(list(paths), list(paths), None if labels is None else labels[: len(paths)], str(data))
    if is_digits_system(manifest):
        split = demo_test_split()
        n = limit or len(split.images)
        return BenchData([np.asarray(render(a)) for a in split.images[:n]],
                         [f"digits[{i}]" for i in split.indices[:n]], split.labels[:n],
                         "the digits test split (dbmef/assets/digits/test_split.npz)")
    n = limit or 4
    return BenchData(list(bench_images(n)), [f"synthetic[{j}]" for j in range(n)], None,
                     "seeded synthetic pictures (benchmarks.bench_images): the bundle names no data of its own")


# -- scenarios --------------------------------------------------------------------------------------
def slow_seconds(results: Sequence[ImageResult]) -> float:
    """The slow path's share of the wall: its stages summed over the rethought images."""
    return float(sum(r.timings.get(s, 0.0) for r in results if r.rethought for s in SLOW_STAGES))


def _summary(results: list[ImageResult], wall: float, rows: dict[str, Any], latency: list[float]) -> dict[str, Any]:
    re = [r for r in results if r.rethought]
    return {"wall_s": wall, "images_per_s": len(results) / wall, "slow_path_s": slow_seconds(results),
            "rethought": len(re), "unet_evals_per_rethought_image": float(np.mean([r.unet_evals for r in re]))
            if re else 0.0, "rows": rows, "latency_rethought_s": spread(latency),
            "answers": [(r.label, r.unet_evals) for r in results]}


def sync_path(rt: Any, data: BenchData) -> dict[str, Any]:
    """The batch-synchronous slow path: per fast-path batch, its rethought images in lockstep
    stages; every image of a batch is answered when the batch is."""
    pipe, bs = rt.pipeline, rt.batch_size
    results: list[ImageResult] = []
    latency: list[float] = []
    rows = SchedulerStats()
    t0 = time.perf_counter()
    for s in range(0, len(data.images), bs):
        t = time.perf_counter()
        batch = rethink_lockstep(pipe, pipe.fast_path(data.images[s : s + bs], data.names[s : s + bs]))
        done = time.perf_counter()
        res = batch.results(pipe.class_names)
        latency += [done - t for r in res if r.rethought]
        results += res
        for k, v in batch.scoring.items():
            if k != "rows_sent_per_row_needed":
                setattr(rows, k, getattr(rows, k) + v)
    return _summary(results, time.perf_counter() - t0, rows.to_dict(), latency)


def scheduler_path(rt: Any, data: BenchData) -> dict[str, Any]:
    """The row scheduler over the whole stream (``DBMEFRuntime.stream``)."""
    stats = SchedulerStats()
    t0 = time.perf_counter()
    got = list(rt.stream(data.images, data.names, stats=stats))
    wall = time.perf_counter() - t0
    results = sorted(got, key=lambda r: r.index)
    return _summary(results, wall, stats.to_dict(), [r.latency_s or 0.0 for r in results if r.rethought])


def all_at_once(rt: Any, images: list[ImageInput], repeats: int) -> dict[str, Any]:
    """Every image submitted at one moment to a ``ClassifierWorker``; walls (median of repeats,
    after a warm-up) and each image's latency from submission (of the median run)."""
    from dbmef.runtime.worker import ClassifierWorker, WorkerConfig

    runs = []
    for _ in range(repeats + 1):
        with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=rt.batch_size)) as w:
            t0 = time.perf_counter()
            res = [f.result() for f in w.submit_many(images)]
            runs.append((time.perf_counter() - t0, res, dict(w.stats.scheduler)))
    walls = [wall for wall, _, _ in runs[1:]]
    _, res, stats = sorted(runs[1:], key=lambda x: x[0])[len(walls) // 2]
    lat = [x.latency_s or 0.0 for x in res]
    return {"wall_s": {"p50": statistics.median(walls), "all": walls}, "latency_s": spread(lat),
            "median_over_last": pct(lat, 50) / max(lat), "rows": stats, "latencies": sorted(lat),
            "unet_evals_per_rethought_image": float(np.mean([x.unet_evals for x in res])),
            "labels": [x.label for x in res], "stages_s_per_image": {
                s: float(np.mean([x.timings.get(s, 0.0) for x in res])) for s in STAGES}}


def at_rate(rt: Any, images: list[ImageInput], rate: float, seed: int = 0) -> dict[str, Any]:
    """The images arriving as a Poisson process of ``rate`` per second (seeded)."""
    from dbmef.runtime.worker import ClassifierWorker, WorkerConfig

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(images))
    with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=rt.batch_size)) as w:
        t0 = time.perf_counter()
        futs = []
        for img, arrive in zip(images, np.cumsum(gaps)):
            time.sleep(max(0.0, t0 + arrive - time.perf_counter()))
            futs.append(w.submit(img))
        res = [f.result() for f in futs]
    return {"rate_per_s": rate, "latency_s": spread([x.latency_s or 0.0 for x in res])}


def paper_scripts(rt: Any, images: list[ImageInput], repeats: int) -> dict[str, Any]:
    """The official scripts' structure over the bundle's own engines (full method)."""
    from dbmef.reference.paper_scripts import PaperScripts

    paper = PaperScripts.on_engines(rt)
    labels: list[int] = []

    def run() -> None:
        labels[:] = paper.classify(images)

    walls = timed_runs(run, repeats, warmup=1)
    paper.close()
    return {"wall_s": {"p50": statistics.median(walls), "all": walls}, "stages_s": dict(paper.timings),
            "unet_evals_per_rethought_image": paper.unet_evals / max(len(images), 1), "labels": labels}


def mode_runtime(spec: RuntimeSpec, mode: str) -> Any:
    return dataclasses.replace(spec, scoring={**spec.scoring, "early_exit": mode}).build()


def run_mode(spec: RuntimeSpec, mode: str, data: BenchData, rethought: list[int], repeats: int,
             rate_fraction: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Every scenario of one early-exit mode."""
    with mode_runtime(spec, mode) as rt:
        say(f"{mode}: the stream at --batch-size {rt.batch_size}, batch-synchronous")
        sync = sync_path(rt, data)
        say(f"{mode}: the stream through the row scheduler")
        sched = scheduler_path(rt, data)
        imgs = [data.images[j] for j in rethought]
        say(f"{mode}: {len(imgs)} rethought images submitted at once ({repeats} repeats)")
        once = all_at_once(rt, imgs, repeats)
        rate = rate_fraction * len(imgs) / once["wall_s"]["p50"]
        say(f"{mode}: the same images arriving at {rate:.3g}/s")
        paced = at_rate(rt, imgs, rate) if imgs else {}
    return {"stream": {"sync": sync, "scheduler": sched}, "all_at_once": once, "at_rate": paced,
            "slow_path_s_ratio_scheduler_over_sync": sched["slow_path_s"] / sync["slow_path_s"]
            if sync["slow_path_s"] else math.nan}


# -- the report -------------------------------------------------------------------------------------
def run_bench(spec: RuntimeSpec, data: str | Path | None = None, source: str | Path | None = None,
              n_images: int | None = None, repeats: int = 3, modes: Sequence[str] = MODES,
              baselines: tuple[str, ...] = ("paper_scripts", "torch_batched"), profile: bool = False,
              rate_fraction: float = 0.5, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the runtime ``spec`` describes (backend, options, scoring, protector) on ``data``
    (see ``bench_data``; ``n_images`` keeps the first N). Returns a JSON-ready report."""

    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            progress(msg)

    if not modes:
        raise ConfigError("bench needs at least one early-exit mode")
    with spec.build() as rt:
        d = bench_data(rt.manifest, data, n_images)
        if rt.config.zero_shot:  # every image, every class (Diffusion Classifier mode)
            rethought = list(range(len(d.images)))
        else:
            logits, _ = rt.pipeline.backbone_logits(d.images)
            rethought = [int(j) for j in np.flatnonzero(rt.protector.gate(logits, rt.config.k).rethink)]
        default, manifest, describe = rt.config.early_exit, rt.manifest, rt.describe()
        say(f"{len(d.images)} images from {d.source}; {len(rethought)} rethought")
        paper = (paper_scripts(rt, [d.images[j] for j in rethought], repeats)  # the paper's method: not zero-shot
                 if "paper_scripts" in baselines and "unet" in manifest.components and rethought
                 and not rt.config.zero_shot else None)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "providers": describe["providers"]},
        "bundle": str(spec.bundle), "backend": spec.backend, "precision": manifest.precision,
        "scoring": describe["scoring"], "protector": describe["protector"], "batch_size": spec.batch_size,
        "data": {"source": d.source, "images": len(d.images), "rethought": len(rethought)},
        "modes": {m: run_mode(spec, m, d, rethought, repeats, rate_fraction, say) for m in dict.fromkeys(modes)},
    }
    if paper is not None:
        report["paper_scripts_engines"] = paper
    summarize(report, default, paper)
    if source is not None and baselines and rethought:
        report.update(torch_baselines(source, spec, [d.images[j] for j in rethought], repeats, baselines, say))
    say("machine matmul rate")
    main = report["modes"].get(default) or next(iter(report["modes"].values()))
    evals = round(main["all_at_once"]["unet_evals_per_rethought_image"] * len(rethought))
    walls = {"dbmef": main["all_at_once"]["wall_s"]["p50"],
             **{k: v["wall_s"]["p50"] for k, v in report.get("baselines", {}).items()}}
    report["roofline"] = roofline(manifest.sources.get("sd", {}).get("unet_flops_per_evaluation"), evals, walls,
                                  machine_matmul_rate())
    if profile:
        say("ONNX Runtime profile of the scorer by op type")
        with spec.build() as rt:
            report["scorer_profile"] = profile_scorer(rt, int(spec.options.get("intra_op_threads", 0)))
    return report


def summarize(report: dict[str, Any], default: str, paper: dict[str, Any] | None) -> None:
    """The headline figures, each from the same run: evaluations and rows of the default mode, the
    speed-ups over paper_scripts and whether the decisions agree."""
    modes = report["modes"]
    main = modes.get(default) or next(iter(modes.values()))
    report["early_exit"] = default
    for v in modes.values():  # the row scheduler changes when rows run, never which rows or what answer
        st = v["stream"]
        v["images_differing_sync_vs_scheduler"] = int(sum(
            a != b for a, b in zip(st["sync"].pop("answers"), st["scheduler"].pop("answers"))))
    report["unet_evals_per_rethought_image"] = main["all_at_once"]["unet_evals_per_rethought_image"]
    report["rows_sent_per_row_needed"] = main["stream"]["scheduler"]["rows"]["rows_sent_per_row_needed"]
    report["rows_sent_per_row_needed_by_mode"] = {
        m: {p: v["stream"][p]["rows"]["rows_sent_per_row_needed"] for p in ("sync", "scheduler")}
        for m, v in modes.items()}
    if "exact" in modes and "adaptive" in modes:
        report["adaptive_over_exact_slow_path_s"] = (modes["adaptive"]["stream"]["scheduler"]["slow_path_s"]
                                                     / modes["exact"]["stream"]["scheduler"]["slow_path_s"])
    if paper is None:
        for v in modes.values():
            v["all_at_once"].pop("labels")
        return
    for v in modes.values():
        v["speedup_vs_paper_scripts"] = paper["wall_s"]["p50"] / v["all_at_once"]["wall_s"]["p50"]
        v["decisions_differing_from_paper_scripts"] = int(sum(
            a != b for a, b in zip(v["all_at_once"].pop("labels"), paper["labels"])))
    paper.pop("labels")
    for key, mode in (("equal_work", "off"), ("equal_decisions", default), ("adaptive", "adaptive")):
        if mode in modes:
            report[f"speedup_vs_paper_scripts_{key}"] = modes[mode]["speedup_vs_paper_scripts"]


def torch_baselines(source: str | Path, spec: RuntimeSpec, images: list[ImageInput], repeats: int,
                    baselines: tuple[str, ...], say: Callable[[str], None]) -> dict[str, Any]:
    """The torch-eager baselines on the bundle's source system, at equal work (early exit off),
    against dbmef at equal work on the same images."""
    from dbmef.reference.engines import reference_pipeline
    from dbmef.reference.paper_scripts import PaperScripts
    from dbmef.runtime.protector import Protector

    with spec.build() as rt:
        work = rt.config.replace(early_exit="off")
    out: dict[str, Any] = {}
    if "torch_batched" in baselines:
        say("baseline torch_batched")
        tb = reference_pipeline(source, work, Protector.fixed(0.0))
        out["torch_batched"] = {"wall_s": {"p50": statistics.median(timed_runs(lambda: tb.classify(images),
                                                                              repeats, warmup=1))}}
    if "paper_scripts" in baselines:
        say("baseline paper_scripts (torch)")
        ps = PaperScripts.on_torch(source, work)
        out["paper_scripts"] = {"wall_s": {"p50": statistics.median(timed_runs(lambda: ps.classify(images),
                                                                              repeats, warmup=1))}}
    with mode_runtime(dataclasses.replace(spec, prot=0.0), "off") as rt:
        ours = statistics.median(timed_runs(lambda: rt.classify(images), repeats, warmup=1))
    report: dict[str, Any] = {"baselines": out, "dbmef_equal_work_wall_s": ours}
    for name, b in out.items():
        report[f"speedup_vs_{name}"] = b["wall_s"]["p50"] / ours
    return report


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Per mode: slow-path seconds and rows sent per row needed, batch-synchronous vs the row
    scheduler; latency of the rethought images submitted at once. One PNG."""
    from dbmef.apps.report import pyplot, save_figure

    modes = report["modes"]
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(modes))
    for j, (p, label) in enumerate((("sync", "batch-synchronous"), ("scheduler", "row scheduler"))):
        axes[0].bar(x + (j - 0.5) * 0.4, [v["stream"][p]["slow_path_s"] for v in modes.values()], 0.4, label=label)
        axes[1].bar(x + (j - 0.5) * 0.4, [v["stream"][p]["rows"]["rows_sent_per_row_needed"] for v in modes.values()],
                    0.4, label=label)
    for ax, title in ((axes[0], "slow-path seconds (whole stream)"), (axes[1], "engine rows sent / rows needed")):
        ax.set_xticks(x, list(modes))
        ax.set_title(title)
        ax.legend()
    axes[1].axhline(1.0, color="k", lw=0.5)
    for m, v in modes.items():
        lat = np.sort(v["all_at_once"].get("latencies", []))
        if not len(lat):
            continue
        axes[2].plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=m)
    axes[2].set_xlabel("seconds from submission")
    axes[2].set_ylabel("fraction of rethought images answered")
    axes[2].set_title("all rethought images submitted at once")
    axes[2].legend()
    sc = report["scoring"]
    fig.suptitle(f"{Path(report['bundle']).name}: k={sc['k']} n={sc['n_timesteps']} V={sc['votes']}, "
                 f"{report['data']['images']} images ({report['data']['rethought']} rethought), "
                 f"--batch-size {report['batch_size']}")
    return save_figure(fig, path)
