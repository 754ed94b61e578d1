"""A tiny randomly initialised Stable Diffusion checkpoint, built offline, for tests and benchmarks.

``build_tiny_sd(folder)`` writes a diffusers-format folder (``unet/ vae/ text_encoder/ tokenizer/
scheduler/`` and ``model_index.json``) that ``StableDiffusionPrior`` and ``StableDiffusionPipeline`` load
like the real thing. Images are 16 x 16 (VAE factor 2), latents 4 x 8 x 8, text embeddings 77 x 32.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

IMAGE_SIZE = 16
"""Image height/width the tiny model is built for (any multiple of 2 works)."""
LATENT_SIZE = 8
WORDS = ["a", "red", "blue", "ball", "cube", "photo", "of", "the", "dog", "cat"]
"""Words with a merged BPE token; any other text still tokenises, byte by byte."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tiny_tokenizer(folder: str | Path):
    """A valid CLIP BPE tokenizer with a ~530-token vocabulary (bytes, bytes + ``</w>``, a few words)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:  # merge left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True})
    )
    return CLIPTokenizer.from_pretrained(folder)


def build_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a random tiny SD checkpoint to ``folder`` (created if needed) and return the folder."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_components(prediction_type, seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return save_tiny(pipe, folder)


def build_tiny_ip2p(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny InstructPix2Pix checkpoint (8-channel UNet input: x_t and the image latents; the
    Euler-ancestral scheduler of timbrooks/instruct-pix2pix) to ``folder`` and return the folder."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    parts = tiny_components("epsilon", seed, image_channels=4)
    parts["scheduler"] = EulerAncestralDiscreteScheduler.from_config(parts["scheduler"].config)
    pipe = StableDiffusionInstructPix2PixPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return save_tiny(pipe, folder)


def tiny_components(prediction_type: str = "epsilon", seed: int = 0, image_channels: int = 0) -> dict:
    """Random tiny ``unet, vae, text_encoder, tokenizer, scheduler`` (the UNet takes ``image_channels`` more
    input channels than the 4 latent ones)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4 + image_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny(pipe, folder: str | Path) -> Path:
    """``pipe.save_pretrained(folder)``, plus the slow-tokenizer files, for transformers versions that do not
    read tokenizer.json."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp)
        for name in ("vocab.json", "merges.txt"):
            (folder / "tokenizer" / name).write_text((Path(tmp) / name).read_text())
    return folder
