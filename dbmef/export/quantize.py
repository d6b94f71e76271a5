"""Quantize a bundle's UNet graphs to INT8 (Q/DQ) and gate them on the decisions they make.

``dbmef quantize --bundle B --data CAL --out Q`` writes a copy of B whose scorer graph (and plain UNet
graph, when B has one) carries QuantizeLinear/DequantizeLinear pairs around its convolutions and
matmuls: the explicit-quantization form TensorRT builds without a calibrator and ONNX Runtime runs on
any provider. It is a step over an existing bundle, not an export flag, because its calibration data
are the bundle's own slow-path inputs: the rows (VAE latent, fixed noise, timestep, positive and
negative embeddings of the top-k) that the bundle's runtime feeds its scorer when it rethinks the
calibration images. Those exist only once the bundle does.

The quantizer is ONNX Runtime's static QDQ quantizer (per-channel symmetric INT8 weights, symmetric
INT8 activations, min/max ranges). NVIDIA Model Optimizer, the TensorRT diffusion demo's path, needs
the torch modules and a CUDA device for its calibration forward passes, and its ONNX export extra pins
onnxruntime-gpu, which cannot sit beside the CPU runtime (docs/quantization.md).

The gate: the quantized bundle and the source bundle rethink the same calibration images (Prot = 0,
the bundle's scoring settings) and their final labels are compared. More than ``max_disagree`` of
them differing refuses the bundle, naming the images; the measured agreement is recorded in the
scorer's validation record (``dbmef info`` prints it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dbmef.errors import ConfigError, ExportError, ValidationError
from dbmef.export.feature_bundle import bundle_copy
from dbmef.export.manifest import component_record
from dbmef.runtime.bundle import Bundle, TensorRTRecord, read_manifest, sha256_file
from dbmef.runtime.contracts import COMPONENTS, kind_of_component
from dbmef.runtime.engine import Engine
from dbmef.runtime.method import add_noise

log = logging.getLogger(__name__)

QUANTIZED = ("int8",)
# The ops that may be quantized: where a UNet's arithmetic is. Everything else (norms, softmax, the
# noising, the error reduction) stays float, as in the TensorRT demo's INT8 recipe.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# The default: convolutions only. Chosen on the digits calibration split (docs/quantization.md): with
# the linear layers and attention matmuls quantized too, more near-tie decisions changed.
DEFAULT_OPS = ("Conv",)
# ONNX Runtime's calibrators: min/max of every activation, a percentile of its histogram, or the
# histogram's entropy-optimal (KL) clipping point
RANGES = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
RECORDER = "_quantize-record"  # the backend name the calibration pass registers


@dataclass(frozen=True)
class QuantizeConfig:
    bundle: str
    data: str  # calibration images: ImageFolder, folder or file list (labels are not used)
    out: str
    to: str = "int8"
    images: int = 64  # calibration images whose slow-path rows calibrate the ranges and feed the gate
    max_disagree: float = 0.005  # refuse when more than this fraction of gate decisions differ
    max_batches: int = 64  # scorer calls (rows of unet_batch) used for the ranges, spread over the pass
    ranges: str = "minmax"  # how activation ranges are read from the calibration rows: RANGES
    ops: tuple[str, ...] = DEFAULT_OPS  # the op types given Q/DQ pairs; the rest stays float

    def __post_init__(self) -> None:
        if self.to not in QUANTIZED:
            raise ConfigError(f"--to {self.to!r}: dbmef quantize writes {list(QUANTIZED)} (fp8 Q/DQ graphs need "
                              "NVIDIA Model Optimizer on a GPU: docs/quantization.md)")
        if self.images < 1 or self.max_batches < 1:
            raise ConfigError(f"--images {self.images} and max_batches {self.max_batches} must be at least 1")
        if not self.ops or set(self.ops) - set(QUANTIZED_OPS):
            raise ConfigError(f"--ops {list(self.ops)}: choose among {list(QUANTIZED_OPS)}")
        if self.ranges not in RANGES:
            raise ConfigError(f"--ranges {self.ranges!r}: use one of {list(RANGES)}")
        if not 0 <= self.max_disagree <= 1:
            raise ConfigError(f"--max-disagree {self.max_disagree} must lie in [0, 1]")


class _Recording(Engine):
    """Runs the wrapped engine and keeps a copy of every feed it was given."""

    def __init__(self, inner: Engine, sink: list[dict[str, np.ndarray]]):
        self.inner, self.sink = inner, sink
        self.name, self.input_names, self.output_names = inner.name, inner.input_names, inner.output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


class Recorded(NamedTuple):
    feeds: list[dict[str, np.ndarray]]  # one dict per scorer call
    labels: list[int | None]  # each image's final label (None: unreadable)


def record_scorer_feeds(bundle_dir: str | Path, images: Sequence[Any]) -> Recorded:
    """The scorer feeds of the bundle's runtime rethinking ``images`` at Prot = 0 on ONNX Runtime with
    its scorer component (exactly what the quantized graph will be asked), and the decisions it made
    (the decision gate's reference for that component: no second fp32 pass)."""
    from dbmef.runtime import DBMEFRuntime, backends

    sink: list[dict[str, np.ndarray]] = []
    scorer = read_manifest(bundle_dir).scorer_component  # the runtime below opens and verifies the bundle

    def opener(bundle: Bundle, component: str, options: Any) -> Engine:
        engine = backends.open_engine(bundle, component, "onnxruntime", options)
        return _Recording(engine, sink) if component == scorer else engine

    backends.register(RECORDER, opener, "records the scorer's feeds (dbmef quantize)")
    # the scorer named: a bundle whose settings would pick another graph still records this one's rows
    with DBMEFRuntime(bundle_dir, prot=0.0, backend=RECORDER, scorer=kind_of_component(scorer)) as rt:
        results = rt.classify(list(images))
    failed = [r for r in results if r.error]
    if failed:
        log.warning("quantize: %d calibration image(s) could not be read and were left out: %s", len(failed),
                    "; ".join(f"{r.name}: {r.error}" for r in failed[:5]))
    if not sink:
        raise ExportError("no calibration image reached the slow path: give readable images with --data")
    return Recorded(sink, [r.label for r in results])


def unet_feeds(scorer_feeds: Sequence[Mapping[str, np.ndarray]], schedule: Any
               ) -> list[dict[str, np.ndarray]]:
    """The plain UNet's inputs for the same rows: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the
    positive and the negative condition (the two UNet evaluations the fused graph makes per row)."""
    abar = schedule.alphas_cumprod()
    # the runtime's own noising and tables (float64 roots cast to float32): the rows its plain UNet is fed
    sqrt_abar, sqrt_one_minus_abar = np.sqrt(abar).astype(np.float32), np.sqrt(1.0 - abar).astype(np.float32)
    out = []
    for f in scorer_feeds:
        t = f["timestep"]
        x_t = add_noise(f["x0"], f["eps"], sqrt_abar[t], sqrt_one_minus_abar[t])
        for emb in (f["emb_pos"], f["emb_neg"]):
            out.append({"sample": x_t, "timestep": f["timestep"], "encoder_hidden_states": emb})
    return out


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced (the first and the last included)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def quantize_graph(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]], ranges: str = "minmax",
                   ops: Sequence[str] = DEFAULT_OPS) -> dict[str, Any]:
    """``src`` -> ``dst`` with INT8 Q/DQ pairs, activation ranges from ``feeds``; returns the recipe."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> Mapping[str, np.ndarray] | None:
            return next(self.it, None)

    recipe = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per-channel "
              "symmetric", "activations": "int8 symmetric", "ranges": RANGES[ranges], "ops": list(ops),
              "calibration_batches": len(feeds), "calibration_rows": int(sum(len(next(iter(f.values())))
                                                                             for f in feeds))}
    root = logging.getLogger()
    root.addFilter(_no_preprocess_advice)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(ops), calibrate_method=getattr(CalibrationMethod, RANGES[ranges]),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    finally:
        root.removeFilter(_no_preprocess_advice)
    return recipe


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantizer advises, through the root logger and twice per graph, to run its
    pre-processing (symbolic shape inference and graph optimisation) first. We do not: the recipe
    is the one the gate judged (docs/quantization.md), and a user-facing WARNING would say otherwise."""
    return not str(record.msg).startswith("Please consider")


def decisions(bundle_dir: str | Path, images: Sequence[Any], scorer: str) -> list[int | None]:
    """Each image's final label with every image rethought (Prot = 0) on ONNX Runtime, scored by
    the ``scorer`` graph ("fused" or "unet") with the bundle's scoring settings."""
    from dbmef.runtime import DBMEFRuntime

    with DBMEFRuntime(bundle_dir, prot=0.0, backend="onnxruntime", scorer=scorer) as rt:
        return [r.label for r in rt.classify(list(images))]


def decision_gate(reference: str | Path, quantized: str | Path, images: Sequence[Any], names: Sequence[str],
                  max_disagree: float, scorer: str = "fused",
                  reference_labels: Sequence[int | None] | None = None) -> dict[str, Any]:
    """Compare the two bundles' decisions on ``images`` (scored by their ``scorer`` graphs; the
    reference's given as ``reference_labels`` where already known); raise ValidationError naming the
    images when more than ``max_disagree`` of them differ."""
    ref = list(reference_labels) if reference_labels is not None else decisions(reference, images, scorer)
    got = decisions(quantized, images, scorer)
    scored = [i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a is not None and b is not None]
    differ = [i for i in scored if ref[i] != got[i]]
    gate: dict[str, Any] = {"images": len(scored), "agree": len(scored) - len(differ),
            "agreement": (len(scored) - len(differ)) / max(len(scored), 1), "max_disagree": max_disagree,
            "differ": [{"image": names[i], "reference": ref[i], "quantized": got[i]} for i in differ[:20]]}
    if not scored:
        raise ValidationError("the decision gate scored no image: give readable calibration images with --data")
    if len(differ) > max_disagree * len(scored):
        shown = ", ".join(f"{d['image']} ({d['reference']} -> {d['quantized']})" for d in gate["differ"][:8])
        raise ValidationError(
            f"the quantized {scorer} graph changes {len(differ)} of {len(scored)} decisions "
            f"({100 * len(differ) / len(scored):.1f} % > the allowed {100 * max_disagree:.1f} %): {shown}. "
            "Calibrate on more or more typical images (--images, --data), or raise --max-disagree knowingly")
    return gate


def quantize_bundle(cfg: QuantizeConfig) -> dict[str, Any]:
    """The whole step: copy, record the calibration rows, quantize, gate, record. On any failure the
    output folder is removed: a refused bundle is never left behind to be served by mistake."""
    from dbmef.runtime.data import expand_inputs

    src = Bundle.open(cfg.bundle)
    paths = spread(expand_inputs([cfg.data]), cfg.images)  # across the classes of a sorted ImageFolder
    with bundle_copy(src.dir, Path(cfg.out)) as out:
        return _quantize(cfg, src, out, paths)


def _quantize(cfg: QuantizeConfig, src: Bundle, out: Path, paths: list[str]) -> dict[str, Any]:
    m = src.manifest
    log.info("quantize: recording the slow path's scorer rows on %d calibration image(s)", len(paths))
    feeds, labels = record_scorer_feeds(src.dir, paths)
    targets = {m.scorer_component: spread(feeds, cfg.max_batches)}
    if "unet" in m.components and m.scorer_component != "unet":
        targets["unet"] = spread(unet_feeds(feeds, m.schedule), cfg.max_batches)
    calibration = {"images": len(paths), "data": str(cfg.data), "scorer_calls": len(feeds)}
    records = {}
    for name, rows in targets.items():
        rec = m.components[name]
        path = out / rec.file
        tmp = out / f".{rec.file}.fp32"
        shutil.move(path, tmp)
        log.info("quantize: %s -> int8 Q/DQ (%d calibration batches)", rec.file, len(rows))
        recipe = quantize_graph(tmp, path, rows, cfg.ranges, cfg.ops)
        tmp.unlink()
        source = {**rec.source, "quantized_from": {"sha256": rec.sha256, "precision": rec.precision},
                  "quantization": {**recipe, "calibration": calibration}}
        records[name] = component_record(COMPONENTS[name], path, cfg.to, {}, source)
    q = Bundle(out, m.replace(components={**m.components, **records}, tensorrt=TensorRTRecord(),
                              created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))
    q = q.save(q.manifest)
    gates = {}
    for name, rec in records.items():  # each graph judged by the decisions it makes on its own
        kind = kind_of_component(name)
        log.info("quantize: the decision gate of %s (%s vs %s, every calibration image rethought)", rec.file,
                 m.components[name].precision, cfg.to)
        known = labels if name == m.scorer_component else None  # the recording pass made these decisions
        gates[name] = decision_gate(src.dir, out, paths, paths, cfg.max_disagree, kind, known)
        records[name] = dataclasses.replace(rec, validation={
            "status": "passed", "runtime": "onnxruntime-cpu", "precision": cfg.to, "decision_gate": gates[name]})
    q = q.save(q.manifest.replace(components={**q.manifest.components, **records}))
    log.info("quantize: wrote %s (%s)", out, ", ".join(
        f"{n}: {gates[n]['agree']}/{gates[n]['images']} decisions agree, sha256 {sha256_file(out / r.file)[:12]}"
        for n, r in records.items()))
    return {"bundle": str(out), "to": cfg.to, "components": sorted(records), "gates": gates,
            "calibration": calibration}
