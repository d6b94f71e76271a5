"""Each component of a bundle exported from its torch module and checked, with the memory of a
16 GB machine in mind."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.export.config import ExportConfig, LoadedSystem
from dbmef.runtime.bundle import ComponentRecord

# Components kept in float32 inside an fp16 bundle. The CLIP text encoder: it runs k prompts per
# rethought image (about 13 GFLOP each, nothing beside the UNet's 1500 evaluations), and its fp16
# trace mixes float32 attention-mask arithmetic into fp16 LayerNorms, which ONNX Runtime rejects.
FP16_KEEP_FP32 = frozenset({"text_encoder"})

def reference_module(name: str, system: LoadedSystem, abar: np.ndarray) -> Any:
    """The float32 torch module a component is exported from and validated against."""
    from dbmef.reference.modules import component_module

    return component_module(name, system.backbone, system.sd, abar)


def exported_module(name: str, cfg: ExportConfig, system: LoadedSystem, abar: np.ndarray) -> Any:
    """The module traced for component ``name`` in the bundle's precision (fp16 keeps float32 I/O):
    the reference module itself in float32, a half-precision copy of it otherwise."""
    import torch

    from dbmef.export.specs import CastIO
    from dbmef.reference.modules import FusedScorerModule

    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    if name == "scorer":
        unet = system.sd.unet if dtype == torch.float32 else cast_copy(system.sd.unet, dtype)
        return FusedScorerModule(unet, abar)  # noising and the error stay float32 inside
    reference = reference_module(name, system, abar)
    if precision_of(name, cfg) == "fp32":
        return reference
    return CastIO(cast_copy(reference, dtype), dtype)


def cast_copy(module: Any, dtype: Any) -> Any:
    """A copy of ``module`` with its floating-point tensors in ``dtype``, made without a float32
    copy on the way (``deepcopy(m).to(dtype)`` holds a second float32 model for a moment: 3.2 GiB
    for SD v1.5's UNet): deepcopy's memo hands it the converted tensors."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and id(t) not in memo:
            c = t.detach().to(dtype)
            is_param = isinstance(t, torch.nn.Parameter)
            memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if is_param else c
    return copy.deepcopy(module, memo)


def precision_of(name: str, cfg: ExportConfig) -> str:
    return "fp32" if name in FP16_KEEP_FP32 else cfg.precision


# what export_components returns: the records, the seconds per step, the decision check
Exported = tuple[dict[str, ComponentRecord], dict[str, float], dict[str, Any] | None]


def export_components(cfg: ExportConfig, system: LoadedSystem, abar: np.ndarray, out: Path, step: Any,
                      positives: np.ndarray) -> Exported:
    """Export and validate every component; returns their manifest records, the seconds taken and
    the scorer's decision check (None when not run).

    Memory (SD v1.5 fp16 must export on a 16 GB machine): every torch-side result a component's
    checks need (validation outputs, the decision check's reference scores) is computed before its
    export, and its float32 torch module is dropped as soon as nothing later needs it: before the
    trace when the traced module is a half-precision copy, after it otherwise. The ONNX Runtime
    side of each check then runs with no torch model resident. Past this call the system's torch
    modules are gone."""
    from dbmef.export.checks import decision_cases, judge_decisions, score_cases, score_cases_on_ort, torch_reference
    from dbmef.export.manifest import component_record, scorer_component_of
    from dbmef.export.onnx_tools import check_outputs, reference_outputs

    names = (["backbone"] if system.backbone is not None else []) + ["text_encoder", "vae_encoder"]
    names += {"fused": ["scorer"], "unet": ["unet"], "both": ["scorer", "unet"]}[cfg.scorer]
    judged = scorer_component_of(names)
    records: dict[str, ComponentRecord] = {}
    timings: dict[str, float] = {}
    decision = cases = reference_scores = None
    for i, name in enumerate(names):
        spec, precision = system.specs[name], precision_of(name, cfg)
        ref = reference_module(name, system, abar)  # float32, whatever the bundle's precision
        checks: list[Any] = []
        t0 = time.perf_counter()
        if cfg.validate:
            step(f"validating {name} (torch side)")
            # fp16 graphs are compared against the fp32 torch model: what the user would otherwise run.
            # They have dynamic spatial axes, so the second batch size is checked at the small size:
            # SD v1.5's fp16 scorer at batch 2 and 64 x 64 took 8 GiB on ONNX Runtime's CPU provider.
            checks = reference_outputs(ref, spec, **({"batches": (1,), "small_batches": (2,)}
                                                     if precision == "fp16" else {}))
            if name == judged and cfg.decision_cases > 0:
                cases = decision_cases(len(system.class_names), system.latent_shape, positives, cfg.scoring,
                                       cfg.seed, cfg.decision_cases)
                reference_scores = score_cases(cases, torch_reference(system.sd, abar, name))
        torch_side = time.perf_counter() - t0
        step(f"exporting {name}")
        del ref  # from here on only ``system`` holds the torch module (for a later component that needs it)
        path = _export_one(name, cfg, system, abar, names[i + 1:], out, timings)
        validation: dict[str, Any] = {"status": "skipped"}
        if cfg.validate:
            step(f"validating {name}")
            t0 = time.perf_counter()
            validation = check_outputs(path, spec, precision, checks)
            timings[f"validate_{name}"] = torch_side + time.perf_counter() - t0
        if cases is not None and reference_scores is not None and name == judged:
            step("decision check")
            t0 = time.perf_counter()
            decision = judge_decisions(cases, score_cases_on_ort(cases, path, name), reference_scores, name, "torch")
            timings["decision_check"] = time.perf_counter() - t0
        records[name] = component_record(spec.contract, path, precision, validation,
                                         system.sources["backbone" if name == "backbone" else "sd"])
    return records, timings, decision


def _export_one(name: str, cfg: ExportConfig, system: LoadedSystem, abar: np.ndarray, later: list[str], out: Path,
                timings: dict[str, float]) -> Path:
    """Trace component ``name`` and write ``out/<name>.onnx``, releasing its torch source (unless a
    component in ``later`` needs it) at the earliest point."""
    from dbmef.export.onnx_tools import finish_onnx, release_memory, trace_onnx

    t0 = time.perf_counter()
    precision = precision_of(name, cfg)
    module = exported_module(name, cfg, system, abar)
    if precision == "fp16":  # a half-precision copy is traced: its float32 source can go before the exporter's peak
        system.release(name, later)
        release_memory()
    with tempfile.TemporaryDirectory(prefix=f"dbmef-{name}-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        trace_onnx(module, spec := system.specs[name], raw, opset=cfg.opset, small=precision == "fp16",
                   sample_batch=1 if precision == "fp16" else 2)
        del module  # the traced module (SD v1.5's fp16 UNet: 1.7 GB) is not needed past tracing
        system.release(name, later)
        release_memory()
        path = finish_onnx(raw, out / f"{spec.name}.onnx")
    release_memory()
    timings[f"export_{name}"] = time.perf_counter() - t0
    return path
