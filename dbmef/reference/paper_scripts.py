"""The official DBMEF scripts' structure over a bundle's own engines: the ``paper_scripts``
baseline of ``dbmef bench`` when no torch source is given (issue 13).

Same structure as the torch baseline in ``dbmef.reference.baselines``: one image at a time; the
VAE runs on every image before the gate; every candidate's positive and negative prompt is
tokenized and encoded for every image, one text-encoder call each; per (vote, candidate) the
timesteps go through the bundle's plain ``unet`` graph in calls of up to 30 rows, positive and
negative in separate calls, the errors reduced on the host after every call; every vote of every
candidate is evaluated (the full method, no early exit). Same noise banks, timesteps, k, n, V and
lam as the runtime, so its decisions are the runtime's (up to float ties) and any difference in
time is the runtime's batching, caching and early exit, on identical engines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dbmef.errors import BundleError
from dbmef.runtime.backends import open_engine
from dbmef.runtime.method import combine_and_error, negative_prompts, positive_prompt, softmax, top_k, vote
from dbmef.runtime.preprocess import ImageInput, load_image

PAPER_UNET_BATCH = 30


class PaperScriptsOnEngines:
    """``classify(images) -> labels`` the paper's way, on ``rt``'s bundle and backend. Rethinks
    images whose top probability is at most ``threshold`` (default: every image)."""

    def __init__(self, rt: Any, threshold: float = float("inf")):
        m = rt.manifest
        if "unet" not in m.components:
            raise BundleError(f"bundle {rt.bundle_dir} has no plain 'unet' graph, which the paper_scripts baseline "
                              "runs; re-export with --scorer both (or pass --source SYSTEM_DIR for the torch one)")
        self.rt = rt
        self.pipe = rt.pipeline
        self.cfg = rt.config
        self.threshold = threshold
        self.unet = open_engine(rt.bundle_dir, m, "unet", rt.backend, rt.options)
        schedule = m.schedule
        abar = schedule.alphas_cumprod()
        self.sqrt_a = np.sqrt(abar).astype(np.float32)
        self.sqrt_1ma = np.sqrt(1.0 - abar).astype(np.float32)
        self.grid = schedule.grid(self.cfg.n_timesteps)
        self.noise = self.pipe.scorer.noise.eps  # (V, n, 4, h, w): the runtime's own noise banks
        self.timings: dict[str, float] = {}
        self.unet_evals = 0

    def _tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + t - t0
        return t

    def _embed(self, text: str) -> np.ndarray:
        return self.pipe.engines.text_encoder({"input_ids": self.pipe.tokenizer([text])})["last_hidden_state"][0]

    def classify(self, images: Sequence[ImageInput]) -> list[int]:
        cfg, pipe, names = self.cfg, self.pipe, self.pipe.class_names
        labels: list[int] = []
        self.timings, self.unet_evals = {}, 0
        for src in images:
            t = time.perf_counter()
            pil = load_image(src)
            x = pipe.backbone_preprocess(pil)[None]
            t = self._tick("decode_preprocess", t)
            x0 = pipe.engines.vae_encoder({"image": pipe.vae_preprocess(pil)[None]})["latent"][0]
            t = self._tick("vae_encode", t)  # before the gate, on every image
            probs = softmax(pipe.engines.backbone({"pixel_values": x})["logits"])
            t = self._tick("backbone", t)
            top_ids, top_p = top_k(probs, cfg.k)
            top = [int(c) for c in top_ids[0]]
            if float(top_p[0, 0]) > self.threshold:
                labels.append(top[0])
                continue
            cand = [names[c] for c in top]
            negs = negative_prompts(cand, cfg.templates)
            pos_emb = [self._embed(positive_prompt(n, cfg.templates)) for n in cand]
            neg_emb = [self._embed(q) for q in negs]
            t = self._tick("text_encoder", t)
            errors = np.zeros((cfg.votes, cfg.k))
            for v in range(cfg.votes):
                for c in range(cfg.k):
                    total = 0.0
                    for s in range(0, cfg.n_timesteps, PAPER_UNET_BATCH):
                        ts = self.grid[s : s + PAPER_UNET_BATCH]
                        eps = self.noise[v, s : s + PAPER_UNET_BATCH]
                        x_t = self.sqrt_a[ts][:, None, None, None] * x0 + self.sqrt_1ma[ts][:, None, None, None] * eps
                        n = len(ts)
                        p = self.unet({"sample": x_t, "timestep": ts,
                                       "encoder_hidden_states": np.repeat(pos_emb[c][None], n, 0)})["noise_pred"]
                        q = self.unet({"sample": x_t, "timestep": ts,
                                       "encoder_hidden_states": np.repeat(neg_emb[c][None], n, 0)})["noise_pred"]
                        total += float(combine_and_error(eps, p, q, cfg.lam).astype(np.float64).sum())
                        self.unet_evals += 2 * n
                    errors[v, c] = total / cfg.n_timesteps
            t = self._tick("unet_scoring", t)
            labels.append(top[vote(errors)[0]])
            self._tick("vote", t)
        return labels

    def close(self) -> None:
        self.unet.close()
