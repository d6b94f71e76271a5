"""What a user would otherwise run, in torch eager, for side-by-side benchmarks at equal work.

* ``paper_scripts``: the structure of the official DBMEF scripts: one image at a time; the VAE runs
  on every image before the gate; both prompts of every candidate are tokenized and encoded for
  every image; per (vote, candidate) the timesteps go through the UNet in batches of up to 30 rows
  with the positive and the negative condition in separate forward calls; errors are copied to the
  host after every batch.
* ``torch_batched``: torch eager behind dbmef's own pipeline (row batching, cached negatives, one
  fused scorer call per chunk): isolates the share of the engine backend.

Both use the same noise banks, timesteps, k, n, V and lam as dbmef, so the UNet work is equal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.method import negative_prompts, positive_prompt, vote
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.preprocess import ImageInput, load_image
from dbmef.runtime.schedule import NoiseSchedule

PAPER_UNET_BATCH = 30


class PaperScriptsBaseline:
    """One image at a time, as the paper's scripts do (see the module docstring)."""

    def __init__(self, system: str | Path, config: ScoringConfig, threshold: float = float("inf")):
        import timm
        from timm.data import create_transform, resolve_model_data_config
        from torchvision import transforms as T

        from dbmef.reference.loading import latent_shape, load_backbone, load_sd, read_class_names

        root = Path(system)
        self.sd = load_sd(root / "sd")
        self.backbone = load_backbone(root / "backbone")
        self.tf = create_transform(**resolve_model_data_config(self.backbone), is_training=False)
        size = int(self.sd.vae.config.sample_size)
        self.vae_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                 T.ToTensor(), T.Normalize([0.5], [0.5])])
        self.names = read_class_names(root / "class_names.json")
        self.cfg = config
        self.threshold = threshold
        schedule = NoiseSchedule()
        abar = torch.from_numpy(schedule.alphas_cumprod())
        self.sqrt_a = abar.sqrt().float()
        self.sqrt_1ma = (1 - abar).sqrt().float()
        self.grid = torch.from_numpy(schedule.grid(config.n_timesteps))
        shape = latent_shape(self.sd.vae.config, size)
        self.noise = torch.from_numpy(NoiseBank(config.votes, config.n_timesteps, shape, config.seed).eps)
        self.timings: dict[str, float] = {}
        del timm

    def _embed(self, text: str) -> torch.Tensor:
        ids = self.sd.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        return self.sd.text_encoder(ids)[0]

    def _tick(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + t - t0
        return t

    @torch.inference_mode()
    def classify(self, images: Sequence[ImageInput]) -> list[int]:
        cfg = self.cfg
        labels = []
        self.timings = {}
        for src in images:
            t = time.perf_counter()
            pil = load_image(src)
            x = self.tf(pil)[None]
            t = self._tick("decode_preprocess", t)
            x0 = self.sd.vae.encode(self.vae_tf(pil)[None]).latent_dist.mean * self.sd.vae.config.scaling_factor
            t = self._tick("vae_encode", t)  # before the gate, on every image
            probs = self.backbone(x).softmax(-1)[0]
            t = self._tick("backbone", t)
            top = probs.argsort(descending=True)[: cfg.k].tolist()
            if float(probs[top[0]]) > self.threshold:
                labels.append(top[0])
                continue
            cand_names = [self.names[c] for c in top]
            negs = negative_prompts(cand_names, cfg.templates)
            pos_emb = [self._embed(positive_prompt(n, cfg.templates)) for n in cand_names]
            neg_emb = [self._embed(negs[c]) for c in range(cfg.k)]
            t = self._tick("text_encoder", t)
            errors = np.zeros((cfg.votes, cfg.k))
            for v in range(cfg.votes):
                for c in range(cfg.k):
                    total = 0.0
                    for s in range(0, cfg.n_timesteps, PAPER_UNET_BATCH):
                        ts = self.grid[s : s + PAPER_UNET_BATCH]
                        eps = self.noise[v, s : s + PAPER_UNET_BATCH]
                        a = self.sqrt_a[ts].view(-1, 1, 1, 1)
                        b = self.sqrt_1ma[ts].view(-1, 1, 1, 1)
                        x_t = a * x0 + b * eps
                        n = len(ts)
                        p = self.sd.unet(x_t, ts, encoder_hidden_states=pos_emb[c].expand(n, -1, -1)).sample
                        q = self.sd.unet(x_t, ts, encoder_hidden_states=neg_emb[c].expand(n, -1, -1)).sample
                        hat = q + cfg.lam * (p - q)
                        total += ((eps - hat) ** 2).mean(dim=(1, 2, 3)).cpu().sum().item()  # host copy per batch
                    errors[v, c] = total / cfg.n_timesteps
            t = self._tick("unet_scoring", t)
            w, _ = vote(errors)
            labels.append(top[w])
            self._tick("vote", t)
        return labels


def unet_flops_per_evaluation(unet_config: dict[str, Any], latent_hw: tuple[int, int], text_len: int = 77) -> float:
    """Analytic FLOPs of one UNet evaluation (one sample, one condition): the UNet is built on
    torch's meta device (no weights, no compute) and run under FlopCounterMode, which counts the
    multiply-adds of every convolution and matmul from their shapes (2 FLOPs each)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**cfg)
        x = torch.empty(1, int(cfg.get("in_channels", 4)), *latent_hw)
        t = torch.zeros(1, dtype=torch.long)
        e = torch.empty(1, text_len, int(cfg["cross_attention_dim"]))
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, encoder_hidden_states=e)
    return float(counter.get_total_flops())


def read_unet_config(system: str | Path) -> dict[str, Any]:
    return json.loads((Path(system) / "sd" / "unet" / "config.json").read_text())
