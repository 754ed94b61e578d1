"""Variational Score Distillation (Wang et al. 2023, "ProlificDreamer: High-Fidelity and Diverse Text-to-3D
Generation with Variational Score Distillation")."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError
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
from nerfstudio_distill.priors.base import CFG, Condition, Prior, classifier_free_guidance


def vsd(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    prompt: Condition,
    *,
    t: Int[Tensor, " B"] | int | None = None,
    noise: Float[Tensor, " B *latent"] | None = None,
    guidance_scale: float | None = None,
    lora_guidance_scale: float = 1.0,
    weighting: str = "sds",
    grad_clip: float | None = None,
    grad_clip_mode: Literal["value", "norm"] = "value",
    lora_t: Int[Tensor, " B"] | None = None,
    lora_noise: Float[Tensor, " B *latent"] | None = None,
    camera_dropout: float = 0.1,
    drop_camera: bool | None = None,
    generator: torch.Generator | None = None,
) -> GuidanceOutput:
    """∇_x0 L_VSD = w(t) · (ε̂_pretrain(x_t; y, t) − ε̂_φ(x_t; y, t, c)), the U-Net Jacobian dropped
    (ProlificDreamer Eq. 9 and Algorithm 1), and the loss that trains φ.

    ε̂_pretrain is the prior's CFG prediction without a camera; ε̂_φ its camera-conditioned LoRA
    (``prior.add_camera_lora``) under ``prompt.camera``, with CFG over the camera at
    ``lora_guidance_scale`` against the null camera (zeros), as threestudio does (1: the camera branch
    alone). Both come from ONE ``predict_noise`` call on the groups [∅, y, (y, c)] (+ (y, 0) when
    ``lora_guidance_scale`` ≠ 1): batch 3·B (4·B).

    ``out.train_loss`` is φ's diffusion loss (ProlificDreamer Eq. 10, Algorithm 1):
    mean_b ‖ε̂_φ(x_τ; y, τ, c) − ε'‖² on the DETACHED x0, at a fresh τ ~ U[0, T) and ε' ~ N(0, I) (v target
    for a v-prediction model), the camera replaced by the null camera with probability
    ``camera_dropout`` (threestudio: 0.1, so the LoRA also learns the camera-free prediction its CFG needs).
    It carries autograd into the LoRA only; backpropagate it beside ``out.loss``.

    Args:
        prior: a prior with a camera LoRA (``prior.takes_camera``).
        x0: latents from ``prior.encode`` (differentiable).
        prompt: the text and one camera per element (:func:`~nerfstudio_distill.priors.base.camera_condition`).
        t: timestep(s) of the gradient; None draws U[0.02 T, 0.98 T].
        noise: ε for x_t; None draws N(0, I).
        guidance_scale: CFG scale of ε̂_pretrain (ProlificDreamer: 7.5); None uses the prior's default.
        lora_guidance_scale: CFG scale of ε̂_φ over the camera (threestudio: 1).
        weighting: w(t), one of :data:`~nerfstudio_distill.guidance.common.WEIGHTINGS` (ProlificDreamer:
            "sds", 1 − ᾱ_t).
        grad_clip: clip threshold for the gradient; None disables clipping.
        grad_clip_mode: ``"value"`` clamps entries, ``"norm"`` caps each element's L2 norm.
        lora_t: τ of the LoRA loss, one per element; None draws U[0, T).
        lora_noise: ε' of the LoRA loss; None draws N(0, I).
        camera_dropout: probability that the LoRA loss of this call sees the null camera.
        drop_camera: force (True) or forbid (False) that drop; None draws it.
        generator: RNG for t, ε, τ, ε' and the drop when they are drawn.
    """
    check_prompt(prompt)
    if not isinstance(prompt, Condition) or prompt.camera is None:
        raise PriorInputError(
            "VSD needs each view's camera: pass Condition(prompt, camera=camera_condition(c2w)) to a prior with "
            "a camera LoRA (prior.add_camera_lora)"
        )
    if not prior.takes_camera:
        raise PriorInputError(f"{type(prior).__name__} has no camera LoRA: call prior.add_camera_lora first")
    batch = x0.shape[0]
    t = resolve_timesteps(prior, t, batch, generator)
    w = weight(weighting, prior.alphas_cumprod, t)  # checked before any network call
    noise = resolve_noise(x0, noise, generator)
    x_t = add_noise(prior.alphas_cumprod, x0.detach(), noise, t)  # DDPM Eq. 4
    text = Condition(prompt.prompt, prompt.image)  # the pretrained branch: no camera
    null = Condition(prompt.prompt, prompt.image, torch.zeros_like(prompt.camera[:1]))
    cfg = prior.cfg(prior.guidance_scale if guidance_scale is None else float(guidance_scale))
    groups = [b.apply(text) for b in cfg.branches] + [prompt] + ([null] if lora_guidance_scale != 1 else [])
    k = len(cfg.branches)
    eps_all = prior.predict_noise(x_t[None].expand(len(groups), *x_t.shape), t, groups, CFG.conditional())
    eps = cfg.combine(eps_all[:k]).to(x0.dtype)  # CFG (Ho & Salimans Eq. 6)
    eps_lora = (
        eps_all[k]
        if len(groups) == k + 1
        else classifier_free_guidance(eps_all[k + 1], eps_all[k], lora_guidance_scale)
    )
    eps_lora = eps_lora.to(x0.dtype)
    grad = batchwise(w, x0) * (eps - eps_lora)  # ProlificDreamer Eq. 9

    # φ's update (ProlificDreamer Algorithm 1): the diffusion loss on the renders, camera-conditioned
    device = generator.device if generator is not None else None
    if lora_t is None:
        lora_t = torch.randint(
            0, prior.num_train_timesteps, (batch,), generator=generator, device=device
        ).cpu()
    lora_noise = resolve_noise(x0, lora_noise, generator, "lora_noise")
    if drop_camera is None:
        drop_camera = camera_dropout > 0 and bool(
            torch.rand((), generator=generator, device=device) < camera_dropout
        )
    lora_condition = null if drop_camera else prompt
    train_loss = prior.diffusion_loss(x0.detach(), lora_t, lora_noise, lora_condition).mean()
    return finish(
        x0, grad, t, grad_clip, grad_clip_mode,
        noise=noise, x_t=x_t, eps=eps, eps_lora=eps_lora, weight=w, train_loss=train_loss,
    )  # fmt: skip
