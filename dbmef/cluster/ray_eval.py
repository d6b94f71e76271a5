"""``dbmef eval --ray``: the same evaluation as ``dbmef.runtime.evaluate.evaluate``, as a Ray Data
pipeline.

    read + decode (tasks) -> backbone + protector (actors, one runtime each)
      -> rethink: VAE, text encoder, UNet scoring, vote (actors, one runtime and a GPU share each)
      -> the driver appends one JSON line per image to the results file

The results file, its resume rule and the summary are ``evaluate``'s own (``read_results``,
``summarize``, the same record fields), so a run can be resumed by either. Answers do not depend
on how the work is split: an image's answer is a function of its pixels and its top-k (noise banks
are seeded per vote, every UNet call has a fixed shape, rows are independent), which the tests
check image by image against the single-process run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.cluster import RuntimeSpec, for_this_actor, init_ray, require_ray
from dbmef.runtime.data import LabelledImage
from dbmef.runtime.evaluate import ResultsFile, record, records_for, summarize
from dbmef.runtime.results import ragged

log = logging.getLogger(__name__)


def read_images(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Ray Data task: decode each path to an RGB uint8 array with the runtime's own decoder (so an
    unreadable file gets the message single-process evaluation gives it)."""
    from dbmef.errors import DBMEFError
    from dbmef.runtime.preprocess import load_image

    pixels, errors = [], []
    for p in batch["path"]:
        try:
            pixels.append(np.asarray(load_image(str(p)), dtype=np.uint8))
            errors.append("")
        except DBMEFError as exc:
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(str(exc))
    return {"path": batch["path"], "label": batch["label"], "pixels": ragged(pixels), "read_error": np.array(errors)}


class FastPathStage:
    """Ray Data actor: backbone + protector. Passes the batch on as ``Batch.columns()``: rows kept
    by the protector are final; rethought rows carry their VAE input, so nothing is decoded twice."""

    def __init__(self, spec: dict[str, Any]):
        self.rt = for_this_actor(RuntimeSpec(**{**spec, "lazy": True})).build()  # only this half's engines

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        fast = self.rt.pipeline.fast_path(list(batch["pixels"]), [str(p) for p in batch["path"]],
                                          errors=[str(e) or None for e in batch["read_error"]])
        return {"path": batch["path"], "label": batch["label"], "fast_node": np.array([node_id()] * len(fast)),
                **fast.columns()}


class RethinkStage:
    """Ray Data actor: the slow path for the rethought images of a batch; passes the rest through."""

    def __init__(self, spec: dict[str, Any]):
        self.rt = for_this_actor(RuntimeSpec(**{**spec, "lazy": True})).build()  # only this half's engines

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from dbmef.runtime.results import Batch

        rows = Batch.from_columns({k: v for k, v in batch.items() if k not in ("path", "label", "fast_node")})
        results = self.rt.pipeline.rethink(rows).results(self.rt.class_names)
        records = [record(str(p), int(y), r) for p, y, r in zip(batch["path"], batch["label"], results)]
        return {"record": np.array([json.dumps(rec) for rec in records]), "fast_node": batch["fast_node"],
                "rethink_node": np.array([node_id()] * len(records))}


def node_id() -> str:
    """The Ray node this process runs on (the summary names where the work ran)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def ray_evaluate(
    spec: RuntimeSpec,
    items: Sequence[LabelledImage],
    results_path: str | Path,
    address: str | None = None,
    resume: bool = True,
    fast_actors: int = 1,
    rethink_actors: int = 1,
    gpus_per_rethink_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``items`` on a Ray cluster (``address``: a cluster to join, e.g. ``auto`` or
    ``ray://head:10001``; None starts a local instance) and return ``evaluate``'s summary.

    Image paths must be readable from every worker (shared storage on a cluster). The rethink
    actors take ``gpus_per_rethink_actor`` GPUs each (1 per GPU, or 0.5 for two per GPU).
    """
    ray = require_ray()
    check_ray_options(fast_actors, rethink_actors, gpus_per_rethink_actor, cpus_per_actor)
    nodes: dict[str, set[str]] = {"fast": set(), "rethink": set()}
    with ResultsFile(results_path, items, resume, spec.identity(), batch_size) as out:
        if progress and len(out.done):
            progress(len(items) - len(out.todo))
        if out.todo:
            started = init_ray(address)
            try:
                check_gpus(ray, gpus_per_rethink_actor, rethink_actors)
                _run(ray, spec, out, fast_actors, rethink_actors, gpus_per_rethink_actor, cpus_per_actor,
                     batch_size, progress, nodes)
            finally:
                if started:
                    ray.shutdown()
        done = out.done
    summary = summarize(records_for(items, done), total=len(items))
    summary["ray_nodes"] = {k: sorted(v) for k, v in nodes.items()}  # where this run's stages ran
    return summary


def check_ray_options(fast_actors: int, rethink_actors: int, gpus: float, cpus: float) -> None:
    """Refuse actor counts and shares no pipeline can run, before Ray starts."""
    from dbmef.errors import ConfigError

    for flag, n in (("--ray-fast-actors", fast_actors), ("--ray-rethink-actors", rethink_actors)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{flag} {n} is invalid: at least 1 actor runs that stage")
    for flag, x in (("--ray-gpus-per-actor", gpus), ("CPUs per actor", cpus)):
        if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ConfigError(f"{flag} {x} is invalid: a finite share >= 0 (e.g. 1 for one GPU per actor, 0.5 for two)")


def check_gpus(ray: Any, gpus: float, actors: int) -> None:
    """Refuse GPU shares the cluster cannot give (Ray Data would wait for them forever)."""
    from dbmef.errors import ConfigError

    have = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus > 0 and have < gpus:
        raise ConfigError(f"--ray-gpus-per-actor {gpus:g}: the Ray cluster has {have:g} GPUs, so no rethink actor "
                          "could start (Ray would wait forever); use --ray-gpus-per-actor 0 on CPUs, or join a "
                          "cluster with GPUs")
    if gpus > 0 and have < gpus * actors:
        log.warning("%d rethink actors at %g GPUs each need %g GPUs; the cluster has %g: some will wait for others",
                    actors, gpus, gpus * actors, have)


def _run(ray: Any, spec: RuntimeSpec, out: ResultsFile, fast_actors: int, rethink_actors: int, gpus: float,
         cpus: float, batch_size: int, progress: Callable[[int], None] | None, nodes: dict[str, set[str]]) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # dbmef shows its own bar
    ds = ray.data.from_items([{"path": str(it.path), "label": int(it.label)} for it in out.todo])
    ds = ds.map_batches(read_images, batch_size=batch_size, batch_format="numpy")
    spec_d = spec.to_dict()
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(FastPathStage, fn_constructor_kwargs={"spec": spec_d}, compute=pool(size=fast_actors),
                        batch_size=batch_size, num_cpus=cpus, batch_format="numpy")
    ds = ds.map_batches(RethinkStage, fn_constructor_kwargs={"spec": spec_d}, compute=pool(size=rethink_actors),
                        batch_size=batch_size, num_cpus=cpus, num_gpus=gpus, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        recs = [json.loads(s) for s in batch["record"]]
        nodes["fast"].update(map(str, batch["fast_node"]))
        nodes["rethink"].update(map(str, batch["rethink_node"]))
        for rec in recs:
            out.add(rec)
        out.sync()
        if progress:
            progress(len(recs))
