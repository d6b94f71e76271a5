"""The official DBMEF scripts' structure, as the ``paper_scripts`` baseline of ``dbmef bench``.

One loop (``PaperScripts.classify``), run either over a bundle's own engines (``EngineOps``: the
same networks dbmef runs, so a difference in time is dbmef's batching, caching and early exit) or
over the torch-eager source system (``TorchOps``: diffusers and timm modules, what a user of the
paper's code runs). The structure: one image at a time; the VAE runs on every image before the
gate; every candidate's positive and negative prompt is tokenized and encoded for every image, one
text-encoder call each; per (vote, candidate) the timesteps go through the plain UNet in calls of
up to 30 rows, positive and negative in separate calls, the error reduced on the host after every
call; every vote of every candidate is evaluated (the full method, no early exit). Same noise
banks, timesteps, k, n, V and lam as the runtime, so its decisions are the runtime's (up to float
ties).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BundleError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.method import combine_and_error, negative_prompts, positive_prompt, softmax, top_k, vote
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.noise_schedule import NoiseSchedule
from dbmef.runtime.preprocess import ImageInput, load_image

PAPER_UNET_BATCH = 30


class PaperOps:
    """The networks the paper's loop calls, one image at a time (numpy in, numpy out)."""

    class_names: list[str]
    latent_shape: tuple[int, int, int]

    def logits(self, img: Any) -> np.ndarray:
        """(C,) backbone logits of one RGB image."""
        raise NotImplementedError

    def latent(self, img: Any) -> np.ndarray:
        """(4, h, w) VAE latent of one RGB image."""
        raise NotImplementedError

    def embed(self, text: str) -> np.ndarray:
        """(L, D) text-encoder output of one prompt."""
        raise NotImplementedError

    def unet(self, x_t: np.ndarray, t: np.ndarray, emb: np.ndarray) -> np.ndarray:
        """(n, 4, h, w) noise predictions for n noised latents under one condition (L, D)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the ops opened."""


class EngineOps(PaperOps):
    """The paper's calls over a ``DBMEFRuntime``'s bundle engines and its plain ``unet`` graph."""

    def __init__(self, rt: Any):
        from dbmef.runtime.backends import open_engine

        if "unet" not in rt.manifest.components:
            raise BundleError(f"bundle {rt.bundle_dir} has no plain 'unet' graph, which the paper_scripts baseline "
                              "runs; re-export with --scorer both (or pass --source SYSTEM_DIR for the torch one)")
        self.pipe = rt.pipeline
        self.class_names = self.pipe.class_names
        self.latent_shape = rt.manifest.vae.latent_shape
        self._unet = open_engine(rt.bundle, "unet", rt.spec.backend, rt.spec.options)

    def logits(self, img: Any) -> np.ndarray:
        return self.pipe.engines.backbone({"pixel_values": self.pipe.backbone_preprocess(img)[None]})["logits"][0]

    def latent(self, img: Any) -> np.ndarray:
        return self.pipe.engines.vae_encoder({"image": self.pipe.vae_preprocess(img)[None]})["latent"][0]

    def embed(self, text: str) -> np.ndarray:
        ids = self.pipe.tokenizer([text])
        return self.pipe.engines.text_encoder({"input_ids": ids})["last_hidden_state"][0]

    def unet(self, x_t: np.ndarray, t: np.ndarray, emb: np.ndarray) -> np.ndarray:
        return self._unet({"sample": x_t, "timestep": t, "encoder_hidden_states": np.repeat(emb[None], len(t), 0)}
                          )["noise_pred"]

    def close(self) -> None:
        self._unet.close()


class TorchOps(PaperOps):
    """The paper's calls in torch eager over the source system folder (diffusers, timm, torchvision)."""

    def __init__(self, system: str | Path):
        import torch
        from timm.data import create_transform, resolve_model_data_config
        from torchvision import transforms as T

        from dbmef.reference.loading import latent_shape, load_backbone, load_sd, read_class_names

        root = Path(system)
        self.torch = torch
        self.sd = load_sd(root / "sd")
        self.backbone = load_backbone(root / "backbone")
        self.tf = create_transform(**resolve_model_data_config(self.backbone), is_training=False)
        size = int(self.sd.vae.config.sample_size)
        self.vae_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                 T.ToTensor(), T.Normalize([0.5], [0.5])])
        self.class_names = read_class_names(root / "class_names.json")
        self.latent_shape = latent_shape(self.sd.vae.config, size)

    def logits(self, img: Any) -> np.ndarray:
        with self.torch.inference_mode():
            return self.backbone(self.tf(img)[None])[0].numpy()

    def latent(self, img: Any) -> np.ndarray:
        with self.torch.inference_mode():
            d = self.sd.vae.encode(self.vae_tf(img)[None]).latent_dist
            return (d.mean * self.sd.vae.config.scaling_factor)[0].numpy()

    def embed(self, text: str) -> np.ndarray:
        with self.torch.inference_mode():
            ids = self.sd.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
            return self.sd.text_encoder(ids)[0][0].numpy()

    def unet(self, x_t: np.ndarray, t: np.ndarray, emb: np.ndarray) -> np.ndarray:
        th = self.torch
        with th.inference_mode():
            e = th.from_numpy(emb)[None].expand(len(t), -1, -1)
            return self.sd.unet(th.from_numpy(x_t), th.from_numpy(t), encoder_hidden_states=e).sample.numpy()


class PaperScripts:
    """``classify(images) -> labels`` the paper's way over ``ops``. Rethinks images whose top
    probability is at most ``threshold`` (default: every image); ``timings`` holds seconds per
    stage of the last call, ``unet_evals`` its UNet evaluations."""

    def __init__(self, ops: PaperOps, config: ScoringConfig, schedule: NoiseSchedule | None = None,
                 threshold: float = float("inf")):
        self.ops, self.cfg, self.threshold = ops, config, threshold
        schedule = schedule or NoiseSchedule()
        abar = schedule.alphas_cumprod()
        self.sqrt_a = np.sqrt(abar).astype(np.float32)
        self.sqrt_1ma = np.sqrt(1.0 - abar).astype(np.float32)
        self.grid = schedule.grid(config.n_timesteps)
        self.noise = NoiseBank(config.votes, config.n_timesteps, ops.latent_shape, config.seed).eps  # (V, n, 4, h, w)
        self.timings: dict[str, float] = {}
        self.unet_evals = 0

    @classmethod
    def on_engines(cls, rt: Any) -> PaperScripts:
        """Over a runtime's bundle: its engines, scoring config and schedule."""
        return cls(EngineOps(rt), rt.config, rt.manifest.schedule)

    @classmethod
    def on_torch(cls, system: str | Path, config: ScoringConfig) -> PaperScripts:
        """Over the torch source system folder the bundle was exported from."""
        return cls(TorchOps(system), config)

    def _tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + t - t0
        return t

    def classify(self, images: Sequence[ImageInput]) -> list[int]:
        cfg, ops = self.cfg, self.ops
        labels: list[int] = []
        self.timings, self.unet_evals = {}, 0
        for src in images:
            t = time.perf_counter()
            pil = load_image(src)
            t = self._tick("decode_preprocess", t)
            x0 = ops.latent(pil)
            t = self._tick("vae_encode", t)  # before the gate, on every image
            top_ids, top_p = top_k(softmax(ops.logits(pil)[None]), cfg.k)
            t = self._tick("backbone", t)
            top = [int(c) for c in top_ids[0]]
            if float(top_p[0, 0]) > self.threshold:
                labels.append(top[0])
                continue
            names = [ops.class_names[c] for c in top]
            pos = [ops.embed(positive_prompt(n, cfg.templates)) for n in names]
            neg = [ops.embed(q) for q in negative_prompts(names, cfg.templates)]
            t = self._tick("text_encoder", t)
            errors = np.array([[self._vote_error(x0, v, pos[c], neg[c]) for c in range(cfg.k)]
                               for v in range(cfg.votes)])  # (V, k)
            t = self._tick("unet_scoring", t)
            labels.append(top[vote(errors)[0]])
            self._tick("vote", t)
        return labels

    def _vote_error(self, x0: np.ndarray, v: int, pos: np.ndarray, neg: np.ndarray) -> float:
        """One candidate's mean error over the timesteps of vote v, in UNet calls of up to 30 rows."""
        total = 0.0
        for s in range(0, self.cfg.n_timesteps, PAPER_UNET_BATCH):
            ts = self.grid[s : s + PAPER_UNET_BATCH]
            eps = self.noise[v, s : s + PAPER_UNET_BATCH]
            x_t = self.sqrt_a[ts][:, None, None, None] * x0 + self.sqrt_1ma[ts][:, None, None, None] * eps
            p, q = self.ops.unet(x_t, ts, pos), self.ops.unet(x_t, ts, neg)  # separate calls, as the paper's
            total += float(combine_and_error(eps, p, q, self.cfg.lam).astype(np.float64).sum())  # on the host
            self.unet_evals += 2 * len(ts)
        return total / self.cfg.n_timesteps

    def close(self) -> None:
        self.ops.close()
