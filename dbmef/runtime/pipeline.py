"""The DBMEF decision procedure over engines: backbone -> softmax -> protector ->
(VAE encode -> negative prompts -> scorer) -> results, with per-stage timings."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
from PIL import Image

from dbmef.errors import ConfigError, DBMEFError, ImageError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import Engine, chunked
from dbmef.runtime.method import negative_prompts, positive_prompt
from dbmef.runtime.noise_schedule import NoiseSchedule
from dbmef.runtime.preprocess import (
    BackbonePreprocess,
    ImageInput,
    Preprocessed,
    VaePreprocess,
    describe,
    load_image,
)
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import Batch, ImageResult
from dbmef.runtime.row_scheduler import SchedulerStats
from dbmef.runtime.scorer import DiffusionScorer
from dbmef.runtime.slow_path import SlowPath
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

    backbone: Engine | None  # None: a bundle without a classifier (zero-shot)
    text_encoder: Engine
    vae_encoder: Engine
    scorer: Engine  # a fused scorer or a plain UNet

    def items(self) -> list[tuple[str, Engine]]:
        named = [("backbone", self.backbone), ("text_encoder", self.text_encoder),
                 ("vae_encoder", self.vae_encoder), ("scorer", self.scorer)]
        return [(n, e) for n, e in named if e is not None]

    def close(self) -> None:
        for _, e in self.items():
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
        backbone_preprocess: BackbonePreprocess | None,
        vae_image_size: int,
        latent_shape: tuple[int, int, int],
        positive_embeddings: np.ndarray | None = None,
        schedule: NoiseSchedule | None = None,
        backbone_batch: int = 32,
        cache_size: int = 4096,
        window: int = 64,
        rows_ahead: bool = True,
        negative_cache: EmbeddingCache | None = None,
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
        self.window = window  # images rethinking at once: the slow path's slots
        self.rows_ahead = rows_ahead  # fill a call that would be padded with rows the plans will ask for next
        self.scorer = DiffusionScorer(config, engines.scorer, latent_shape, schedule)
        self.negative_cache = negative_cache if negative_cache is not None else EmbeddingCache(cache_size)
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
        ids = self.tokenizer(list(texts))  # (N, L)
        return chunked(self.engines.text_encoder, "input_ids", ids, "last_hidden_state", 64).astype(np.float32,
                                                                                                  copy=False)

    def encode_latents(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> (M, 4, h, w) VAE latents x0 (docs/design.md §1.4)."""
        return self._vae(np.stack([self.vae_preprocess(img) for img in images]))

    def _vae(self, imgs: np.ndarray) -> np.ndarray:
        """(M, 3, S, S) VAE inputs -> (M, 4, h, w) latents, in calls of at most the engine's batch."""
        return chunked(self.engines.vae_encoder, "image", imgs, "latent", 8)

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

    def fast_path(self, images: Sequence[ImageInput | Preprocessed], names: Sequence[str] | None = None,
                  errors: Sequence[str | None] | None = None) -> Batch:
        """Decode, backbone and gate: the first half of ``classify``. Rows not rethought are final;
        rethought rows carry their VAE input, so ``rethink`` (here or in another process) never
        decodes again. ``errors``: inputs already known to be unreadable (not read again)."""
        batch = Batch.empty([names[i] if names else describe(src) for i, src in enumerate(images)],
                            self.config.k, self.config.votes)
        t0 = time.perf_counter()
        batch.submitted[:] = t0
        pixel, batch.error = self._decode(images, errors, batch.names)
        ok = batch.ok
        batch.charge("decode_preprocess", time.perf_counter() - t0, ok)
        if ok.any():
            self._gate(batch, np.stack(pixel), images)
        done = ~batch.rethink
        batch.latency[done] = time.perf_counter() - t0  # kept answers (and unreadable inputs) are final now
        return batch

    def _gate(self, batch: Batch, pixel: np.ndarray, images: Sequence[ImageInput | Preprocessed]) -> None:
        ok = batch.ok
        t0 = time.perf_counter()
        if self.engines.backbone is None:  # zero-shot without a classifier: every class, in class order
            batch.top[ok] = np.arange(len(self.class_names))
            batch.rethink[ok] = True
            batch.label[ok] = 0
            self._vae_inputs(batch, images)
            return
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
        self._vae_inputs(batch, images)

    def _vae_inputs(self, batch: Batch, images: Sequence[ImageInput | Preprocessed]) -> None:
        t0 = time.perf_counter()
        for i in np.flatnonzero(batch.rethink):
            # decoded again, for the rethought images only, rather than every decoded picture held
            # until the gate: the same pixels, and the memory of one picture at a time
            src = images[int(i)]
            try:
                batch.vae_pixels[i] = src.vae if isinstance(src, Preprocessed) else self.vae_preprocess(load_image(src))
            except DBMEFError as exc:  # the file changed or vanished since the first read
                batch.error[i], batch.rethink[i] = f"{exc} (on the second read, for the VAE)", False
        batch.charge("vae_encode", time.perf_counter() - t0, batch.rethink)  # its preprocessing, done once here

    def to_rethink(self, batch: Batch) -> np.ndarray:
        """Rows of ``batch`` the slow path still has to answer: (M,) int64."""
        idx = np.flatnonzero(batch.rethink & batch.ok & (batch.unet_evals == 0))
        if len(idx) and batch.top.shape[1] != self.config.k:
            raise ConfigError(f"the batch carries a top-{batch.top.shape[1]} but the scoring config has k = "
                              f"{self.config.k}")
        return idx

    def slow_inputs(self, batch: Batch, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """VAE latents (M, 4, h, w) and negative embeddings (M, k, L, D) of rows ``idx``, their stage
        times charged to those rows; the rows' VAE inputs are released."""
        rows = np.zeros(len(batch), bool)
        rows[idx] = True
        pixels = [batch.vae_pixels[i] for i in idx]
        if any(p is None for p in pixels):
            raise ConfigError("a rethought row of the batch has no VAE input: build batches with fast_path")
        t0 = time.perf_counter()
        latents = self._vae(np.stack(pixels))  # type: ignore[arg-type]
        t1 = time.perf_counter()
        # zero-shot has no negative condition (positive only, lam = 1): nothing to encode
        neg = None if self.config.zero_shot else self.negative_embeddings(batch.top[idx])
        batch.charge("vae_encode", t1 - t0, rows)
        batch.charge("text_encoder", time.perf_counter() - t1, rows)
        for i in idx:
            batch.vae_pixels[i] = None
        return latents, neg

    def slow_path(self, capacity: int | None = None, progress: Callable[[int], None] | None = None,
                  fill_wait_s: float = math.inf, clock: Callable[[], float] = time.perf_counter) -> SlowPath:
        """The slow-path driver over this pipeline's scorer with ``capacity`` image slots (default
        ``window``); ``progress`` receives UNet rows done, ``fill_wait_s``/``clock`` go to its
        scheduler (``RowScheduler``)."""
        ex = self.scorer.executor(self.positive_embeddings, capacity or self.window)
        return SlowPath(ex, self.config, rows_ahead=self.rows_ahead, fill_wait_s=fill_wait_s, progress=progress,
                        clock=clock)

    def rethink(self, batch: Batch, progress: Callable[[int], None] | None = None) -> Batch:
        """The second half of ``classify``: VAE -> negatives -> scorer -> vote for the batch's
        rethought rows, in place, all of them through one slow-path driver. The answer is the one
        ``classify`` gives: it depends on the image and its top-k only, whichever process or batch
        runs it."""
        idx = self.to_rethink(batch)
        if not len(idx):
            return batch
        latents, neg = self.slow_inputs(batch, idx)
        with self.slow_path(len(idx), progress) as slow:
            for i, s in zip(idx, slow.run(latents, batch.top[idx], neg, batch.submitted[idx], batch.top_p[idx])):
                batch.settle(int(i), s)
            batch.scoring = slow.stats.to_dict()
        return batch

    def stream(self, images: Iterable[ImageInput], names: Iterable[str] | None = None,
               progress: Callable[[int], None] | None = None,
               stats: SchedulerStats | None = None) -> Iterator[ImageResult]:
        """Classify a stream, yielding each input's result as soon as it is answered (``index``: its
        position in the stream): kept answers after their fast-path batch, rethought ones when
        their plan settles. Inputs are read ``backbone_batch`` at a time, only while the slow path
        cannot fill its next engine call and fewer than ``window`` images are rethinking, so
        memory stays flat however long the stream. ``progress`` receives UNet rows done; ``stats``
        (if given) is updated with the scheduler's counts as the stream runs."""
        source = enumerate(zip(images, names) if names is not None else ((src, None) for src in images))
        held: dict[int, tuple[Batch, int]] = {}  # stream position -> (its batch, its row)
        exhausted = False
        with self.slow_path(progress=progress) as slow:
            if stats is not None:
                slow.stats = stats
            while True:
                while not exhausted and slow.wants_images:
                    chunk = list(islice(source, self.backbone_batch))
                    exhausted = not chunk
                    yield from self._admit(chunk, slow, held)
                if not slow.busy:
                    if exhausted:
                        return
                    continue
                for s in slow.step(more_coming=not exhausted):
                    batch, row = held.pop(s.key)  # type: ignore[call-overload]
                    batch.settle(row, s)
                    yield batch.result(row, self.class_names)

    def _admit(self, chunk: list[tuple[int, tuple[ImageInput, str | None]]], slow: SlowPath,
               held: dict[int, tuple[Batch, int]]) -> Iterator[ImageResult]:
        """Fast path of one chunk of the stream: its kept answers now, its rethought rows to ``slow``."""
        if not chunk:
            return
        srcs = [src for _, (src, _) in chunk]
        given = [name for _, (_, name) in chunk]
        batch = self.fast_path(srcs, given if all(n is not None for n in given) else None)  # type: ignore[arg-type]
        batch.index[:] = [pos for pos, _ in chunk]
        idx = self.to_rethink(batch)
        for i in np.flatnonzero(~np.isin(np.arange(len(batch)), idx)):
            yield batch.result(int(i), self.class_names)
        if len(idx):
            latents, neg = self.slow_inputs(batch, idx)
            for j, i in enumerate(idx):
                key = int(batch.index[i])  # its stream position
                held[key] = (batch, int(i))
                slow.submit(key, latents[j], batch.top[i], None if neg is None else neg[j],
                            submitted=float(batch.submitted[i]), probs=batch.top_p[i])

    def _decode(self, images: Sequence[ImageInput | Preprocessed], known: Sequence[str | None] | None,
                names: Sequence[str]) -> tuple[list[np.ndarray], list[str | None]]:
        """Each input decoded and preprocessed for the backbone: the arrays of the readable ones, and
        one error message (or None) per input. ``known``: errors already found (not read again)."""
        pixel: list[np.ndarray] = []
        errors: list[str | None] = []
        for i, src in enumerate(images):
            try:
                if known is not None and known[i]:
                    raise ImageError(str(known[i]))
                if isinstance(src, Preprocessed):  # decoded by a decode lane: no pixel is read again
                    if src.error or src.pixel is None:
                        raise ImageError(src.error or f"{src.name}: not preprocessed")
                    pixel.append(src.pixel)
                    errors.append(None)
                    continue
                # One decoded picture at a time, released once preprocessed: a batch of images at the
                # pixel limit costs one of them, not all (a 64 M-pixel RGBA PNG decodes to 0.25 GB).
                img = load_image(src)
                pixel.append(self._backbone_pixels(img))
                errors.append(None)
            except DBMEFError as exc:
                errors.append(str(exc))
                log.warning("skipping %s: %s", names[i], exc)
        return pixel, errors

    def _backbone_pixels(self, img: Image.Image) -> np.ndarray:
        """The backbone's input for a decoded picture; without a classifier (zero-shot) an empty
        array: the picture is only checked, the VAE reads it."""
        return self.backbone_preprocess(img) if self.backbone_preprocess else np.zeros(0, np.float32)

    def preprocess(self, src: ImageInput, name: str | None = None) -> Preprocessed:
        """Decode ``src`` once and preprocess it for the backbone and the VAE (for a decode lane:
        the fast path then reads no pixels; the arrays are the ones ``classify`` computes)."""
        name = name or describe(src)
        try:
            img = load_image(src)
            return Preprocessed(name, self._backbone_pixels(img), self.vae_preprocess(img))
        except DBMEFError as exc:
            return Preprocessed(name, None, None, str(exc))

    def backbone_logits(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, list[str | None]]:
        """Decode and run the backbone only: (N_ok, C) logits of the readable images, and one error
        message (or None) per input."""
        pixel, errors = self._decode(images, None, [describe(s) for s in images])
        if not pixel:
            return np.empty((0, len(self.class_names)), np.float32), errors
        return self._backbone(np.stack(pixel)), errors

    def _backbone(self, pixel: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) -> (N, C) logits, in calls of at most the engine's batch."""
        if self.engines.backbone is None:
            raise ConfigError("this bundle has no classifier (a zero-shot bundle): there are no backbone scores")
        return chunked(self.engines.backbone, "pixel_values", pixel, "logits", self.backbone_batch)
