"""Train the digits DBMEF system on real images, then export it with ``dbmef-export``'s code path.

    python -m benchmarks.digits.train --seed 0 --out engines/digits/seed0

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

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DIGIT_NAMES, IMAGE_SIZE, DigitsSplit, render

log = logging.getLogger("digits.train")

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

    from dbmef.runtime.schedule import alphas_cumprod

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
def train_system(cfg: TrainConfig) -> dict[str, Any]:
    import json as _json

    from diffusers import DDPMScheduler
    from timm.models import save_for_hf

    from dbmef.reference.loading import quiet_hf_logging
    from dbmef.reference.tiny import write_model_index

    quiet_hf_logging()
    out = Path(cfg.out)
    system = out / "system"
    if cfg.export_only:
        _, calib, _ = make_splits()
        report = json.loads((out / "train_report.json").read_text()) if (out / "train_report.json").is_file() else {}
        for name in ("weak", "strong"):
            export_and_calibrate(cfg, system, name, out / f"bundle-{name}", calib)
        return report
    sd = system / "sd"
    sd.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(_json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    clf, calib, test = make_splits()
    for name, s in (("train", clf), ("calibration", calib), ("test", test)):
        s.save(out / f"{name}_split.npz")
    report: dict[str, Any] = {"seed": cfg.seed, "n_train": len(clf.labels), "n_calibration": len(calib.labels),
                              "n_test": len(test.labels), "seconds": {}}
    secs = report["seconds"]

    t0 = time.perf_counter()
    xb_clf, xb_test = backbone_inputs(clf), backbone_inputs(test)
    # The weak backbone sees a small stratified part of the training split, briefly.
    rng = np.random.default_rng(cfg.seed)
    per_class = max(1, cfg.weak_train_images // len(DIGIT_NAMES))
    weak_ix = np.concatenate([rng.permutation(np.flatnonzero(clf.labels == c))[:per_class]
                              for c in range(len(DIGIT_NAMES))])
    weak = train_classifier(cfg.weak_model, xb_clf[weak_ix], clf.labels[weak_ix], cfg.weak_epochs, cfg.seed, 0)
    strong = train_classifier(cfg.strong_model, xb_clf, clf.labels, cfg.strong_epochs, cfg.seed, cfg.max_shift)
    secs["classifiers"] = time.perf_counter() - t0
    report["torch_test_accuracy"] = {"weak": accuracy(weak, xb_test, test.labels),
                                     "strong": accuracy(strong, xb_test, test.labels)}
    log.info("classifiers: %s", report["torch_test_accuracy"])
    for name, model in (("weak", weak), ("strong", strong)):
        save_for_hf(model, str(system / f"backbone_{name}"))

    # The diffusion side trains on the whole training split (classifier part + calibration part).
    train_all = DigitsSplit(np.concatenate([clf.images, calib.images]), np.concatenate([clf.labels, calib.labels]),
                            np.concatenate([clf.indices, calib.indices]))
    xv = vae_inputs(train_all)
    t0 = time.perf_counter()
    vae, scaling = train_vae(xv, cfg)
    secs["vae"] = time.perf_counter() - t0
    report["vae_scaling_factor"] = scaling
    vae.save_pretrained(sd / "vae")
    tokenizer = build_tokenizer(sd)
    latents = encode_latents(vae, xv, cfg.augment_copies, cfg.max_shift, cfg.seed)
    t0 = time.perf_counter()
    unet, text = train_unet(latents, train_all.labels, tokenizer, cfg)
    secs["unet"] = time.perf_counter() - t0
    unet.save_pretrained(sd / "unet")
    text.save_pretrained(sd / "text_encoder")
    sched: Any = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear")
    sched.save_pretrained(sd / "scheduler")
    write_model_index(sd)
    (system / "class_names.json").write_text(_json.dumps(DIGIT_NAMES, indent=1))

    if cfg.export:
        for name in ("weak", "strong"):
            t0 = time.perf_counter()
            export_and_calibrate(cfg, system, name, out / f"bundle-{name}", calib)
            secs[f"export_{name}"] = time.perf_counter() - t0
    secs["total"] = sum(secs.values())
    (out / "train_report.json").write_text(_json.dumps(report, indent=2) + "\n")
    return report


def export_and_calibrate(cfg: TrainConfig, system: Path, backbone: str, bundle: Path, calib: DigitsSplit) -> Path:
    """``dbmef-export``'s library path with the digits defaults, then the protector calibrated on
    the calibration split, as ``dbmef calibrate`` does."""
    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.runtime.config import ScoringConfig
    from dbmef.runtime.evaluate import calibrate, write_protector
    from dbmef.runtime.system import DBMEFRuntime

    scoring = ScoringConfig(k=cfg.k, n_timesteps=cfg.n_timesteps, votes=cfg.votes, lam=cfg.lam, unet_batch=64)
    # scorer "both": the fused graph serves; the plain UNet graph lets the Table 1 ablations get
    # every lam and the negative-only error from one pass (DiffusionScorer.score_terms).
    export_bundle(ExportConfig(backbone=str(system / f"backbone_{backbone}"), sd=str(system / "sd"),
                               image_size=IMAGE_SIZE, class_names=str(system / "class_names.json"),
                               out=str(bundle), scoring=scoring, seed=cfg.seed, scorer="both"))
    prot = cfg.prot_strong if backbone == "strong" else cfg.prot
    with DBMEFRuntime(bundle) as rt:
        protector, stats = calibrate(rt, labelled(calib), prot)
    data = "digits calibration split (200 images of load_digits' train split)"
    write_protector(bundle, protector, {**stats, "data": data})
    return bundle


def labelled(split: DigitsSplit) -> list[Any]:
    """The split as the runtime's labelled items (images given as arrays)."""
    from dbmef.runtime.data import LabelledImage

    return [LabelledImage(np.asarray(render(a)), int(y)) for a, y in zip(split.images, split.labels)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.train", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=typ, default=f.default)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    report = train_system(cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
