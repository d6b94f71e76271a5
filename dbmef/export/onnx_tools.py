"""ONNX export, clean-up and validation of one component."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dbmef.errors import ValidationError
from dbmef.export.onnx_io import TWO_GB, compare, release_memory, save_onnx  # noqa: F401  (re-exported)
from dbmef.export.specs import ExportSpec

log = logging.getLogger(__name__)



def export_onnx(module: nn.Module, spec: ExportSpec, out: Path, opset: int = 17, sample_batch: int = 2,
                small: bool = False) -> Path:
    """Trace ``module`` to ``out`` with a dynamic batch axis, fold constants and infer shapes.

    Weights go to one external-data file ``<out>.data`` when the graph is over 2 GB (protobuf's
    limit); smaller graphs are self-contained.
    """
    with tempfile.TemporaryDirectory(prefix=f"dbmef-{spec.name}-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        trace_onnx(module, spec, raw, opset, sample_batch, small)
        return finish_onnx(raw, out)


def trace_onnx(module: nn.Module, spec: ExportSpec, raw: Path, opset: int = 17, sample_batch: int = 2,
               small: bool = False) -> None:
    """``torch.onnx.export`` of ``module`` to ``raw`` (dynamic batch; spatial axes too when traced
    ``small``). Separate from ``finish_onnx`` so the caller can free the module in between."""
    args = spec.make_inputs(sample_batch)
    axes = dict(spec.dynamic_axes)
    if small and spec.small_inputs is not None:
        args = spec.small_inputs(sample_batch)
        for name, extra in (spec.spatial_axes or {}).items():
            axes[name] = {**axes.get(name, {}), **extra}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module.eval(), args, str(raw),
            input_names=list(spec.contract.input_names), output_names=list(spec.contract.output_names),
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def finish_onnx(raw: Path, out: Path) -> Path:
    """Clean up the traced graph at ``raw`` and save it as ``out`` (checked, shapes inferred)."""
    import onnx

    return save_onnx(cleanup(onnx.load(str(raw))), out)  # load pulls in any external data the exporter split off


def cleanup(model: Any) -> Any:
    """Constant folding and dead-node removal with onnx-graphsurgeon (well-kept, by NVIDIA)."""
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        log.warning("onnx-graphsurgeon is not installed: skipping graph clean-up")
        return model
    graph = gs.import_onnx(model)
    try:
        graph.fold_constants(error_ok=True).cleanup().toposort()
    except Exception as exc:  # folding is an optimisation; a failure must not lose the export
        log.warning("constant folding skipped: %s", exc)
        graph.cleanup().toposort()
    return gs.export_onnx(graph)


def validate_component(module: nn.Module, onnx_path: Path, spec: ExportSpec, precision: str,
                       batches: tuple[int, ...] = (1, 2), small_batches: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run the ONNX graph in ONNX Runtime (CPU) against the torch module at two batch sizes
    (proving the batch axis is dynamic): ``batches`` at the real input size, ``small_batches`` at the
    spec's small size (a graph exported with dynamic spatial axes). Raises ValidationError past
    tolerance. ``reference_outputs`` then ``check_outputs``."""
    return check_outputs(onnx_path, spec, precision, reference_outputs(module, spec, batches, small_batches))


def reference_outputs(module: nn.Module, spec: ExportSpec, batches: tuple[int, ...] = (1, 2),
                      small_batches: tuple[int, ...] = ()) -> list[tuple[int, dict[str, Any], Any]]:
    """The torch side of a validation: (batch, inputs, output) per case, as numpy. Computed apart from
    ``check_outputs`` so that the torch module can be freed before ONNX Runtime opens the graph: the
    two models and their activations never coexist (SD v1.5's fp32 UNet at batch 2 and its fp16
    graph on ONNX Runtime would need over 10 GB together)."""
    cases = []
    sizes = [(b, spec.make_inputs) for b in batches]
    sizes += [(b, spec.small_inputs or spec.make_inputs) for b in small_batches]  # the real size if no small one
    for b, make in sizes:
        args = make(b)
        with torch.no_grad():
            ref = module(*args).float().numpy()
        cases.append((b, {n: a.numpy() for n, a in zip(spec.contract.input_names, args)}, ref))
        release_memory()
    return cases


def check_outputs(onnx_path: Path, spec: ExportSpec, precision: str,
                  cases: list[tuple[int, dict[str, Any], Any]]) -> dict[str, Any]:
    """The ONNX Runtime side of a validation (CPU, no memory arena) against ``reference_outputs``."""
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    atol, rtol = spec.tolerance(precision)
    eng = OrtEngine.on_cpu(onnx_path, spec.name, arena=False)
    reports = []
    try:
        for b, feeds, ref in cases:
            got = eng(feeds)[spec.contract.output_names[0]]
            rep = compare(spec.contract.output_names[0], got, ref, atol, rtol)
            rep["batch"], rep["input_shapes"] = b, {n: list(a.shape) for n, a in feeds.items()}
            reports.append(rep)
            log.info("validate %s batch %d: max abs %.3g, max rel %.3g", spec.name, b, rep.get("max_abs", -1),
                     rep.get("max_rel", -1))
            if not rep["ok"]:
                raise ValidationError(
                    f"exported {spec.name} ({onnx_path.name}, {precision}) differs from torch at batch {b}: "
                    f"max abs {rep.get('max_abs')}, max rel {rep.get('max_rel')} at {rep.get('worst_index')} "
                    f"(tolerance atol={atol}, rtol={rtol}). The export is refused; try --precision fp32 or report it"
                )
    finally:
        eng.close()
        release_memory()
    return {"status": "passed", "runtime": "onnxruntime-cpu", "precision": precision, "checks": reports}
