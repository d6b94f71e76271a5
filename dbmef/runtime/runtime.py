"""``DBMEFRuntime``: load a bundle, check it, and classify batches of images.

This is what a production service embeds. It needs numpy, Pillow, tokenizers and one engine
backend (ONNX Runtime here; native TensorRT in ``trt_backend``). It is cheap to construct per
worker and holds no state that makes an answer depend on scheduling: the noise banks are fixed
by the seed and the negative-embedding cache only memoises a pure function.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime.bundle import BundleManifest, load_manifest, verify_files
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine
from dbmef.runtime.pipeline import DBMEFPipeline, ImageResult, PipelineEngines
from dbmef.runtime.preprocess import BackbonePreprocess, ImageInput
from dbmef.runtime.protector import Protector
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt", "auto")


def open_engine(bundle_dir: Path, manifest: BundleManifest, component: str, backend: str, options: Any) -> Engine:
    """One component's engine on the chosen backend."""
    rec = manifest.components[component]
    if backend in ("tensorrt", "auto") and manifest.tensorrt.get("engines", {}).get(component):
        try:
            from dbmef.runtime.trt_backend import TrtEngine

            return TrtEngine.from_bundle(bundle_dir, manifest, component)
        except Exception as exc:
            if backend == "tensorrt":
                raise
            log.info("native TensorRT unavailable for %s (%s); using ONNX Runtime", component, exc)
    elif backend == "tensorrt":
        raise BundleError(
            f"bundle {bundle_dir} has no TensorRT engine for '{component}'; build them with "
            f"`dbmef build-engines --bundle {bundle_dir}` on the target GPU, or use --backend onnxruntime"
        )
    from dbmef.runtime.ort_backend import OrtEngine

    return OrtEngine(bundle_dir / rec.file, component, options)


class LazyEngine:
    """An engine opened on its first call. Its names come from the manifest, so building a
    scorer around it opens nothing: a worker that only runs the fast path never loads the UNet,
    and one that only rethinks never loads the backbone."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 opener: Callable[[], Engine]):
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self._opener = opener
        self._engine: Engine | None = None

    @property
    def opened(self) -> bool:
        return self._engine is not None

    def _get(self) -> Engine:
        if self._engine is None:
            self._engine = self._opener()
        return self._engine

    def __call__(self, feeds: Any) -> dict[str, np.ndarray]:
        return self._get()(feeds)

    def __getattr__(self, attr: str) -> Any:
        # Backend extras (score_rows, device, providers) exist once the engine is open; asking for
        # one opens it, as the first call would.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._get(), attr)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


class DBMEFRuntime:
    """A loaded bundle, ready to classify.

    bundle_dir: folder written by ``dbmef-export``. backend: 'onnxruntime', 'tensorrt' or 'auto'.
    options: backend options (``OrtOptions`` for ONNX Runtime). verify: check file hashes.
    scoring: override the bundle's default scoring config (k, n, lam, V, seed, unet_batch).
    protector: override the bundle's calibrated protector. Without either, an uncalibrated
    bundle rethinks every image (Prot = 0) and says so once. lazy: open each engine on its first
    use (distributed workers that run one half of the pipeline load only what they use).
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
    ):
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest = load_manifest(self.bundle_dir)
        verify_files(self.bundle_dir, self.manifest, hashes=verify)
        m = self.manifest
        self.config = scoring or m.scoring
        if protector is None:
            protector = m.protector
        if protector is None:
            log.warning("bundle %s is not calibrated: every image is rethought (Prot = 0); run "
                        "`dbmef calibrate --bundle %s --data DIR --prot 0.95`", self.bundle_dir, self.bundle_dir)
            protector = Protector(math.inf, 0.0, None)
        self.batch_size = batch_size
        pos = np.load(self.bundle_dir / m.positive_embeddings["file"])
        if pos.shape[0] != len(m.class_names):
            raise BundleError(f"{m.positive_embeddings['file']} has {pos.shape[0]} rows for {len(m.class_names)} "
                              "classes; re-export the bundle")
        def engine(component: str) -> Any:
            if not lazy:
                return open_engine(self.bundle_dir, m, component, backend, options)
            rec = m.components[component]
            return LazyEngine(component, [t.name for t in rec.inputs], [t.name for t in rec.outputs],
                              lambda: open_engine(self.bundle_dir, m, component, backend, options))

        engines = PipelineEngines(
            backbone=engine("backbone"),
            text_encoder=engine("text_encoder"),
            vae_encoder=engine("vae_encoder"),
            scorer=engine(m.scorer_component),
        )
        h, w = m.vae["latent_shape"][1:]
        on_cpu = not lazy and getattr(engines.scorer, "device", None) == "cpu"
        if on_cpu and h * w >= 32 * 32 and self.config.unet_batch > 4:
            # CPU kernels materialise the attention matrices: (64x64)^2 x 8 heads x 4 B is 0.5 GB per
            # UNet sample, so a GPU-sized batch of 32 rows (64 samples) needs tens of GB.
            log.warning("the scorer runs on the CPU with %d rows per call at a %dx%d latent: expect very high "
                        "memory use; pass --unet-batch 2 (or scoring=...replace(unet_batch=2))",
                        self.config.unet_batch, h, w)
        self.pipeline = DBMEFPipeline(
            engines=engines,
            tokenizer=ClipTokenizer(self.bundle_dir / m.tokenizer["file"], int(m.tokenizer.get("max_length", 77)),
                                    m.tokenizer.get("pad_id")),
            class_names=m.class_names,
            config=self.config,
            protector=protector,
            backbone_preprocess=BackbonePreprocess.from_data_config(m.backbone_preprocess),
            vae_image_size=int(m.vae["image_size"]),
            latent_shape=tuple(m.vae["latent_shape"]),  # type: ignore[arg-type]
            positive_embeddings=pos,
            backbone_batch=max(batch_size, 1),
            cache_size=cache_size,
        )

    @property
    def class_names(self) -> list[str]:
        return self.pipeline.class_names

    @property
    def protector(self) -> Protector:
        return self.pipeline.protector

    @property
    def last_timings(self) -> dict[str, float]:
        return getattr(self.pipeline, "last_timings", {})

    def classify(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[ImageResult]:
        """Classify images (paths, bytes, PIL images or arrays), ``batch_size`` at a time. One result
        per input in input order; unreadable inputs carry ``error`` and do not stop the rest."""
        out: list[ImageResult] = []
        for batch_names, batch in self.iter_batches(images, names):
            res = self.pipeline.classify(batch, batch_names)
            for r in res:
                r.index += len(out)
            out.extend(res)
            if progress is not None:
                progress(len(res))
        return out

    def iter_batches(self, images: Sequence[ImageInput], names: Sequence[str] | None
                     ) -> Iterator[tuple[list[str] | None, list[ImageInput]]]:
        for s in range(0, len(images), self.batch_size):
            yield (list(names[s : s + self.batch_size]) if names else None), list(images[s : s + self.batch_size])

    def backbone_scores(self, images: Iterable[ImageInput]) -> tuple[np.ndarray, list[str | None]]:
        """Backbone softmax for calibration: (N, C) probabilities (rows of NaN where an image could
        not be read) and the per-image error message or None."""
        from dbmef.runtime.protector import softmax

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
            "scorer": m.scorer_component,
            "providers": {n: getattr(getattr(engines, n), "providers", ["?"])[0]
                          for n in ("backbone", "text_encoder", "vae_encoder", "scorer")},
            "protector": self.protector.to_dict(),
            "scoring": self.config.to_dict(),
        }
