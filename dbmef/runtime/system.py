"""``DBMEFRuntime``: load a bundle, check it, and classify batches of images.

This is what a production service embeds. It needs numpy, Pillow, tokenizers and one engine
backend (ONNX Runtime here; native TensorRT in ``backends/tensorrt.py``). It is cheap to construct per
worker and holds no state that makes an answer depend on scheduling: the noise banks are fixed
by the seed and the negative-embedding cache only memoises a pure function.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime.backends import names as backend_names
from dbmef.runtime.backends import open_engine
from dbmef.runtime.bundle import BundleManifest, load_manifest, verify_files
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine, LazyEngine
from dbmef.runtime.pipeline import DBMEFPipeline, PipelineEngines
from dbmef.runtime.preprocess import BackbonePreprocess, ImageInput
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import ImageResult
from dbmef.runtime.scheduler import SchedulerStats
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime as plain data: what the CLI parses, what Ray ships to its workers, what a service
    config file can hold. ``DBMEFRuntime.from_spec`` (or ``spec.build()``) is the one assembly.

    options: the backend's options as a dict (for ONNX Runtime the fields of ``OrtOptions``, e.g.
    ``{"device": "cuda", "intra_op_threads": 4}``). scoring: overrides of the bundle's scoring
    config. prot: 0 rethinks everything, 1 nothing; None keeps the bundle's protector. lazy: open
    engines on first use (a fast-path worker never loads the UNet).
    """

    bundle: str
    backend: str = "onnxruntime"
    options: dict[str, Any] = field(default_factory=dict)
    verify: bool = True
    batch_size: int = 16
    scoring: dict[str, Any] = field(default_factory=dict)
    prot: float | None = None
    lazy: bool = False
    expect_digest: str | None = None
    scorer: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size = {self.batch_size} is invalid: need at least 1 image per batch "
                              "(--batch-size)")
        if self.prot is not None and self.prot not in (0.0, 1.0):
            raise ConfigError(f"prot = {self.prot} as a runtime override must be 0 (rethink every image) or 1 "
                              "(none); calibrate other values with `dbmef calibrate --prot P`")

    def build(self) -> DBMEFRuntime:
        return DBMEFRuntime.from_spec(self)

    def identity(self) -> dict[str, Any]:
        """``DBMEFRuntime.identity`` without opening any engine (what the driver of a distributed
        evaluation writes into its results file)."""
        m = load_manifest(self.bundle)
        return identity(m, m.scoring.replace(**self.scoring), resolve_protector(m, self._protector()),
                        overridden=self.prot is not None)

    def _protector(self) -> Protector | None:
        return None if self.prot is None else Protector.fixed(self.prot)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_protector(manifest: BundleManifest, override: Protector | None) -> Protector:
    """The protector a runtime uses: the override, else the bundle's calibrated one, else Prot = 0
    (an uncalibrated bundle rethinks every image)."""
    return override or manifest.protector or Protector.fixed(0.0)


def identity(manifest: BundleManifest, scoring: ScoringConfig, protector: Protector | None,
             overridden: bool = False) -> dict[str, Any]:
    """The fields that decide answers. ``unet_batch`` is left out: answers do not depend on it, and
    so is the bundle's own calibration when ``overridden`` (a fixed Prot 0/1 replaces it): a
    calibration pass at Prot 0 resumes after ``dbmef calibrate`` wrote a new threshold."""
    sc = scoring.to_dict()
    sc.pop("unet_batch", None)
    return {"bundle_digest": manifest.digest(calibration=not overridden), "scoring": sc,
            "protector": protector.to_dict() if protector is not None else None}


class DBMEFRuntime:
    """A loaded bundle, ready to classify.

    bundle_dir: folder written by ``dbmef-export``. backend: a registered backend name
    ('onnxruntime', 'tensorrt', 'auto', or one added with ``dbmef.runtime.backends.register``).
    options: that backend's options (its own object, e.g. ``OrtOptions``, or a dict of its fields).
    verify: check file hashes.
    scoring: override the bundle's default scoring config (k, n, lam, V, seed, unet_batch).
    protector: override the bundle's calibrated protector. Without either, an uncalibrated
    bundle rethinks every image (Prot = 0) and says so once. lazy: open each engine on its first
    use (distributed workers that run one half of the pipeline load only what they use). scorer:
    ``"scorer"`` (the fused graph) or ``"unet"`` (the plain UNet, noising and error on the host)
    where the bundle holds both; default the manifest's.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        backend: str = "onnxruntime",
        options: Any = None,
        verify: bool = True,
        scoring: ScoringConfig | None = None,
        protector: Protector | None = None,
        batch_size: int = 16,
        cache_size: int = 4096,
        lazy: bool = False,
        expect_digest: str | None = None,
        scorer: str | None = None,
        window: int = 64,
    ):
        if backend not in backend_names():
            raise ConfigError(f"backend {backend!r} is not one of {list(backend_names())}")
        if batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size} is invalid: need at least 1 image per batch")
        self.bundle_dir = Path(bundle_dir)
        self.backend, self.options = backend, options  # kept to open more engines the same way
        self.manifest = load_manifest(self.bundle_dir)
        verify_files(self.bundle_dir, self.manifest, hashes=verify)
        if expect_digest is not None and self.manifest.digest() != expect_digest.strip().lower():
            raise BundleError(f"bundle {self.bundle_dir} has digest {self.manifest.digest()}, not the expected "
                              f"{expect_digest} (--expect-digest): it is another bundle, or it was changed (re-"
                              "exported, recalibrated); `dbmef info` prints a bundle's digest")
        # which scorer graph runs: the fused one or the plain UNet (errors on the host); answers agree
        self.scorer_component = scorer or self.manifest.scorer_component
        if self.scorer_component not in ("scorer", "unet") or self.scorer_component not in self.manifest.components:
            raise BundleError(f"scorer {self.scorer_component!r} is not in bundle {self.bundle_dir} (it has "
                              f"{[c for c in ('scorer', 'unet') if c in self.manifest.components]}; export with "
                              "--scorer both for both)")
        m = self.manifest
        self.config = scoring or m.scoring
        if protector is None and m.protector is None:
            log.warning("bundle %s is not calibrated: every image is rethought (Prot = 0); run "
                        "`dbmef calibrate --bundle %s --data DIR --prot 0.95`", self.bundle_dir, self.bundle_dir)
        self._overridden = protector is not None
        protector = resolve_protector(m, protector)
        self.batch_size = batch_size
        if window < 1:
            raise ConfigError(f"window = {window} is invalid: need at least 1 image rethinking at a time")
        self.window = window
        pos = np.load(self.bundle_dir / m.embeddings_spec.file)
        if pos.shape[0] != len(m.class_names):
            raise BundleError(f"{m.embeddings_spec.file} has {pos.shape[0]} rows for {len(m.class_names)} "
                              "classes; re-export the bundle")
        engines = self._engines(lazy)
        vae = m.vae_spec
        h, w = vae.latent_shape[1:]
        on_cpu = not lazy and getattr(engines.scorer, "device", "cpu") == "cpu"
        if on_cpu and h * w >= 32 * 32 and self.config.unet_batch > 4:
            # CPU kernels materialise the attention matrices: (64x64)^2 x 8 heads x 4 B is 0.5 GB per
            # UNet sample, so a GPU-sized batch of 32 rows (64 samples) needs tens of GB.
            log.warning("the scorer runs on the CPU with %d rows per call at a %dx%d latent: expect very high "
                        "memory use; pass --unet-batch 2 (or scoring=...replace(unet_batch=2))",
                        self.config.unet_batch, h, w)
        self.pipeline = DBMEFPipeline(
            engines=engines,
            tokenizer=ClipTokenizer(self.bundle_dir / m.tokenizer_spec.file, m.tokenizer_spec.max_length,
                                    m.tokenizer_spec.pad_id),
            class_names=m.class_names,
            config=self.config,
            protector=protector,
            backbone_preprocess=BackbonePreprocess.from_data_config(m.backbone_preprocess),
            vae_image_size=vae.image_size,
            latent_shape=vae.latent_shape,
            schedule=m.schedule,
            positive_embeddings=pos,
            backbone_batch=max(batch_size, 1),
            cache_size=cache_size,
        )

    def _engines(self, lazy: bool) -> PipelineEngines:
        """The four networks through the backend; ``lazy``: each opened on its first call."""
        m, backend, options = self.manifest, self.backend, self.options

        def engine(component: str) -> Engine:
            if not lazy:
                return open_engine(self.bundle_dir, m, component, backend, options)
            rec = m.components[component]
            return LazyEngine(component, [t.name for t in rec.inputs], [t.name for t in rec.outputs],
                              lambda: open_engine(self.bundle_dir, m, component, backend, options))

        return PipelineEngines(backbone=engine("backbone"), text_encoder=engine("text_encoder"),
                               vae_encoder=engine("vae_encoder"), scorer=engine(self.scorer_component))

    @classmethod
    def from_spec(cls, spec: RuntimeSpec) -> DBMEFRuntime:
        """The runtime a ``RuntimeSpec`` describes: scoring overrides applied to the bundle's config,
        ``prot`` 0/1 as a fixed protector."""
        scoring = load_manifest(spec.bundle).scoring.replace(**spec.scoring) if spec.scoring else None
        return cls(spec.bundle, backend=spec.backend, options=dict(spec.options), verify=spec.verify,
                   scoring=scoring, protector=spec._protector(), batch_size=spec.batch_size, lazy=spec.lazy,
                   expect_digest=spec.expect_digest, scorer=spec.scorer)

    def identity(self) -> dict[str, Any]:
        """What decides this runtime's answers, as plain data: the bundle digest, the scoring config
        and the protector. Results files record it so a resume never mixes two configurations."""
        return identity(self.manifest, self.config, self.protector, overridden=self._overridden)

    def with_protector(self, protector: Protector) -> DBMEFRuntime:
        """The same runtime (same engines, caches and scoring) behind another gate: what a sweep
        over thresholds or a service with two operating points uses instead of reloading."""
        other = copy.copy(self)
        other.pipeline = copy.copy(self.pipeline)
        other.pipeline.protector = protector
        return other

    @property
    def class_names(self) -> list[str]:
        return self.pipeline.class_names

    @property
    def protector(self) -> Protector:
        return self.pipeline.protector

    def classify(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[ImageResult]:
        """Classify images (paths, bytes, PIL images or arrays). One result per input in input order;
        unreadable inputs carry ``error`` and do not stop the rest. ``progress`` receives images
        answered. Runs ``stream`` underneath: the same answers, whatever the batching."""
        out: list[ImageResult | None] = [None] * len(images)
        for r in self.stream(images, names):
            out[r.index] = r
            if progress is not None:
                progress(1)
        return out  # type: ignore[return-value]

    def stream(self, images: Iterable[ImageInput], names: Iterable[str] | None = None, window: int | None = None,
               progress: Callable[[int], None] | None = None, stats: SchedulerStats | None = None
               ) -> Iterator[ImageResult]:
        """Yield each input's result as soon as it is answered (``ImageResult.index``: its position;
        ``latency_s``: from its fast path to its answer). Inputs are read ``batch_size`` at a time
        and at most ``window`` (default ``self.window``) images rethink at once, so memory stays flat
        on any number of inputs. ``progress`` receives UNet rows done; ``stats`` collects the row
        scheduler's counts (engine calls, rows sent and needed)."""
        return self.pipeline.stream(images, names, batch_size=self.batch_size, window=window or self.window,
                                    progress=progress, stats=stats)

    def backbone_scores(self, images: Iterable[ImageInput]) -> tuple[np.ndarray, list[str | None]]:
        """Backbone softmax for calibration: (N, C) probabilities (rows of NaN where an image could
        not be read) and the per-image error message or None."""
        from dbmef.runtime.method import softmax

        imgs = list(images)
        probs = np.full((len(imgs), len(self.class_names)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(imgs)
        for s in range(0, len(imgs), self.batch_size):
            logits, errs = self.pipeline.backbone_logits(imgs[s : s + self.batch_size])
            for j, e in enumerate(errs):
                errors[s + j] = e
            ok = [j for j, e in enumerate(errs) if e is None]
            if ok:
                probs[[s + j for j in ok]] = softmax(logits)
        return probs, errors

    def close(self) -> None:
        self.pipeline.engines.close()

    def __enter__(self) -> DBMEFRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        engines = self.pipeline.engines
        return {
            "bundle": str(self.bundle_dir),
            "precision": m.precision,
            "classes": len(m.class_names),
            "scorer": self.scorer_component,
            "providers": {n: getattr(getattr(engines, n), "providers", ["?"])[0]
                          for n in ("backbone", "text_encoder", "vae_encoder", "scorer")},
            "protector": self.protector.to_dict(),
            "scoring": self.config.to_dict(),
        }
