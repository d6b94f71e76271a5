"""The DBMEF decision procedure over engines: backbone -> softmax -> protector ->
(VAE encode -> negative prompts -> scorer) -> results, with per-stage timings."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dbmef.errors import ConfigError, DBMEFError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine, max_batch
from dbmef.runtime.preprocess import BackbonePreprocess, ImageInput, VaePreprocess, describe, load_image
from dbmef.runtime.prompts import negative_prompts, positive_prompt
from dbmef.runtime.protector import Protector
from dbmef.runtime.schedule import NoiseSchedule
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

STAGES = ("decode_preprocess", "backbone", "protector", "vae_encode", "text_encoder", "unet_scoring", "vote")
SLOW_STAGES = ("vae_encode", "text_encoder", "unet_scoring", "vote")


@dataclass
class ImageResult:
    """The answer for one input. ``label`` is None only when ``error`` says why."""

    index: int
    image: str
    label: int | None = None
    class_name: str | None = None
    rethought: bool = False
    backbone_label: int | None = None
    max_prob: float | None = None
    topk: list[tuple[int, float]] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)
    errors: list[list[float | None]] = field(default_factory=list)  # (V opened, k); None: not evaluated
    votes: list[int] = field(default_factory=list)  # (k,) votes won among completed votes
    unet_evals: int = 0  # UNet evaluations this image's rethink cost (0 when not rethought)
    timings: dict[str, float] = field(default_factory=dict)  # seconds, this image's share
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "image": self.image,
            "label": self.label,
            "class_name": self.class_name,
            "rethought": self.rethought,
            "backbone_label": self.backbone_label,
            "max_prob": self.max_prob,
            "topk": [[c, p] for c, p in self.topk],
            "candidates": self.candidates,
            "errors": self.errors,
            "votes": self.votes,
            "unet_evals": self.unet_evals,
            "timings": self.timings,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageResult:
        """Inverse of ``to_dict`` (extra keys, such as an evaluation record's, are ignored)."""
        return cls(
            index=int(d["index"]), image=str(d["image"]), label=d.get("label"), class_name=d.get("class_name"),
            rethought=bool(d.get("rethought", False)), backbone_label=d.get("backbone_label"),
            max_prob=d.get("max_prob"), topk=[(int(c), float(p)) for c, p in d.get("topk", [])],
            candidates=list(d.get("candidates", [])), errors=[list(e) for e in d.get("errors", [])],
            votes=list(d.get("votes", [])), unet_evals=int(d.get("unet_evals", 0)),
            timings=dict(d.get("timings", {})), error=d.get("error"),
        )


class StageTimer:
    """Accumulates wall time per stage. Engines are synchronous here, so a stage's clock stops when
    its outputs are on the host."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {s: 0.0 for s in STAGES}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


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
        """RGB images -> (M, 4, h, w) VAE latents x0 (DESIGN.md §1.4), in calls of at most the
        engine's batch."""
        imgs = np.stack([self.vae_preprocess(img) for img in images])
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

    def classify(
        self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[ImageResult]:
        """Classify a batch. One result per input, in input order; an input that cannot be read
        gets ``error`` set and does not stop the others. ``progress`` receives UNet rows done."""
        timer = StageTimer()
        results, pils = self._fast_path(images, names, timer)
        ok = [r for r in results if r.error is None]
        self._slow_path([r for r in ok if r.rethought], pils, timer, progress)
        self._share_timings(ok, timer)
        self.last_timings = timer.seconds
        return results

    def fast_path(self, images: Sequence[ImageInput], names: Sequence[str] | None = None
                  ) -> tuple[list[ImageResult], dict[int, Image.Image]]:
        """Decode, backbone and protector only (the first half of ``classify``, e.g. for a
        distributed pipeline that rethinks elsewhere). Returns the results, final for images not
        rethought, and the decoded images of the rethought ones by result index."""
        timer = StageTimer()
        results, pils = self._fast_path(images, names, timer)
        ok = [r for r in results if r.error is None]
        self._share_timings(ok, timer)
        return results, {r.index: pils[r.index] for r in ok if r.rethought}

    def rethink(self, results: Sequence[ImageResult], images: Sequence[ImageInput],
                progress: Callable[[int], None] | None = None) -> None:
        """The second half of ``classify``: re-rank ``results`` (from ``fast_path``, all with
        ``rethought`` set) in place; ``images`` are the same images, in the same order. The answer
        is the one ``classify`` gives: it depends on the image and its top-k only."""
        timer = StageTimer()
        todo = [r for r in results if r.rethought and r.error is None]
        if len(results) != len(images):
            raise ConfigError(f"rethink got {len(results)} results and {len(images)} images")
        wanted = {id(r) for r in todo}
        pils = {r.index: load_image(src) for r, src in zip(results, images) if id(r) in wanted}
        self._slow_path(todo, pils, timer, progress)
        share = {st: timer.seconds[st] / max(len(todo), 1) for st in SLOW_STAGES}
        for r in todo:
            r.timings.update(share)

    def _fast_path(self, images: Sequence[ImageInput], names: Sequence[str] | None, timer: StageTimer
                   ) -> tuple[list[ImageResult], dict[int, Image.Image]]:
        results = [ImageResult(i, names[i] if names else describe(src)) for i, src in enumerate(images)]
        pils: dict[int, Image.Image] = {}
        pixel: list[np.ndarray] = []
        with timer("decode_preprocess"):
            for r, src in zip(results, images):
                try:
                    img = load_image(src)
                    pixel.append(self.backbone_preprocess(img))
                    pils[r.index] = img
                except DBMEFError as exc:
                    r.error = str(exc)
                    log.warning("skipping %s: %s", r.image, exc)
        ok = [r for r in results if r.error is None]
        if ok:
            self._backbone_and_protector(ok, np.stack(pixel), timer)
        return results, pils

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
        logits = self._backbone(np.stack(pixel))
        return logits, errors

    def _backbone(self, pixel: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, C) logits, in calls of at most the engine's batch."""
        step = max_batch(self.engines.backbone, self.backbone_batch)
        return np.concatenate([self.engines.backbone({"pixel_values": pixel[s : s + step]})["logits"]
                               for s in range(0, len(pixel), step)])

    def _backbone_and_protector(self, ok: list[ImageResult], pixel: np.ndarray, timer: StageTimer) -> None:
        k = self.config.k
        with timer("backbone"):
            logits = self._backbone(pixel)  # (N, C)
        if logits.shape[1] != len(self.class_names):
            raise ConfigError(
                f"the backbone outputs {logits.shape[1]} classes but {len(self.class_names)} class names "
                "are configured; pass class names that match the backbone"
            )
        with timer("protector"):
            g = self.protector.gate(logits, k)
            top, top_p, rethink = g.top, g.top_p, g.rethink  # (N, k), (N, k), (N,)
        for j, r in enumerate(ok):
            r.backbone_label = int(top[j, 0])
            r.max_prob = float(top_p[j, 0])
            r.topk = [(int(c), float(p)) for c, p in zip(top[j], top_p[j])]
            r.rethought = bool(rethink[j])
            r.label = r.backbone_label
            r.class_name = self.class_names[r.label]

    def _slow_path(self, todo: list[ImageResult], pils: dict[int, Image.Image], timer: StageTimer,
                   progress: Callable[[int], None] | None) -> None:
        """VAE -> negatives -> scorer -> vote for the rethought results; candidates are their top-k."""
        if not todo:
            return
        k = self.config.k
        cands = np.array([[c for c, _ in r.topk[:k]] for r in todo], dtype=np.int64)  # (M,k)
        if cands.shape[1] != k:
            raise ConfigError(f"results carry a top-{cands.shape[1]} but the scoring config has k = {k}")
        with timer("vae_encode"):
            latents = self.encode_latents([pils[r.index] for r in todo])  # (M,4,h,w)
        with timer("text_encoder"):
            neg = self.negative_embeddings(cands)  # (M,k,L,D)
        with timer("unet_scoring"):
            sr = self.scorer.score(latents, cands, self.positive_embeddings, neg, progress)
        # what the last slow path cost in engine terms (benchmarks read it; answers never depend on it)
        self.last_scoring = {"images": len(todo), "rows": sr.rows, "engine_calls": sr.engine_calls,
                             "stages": sr.stages, "padded_rows": sr.engine_calls * self.config.unet_batch - sr.rows}
        with timer("vote"):
            for q, r in enumerate(todo):
                r.label = int(sr.labels[q])
                r.class_name = self.class_names[r.label]
                r.candidates = [int(c) for c in sr.candidates[q]]
                opened = ~np.isnan(sr.errors[q]).all(axis=1)  # votes early exit never opened are left out
                r.errors = [[None if np.isnan(e) else float(e) for e in row] for row in sr.errors[q][opened]]
                r.votes = [int(v) for v in sr.votes[q]]
                r.unet_evals = int(sr.unet_evals_per_image[q])

    @staticmethod
    def _share_timings(ok: list[ImageResult], timer: StageTimer) -> None:
        """Attribute batch stage time to images: shared stages split over all readable images,
        rethink stages over the rethought ones only."""
        s = timer.seconds
        n_ok = max(len(ok), 1)
        n_re = max(sum(r.rethought for r in ok), 1)
        for r in ok:
            r.timings = {
                st: s[st] / (n_re if st in SLOW_STAGES else n_ok)
                for st in STAGES
                if r.rethought or st not in SLOW_STAGES
            }


