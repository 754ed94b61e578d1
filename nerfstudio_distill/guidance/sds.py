"""Score Distillation Sampling (Poole et al. 2023, "DreamFusion: Text-to-3D using 2D Diffusion")."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.guidance.common import (
    GuidanceOutput,
    add_noise,
    batchwise,
    check_prompt,
    finish,
    resolve_noise,
    resolve_timesteps,
    weight,
)
from nerfstudio_distill.priors.base import Condition, Prior


def sds(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    prompt: str | Condition,
    *,
    t: Int[Tensor, " B"] | int | None = None,
    noise: Float[Tensor, " B *latent"] | None = None,
    guidance_scale: float | None = None,
    weighting: str = "sds",
    grad_clip: float | None = None,
    grad_clip_mode: Literal["value", "norm"] = "value",
    generator: torch.Generator | None = None,
) -> GuidanceOutput:
    """∇_x0 L_SDS = w(t) · (ε̂(x_t; y, t) − ε), the U-Net Jacobian dropped (DreamFusion Eq. 3).

    One ``predict_noise`` call (G = 1).

    Args:
        prior: the diffusion prior.
        x0: latents from ``prior.encode`` (differentiable).
        prompt: target text; must be non-empty.
        t: timestep(s), one for all or one per element; None draws U[0.02 T, 0.98 T].
        noise: ε for x_t; None draws N(0, I).
        guidance_scale: CFG scale; None uses the prior's default.
        weighting: w(t), one of :data:`~nerfstudio_distill.guidance.common.WEIGHTINGS`.
        grad_clip: clip threshold for the gradient; None disables clipping.
        grad_clip_mode: ``"value"`` clamps entries, ``"norm"`` caps each element's L2 norm.
        generator: RNG for t and ε when they are drawn.
    """
    check_prompt(prompt)
    t = resolve_timesteps(prior, t, x0.shape[0], generator)
    w = weight(weighting, prior.alphas_cumprod, t)  # checked before any network call
    noise = resolve_noise(x0, noise, generator)
    x_t = add_noise(prior.alphas_cumprod, x0.detach(), noise, t)  # DDPM Eq. 4
    # CFG ε̂ (Ho & Salimans Eq. 6): one network call
    eps = prior.predict_noise(x_t[None], t, [prompt], guidance_scale)[0].to(x0.dtype)
    grad = batchwise(w, x0) * (eps - noise)  # DreamFusion Eq. 3
    return finish(x0, grad, t, grad_clip, grad_clip_mode, noise=noise, x_t=x_t, eps=eps, weight=w)
