"""InstructPix2Pix (Brooks, Holynski & Efros, CVPR 2023) as a :class:`Prior`: Stable Diffusion whose UNet also
sees the latents of a conditioning image.

The UNet input is ``[x_t, c_I]`` on the channels (8 = 4 + 4 for the released model), with c_I the VAE
*mode* of the conditioning image, NOT multiplied by the VAE's scaling factor, and zeros as the dropped
image condition, as diffusers' ``StableDiffusionInstructPix2PixPipeline`` does. Guidance is the
three-branch CFG of the paper's Eq. 3 (:meth:`CFG.instruct`): a bare scale is the text scale s_T, and
the image scale s_I comes from the config. Everything else (loading, offline rules, text, VAE) is the
Stable Diffusion prior's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError

from .base import CFG
from .stable_diffusion import StableDiffusionPrior, StableDiffusionPriorConfig

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"

MODEL_FLAGS = (
    "--pipeline.prior.instruct-pix2pix.model (ns-train; --prior.instruct-pix2pix.model in ns-distill-2d)"
)
"""Where users set the model, named in load errors."""
LORA_FLAGS = (
    "--pipeline.prior.instruct-pix2pix.lora (ns-train; --prior.instruct-pix2pix.lora in ns-distill-2d)"
)
"""Where users set the LoRA adapters, named in load errors."""


@dataclass
class InstructPix2PixPriorConfig(StableDiffusionPriorConfig):
    """Options of :class:`InstructPix2PixPrior` (those of Stable Diffusion, plus the image CFG scale)."""

    model: str = DEFAULT_MODEL
    """Hugging Face hub id or local folder of a diffusers InstructPix2Pix checkpoint (unet/ with an
    8-channel input, vae/, text_encoder/, tokenizer/, scheduler/). Point this at a local folder on
    machines without internet access."""
    guidance_scale: float = 7.5
    """Default text CFG scale s_T (unitless, InstructPix2Pix: 7.5) used when a guidance method passes
    none: how strongly the edit follows the instruction."""
    image_guidance_scale: float = 1.5
    """Image CFG scale s_I (unitless, InstructPix2Pix: 1.5): how closely the edit keeps to the
    conditioning image (the source view). Raise it for more conservative edits; 1 with a text scale of 1
    runs the conditional branch alone."""

    def setup(self, **overrides: Any) -> InstructPix2PixPrior:
        """Load the networks and return the prior; ``overrides`` replace fields (e.g. ``device=``)."""
        return InstructPix2PixPrior(self, **overrides)


class InstructPix2PixPrior(StableDiffusionPrior):
    """Frozen InstructPix2Pix behind the :class:`Prior` interface.

    ``InstructPix2PixPrior(config)`` or ``InstructPix2PixPrior(model="path", device="cpu", ...)``, and
    :meth:`from_components`, as for :class:`StableDiffusionPrior`. Each group's :class:`Condition` carries
    the instruction as its text and :meth:`encode_condition` of the conditioning image as its image.
    """

    config_class = InstructPix2PixPriorConfig
    model_flags = MODEL_FLAGS
    lora_flags = LORA_FLAGS
    takes_image = True
    config: InstructPix2PixPriorConfig

    def cfg(self, scale: float) -> CFG:
        """InstructPix2Pix's three-branch CFG (Eq. 3) with text scale ``scale`` and the config's image scale."""
        return CFG.instruct(text_scale=scale, image_scale=self.config.image_guidance_scale)

    @torch.no_grad()
    def encode_condition(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Conditioning images in [0, 1] to the image latents c_I the UNet takes (float32, on the prior's
        device): the VAE posterior's mode, unscaled (diffusers' ``prepare_image_latents``). Pass them as
        ``Condition(instruction, image=...)``; they must be the size of the latents being denoised."""
        return self.vae.encode(self._vae_input(images)).latent_dist.mode().float()

    def _unet_input(
        self, x_t: Float[Tensor, "N C h w"], images: Sequence[Tensor | None] | None = None
    ) -> Float[Tensor, "N 2C h w"]:
        """``[x_t, c_I]`` on the channels; zeros where a row drops the image (or the call has none)."""
        null = torch.zeros_like(x_t[0])  # diffusers' uncond_image_latents
        rows = [None] * x_t.shape[0] if images is None else images
        for image in rows:
            if image is not None and image.shape != null.shape:
                raise PriorInputError(
                    f"the image condition has shape {tuple(image.shape)} but the latents are "
                    f"{tuple(null.shape)}: encode the conditioning image at the render's size with "
                    "prior.encode_condition(images)"
                )
        return torch.cat([x_t, torch.stack([null if i is None else i.to(x_t) for i in rows])], 1)
