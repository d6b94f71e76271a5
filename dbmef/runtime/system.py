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
from dbmef.runtime.bundle import Bundle, BundleManifest
from dbmef.runtime.config import ZERO_SHOT_EXIT, ScoringConfig
from dbmef.runtime.contracts import SCORER_KINDS, kind_of_component, scorer_kind
from dbmef.runtime.engine import Engine, LazyEngine
from dbmef.runtime.pipeline import DBMEFPipeline, EmbeddingCache, PipelineEngines
from dbmef.runtime.preprocess import ImageInput
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import ImageResult
from dbmef.runtime.row_scheduler import SchedulerStats
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime as plain data, and the one list of its settings: what ``DBMEFRuntime(bundle,
    **settings)`` takes, what the CLI parses, what Ray ships to its workers, what a service config
    file can hold. ``spec.build()`` (or ``DBMEFRuntime(spec)``) is the one assembly.

    bundle: a bundle folder written by ``dbmef-export``. backend: a registered backend name
    ('onnxruntime', 'tensorrt', 'auto', or one added with ``dbmef.runtime.backends.register``);
    options: that backend's options (a dict of its fields, e.g. ``{"device": "cuda",
    "intra_op_threads": 4}`` for ONNX Runtime's ``OrtOptions``, or that object). verify: hash every
    file of the bundle when it is opened; expect_digest: refuse any other bundle. batch_size: images
    per fast-path batch (the backbone's calls, the stream's reads). scoring: overrides of the
    bundle's scoring config (field -> value). prot: 0 rethinks everything, 1 nothing; None keeps the
    bundle's protector. lazy: open each engine on its first use (a fast-path worker never loads the
    UNet). scorer: ``"fused"`` (the fused graph) or ``"unet"`` (the plain UNet, noising and error
    on the host) where the bundle has both; None: the bundle's choice (the plain UNet at lam 1,
    which then runs the positive condition alone). window: images rethinking at once, the slow
    path's slots (more fill the engine calls better and cost a latent and k negative embeddings
    each). rows_ahead: fill an engine call that would be padded with rows the plans will ask for
    next (never changes an answer). cache_size: negative embeddings kept (LRU, by candidate tuple).
    """

    bundle: str
    backend: str = "onnxruntime"
    options: Any = field(default_factory=dict)
    verify: bool = True
    batch_size: int = 16
    scoring: dict[str, Any] = field(default_factory=dict)
    prot: float | None = None
    lazy: bool = False
    expect_digest: str | None = None
    scorer: str | None = None
    window: int = 64
    rows_ahead: bool = True
    cache_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("batch_size", "window", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"runtime setting {name} = {value!r} is invalid: it must be an integer >= 1"
                                  + (" (--batch-size)" if name == "batch_size" else " (--window)" if name == "window"
                                     else ""))
        if self.scorer is not None:
            object.__setattr__(self, "scorer", scorer_kind(self.scorer, "scorer"))
        if isinstance(self.scoring, ScoringConfig):  # a whole config: every field overridden
            object.__setattr__(self, "scoring", self.scoring.to_dict())
        check_options(self.backend, self.options)  # a bad --threads fails before any data is read
        self.protector()  # a prot other than 0/1 is refused here, before anything opens

    @classmethod
    def of(cls, bundle: str | Path | Bundle, **settings: Any) -> RuntimeSpec:
        """The spec of ``bundle`` (a folder or an opened Bundle) with ``settings`` (this class's other
        fields; ``scoring`` may be a whole ``ScoringConfig``); an unknown name is a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)} - {"bundle"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"unknown runtime setting(s) {unknown}; the settings are {sorted(known)}")
        path = bundle.dir if isinstance(bundle, Bundle) else bundle
        return cls(bundle=str(path), **settings)

    def protector(self) -> Protector | None:
        """The fixed protector ``prot`` asks for (None: the bundle's own)."""
        if self.prot is None:
            return None
        if self.prot not in (0.0, 1.0):
            raise ConfigError(f"prot = {self.prot} as a runtime override must be 0 (rethink every image) or 1 "
                              "(none); calibrate other values with `dbmef calibrate --prot P`")
        return Protector.fixed(self.prot)

    def scoring_config(self, bundle: Bundle) -> ScoringConfig:
        """The bundle's scoring config with this spec's overrides. Where the overrides turn zero-shot
        mode on with adaptive early exit, the adaptive settings not given are zero-shot's own
        (``ZERO_SHOT_EXIT``, chosen for ten candidates and one vote), not the bundle's DBMEF ones."""
        if not self.scoring:
            return bundle.manifest.scoring
        merged = {**bundle.manifest.scoring.to_dict(), **self.scoring}
        if self.scoring.get("zero_shot") and merged.get("early_exit") == "adaptive":
            merged.update({k: v for k, v in ZERO_SHOT_EXIT.items() if k not in self.scoring})
        return ScoringConfig.from_dict(merged)

    def build(self, bundle: Bundle | None = None) -> DBMEFRuntime:
        """The runtime; ``bundle``: this spec's bundle already opened (not opened again)."""
        return DBMEFRuntime(self, opened=bundle)

    def identity(self, bundle: Bundle | None = None) -> dict[str, Any]:
        """``DBMEFRuntime.identity`` without opening any engine (what the driver of a distributed
        evaluation writes into its results file)."""
        b = bundle or Bundle.open(self.bundle, verify=False)
        return identity(b, self.scoring_config(b), resolve_protector(b, self.protector()),
                        overridden=self.prot is not None)

    def replace(self, **changes: Any) -> RuntimeSpec:
        return dataclasses.replace(self, **changes)

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


@dataclass(frozen=True)
class _Loaded:
    """What a runtime opened, shared by every gate over it (``with_protector``): the bundle, the
    scoring config and scorer it resolved, the engines, the tokenizer and the caches."""

    bundle: Bundle
    config: ScoringConfig
    scorer: str  # "fused" or "unet"
    engines: PipelineEngines
    tokenizer: ClipTokenizer
    positive: np.ndarray
    cache: EmbeddingCache


class DBMEFRuntime:
    """A loaded bundle, ready to classify.

    ``DBMEFRuntime(bundle, **settings)``: bundle is a bundle folder, an opened ``Bundle``, or a whole
    ``RuntimeSpec`` (then no settings); settings are ``RuntimeSpec``'s fields (backend, options,
    scoring, prot, batch_size, window, ...), where ``scoring`` may also be a whole ``ScoringConfig``.
    protector: another gate than the bundle's calibrated one (any threshold, unlike ``prot``);
    without either, an uncalibrated bundle rethinks every image (Prot = 0) and says so once.
    opened: the spec's bundle already opened (not opened again).
    """

    def __init__(self, bundle: str | Path | Bundle | RuntimeSpec, *, protector: Protector | None = None,
                 opened: Bundle | None = None, _shared: _Loaded | None = None, **settings: Any):
        if isinstance(bundle, RuntimeSpec):
            if settings:
                raise ConfigError(f"DBMEFRuntime(spec): give settings {sorted(settings)} in the spec instead")
            self.spec = bundle
        else:
            self.spec = RuntimeSpec.of(bundle, **settings)
            opened = bundle if isinstance(bundle, Bundle) else opened
        self._loaded = _shared or self._load(opened)
        self._overridden = protector is not None or self.spec.prot is not None
        gate = protector or self.spec.protector()
        if gate is None and self.manifest.protector is None and not self.config.zero_shot:
            log.warning("bundle %s is not calibrated: every image is rethought (Prot = 0); run "
                        "`dbmef calibrate --bundle %s --data DIR --prot 0.95`", self.bundle_dir, self.bundle_dir)
        if self.config.zero_shot:  # every class a candidate, every image rethought
            gate = Protector.fixed(0.0)
        self.pipeline = self._pipeline(resolve_protector(self.bundle, gate))

    def _load(self, opened: Bundle | None) -> _Loaded:
        spec = self.spec
        if spec.backend not in backend_names():
            raise ConfigError(f"backend {spec.backend!r} is not one of {list(backend_names())}")
        b = opened or Bundle.open(spec.bundle, spec.verify, spec.expect_digest)
        m = b.manifest
        config = spec.scoring_config(b)
        if config.decision == "fused" and config.fused_beta is None:
            raise ConfigError(f"decision 'fused' needs the bundle's fused calibration (scoring.fused_beta), which "
                              f"{b.dir} does not have: run `dbmef calibrate --bundle {b.dir} --data DIR --decision "
                              "fused`, or give --fused-beta B")
        if "backbone" not in m.components and not config.zero_shot:
            raise ConfigError(f"bundle {b.dir} has no classifier: it can only run zero-shot "
                              "(--zero-shot, or scoring=...replace(zero_shot=True, lam=1.0))")
        if config.zero_shot:
            if "unet" not in m.components:
                raise BundleError(f"zero-shot mode scores the positive condition alone, which needs the plain UNet "
                                  f"graph; bundle {b.dir} has only the fused scorer (re-export with "
                                  "--scorer unet or both)")
            config = config.replace(k=len(m.class_names))
        scorer = self._scorer(b, config)
        tok = ClipTokenizer(b.path(m.tokenizer.file), m.tokenizer.max_length, m.tokenizer.pad_id)
        engines = self._engines(b, SCORER_KINDS[scorer].name)
        self._warn_memory(b, config, engines.scorer)
        return _Loaded(b, config, scorer, engines, tok, b.positive_embeddings(), EmbeddingCache(spec.cache_size))

    def _scorer(self, bundle: Bundle, config: ScoringConfig) -> str:
        """The scorer kind to run: the spec's, else the bundle's; at lam = 1 the plain UNet where the
        bundle has one (the negative condition cannot change an error: one UNet evaluation per row)."""
        m = bundle.manifest
        have = [kind_of_component(c) for c in ("scorer", "unet") if c in m.components]
        positive_only = config.lam == 1.0 and "unet" in have
        scorer = self.spec.scorer or ("unet" if positive_only else kind_of_component(m.scorer_component))
        if scorer not in have:
            raise BundleError(f"scorer {scorer!r} is not in bundle {bundle.dir} (it has {have}; export with "
                              "--scorer both for both)")
        return scorer

    @property
    def bundle(self) -> Bundle:
        return self._loaded.bundle

    @property
    def config(self) -> ScoringConfig:
        return self._loaded.config

    @property
    def scorer(self) -> str:
        """The scorer this runtime runs: ``"fused"`` or ``"unet"``."""
        return self._loaded.scorer

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def window(self) -> int:
        return self.spec.window

    @property
    def manifest(self) -> BundleManifest:
        return self.bundle.manifest

    @property
    def bundle_dir(self) -> Path:
        return self.bundle.dir

    def _engines(self, bundle: Bundle, scorer_component: str) -> PipelineEngines:
        """The four networks through the backend; ``lazy``: each opened on its first call."""
        spec = self.spec

        def engine(component: str) -> Engine:
            if component not in bundle.manifest.components:  # a bundle without a backbone (zero-shot)
                return None  # type: ignore[return-value]
            if not spec.lazy:
                return open_engine(bundle, component, spec.backend, spec.options)
            rec = bundle.manifest.components[component]
            return LazyEngine(component, rec.input_names, rec.output_names,
                              lambda: open_engine(bundle, component, spec.backend, spec.options))

        return PipelineEngines(backbone=engine("backbone"), text_encoder=engine("text_encoder"),
                               vae_encoder=engine("vae_encoder"), scorer=engine(scorer_component))

    @staticmethod
    def _warn_memory(bundle: Bundle, config: ScoringConfig, scorer: Engine) -> None:
        h, w = bundle.manifest.vae.latent_shape[1:]
        if scorer.device == "cpu" and h * w >= 32 * 32 and config.unet_batch > 4:
            # CPU kernels materialise the attention matrices: (64x64)^2 x 8 heads x 4 B is 0.5 GB per
            # UNet sample, so a GPU-sized batch of 32 rows (64 samples) needs tens of GB.
            log.warning("the scorer runs on the CPU with %d rows per call at a %dx%d latent: expect very high "
                        "memory use; pass --unet-batch 2 (or scoring=...replace(unet_batch=2))",
                        config.unet_batch, h, w)

    def _pipeline(self, protector: Protector) -> DBMEFPipeline:
        m, ld, spec = self.manifest, self._loaded, self.spec
        return DBMEFPipeline(engines=ld.engines, tokenizer=ld.tokenizer, class_names=list(m.class_names),
                             config=ld.config, protector=protector, backbone_preprocess=m.backbone_preprocess,
                             vae_image_size=m.vae.image_size, latent_shape=m.vae.latent_shape, schedule=m.schedule,
                             positive_embeddings=ld.positive, backbone_batch=spec.batch_size, window=spec.window,
                             rows_ahead=spec.rows_ahead, negative_cache=ld.cache)

    def identity(self) -> dict[str, Any]:
        """What decides this runtime's answers, as plain data: the bundle digest, the scoring config
        and the protector. Results files record it so a resume never mixes two configurations."""
        return identity(self.bundle, self.config, self.protector, overridden=self._overridden)

    def with_protector(self, protector: Protector) -> DBMEFRuntime:
        """The same bundle, engines, caches and scoring behind another gate (a sweep over thresholds,
        a service with two operating points): a new runtime, this one unchanged."""
        return DBMEFRuntime(self.spec, protector=protector, _shared=self._loaded)

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

    def stream(self, images: Iterable[ImageInput], names: Iterable[str] | None = None,
               progress: Callable[[int], None] | None = None, stats: SchedulerStats | None = None
               ) -> Iterator[ImageResult]:
        """Yield each input's result as soon as it is answered (``ImageResult.index``: its position;
        ``latency_s``: from its fast path to its answer). Inputs are read ``batch_size`` at a time
        and at most ``window`` images rethink at once, so memory stays flat on any number of inputs.
        ``progress`` receives UNet rows done; ``stats`` collects the row scheduler's counts (engine
        calls, rows sent and needed)."""
        return self.pipeline.stream(images, names, progress=progress, stats=stats)

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
            "scorer": self.scorer,
            "providers": {n: e.providers[0] for n, e in engines.items()},
            "protector": self.protector.to_dict(),
            "scoring": self.config.to_dict(),
        }
