"""A tiny, seeded DBMEF system for tests and the demo, built in seconds.

It has the real architectures' classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a
timm ResNet) at toy sizes, and is saved with ``save_pretrained``/``save_for_hf`` so it loads
through exactly the code paths real weights use. Its weights are random: answers are meaningful
only as parity targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dbmef.errors import ConfigError

TINY_CLASS_NAMES = ["cat", "dog", "car", "ship", "frog", "horse", "bird", "truck", "deer", "plane"]


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    num_classes: int = 10
    image_size: int = 64  # VAE input; latent is image_size / 8
    backbone_size: int = 64
    text_width: int = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_clip_tokenizer(out: Path, words: list[str]) -> None:
    """A CLIP BPE tokenizer (vocab.json + merges.txt, the files SD's tokenizer/ folder holds) whose
    vocabulary is the 512 byte symbols, whole-word merges for ``words``, and the two specials."""
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for w in sorted({w for w in words if w.isascii() and w.isalpha() and len(w) > 1}):
        # Merge left to right: w[0]+w[1], then that + w[2], ..., the last symbol carrying </w>.
        sym = w[0]
        for j, ch in enumerate(w[1:], start=1):
            right = ch + "</w>" if j == len(w) - 1 else ch
            pair = (sym, right)
            merged = sym + right
            if merged not in vocab:
                merges.append(pair)
                vocab.append(merged)
            sym = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }))


def write_model_index(sd: Path) -> None:
    """The diffusers ``model_index.json`` of an SD-layout folder (unet, vae, text encoder, tokenizer,
    scheduler)."""
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=2))


def build_tiny_system(out: str | Path, spec: TinySpec | None = None, class_names: list[str] | None = None) -> Path:
    """Build and save a tiny system folder (``sd/``, ``backbone/``, ``class_names.json``)."""
    import timm
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from timm.models import save_for_hf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dbmef.reference.loading import quiet_hf_logging

    quiet_hf_logging()
    spec = spec or TinySpec()
    names = class_names or TINY_CLASS_NAMES[: spec.num_classes]
    if len(names) != spec.num_classes:
        raise ConfigError(f"{len(names)} class names for {spec.num_classes} classes")
    root = Path(out)
    sd = root / "sd"
    torch.manual_seed(spec.seed)

    words = [w for n in names for w in n.replace(",", " ").split()] + "a photo of the features".split()
    write_tiny_clip_tokenizer(sd / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer", local_files_only=True)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_cfg).eval().save_pretrained(sd / "text_encoder")

    unet: Any = UNet2DConditionModel(
        sample_size=spec.image_size // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=spec.text_width,
        attention_head_dim=8, norm_num_groups=32,
    )
    unet.save_pretrained(sd / "unet")
    vae: Any = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=spec.image_size,
    )
    vae.save_pretrained(sd / "vae")
    scheduler: Any = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    scheduler.save_pretrained(sd / "scheduler")
    write_model_index(sd)

    s = spec.backbone_size
    backbone = timm.create_model(
        "test_resnet", pretrained=False, num_classes=spec.num_classes,
        pretrained_cfg_overlay={"input_size": (3, s, s), "crop_pct": 0.875, "interpolation": "bicubic"},
    ).eval()
    save_for_hf(backbone, str(root / "backbone"))
    (root / "class_names.json").write_text(json.dumps(names, indent=1))
    (root / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return root
