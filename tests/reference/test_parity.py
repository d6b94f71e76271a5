"""The scorer over the torch backend vs a deliberately naive torch version of the paper's loop.

The naive loop uses only torch, diffusers, transformers and torchvision: its own tokenizer, its
own preprocessing, diffusers' scheduler for the noising, one image, vote, candidate and
timestep at a time. Only the noise bank (an input of the method) is shared.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dbmef.runtime import NoiseBank, Protector, ScoringConfig
from tests.conftest import needs_torch

pytestmark = needs_torch

CFG = ScoringConfig(k=3, n_timesteps=5, votes=3, lam=1.1, seed=3, unet_batch=8)


def naive_paper_loop(system, images, cfg):
    import json

    import timm
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms as T
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = system / "sd"
    unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    te = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    sched = DDPMScheduler.from_pretrained(sd / "scheduler")
    names = json.loads((system / "class_names.json").read_text())
    model = timm.create_model(f"local-dir:{system / 'backbone'}", pretrained=True).eval()
    tf = create_transform(**resolve_model_data_config(model), is_training=False)
    size = vae.config.sample_size
    vae_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                        T.ToTensor(), T.Normalize([0.5], [0.5])])
    T_ = sched.config.num_train_timesteps
    grid = [T_ // cfg.n_timesteps // 2 + i * (T_ // cfg.n_timesteps) for i in range(cfg.n_timesteps)]

    def embed(text):
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    out = []
    with torch.no_grad():
        for img in images:
            from PIL import Image

            pil = Image.fromarray(img)
            probs = model(tf(pil)[None]).softmax(-1)[0]
            cands = probs.argsort(descending=True)[: cfg.k].tolist()
            x0 = vae.encode(vae_tf(pil)[None]).latent_dist.mean * vae.config.scaling_factor
            errs = np.zeros((cfg.votes, cfg.k))
            for v in range(cfg.votes):
                bank = NoiseBank(cfg.votes, cfg.n_timesteps, tuple(x0.shape[1:]), cfg.seed).eps[v]
                for c, cls in enumerate(cands):
                    others = [names[o] for o in cands if o != cls]
                    pos = embed(f"a photo of a {names[cls]}.")
                    neg = embed("the features of " + ",".join(others) + ".")
                    for i, t in enumerate(grid):
                        eps = torch.from_numpy(bank[i])[None]
                        tt = torch.tensor([t])
                        xt = sched.add_noise(x0, eps, tt)
                        ep = unet(xt, tt, encoder_hidden_states=pos).sample
                        en = unet(xt, tt, encoder_hidden_states=neg).sample
                        hat = en + cfg.lam * (ep - en)
                        errs[v, c] += F.mse_loss(eps, hat).item() / cfg.n_timesteps
            winners = Counter(int(np.argmin(errs[v])) for v in range(cfg.votes))
            top = max(winners.values())
            tied = [c for c in range(cfg.k) if winners.get(c, 0) == top]
            best = min(tied, key=lambda c: (errs[:, c].mean(), c))
            out.append({"candidates": cands, "errors": errs, "label": cands[best]})
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unet"])
def test_scorer_matches_naive_paper_loop(tiny_system, sample_images, fused):
    from dbmef.reference.engines import reference_pipeline

    images = sample_images[:3]
    pipe = reference_pipeline(tiny_system, CFG, Protector(float("inf"), 0.0), fused=fused)
    got = pipe.classify(images)
    ref = naive_paper_loop(tiny_system, images, CFG)
    for g, r in zip(got, ref):
        assert g.rethought
        assert g.candidates == r["candidates"]
        err = np.asarray(g.noise_errors)
        diff = np.abs(err - r["errors"])
        assert diff.max() <= 1e-5, f"max abs err diff {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}"
        assert g.label == r["label"]


def test_tokenizer_matches_transformers(tiny_system):
    from transformers import CLIPTokenizer

    from dbmef.reference.loading import save_tokenizer_json
    from dbmef.runtime import ClipTokenizer

    hf = CLIPTokenizer.from_pretrained(tiny_system / "sd" / "tokenizer")
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "tokenizer.json"
    save_tokenizer_json(hf, p)
    ours = ClipTokenizer(p)
    texts = ["a photo of a cat.", "the features of dog,car,ship.", "x " * 100, "Ünïcode é"]
    ref = hf(texts, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ours(texts), np.asarray(ref))


def test_pipeline_gates_and_answers_alone_as_in_batch(tiny_system, sample_images):
    from dbmef.reference.engines import reference_pipeline

    cfg = CFG.replace(votes=1, n_timesteps=2)
    everything = reference_pipeline(tiny_system, cfg, Protector(float("inf"), 0.0))
    nothing = reference_pipeline(tiny_system, cfg, Protector(float("-inf"), 1.0))
    all_r = everything.classify(sample_images)
    none_r = nothing.classify(sample_images)
    assert all(r.rethought for r in all_r) and not any(r.rethought for r in none_r)
    assert all(r.label == r.backbone_label for r in none_r)
    for j, img in enumerate(sample_images):
        alone = everything.classify([img])[0]
        assert alone.label == all_r[j].label
        np.testing.assert_allclose(alone.noise_errors, all_r[j].noise_errors, rtol=1e-5)
