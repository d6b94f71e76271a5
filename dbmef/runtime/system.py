"""``DBMEFRuntime``: a bundle, its engines, a scoring config and a protector, assembled into a
pipeline that classifies images.

This is what a production service embeds. It needs numpy, Pillow, tokenizers and one engine
backend (ONNX Runtime here; native TensorRT in ``backends/tensorrt.py``). It is cheap to construct
per worker and holds no state that makes an answer depend on scheduling: the noise banks are
fixed by the seed and the negative-embedding cache only memoises a pure function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime.backends import check_options, open_engine
from dbmef.runtime.backends import names as backend_names
from dbmef.runtime.bundle import Bundle
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine, LazyEngine
from dbmef.runtime.pipeline import DBMEFPipeline, EmbeddingCache, PipelineEngines
from dbmef.runtime.preprocess import ImageInput
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import ImageResult
from dbmef.runtime.scheduler import SchedulerStats
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)


def check_counts(batch_size: int, window: int) -> None:
    """The runtime's two counts, checked in one place (``RuntimeSpec`` and ``DBMEFRuntime``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size} is invalid: need at least 1 image per batch (--batch-size)")
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"window = {window} is invalid: need at least 1 image rethinking at a time")


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime as plain data: what the CLI parses, what Ray ships to its workers, what a service
    config file can hold. ``spec.build()`` is the one assembly.

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
    window: int = 64

    def __post_init__(self) -> None:
        check_counts(self.batch_size, self.window)
        check_options(self.backend, self.options)  # a bad --threads fails before any data is read
        self.protector()  # a prot other than 0/1 is refused here, before anything opens

    def protector(self) -> Protector | None:
        """The fixed protector ``prot`` asks for (None: the bundle's own)."""
        if self.prot is None:
            return None
        if self.prot not in (0.0, 1.0):
            raise ConfigError(f"prot = {self.prot} as a runtime override must be 0 (rethink every image) or 1 "
                              "(none); calibrate other values with `dbmef calibrate --prot P`")
        return Protector.fixed(self.prot)

    def build(self, bundle: Bundle | None = None) -> DBMEFRuntime:
        """The runtime; ``bundle``: this spec's bundle already opened (not opened again)."""
        b = bundle or Bundle.open(self.bundle, self.verify, self.expect_digest)
        scoring = b.manifest.scoring.replace(**self.scoring) if self.scoring else None
        return DBMEFRuntime(b, backend=self.backend, options=dict(self.options), scoring=scoring,
                            protector=self.protector(), batch_size=self.batch_size, lazy=self.lazy,
                            scorer=self.scorer, window=self.window)

    def identity(self, bundle: Bundle | None = None) -> dict[str, Any]:
        """``DBMEFRuntime.identity`` without opening any engine (what the driver of a distributed
        evaluation writes into its results file)."""
        b = bundle or Bundle.open(self.bundle, verify=False)
        m = b.manifest
        return identity(b, m.scoring.replace(**self.scoring), resolve_protector(b, self.protector()),
                        overridden=self.prot is not None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_protector(bundle: Bundle, override: Protector | None) -> Protector:
    """The protector a runtime uses: the override, else the bundle's calibrated one, else Prot = 0
    (an uncalibrated bundle rethinks every image)."""
    return override or bundle.manifest.protector or Protector.fixed(0.0)


def identity(bundle: Bundle, scoring: ScoringConfig, protector: Protector | None,
             overridden: bool = False) -> dict[str, Any]:
    """The fields that decide answers. ``unet_batch`` is left out: answers do not depend on it, and
    so is the bundle's own calibration when ``overridden`` (a fixed Prot 0/1 replaces it): a
    calibration pass at Prot 0 resumes after ``dbmef calibrate`` wrote a new threshold."""
    sc = scoring.to_dict()
    sc.pop("unet_batch", None)
    return {"bundle_digest": bundle.digest(calibration=not overridden), "scoring": sc,
            "protector": protector.to_dict() if protector is not None else None}


class DBMEFRuntime:
    """A loaded bundle, ready to classify.

    bundle: a bundle folder written by ``dbmef-export`` (opened and checked here, hashes with
    ``verify``, pinned with ``expect_digest``) or a ``Bundle`` already open. backend: a registered
    backend name ('onnxruntime', 'tensorrt', 'auto', or one added with
    ``dbmef.runtime.backends.register``); options: that backend's options (its own object, e.g.
    ``OrtOptions``, or a dict of its fields). scoring: the scoring config (default: the bundle's).
    protector: another gate than the bundle's calibrated one; without either, an uncalibrated bundle
    rethinks every image (Prot = 0) and says so once. lazy: open each engine on its first use
    (distributed workers that run one half of the pipeline load only what they use). scorer:
    ``"scorer"`` (the fused graph) or ``"unet"`` (the plain UNet, noising and error on the host)
    where the bundle holds both. window: images rethinking at once in ``stream``.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
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
        check_counts(batch_size, window)
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify, expect_digest)
        self.backend, self.options = backend, options  # kept to open more engines the same way
        self.batch_size, self.window = batch_size, window
        m = self.manifest
        self.config = scoring or m.scoring
        if "backbone" not in m.components and not self.config.zero_shot:
            raise ConfigError(f"bundle {self.bundle_dir} has no classifier: it can only run zero-shot "
                              "(--zero-shot, or scoring=...replace(zero_shot=True, lam=1.0))")
        if self.config.zero_shot:  # every class a candidate, every image rethought
            if "unet" not in m.components:
                raise BundleError(f"zero-shot mode scores the positive condition alone, which needs the plain UNet "
                                  f"graph; bundle {self.bundle_dir} has only the fused scorer (re-export with "
                                  "--scorer unet or both)")
            self.config = self.config.replace(k=len(m.class_names))
            protector = Protector.fixed(0.0)
        # At lam = 1 the negative condition cannot change an error: the plain UNet graph, where the
        # bundle has one, runs the positive condition alone (one UNet evaluation per row, not two).
        positive_only = self.config.lam == 1.0 and "unet" in m.components
        self.scorer_component = scorer or ("unet" if positive_only else m.scorer_component)
        if self.scorer_component not in ("scorer", "unet") or self.scorer_component not in m.components:
            raise BundleError(f"scorer {self.scorer_component!r} is not in bundle {self.bundle_dir} (it has "
                              f"{[c for c in ('scorer', 'unet') if c in m.components]}; export with "
                              "--scorer both for both)")
        if protector is None and m.protector is None and not self.config.zero_shot:
            log.warning("bundle %s is not calibrated: every image is rethought (Prot = 0); run "
                        "`dbmef calibrate --bundle %s --data DIR --prot 0.95`", self.bundle_dir, self.bundle_dir)
        self._overridden = protector is not None
        self._positive = self.bundle.positive_embeddings()
        self._tokenizer = ClipTokenizer(self.bundle.path(m.tokenizer.file), m.tokenizer.max_length, m.tokenizer.pad_id)
        self._cache = EmbeddingCache(cache_size)
        engines = self._engines(lazy)
        self._warn_memory(engines.scorer)
        self.pipeline = self._pipeline(engines, resolve_protector(self.bundle, protector))

    @property
    def manifest(self) -> Any:
        return self.bundle.manifest

    @property
    def bundle_dir(self) -> Path:
        return self.bundle.dir

    def _engines(self, lazy: bool) -> PipelineEngines:
        """The four networks through the backend; ``lazy``: each opened on its first call."""

        def engine(component: str) -> Engine:
            if component not in self.manifest.components:  # a bundle without a backbone (zero-shot)
                return None  # type: ignore[return-value]
            if not lazy:
                return open_engine(self.bundle, component, self.backend, self.options)
            rec = self.manifest.components[component]
            return LazyEngine(component, rec.input_names, rec.output_names,
                              lambda: open_engine(self.bundle, component, self.backend, self.options))

        return PipelineEngines(backbone=engine("backbone"), text_encoder=engine("text_encoder"),
                               vae_encoder=engine("vae_encoder"), scorer=engine(self.scorer_component))

    def _warn_memory(self, scorer: Engine) -> None:
        h, w = self.manifest.vae.latent_shape[1:]
        if scorer.device == "cpu" and h * w >= 32 * 32 and self.config.unet_batch > 4:
            # CPU kernels materialise the attention matrices: (64x64)^2 x 8 heads x 4 B is 0.5 GB per
            # UNet sample, so a GPU-sized batch of 32 rows (64 samples) needs tens of GB.
            log.warning("the scorer runs on the CPU with %d rows per call at a %dx%d latent: expect very high "
                        "memory use; pass --unet-batch 2 (or scoring=...replace(unet_batch=2))",
                        self.config.unet_batch, h, w)

    def _pipeline(self, engines: PipelineEngines, protector: Protector) -> DBMEFPipeline:
        m = self.manifest
        return DBMEFPipeline(engines=engines, tokenizer=self._tokenizer, class_names=list(m.class_names),
                             config=self.config, protector=protector, backbone_preprocess=m.backbone_preprocess,
                             vae_image_size=m.vae.image_size, latent_shape=m.vae.latent_shape, schedule=m.schedule,
                             positive_embeddings=self._positive, backbone_batch=self.batch_size,
                             negative_cache=self._cache)

    def identity(self) -> dict[str, Any]:
        """What decides this runtime's answers, as plain data: the bundle digest, the scoring config
        and the protector. Results files record it so a resume never mixes two configurations."""
        return identity(self.bundle, self.config, self.protector, overridden=self._overridden)

    def with_protector(self, protector: Protector) -> DBMEFRuntime:
        """The same bundle, engines, caches and scoring behind another gate (a sweep over thresholds,
        a service with two operating points): a new runtime, this one unchanged."""
        other = object.__new__(DBMEFRuntime)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "pipeline"})
        other._overridden = True
        other.pipeline = self._pipeline(self.pipeline.engines, protector)
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
            errors[s : s + len(errs)] = errs
            ok = [s + j for j, e in enumerate(errs) if e is None]
            if ok:
                probs[ok] = softmax(logits)
        return probs, errors

    def close(self) -> None:
        self.pipeline.engines.close()

    def __enter__(self) -> DBMEFRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        engines = self.pipeline.engines
        return {
            "bundle": str(self.bundle_dir),
            "precision": self.manifest.precision,
            "classes": len(self.class_names),
            "scorer": self.scorer_component,
            "providers": {n: e.providers[0] for n, e in engines.items()},
            "protector": self.protector.to_dict(),
            "scoring": self.config.to_dict(),
        }
