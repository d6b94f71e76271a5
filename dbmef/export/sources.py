"""Where the weights come from: local folders, the local Hugging Face cache, or architectures
built from configs with random weights. Nothing here touches the network: a missing weight is an
ExportError within seconds, naming what is missing and the flags that fix it."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dbmef.errors import ExportError

log = logging.getLogger(__name__)

SD15_REPOS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")

# Stable Diffusion v1.5's component configs (from its model_index and subfolder configs).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32, "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "act_fn": "silu",
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}


def offline_env() -> None:
    """Make every Hugging Face client fail fast instead of waiting on the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def find_cached_sd15() -> Path | None:
    """The snapshot folder of SD v1.5 in the local Hugging Face cache, if one is there."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in SD15_REPOS:
        try:
            p = Path(snapshot_download(repo, local_files_only=True,
                                       allow_patterns=["unet/*", "vae/*", "text_encoder/*", "tokenizer/*",
                                                       "scheduler/*", "model_index.json"]))
        except Exception:  # LocalEntryNotFoundError and friends: not cached
            continue
        if (p / "unet").is_dir():
            return p
    return None


def resolve_sd_source(sd: str, image_size: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Turn ``--sd`` into a local diffusers folder. Returns (folder, source record for the manifest).

    ``auto``: SD v1.5 from the local HF cache. ``sd15``: SD v1.5's architecture with random
    weights. ``tiny``: the tiny test system. Anything else: a local diffusers folder.
    """
    if sd == "auto":
        p = find_cached_sd15()
        if p is None:
            raise ExportError(
                "Stable Diffusion v1.5 is not in the local Hugging Face cache (looked for "
                f"{', '.join(SD15_REPOS)} under {os.environ.get('HF_HOME', '~/.cache/huggingface')}). "
                "Pass --sd DIR (a local diffusers folder of SD v1.5), or --sd sd15 to export the architecture "
                "with random weights, or --sd tiny for the test system"
            )
        return p, {"kind": "hf-cache", "id": str(p)}
    if sd == "tiny":
        from dbmef.reference.tiny import TinySpec, build_tiny_system

        root = Path(tempfile.mkdtemp(prefix="dbmef-tiny-"))
        spec = TinySpec(seed=seed, image_size=64 if image_size >= 64 else image_size)
        build_tiny_system(root, spec)
        return root / "sd", {"kind": "tiny", "id": "tiny", "seed": seed, "image_size": spec.image_size}
    if sd == "sd15":
        root = Path(tempfile.mkdtemp(prefix="dbmef-sd15-"))
        build_sd15_random(root, image_size, seed)
        return root, {"kind": "sd15-random-init", "id": "sd15 architecture, random weights", "seed": seed}
    p = Path(sd)
    if not p.is_dir():
        raise ExportError(
            f"--sd {sd!r}: no such folder. Pass a local diffusers folder of SD v1.5, 'sd15' (architecture "
            "with random weights), 'tiny' (test system), or omit --sd to use the local Hugging Face cache"
        )
    return p, {"kind": "local", "id": str(p.resolve())}


def build_sd15_random(root: Path, image_size: int = 512, seed: int = 0) -> Path:
    """SD v1.5's UNet, VAE and CLIP text encoder from their configs with random weights, saved in
    the diffusers layout. The tokenizer is the byte-level CLIP BPE (real CLIP merges cannot be
    downloaded here): ids stay inside the 49408-token vocabulary, which is all random weights need."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbmef.reference.loading import quiet_hf_logging
    from dbmef.reference.tiny import write_tiny_clip_tokenizer

    quiet_hf_logging()
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(root / "tokenizer", [])
    unet: Any = UNet2DConditionModel(**{**SD15_UNET, "sample_size": image_size // 8})
    unet.save_pretrained(root / "unet")
    del unet
    vae: Any = AutoencoderKL(**{**SD15_VAE, "sample_size": image_size})
    vae.save_pretrained(root / "vae")
    del vae
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    cfg = CLIPTextConfig(**{**SD15_TEXT, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                            "pad_token_id": tok.pad_token_id})
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    sched: Any = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear")
    sched.save_pretrained(root / "scheduler")
    return root


def imagenet_class_names() -> tuple[list[str], list[str]]:
    """ImageNet-1k class names (first lemma of each synset) and wnids, from timm's own metadata."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    wnids = [info.index_to_label_name(i) for i in range(1000)]
    return names, wnids
