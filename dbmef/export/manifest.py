"""The manifest of a freshly exported bundle, written the same way by both export paths (torch and
the ONNX folder): the records of ``dbmef.runtime.bundle`` filled from what the export produced."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.runtime.bundle import (
    BundleManifest,
    ComponentRecord,
    EmbeddingsRecord,
    SchedulerRecord,
    TokenizerRecord,
    VaeRecord,
    sha256_file,
)
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.contracts import ComponentSpec
from dbmef.runtime.noise_schedule import NoiseSchedule
from dbmef.runtime.preprocess import BackbonePreprocess

TOOLS = ("dbmef", "torch", "diffusers", "transformers", "timm", "onnx", "onnxruntime", "onnxruntime-gpu",
         "onnx-graphsurgeon", "tokenizers", "numpy")


def tool_versions() -> dict[str, str]:
    """The versions of the tools that built a bundle (recorded in its manifest)."""
    import platform

    out = {"python": platform.python_version()}
    for pkg in TOOLS:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def component_record(contract: ComponentSpec, path: Path, precision: str, validation: dict[str, Any],
                     source: dict[str, Any]) -> ComponentRecord:
    """The record of one exported graph (and its external data, when it has any)."""
    data = path.with_name(path.name + ".data")
    return ComponentRecord(
        file=path.name, sha256=sha256_file(path),
        inputs=contract.inputs, outputs=contract.outputs,
        precision=precision, external_data=data.name if data.exists() else None,
        external_data_sha256=sha256_file(data) if data.exists() else None, source=source, validation=validation)


def scorer_component_of(components: Any) -> str:
    """The component the runtime scores with (and the decision check judges): the fused graph
    where the bundle has one, else the plain UNet."""
    return "scorer" if "scorer" in components else "unet"


def new_manifest(out: Path, records: dict[str, ComponentRecord], class_names: list[str],
                 data_config: dict[str, Any] | None,
                 vae: VaeRecord, schedule: NoiseSchedule, scheduler_source: dict[str, Any], scoring: ScoringConfig,
                 pad_id: int | None, positive: np.ndarray, precision: str, sources: dict[str, Any]) -> BundleManifest:
    """The manifest of the bundle just written to ``out`` (tokenizer.json and
    positive_embeddings.npy included), uncalibrated."""
    return BundleManifest(
        components=records,
        scorer_component=scorer_component_of(records),
        class_names=tuple(class_names),
        backbone_preprocess=None if data_config is None else BackbonePreprocess.from_data_config(data_config),
        vae=vae,
        scheduler=SchedulerRecord(**schedule.to_dict(), source_config=dict(scheduler_source)),
        scoring=scoring,
        tokenizer=TokenizerRecord("tokenizer.json", sha256_file(out / "tokenizer.json"), 77, pad_id),
        positive_embeddings=EmbeddingsRecord("positive_embeddings.npy", sha256_file(out / "positive_embeddings.npy"),
                                             tuple(positive.shape), "float32", scoring.templates.positive),
        precision=precision,
        sources=sources,
        tools=tool_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
