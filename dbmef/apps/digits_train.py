"""Training the digits DBMEF system's networks on real images (``digits_system.train_system``
assembles, exports and calibrates them; ``python -m benchmarks.digits.train`` runs it).

Everything is trained here, seeded, on scikit-learn's ``load_digits`` (1 797 real 8x8 handwritten
digits), rendered as 16x16 RGB images by ``dbmef.apps.digits.render``:

* two timm classifiers (the backbones): ``weak`` (a 2-layer ``test_resnet`` trained briefly on a
  small part of the training split, 88-92 % test accuracy) and ``strong`` (``resnet10t`` with
  shift augmentation, about 98-99 %);
* the diffusion side, with the classes Stable Diffusion uses: a tiny ``AutoencoderKL``
  (16x16 -> 4x8x8 latents, scaling factor = 1 / std of the training latents, as SD chose its
  0.18215), a tiny ``CLIPTextModel`` with a ``CLIPTokenizer`` whose vocabulary this script writes,
  and a ``UNet2DConditionModel`` trained with the epsilon objective on SD's scaled-linear schedule.
  The text encoder is trained jointly with the UNet. Conditions during training (our choice):
  50 % the positive prompt ``"a photo of a {name}."``, 40 % a set prompt in the negative
  template's form ``"the features of three,eight."`` naming 2-4 classes *including* the image's
  own (so a set prompt means "one of these"; DBMEF's negative for the true candidate lists only
  wrong classes and predicts the noise badly, the negative of a wrong candidate contains the truth),
  10 % the empty prompt.

Splits are fixed (independent of ``--seed``): 1 200 train / 597 test, stratified; of the train
split 1 000 images train the classifiers and 200 calibrate the protector (the diffusion side
trains on all 1 200). Outputs under ``--out``: ``system/`` (diffusers/timm folders, loadable with
``from_pretrained``), ``bundle-weak/`` and ``bundle-strong/`` (calibrated bundles), the split
files, ``train_config.json`` and ``train_report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DIGIT_NAMES, IMAGE_SIZE, DigitsSplit

N_TEST = 597
N_CALIB = 200
SPLIT_SEED = 0  # the split never moves with the training seed


@dataclass
class TrainConfig:
    seed: int = 0
    out: str = "engines/digits/seed0"
    # classifiers
    weak_model: str = "test_resnet"
    weak_train_images: int = 150
    weak_epochs: int = 30
    strong_model: str = "resnet10t"
    strong_epochs: int = 30
    # diffusion side
    vae_steps: int = 800
    unet_steps: int = 4000
    batch: int = 64
    augment_copies: int = 8
    max_shift: int = 2
    text_width: int = 64
    p_positive: float = 0.5
    p_set: float = 0.4
    # the bundle's defaults
    k: int = 3
    n_timesteps: int = 30
    votes: int = 1
    lam: float = 1.1
    prot: float = 0.95
    prot_strong: float = 0.99  # the paper's Prot for strong backbones
    export: bool = True
    export_only: bool = False  # re-export and re-calibrate an already trained system/
    # a bundle whose diffusion side the systems reuse (`dbmef-export --sd BUNDLE`): only the classifiers are
    # trained, so a system costs minutes instead of an hour (the UNet is the bundle's, trained with its own seed)
    diffusion_from: str = ""


# -- data ----------------------------------------------------------------------------------------
def make_splits() -> tuple[DigitsSplit, DigitsSplit, DigitsSplit]:
    """(classifier train, calibration, test) from scikit-learn's digits, stratified, fixed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=N_TEST, stratify=y, random_state=SPLIT_SEED)
    train = np.sort(train)
    clf, calib = train_test_split(train, test_size=N_CALIB, stratify=y[train], random_state=SPLIT_SEED)

    def split(ix: np.ndarray) -> DigitsSplit:
        ix = np.sort(ix)
        return DigitsSplit(images[ix], y[ix], ix)

    return split(clf), split(calib), split(test)


def backbone_inputs(split: DigitsSplit) -> np.ndarray:
    """The runtime's own backbone preprocessing, so training and serving see the same tensors."""
    from dbmef.runtime.preprocess import BackbonePreprocess

    pre = BackbonePreprocess.from_data_config(BACKBONE_DATA_CONFIG)
    return np.stack([pre(im) for im in split.rendered()])


def vae_inputs(split: DigitsSplit) -> np.ndarray:
    from dbmef.runtime.preprocess import VaePreprocess

    pre = VaePreprocess(IMAGE_SIZE)
    return np.stack([pre(im) for im in split.rendered()])


# timm data config written into each classifier's pretrained_cfg (and hence the bundle).
BACKBONE_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bicubic", "crop_pct": 1.0,
    "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
}


def random_shift(x: Any, max_shift: int, gen: Any, fill: float) -> Any:
    """Shift each image by up to ``max_shift`` pixels in x and y (zero-padded with ``fill``)."""
    import torch
    import torch.nn.functional as F

    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


# -- classifiers ----------------------------------------------------------------------------------
def train_classifier(name: str, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, augment: int,
                     lr: float = 2e-3) -> Any:
    import timm
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=len(DIGIT_NAMES),
                              pretrained_cfg_overlay=dict(BACKBONE_DATA_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 64):
            b = perm[s : s + 64]
            xb = random_shift(xt[b], augment, gen, fill=-1.0)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[s : s + 256])).argmax(1) for s in range(0, len(x), 256)])
    return float((pred.numpy() == y).mean())


# -- diffusion side -------------------------------------------------------------------------------
def build_tokenizer(sd: Path) -> Any:
    from transformers import CLIPTokenizer

    from dbmef.reference.tiny import write_tiny_clip_tokenizer

    words = DIGIT_NAMES + "a photo of the features".split()
    write_tiny_clip_tokenizer(sd / "tokenizer", words)
    return CLIPTokenizer.from_pretrained(sd / "tokenizer", local_files_only=True)


def train_vae(x: np.ndarray, cfg: TrainConfig) -> tuple[Any, float]:
    """A tiny AutoencoderKL (2 blocks: 16x16 -> 4x8x8). Returns (vae, scaling_factor)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vae: Any = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=IMAGE_SIZE,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    xt = torch.from_numpy(x)
    vae.train()
    for _ in _progress(range(cfg.vae_steps), "VAE"):
        b = torch.randint(0, len(xt), (64,), generator=gen)
        xb = random_shift(xt[b], cfg.max_shift, gen, fill=-1.0)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        # SD's VAE weighs KL at 1e-6 beside perceptual terms; plain MSE here, KL a little stronger
        # so the latent stays smooth enough for the UNet.
        loss = torch.nn.functional.mse_loss(rec, xb) + 1e-5 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(xt[s : s + 256]).latent_dist.mean for s in range(0, len(xt), 256)])
    scaling = float(1.0 / mean.flatten().std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, scaling


def encode_latents(vae: Any, x: np.ndarray, copies: int, max_shift: int, seed: int) -> Any:
    """Latents (mean * scaling_factor, as the runtime computes them) of the images and of
    ``copies`` shifted copies of each: the UNet's training set."""
    import torch

    gen = torch.Generator().manual_seed(seed + 17)
    xt = torch.from_numpy(x)
    outs = []
    with torch.no_grad():
        for c in range(copies + 1):
            xs = xt if c == 0 else random_shift(xt, max_shift, gen, fill=-1.0)
            outs.append(torch.cat([vae.encode(xs[s : s + 256]).latent_dist.mean for s in range(0, len(xs), 256)]))
    return torch.cat(outs) * vae.config.scaling_factor


def sample_prompts(labels: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> list[str]:
    from dbmef.runtime.method import PromptTemplates

    t = PromptTemplates()
    out = []
    for y in labels:
        u = rng.random()
        if u < cfg.p_positive:
            out.append(t.positive.format(name=DIGIT_NAMES[y]))
        elif u < cfg.p_positive + cfg.p_set:
            others = [c for c in rng.permutation(len(DIGIT_NAMES)) if c != y][: int(rng.integers(1, 4))]
            members = list(others)
            members.insert(int(rng.integers(0, len(members) + 1)), int(y))
            out.append(t.negative.format(names=t.separator.join(DIGIT_NAMES[c] for c in members)))
        else:
            out.append("")
    return out


def train_unet(latents: Any, labels: np.ndarray, tokenizer: Any, cfg: TrainConfig) -> tuple[Any, Any]:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbmef.runtime.noise_schedule import alphas_cumprod

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 2)
    w = cfg.text_width
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet: Any = UNet2DConditionModel(
        sample_size=latents.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=w,
        # diffusers' ``attention_head_dim`` is the number of heads: 2 heads of 16 channels. CPU
        # attention kernels are 4x slower with 8 heads of 4 (measured on the training step).
        attention_head_dim=2, norm_num_groups=32,
    )
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warm = min(200, cfg.unet_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, cfg.unet_steps) / cfg.unet_steps)))
    abar = torch.from_numpy(alphas_cumprod(1000, 0.00085, 0.012).astype(np.float32))
    lab_all = np.tile(labels, len(latents) // len(labels))
    unet.train()
    text.train()
    for _ in _progress(range(cfg.unet_steps), "UNet + text encoder"):
        b = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0 = latents[b]
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ids = tokenizer(sample_prompts(lab_all[b.numpy()], rng, cfg), padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
        cond = text(ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return unet.eval(), text.eval()


def _progress(it: Any, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, mininterval=2.0, dynamic_ncols=True)


# -- the whole system -----------------------------------------------------------------------------
