"""The DBMEF decision procedure over engines: backbone -> softmax -> protector ->
(VAE encode -> negative prompts -> scorer) -> results, with per-stage timings."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dbmef.errors import ConfigError, DBMEFError, ImageError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine, max_batch
from dbmef.runtime.method import negative_prompts, positive_prompt
from dbmef.runtime.preprocess import BackbonePreprocess, ImageInput, VaePreprocess, describe, load_image
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import Batch, ImageResult
from dbmef.runtime.schedule import NoiseSchedule
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

class EmbeddingCache:
    """A bounded LRU cache of negative embeddings keyed by the ordered candidate tuple."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._d: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, ...]) -> np.ndarray | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return v

    def put(self, key: tuple[int, ...], value: np.ndarray) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.maxsize:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class PipelineEngines:
    """The four networks of a DBMEF system, each behind the Engine interface."""

    backbone: Engine
    text_encoder: Engine
    vae_encoder: Engine
    scorer: Engine  # a fused scorer or a plain UNet

    def close(self) -> None:
        for e in (self.backbone, self.text_encoder, self.vae_encoder, self.scorer):
            e.close()


class DBMEFPipeline:
    """Classify batches of images with DBMEF over any engine backend.

    class_names: (C,) names in the backbone's class order. positive_embeddings: (C,L,D), computed
    with the text encoder on first use when not given (a bundle ships them precomputed).
    latent_shape: (4, h, w) of the VAE latent for ``vae_image_size`` inputs.
    """

    def __init__(
        self,
        engines: PipelineEngines,
        tokenizer: ClipTokenizer,
        class_names: Sequence[str],
        config: ScoringConfig,
        protector: Protector,
        backbone_preprocess: BackbonePreprocess,
        vae_image_size: int,
        latent_shape: tuple[int, int, int],
        positive_embeddings: np.ndarray | None = None,
        schedule: NoiseSchedule | None = None,
        backbone_batch: int = 32,
        cache_size: int = 4096,
    ):
        if config.k > len(class_names):
            raise ConfigError(f"k = {config.k} exceeds the number of classes ({len(class_names)})")
        self.engines = engines
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.config = config
        self.protector = protector
        self.backbone_preprocess = backbone_preprocess
        self.vae_preprocess = VaePreprocess(vae_image_size)
        self.backbone_batch = backbone_batch
        self.scorer = DiffusionScorer(config, engines.scorer, latent_shape, schedule)
        self.negative_cache = EmbeddingCache(cache_size)
        if positive_embeddings is None:
            positive_embeddings = self.encode_text(
                [positive_prompt(n, config.templates) for n in self.class_names]
            )
        if positive_embeddings.shape[0] != len(self.class_names):
            raise ConfigError(
                f"{positive_embeddings.shape[0]} positive embeddings for {len(self.class_names)} classes"
            )
        self.positive_embeddings = np.ascontiguousarray(positive_embeddings, dtype=np.float32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (N, L, D) last hidden states, in text-encoder batches of at most 64."""
        outs = []
        step = max_batch(self.engines.text_encoder, 64)
        for s in range(0, len(texts), step):
            ids = self.tokenizer(texts[s : s + step])
            outs.append(self.engines.text_encoder({"input_ids": ids})["last_hidden_state"])
        return np.concatenate(outs).astype(np.float32, copy=False)

    def encode_latents(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> (M, 4, h, w) VAE latents x0 (DESIGN.md §1.4)."""
        return self._vae(np.stack([self.vae_preprocess(img) for img in images]))

    def _vae(self, imgs: np.ndarray) -> np.ndarray:
        """(M, 3, S, S) VAE inputs -> (M, 4, h, w) latents, in calls of at most the engine's batch."""
        step = max_batch(self.engines.vae_encoder, 8)
        return np.concatenate([self.engines.vae_encoder({"image": imgs[s : s + step]})["latent"]
                               for s in range(0, len(imgs), step)])

    def negative_embeddings(self, candidates: np.ndarray) -> np.ndarray:
        """(M,k) candidate ids -> (M,k,L,D): each image's k negatives in one text-encoder call,
        cached by the ordered candidate tuple."""
        out = []
        for row in candidates:
            key = tuple(int(c) for c in row)
            emb = self.negative_cache.get(key)
            if emb is None:
                names = [self.class_names[c] for c in key]
                emb = self.encode_text(negative_prompts(names, self.config.templates))
                self.negative_cache.put(key, emb)
            out.append(emb)
        return np.stack(out)

    def classify(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[ImageResult]:
        """Classify a batch. One result per input, in input order; an input that cannot be read
        gets ``error`` set and does not stop the others. ``progress`` receives UNet rows done."""
        return self.rethink(self.fast_path(images, names), progress).results(self.class_names)

    def fast_path(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                  errors: Sequence[str | None] | None = None) -> Batch:
        """Decode, backbone and gate: the first half of ``classify``. Rows not rethought are final;
        rethought rows carry their VAE input, so ``rethink`` (here or in another process) never
        decodes again. ``errors``: inputs already known to be unreadable (not read again)."""
        batch = Batch.empty([names[i] if names else describe(src) for i, src in enumerate(images)],
                            self.config.k, self.config.votes)
        pils: dict[int, Image.Image] = {}
        pixel: list[np.ndarray] = []
        t0 = time.perf_counter()
        for i, src in enumerate(images):
            try:
                if errors is not None and errors[i]:
                    raise ImageError(str(errors[i]))
                img = load_image(src)
                pixel.append(self.backbone_preprocess(img))
                pils[i] = img
            except DBMEFError as exc:
                batch.error[i] = str(exc)
                log.warning("skipping %s: %s", batch.names[i], exc)
        ok = batch.ok
        batch.charge("decode_preprocess", time.perf_counter() - t0, ok)
        if ok.any():
            self._gate(batch, np.stack(pixel), pils)
        return batch

    def _gate(self, batch: Batch, pixel: np.ndarray, pils: dict[int, Image.Image]) -> None:
        ok = batch.ok
        t0 = time.perf_counter()
        logits = self._backbone(pixel)  # (N_ok, C)
        batch.charge("backbone", time.perf_counter() - t0, ok)
        if logits.shape[1] != len(self.class_names):
            raise ConfigError(
                f"the backbone outputs {logits.shape[1]} classes but {len(self.class_names)} class names "
                "are configured; pass class names that match the backbone"
            )
        t0 = time.perf_counter()
        g = self.protector.gate(logits, self.config.k)
        batch.top[ok], batch.top_p[ok], batch.rethink[ok] = g.top, g.top_p, g.rethink
        batch.label[ok] = g.top[:, 0]
        batch.charge("protector", time.perf_counter() - t0, ok)
        t0 = time.perf_counter()
        for i in np.flatnonzero(batch.rethink):
            batch.vae_pixels[i] = self.vae_preprocess(pils[int(i)])
        batch.charge("vae_encode", time.perf_counter() - t0, batch.rethink)  # its preprocessing, done once here

    def rethink(self, batch: Batch, progress: Callable[[int], None] | None = None) -> Batch:
        """The second half of ``classify``: VAE -> negatives -> scorer -> vote for the batch's
        rethought rows, in place. The answer is the one ``classify`` gives: it depends on the
        image and its top-k only, whichever process or batch runs it."""
        rows = batch.rethink & batch.ok & (batch.unet_evals == 0)
        if not rows.any():
            return batch
        idx = np.flatnonzero(rows)
        cands = batch.top[idx]  # (M, k)
        if cands.shape[1] != self.config.k:
            raise ConfigError(f"the batch carries a top-{cands.shape[1]} but the scoring config has k = "
                              f"{self.config.k}")
        t0 = time.perf_counter()
        pixels = [batch.vae_pixels[i] for i in idx]
        if any(p is None for p in pixels):
            raise ConfigError("a rethought row of the batch has no VAE input: build batches with fast_path")
        latents = self._vae(np.stack(pixels))  # type: ignore[arg-type]  # (M, 4, h, w)
        t1 = time.perf_counter()
        neg = self.negative_embeddings(cands)  # (M, k, L, D)
        t2 = time.perf_counter()
        sr = self.scorer.score(latents, cands, self.positive_embeddings, neg, progress)
        t3 = time.perf_counter()
        batch.label[idx] = sr.labels  # "vote": recording the tallied answers (the tally runs in the scorer)
        batch.noise_errors[idx], batch.votes[idx], batch.unet_evals[idx] = sr.errors, sr.votes, sr.unet_evals_per_image
        t4 = time.perf_counter()
        # what the slow path cost in engine terms (benchmarks read it; answers never depend on it)
        batch.scoring = {"images": len(idx), "rows": sr.rows, "engine_calls": sr.engine_calls, "stages": sr.stages,
                         "padded_rows": sr.engine_calls * self.config.unet_batch - sr.rows}
        for stage, secs in (("vae_encode", t1 - t0), ("text_encoder", t2 - t1), ("unet_scoring", t3 - t2),
                            ("vote", t4 - t3)):
            batch.charge(stage, secs, rows)
        return batch

    def backbone_logits(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, list[str | None]]:
        """Decode and run the backbone only: (N_ok, C) logits of the readable images, and one error
        message (or None) per input."""
        pixel: list[np.ndarray] = []
        errors: list[str | None] = []
        for src in images:
            try:
                pixel.append(self.backbone_preprocess(load_image(src)))
                errors.append(None)
            except DBMEFError as exc:
                errors.append(str(exc))
        if not pixel:
            return np.empty((0, len(self.class_names)), np.float32), errors
        return self._backbone(np.stack(pixel)), errors

    def _backbone(self, pixel: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, C) logits, in calls of at most the engine's batch."""
        step = max_batch(self.engines.backbone, self.backbone_batch)
        return np.concatenate([self.engines.backbone({"pixel_values": pixel[s : s + step]})["logits"]
                               for s in range(0, len(pixel), step)])
