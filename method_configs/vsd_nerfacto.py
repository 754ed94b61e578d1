"""ns-train vsd-nerfacto: text-to-3D with Variational Score Distillation (ProlificDreamer).

The settings shared with sds-nerfacto and sdi-nerfacto (cameras, field, resolution schedule, 10000 steps)
are :func:`method_configs._text_to_3d.text_to_3d_method`'s; what VSD adds are ProlificDreamer's, as
threestudio's ``configs/prolificdreamer.yaml`` and ``stable_diffusion_vsd_guidance.py`` set them:
CFG 7.5 on the pretrained branch, t ~ U(0.02, 0.98) dropping to U(0.02, 0.5) (at step 5000 of 25000 there,
where its renders grow to 512 px; here at step 5000 of 10000, where ours grow to 128 px), w(t) = 1 − ᾱ_t,
a rank-4 LoRA on the UNet's attention projections trained with AdamW at lr 1e-4 (betas 0.9/0.99,
eps 1e-15), camera-conditioned, with the camera dropped for 10 % of its steps, and no CFG on its own branch.
"""

from dataclasses import dataclass

import torch
from nerfstudio.engine.optimizers import OptimizerConfig

from method_configs._text_to_3d import text_to_3d_method
from nerfstudio_distill.guidance.common import TimestepSchedule
from nerfstudio_distill.guidance.config import GuidanceConfig


@dataclass
class AdamWOptimizerConfig(OptimizerConfig):
    """AdamW (decoupled weight decay), the optimizer threestudio's ProlificDreamer uses for every group."""

    _target: type = torch.optim.AdamW
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam's β1 and β2 (threestudio's ProlificDreamer: 0.9, 0.99)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (torch's AdamW default, which threestudio keeps)."""


vsd_nerfacto = text_to_3d_method(
    "vsd-nerfacto",
    GuidanceConfig(
        method="vsd",
        guidance_scale=7.5,
        timesteps=TimestepSchedule(
            min_fraction=0.02, max_fraction=0.98, anneal="step", final_max_fraction=0.5, step_at=0.5
        ),
        weighting="sds",
        lora_rank=4,
        lora_guidance_scale=1.0,
        camera_dropout=0.1,
    ),
    "Create a scene from a text prompt with Variational Score Distillation (ProlificDreamer; a camera-"
    "conditioned LoRA of the prior learns the renders; exportable).",
)
vsd_nerfacto.config.optimizers["guidance"] = {
    "optimizer": AdamWOptimizerConfig(lr=1e-4, eps=1e-15),
    "scheduler": None,
}
