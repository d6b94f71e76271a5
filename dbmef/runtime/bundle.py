"""The bundle: one self-describing folder per exported system (DESIGN.md §2).

``manifest.json`` records the format version, every component file with its hash, I/O names,
shapes and dtypes, precision, sources, preprocessing, class names, prompt templates, the
protector, the scheduler constants, the default scoring config and the tool versions. The
runtime refuses a bundle it does not understand, naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmef.errors import BundleError
from dbmef.runtime.config import SCHEDULER_FIELDS, ScoringConfig
from dbmef.runtime.protector import Protector
from dbmef.runtime.schedule import NoiseSchedule

FORMAT = "dbmef-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_COMPONENTS = ("backbone", "text_encoder", "vae_encoder")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[str | int]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        return cls(str(d["name"]), str(d["dtype"]), list(d["shape"]))


@dataclass
class ComponentRecord:
    """One ONNX component: its files (graph and optional external data) with their hashes."""

    file: str
    sha256: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    precision: str = "fp32"
    external_data: str | None = None
    external_data_sha256: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    def files(self) -> list[tuple[str, str]]:
        out = [(self.file, self.sha256)]
        if self.external_data:
            out.append((self.external_data, self.external_data_sha256 or ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            "precision": self.precision,
            "external_data": self.external_data,
            "external_data_sha256": self.external_data_sha256,
            "source": self.source,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComponentRecord:
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
            outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
            precision=d.get("precision", "fp32"),
            external_data=d.get("external_data"),
            external_data_sha256=d.get("external_data_sha256"),
            source=d.get("source", {}),
            validation=d.get("validation", {}),
        )


@dataclass(frozen=True)
class VaeSpec:
    """The manifest's ``vae`` record, typed: the VAE's input size and its latent's shape."""

    image_size: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float


@dataclass(frozen=True)
class FileSpec:
    """A file of the bundle that is not an ONNX graph (tokenizer.json, positive_embeddings.npy)."""

    file: str
    sha256: str
    shape: tuple[int, ...] = ()  # the array's shape (positive embeddings: C, L, D)
    max_length: int = 77  # the tokenizer's context length
    pad_id: int | None = None


@dataclass
class BundleManifest:
    """Everything the runtime needs to know about a bundle, round-tripped through JSON. The JSON
    records ``vae``, ``tokenizer`` and ``positive_embeddings`` are read through their typed views
    (``vae_spec``, ``tokenizer_spec``, ``embeddings_spec``)."""

    components: dict[str, ComponentRecord]
    scorer_component: str  # "scorer" (fused graph) or "unet"
    class_names: list[str]
    backbone_preprocess: dict[str, Any]
    vae: dict[str, Any]  # image_size, latent_shape, scaling_factor
    scheduler: dict[str, Any]
    scoring: ScoringConfig
    tokenizer: dict[str, Any]  # file, sha256, max_length, pad_id
    positive_embeddings: dict[str, Any]  # file, sha256, shape, dtype
    protector: Protector | None = None
    precision: str = "fp32"
    sources: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    tensorrt: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- typed views of the JSON records --------------------------------------------------------
    @property
    def vae_spec(self) -> VaeSpec:
        c, h, w = (int(x) for x in self.vae["latent_shape"])
        return VaeSpec(int(self.vae["image_size"]), (c, h, w), float(self.vae.get("scaling_factor", 0.18215)))

    @property
    def tokenizer_spec(self) -> FileSpec:
        t = self.tokenizer
        return FileSpec(t["file"], t["sha256"], max_length=int(t.get("max_length", 77)), pad_id=t.get("pad_id"))

    @property
    def embeddings_spec(self) -> FileSpec:
        e = self.positive_embeddings
        return FileSpec(e["file"], e["sha256"], shape=tuple(int(x) for x in e.get("shape", ())))

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created": self.created,
            "precision": self.precision,
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "scorer_component": self.scorer_component,
            "class_names": self.class_names,
            "backbone_preprocess": self.backbone_preprocess,
            "vae": self.vae,
            "scheduler": self.scheduler,
            "scoring": self.scoring.to_dict(),
            "tokenizer": self.tokenizer,
            "positive_embeddings": self.positive_embeddings,
            "protector": self.protector.to_dict() if self.protector else None,
            "sources": self.sources,
            "tools": self.tools,
            "tensorrt": self.tensorrt,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> BundleManifest:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: the manifest is a JSON {type(d).__name__}, not an object; "
                              "re-export the bundle")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: 'format' is {d.get('format')!r}, not {FORMAT!r}; this is not a dbmef bundle")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format_version {version!r} is not supported by this dbmef "
                f"(it reads version {FORMAT_VERSION}); re-export the bundle with this dbmef's dbmef-export, "
                "or install the dbmef version that wrote it"
            )
        check_schema(d, where)
        try:
            scoring = _scoring_without_schedule(d["scoring"], d["scheduler"], where)
            m = cls(
                components={k: ComponentRecord.from_dict(v) for k, v in d["components"].items()},
                scorer_component=d["scorer_component"],
                class_names=list(d["class_names"]),
                backbone_preprocess=d["backbone_preprocess"],
                vae=d["vae"],
                scheduler=d["scheduler"],
                scoring=scoring,
                tokenizer=d["tokenizer"],
                positive_embeddings=d["positive_embeddings"],
                protector=Protector.from_dict(d["protector"]) if d.get("protector") else None,
                precision=d.get("precision", "fp32"),
                sources=d.get("sources", {}),
                tools=d.get("tools", {}),
                created=d.get("created", ""),
                tensorrt=d.get("tensorrt", {}),
                format_version=version,
            )
        except KeyError as exc:
            raise BundleError(f"{where}: required field {exc} is missing; re-export the bundle") from exc
        missing = [c for c in (*REQUIRED_COMPONENTS, m.scorer_component) if c not in m.components]
        if missing:
            raise BundleError(f"{where}: components {missing} are missing from 'components'")
        n = len(m.class_names)
        emb_shape = m.positive_embeddings.get("shape", [n])
        if emb_shape[0] != n:
            raise BundleError(
                f"{where}: {n} class names but positive_embeddings has {emb_shape[0]} rows; re-export the bundle"
            )
        return m

    def digest(self, calibration: bool = True) -> str:
        """sha256 over the manifest's canonical JSON, which names every file with its sha256: one
        string that pins everything a bundle answers with (components, class names, templates,
        protector, configs). TensorRT engine records are left out: engines are rebuilt per GPU and
        checked against their ONNX graphs, not part of what the bundle means. ``calibration=False``
        also leaves out the protector and the calibration record (the digest of what answers with a
        fixed Prot 0/1 override)."""
        d = self.to_dict()
        d.pop("tensorrt", None)
        if not calibration:
            d.pop("protector", None)
            d["sources"] = {k: v for k, v in d["sources"].items() if k != "calibration"}
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule the UNet was trained with and the fused scorer baked in."""
        return NoiseSchedule.from_dict(self.scheduler)

    def save(self, bundle_dir: str | Path) -> Path:
        """Write manifest.json atomically (a crash never leaves half a manifest)."""
        d = Path(bundle_dir)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a bundle is meant to be shared
        os.replace(tmp, d / MANIFEST)
        return d / MANIFEST

    # -- files -----------------------------------------------------------------------------------
    def files(self) -> list[tuple[str, str]]:
        """(relative path, sha256) of every file the manifest names."""
        out: list[tuple[str, str]] = []
        for rec in self.components.values():
            out.extend(rec.files())
        out.extend((f.file, f.sha256) for f in (self.tokenizer_spec, self.embeddings_spec))
        return out


# field -> the JSON type it must have (checked before any field is used, so a manifest of the wrong
# shape is a BundleError naming the field, never an AttributeError)
_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "components": dict, "scorer_component": str, "class_names": list, "backbone_preprocess": dict, "vae": dict,
    "scheduler": dict, "scoring": dict, "tokenizer": dict, "positive_embeddings": dict,
    "protector": (dict, type(None)), "sources": dict, "tools": dict, "tensorrt": dict, "precision": str,
}
_NESTED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "vae": {"image_size": int, "latent_shape": list},
    "tokenizer": {"file": str, "sha256": str},
    "positive_embeddings": {"file": str, "sha256": str},
    "backbone_preprocess": {"input_size": list},
}
_COMPONENT: dict[str, type | tuple[type, ...]] = {"file": str, "sha256": str, "inputs": list, "outputs": list,
                                                   "external_data": (str, type(None))}


def check_schema(d: dict[str, Any], where: str) -> None:
    """Every field the runtime reads has the JSON type it expects."""

    def need(value: Any, kind: type | tuple[type, ...], field: str) -> None:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise BundleError(f"{where}: field '{field}' must be a JSON {names}, got {type(value).__name__} "
                              f"{str(value)[:60]!r}; the manifest is damaged: re-export the bundle")

    for key, kind in _SCHEMA.items():
        if key in d:
            need(d[key], kind, key)
    for key, fields in _NESTED.items():
        for f, kind in fields.items():
            if isinstance(d.get(key), dict) and f in d[key]:
                need(d[key][f], kind, f"{key}.{f}")
    for name, rec in (d.get("components") or {}).items():
        need(rec, dict, f"components.{name}")
        for f, kind in _COMPONENT.items():
            if f in rec:
                need(rec[f], kind, f"components.{name}.{f}")
        for io in ("inputs", "outputs"):
            for j, t in enumerate(rec.get(io, [])):
                need(t, dict, f"components.{name}.{io}[{j}]")
                for f in ("name", "dtype", "shape"):
                    if f not in t:
                        raise BundleError(f"{where}: field 'components.{name}.{io}[{j}].{f}' is missing; "
                                          "re-export the bundle")
    for j, n in enumerate(d.get("class_names") or []):
        need(n, str, f"class_names[{j}]")
    shape = (d.get("vae") or {}).get("latent_shape", [4, 1, 1])
    if len(shape) != 3 or not all(isinstance(x, int) and x > 0 for x in shape):
        raise BundleError(f"{where}: field 'vae.latent_shape' must be 3 positive integers, got {shape!r}")


def _scoring_without_schedule(scoring: dict[str, Any], scheduler: dict[str, Any], where: str) -> ScoringConfig:
    """Bundles written before the schedule left the scoring config repeat it there; accept them when
    both records agree (they always did: both were written from one config) and drop the copy."""
    scoring = dict(scoring)
    for key in SCHEDULER_FIELDS:
        if key in scoring:
            value = scoring.pop(key)
            if scheduler.get(key) != value:
                raise BundleError(f"{where}: scoring.{key} = {value!r} disagrees with scheduler.{key} = "
                                  f"{scheduler.get(key)!r}; re-export the bundle")
    return ScoringConfig.from_dict(scoring)


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"bundle folder {d} does not exist; write one with `dbmef-export --backbone NAME --out {d}`")
    p = d / MANIFEST
    if not p.is_file():
        raise BundleError(f"{p} is missing: {d} is not a dbmef bundle (export one with dbmef-export)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{p} is not valid JSON ({exc}); re-export the bundle") from exc
    return BundleManifest.from_dict(data, where=str(p))


def verify_files(bundle_dir: str | Path, manifest: BundleManifest, hashes: bool = True) -> None:
    """Check that every file the manifest names exists and, with ``hashes``, is unaltered."""
    d = Path(bundle_dir)
    for rel, digest in manifest.files():
        p = d / rel
        if not p.is_file():
            raise BundleError(f"bundle file {p} is missing (named in {d / MANIFEST}); re-export the bundle")
        if hashes and sha256_file(p) != digest:
            raise BundleError(
                f"bundle file {p} does not match the sha256 recorded in {d / MANIFEST}: it was altered or "
                "truncated; re-export the bundle (or skip the check at your own risk: --no-verify on the command "
                "line, verify=False in Python)"
            )
