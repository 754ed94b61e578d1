"""Delta Denoising Score (Hertz et al. 2023, "Delta Denoising Score")."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.guidance.common import (
    GuidanceOutput,
    add_noise,
    batchwise,
    check_prompt,
    check_source,
    finish,
    resolve_noise,
    resolve_timesteps,
    weight,
)
from nerfstudio_distill.priors.base import Condition, Prior


def dds(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    x0_src: Float[Tensor, " B *latent"],
    prompt: str | Condition,
    prompt_src: str | Condition,
    *,
    t: Int[Tensor, " B"] | int | None = None,
    noise: Float[Tensor, " B *latent"] | None = None,
    guidance_scale: float | None = None,
    weighting: str = "uniform",
    generator: torch.Generator | None = None,
) -> GuidanceOutput:
    """∇_x0 L_DD = w(t) · (ε̂(x_t; y_tgt, t) − ε̂(x̃_t; y_src, t)) (DDS: the delta of the target and
    source SDS gradients), with t and ε shared by x_t = noised x0 and x̃_t = noised x0_src, so ε cancels.

    One ``predict_noise`` call (G = 2: target and source, each with its unconditional branch).

    Args:
        prior: the diffusion prior.
        x0: latents being edited, from ``prior.encode`` (differentiable).
        x0_src: latents of the source (unedited) images, same shape; no gradient.
        prompt: target text; must be non-empty.
        prompt_src: text describing the source images ("" allowed: unconditional).
        t: timestep(s), one for all or one per element; None draws U[0.02 T, 0.98 T].
        noise: ε shared by both branches; None draws N(0, I).
        guidance_scale: CFG scale of both branches; None uses the prior's default.
        weighting: w(t) (DDS uses none: ``"uniform"``).
        generator: RNG for t and ε when they are drawn.
    """
    check_prompt(prompt)
    x0_src = check_source(x0, x0_src)
    t = resolve_timesteps(prior, t, x0.shape[0], generator)
    w = weight(weighting, prior.alphas_cumprod, t)  # checked before any network call
    noise = resolve_noise(x0, noise, generator)
    # x_t and x̃_t with the same ε (DDPM Eq. 4)
    x_t = torch.stack([add_noise(prior.alphas_cumprod, x, noise, t) for x in (x0.detach(), x0_src)])
    # CFG ε̂ (Ho & Salimans Eq. 6): one network call
    eps = prior.predict_noise(x_t, t, [prompt, prompt_src], guidance_scale).to(x0.dtype)
    grad = batchwise(w, x0) * (eps[0] - eps[1])  # DDS: ε̂_tgt − ε̂_src
    return finish(x0, grad, t, noise=noise, x_t=x_t[0], eps=eps[0], eps_src=eps[1], weight=w)
