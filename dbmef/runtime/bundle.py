"""The bundle: one self-describing folder per exported system (docs/bundle.md).

``manifest.json`` is parsed and checked once, by ``Bundle.open``, into the frozen records below.
Their fields are the manifest's fields: the JSON is read and written from them by one typed codec
(``decode`` / ``encode``), so the schema check, the parsing and the JSON never list a field twice.
``LEGACY`` maps the one older layout still in the wild (the noise schedule repeated under
``scoring``) onto the current one.

The runtime refuses a bundle it does not understand, naming the problem: a manifest over
``MAX_MANIFEST_BYTES``, not UTF-8 or nested too deep, a field of the wrong type, a file that resolves
outside the bundle folder, a missing or altered file, an unreadable embeddings array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dbmef.errors import BundleError
from dbmef.runtime.config import SCHEDULER_FIELDS, ScoringConfig
from dbmef.runtime.contracts import TensorIO, TensorSpec
from dbmef.runtime.noise_schedule import NoiseSchedule
from dbmef.runtime.preprocess import BackbonePreprocess
from dbmef.runtime.protector import Protector
from dbmef.runtime.records import decode_fields, encode, need

FORMAT = "dbmef-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_COMPONENTS = ("text_encoder", "vae_encoder")  # and the scorer; the backbone is optional (zero-shot)
# A manifest is a few hundred kB at most (ImageNet's 1 000 class names and wnids, the calibration
# curve): 32 MiB bounds what a damaged or hostile one can make the runtime read and hold.
MAX_MANIFEST_BYTES = 32 << 20
CALIBRATED_SCORING = ("decision", "fused_beta")  # scoring fields `dbmef calibrate` writes with a threshold
ENGINE_DIR = "trt"

T = TypeVar("T")


# -- the records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentRecord(TensorIO):
    """One ONNX component: its files (graph and optional external data) with their hashes, its I/O
    contract (the ``contracts.ComponentSpec``'s tensors, as exported), the precision it was exported
    at, where it came from and how it was validated."""

    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    external_data: str | None = None
    external_data_sha256: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        """Whether the first input's batch dimension is symbolic (any rows per call)."""
        return bool(self.inputs) and not isinstance(self.inputs[0].shape[0], int)

    def files(self) -> list[tuple[str, str]]:
        out = [(self.file, self.sha256)]
        if self.external_data:
            out.append((self.external_data, self.external_data_sha256 or ""))
        return out


@dataclass(frozen=True)
class VaeRecord:
    """The VAE encoder's input size and its latent (``mean * scaling_factor``)."""

    image_size: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        if self.image_size < 1 or min(self.latent_shape) < 1:
            raise BundleError(f"vae image_size {self.image_size} / latent_shape {self.latent_shape} must be positive")


@dataclass(frozen=True)
class TokenizerRecord:
    file: str
    sha256: str
    max_length: int = 77
    pad_id: int | None = None
    library: str = "tokenizers"


@dataclass(frozen=True)
class EmbeddingsRecord:
    """The positive condition of every class, computed once at export: (C, L, D) float32."""

    file: str
    sha256: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    template: str = ""


@dataclass(frozen=True)
class SchedulerRecord:
    """The DDPM constants the UNet was trained with (the fused scorer graph bakes them in)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    source_config: dict[str, Any] = field(default_factory=dict)  # the source scheduler's own config

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)


@dataclass(frozen=True)
class EngineRecord:
    """One TensorRT engine built by ``dbmef build-engines``, with everything its key was made of."""

    file: str
    key: str
    sha256: str
    trt_version: str
    gpu: str
    compute_capability: str
    precision: str
    profile: dict[str, dict[str, list[int]]]
    build_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorRTRecord:
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    timing_cache: str | None = None


@dataclass(frozen=True)
class BundleManifest:
    """Everything the runtime needs to know about a bundle (the fields of ``manifest.json``)."""

    components: dict[str, ComponentRecord]
    scorer_component: str  # "scorer" (fused graph) or "unet"
    class_names: tuple[str, ...]
    backbone_preprocess: BackbonePreprocess | None  # None: a bundle without a classifier (zero-shot only)
    vae: VaeRecord
    scheduler: SchedulerRecord
    scoring: ScoringConfig
    tokenizer: TokenizerRecord
    positive_embeddings: EmbeddingsRecord
    protector: Protector | None = None
    precision: str = "fp32"
    sources: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    tensorrt: TensorRTRecord = field(default_factory=TensorRTRecord)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        missing = [c for c in (*REQUIRED_COMPONENTS, self.scorer_component) if c not in self.components]
        if missing:
            raise BundleError(f"components {missing} are missing from 'components'")
        if ("backbone" in self.components) != (self.backbone_preprocess is not None):
            raise BundleError("'backbone' and 'backbone_preprocess' go together: a bundle has both or neither")
        n = len(self.class_names)
        if self.positive_embeddings.shape and self.positive_embeddings.shape[0] != n:
            raise BundleError(f"{n} class names but positive_embeddings has {self.positive_embeddings.shape[0]} "
                              "rows; re-export the bundle")

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule the UNet was trained with and the fused scorer baked in."""
        return self.scheduler.schedule

    def replace(self, **changes: Any) -> BundleManifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> BundleManifest:
        need(d, dict, "manifest")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: 'format' is {d.get('format')!r}, not {FORMAT!r}; this is not a dbmef bundle")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format_version {d.get('format_version')!r} is not supported by this dbmef (it "
                f"reads version {FORMAT_VERSION}); re-export the bundle with this dbmef's dbmef-export, or install "
                "the dbmef version that wrote it")
        try:
            return _decode_manifest(LEGACY(d))
        except BundleError as exc:
            raise BundleError(f"{where}: {exc}") from None

    def digest(self, calibration: bool = True) -> str:
        """sha256 over the manifest's canonical JSON, which names every file with its sha256: one
        string that pins everything a bundle answers with. TensorRT engine records are left out
        (engines are rebuilt per GPU and checked against their ONNX graphs); ``calibration=False``
        also leaves out the protector and the calibration record (the digest of what answers with
        a fixed Prot 0/1 override)."""
        d = self.to_dict()
        d.pop("tensorrt", None)
        if not calibration:
            d.pop("protector", None)
            d["sources"] = {k: v for k, v in d["sources"].items() if k != "calibration"}
            # what `dbmef calibrate` writes into the scoring config with the threshold; an evaluation
            # pins its own scoring config (decision and beta included) beside this digest anyway
            d["scoring"] = {k: v for k, v in d["scoring"].items() if k not in CALIBRATED_SCORING}
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def files(self) -> list[tuple[str, str]]:
        """(relative path, sha256) of every file the manifest names."""
        out: list[tuple[str, str]] = []
        for rec in self.components.values():
            out.extend(rec.files())
        out.extend((f.file, f.sha256) for f in (self.tokenizer, self.positive_embeddings))
        return out


def _decode_manifest(d: dict[str, Any]) -> BundleManifest:
    return decode_fields(BundleManifest, d, "manifest")  # type: ignore[no-any-return]


def LEGACY(d: dict[str, Any]) -> dict[str, Any]:
    """The older layout onto the current one: manifests written before the noise schedule left the
    scoring config repeat T and the betas under ``scoring``; accepted when they agree with
    ``scheduler`` (they always did: both were written from one config) and dropped there."""
    scoring, scheduler = d.get("scoring"), d.get("scheduler")
    if not isinstance(scoring, dict) or not isinstance(scheduler, dict) or not set(scoring) & set(SCHEDULER_FIELDS):
        return d
    scoring = dict(scoring)
    for key in SCHEDULER_FIELDS:
        if key in scoring:
            value = scoring.pop(key)
            if scheduler.get(key) != value:
                raise BundleError(f"scoring.{key} = {value!r} disagrees with scheduler.{key} = "
                                  f"{scheduler.get(key)!r}; re-export the bundle")
    return {**d, "scoring": scoring}


def with_validation(m: BundleManifest, component: str, **entries: Any) -> BundleManifest:
    """``m`` with ``entries`` added to one component's validation record."""
    rec = m.components[component]
    rec = dataclasses.replace(rec, validation={**rec.validation, **entries})
    return m.replace(components={**m.components, component: rec})


# -- reading and checking a bundle folder -----------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Parse and check ``manifest.json`` (no file of the bundle is opened): the size bound, UTF-8,
    JSON (any depth is a BundleError, never a RecursionError), every field's type, every named file
    inside the folder."""
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"bundle folder {d} does not exist; write one with `dbmef-export --backbone NAME --out {d}`")
    p = d / MANIFEST
    if not p.is_file():
        raise BundleError(f"{p} is missing: {d} is not a dbmef bundle (export one with dbmef-export)")
    size = p.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{p} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest: it is "
                          "damaged or not a dbmef manifest; re-export the bundle")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{p} is not UTF-8 text ({exc}); re-export the bundle") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{p} is not valid JSON ({exc}); re-export the bundle") from None
    except RecursionError:
        raise BundleError(f"{p} nests JSON too deeply to be a dbmef manifest; re-export the bundle") from None
    m = BundleManifest.from_dict(data, where=str(p))
    for rel, _ in m.files():
        inside(d, rel, p)
    return m


def inside(bundle_dir: Path, rel: str, where: Path | str = MANIFEST) -> Path:
    """``bundle_dir / rel``, refused unless it is a relative path that stays inside the folder
    (symbolic links resolved): a manifest names its own files, never ``../../etc/passwd``."""
    root = bundle_dir.resolve()
    if not rel or Path(rel).is_absolute():
        raise BundleError(f"{where}: file {rel!r} must be a path relative to the bundle folder; re-export the bundle")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise BundleError(f"{where}: file {rel!r} resolves outside the bundle folder {root} ({target}); a bundle "
                          "may only name its own files: re-export it, and do not run bundles from untrusted sources")
    return target


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its folder and its checked manifest. ``Bundle.open`` is the one way in."""

    dir: Path
    manifest: BundleManifest

    @classmethod
    def open(cls, bundle_dir: str | Path, verify: bool = True, expect_digest: str | None = None) -> Bundle:
        """Read and check the manifest, check every file it names exists (and, with ``verify``,
        matches its sha256), and with ``expect_digest`` refuse any other bundle."""
        d = Path(bundle_dir)
        m = read_manifest(d)
        b = cls(d, m)
        b.verify(hashes=verify)
        if expect_digest is not None and m.digest() != expect_digest.strip().lower():
            raise BundleError(f"bundle {d} has digest {m.digest()}, not the expected {expect_digest} "
                              "(--expect-digest): it is another bundle, or it was changed (re-exported, "
                              "recalibrated); `dbmef info` prints a bundle's digest")
        return b

    def path(self, rel: str) -> Path:
        """A file of the bundle (checked to lie inside it)."""
        return inside(self.dir, rel, self.dir / MANIFEST)

    def verify(self, hashes: bool = True) -> None:
        """Every file the manifest names exists and, with ``hashes``, is unaltered."""
        for rel, digest in self.manifest.files():
            p = self.path(rel)
            if not p.is_file():
                raise BundleError(f"bundle file {p} is missing (named in {self.dir / MANIFEST}); re-export the bundle")
            if hashes and sha256_file(p) != digest:
                raise BundleError(
                    f"bundle file {p} does not match the sha256 recorded in {self.dir / MANIFEST}: it was altered or "
                    "truncated; re-export the bundle (or skip the check at your own risk: --no-verify on the command "
                    "line, verify=False in Python)")

    def positive_embeddings(self) -> np.ndarray:
        """(C, L, D) float32, checked against the manifest's shape."""
        rec = self.manifest.positive_embeddings
        p = self.path(rec.file)
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BundleError(f"{p} is not a readable numpy array ({exc}); re-export the bundle") from None
        n = len(self.manifest.class_names)
        if a.ndim != 3 or a.shape[0] != n or (rec.shape and tuple(a.shape) != tuple(rec.shape)):
            raise BundleError(f"{p} has shape {a.shape}, the manifest says {tuple(rec.shape) or (n, 'L', 'D')}; "
                              "re-export the bundle")
        if not np.isfinite(a).all():
            raise BundleError(f"{p} holds NaN or infinite values; re-export the bundle")
        return np.ascontiguousarray(a, dtype=np.float32)

    def digest(self, calibration: bool = True) -> str:
        return self.manifest.digest(calibration)

    def save(self, manifest: BundleManifest) -> Bundle:
        """Write ``manifest`` as this bundle's manifest.json, atomically (a crash never leaves half
        a manifest); returns the bundle with it."""
        text = json.dumps(manifest.to_dict(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".manifest-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a bundle is meant to be shared
            os.replace(tmp, self.dir / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Bundle(self.dir, manifest)


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    """The checked manifest of a bundle (files not hashed): ``read_manifest``."""
    return read_manifest(bundle_dir)
