"""Score Distillation via Inversion (Lukoianov et al. 2024, "Score Distillation via Reparametrized DDIM")."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError
from nerfstudio_distill.guidance.common import (
    GuidanceOutput,
    batchwise,
    check_prompt,
    ddim_step,
    finish,
    resolve_timesteps,
    weight,
)
from nerfstudio_distill.priors.base import Condition, Prior


def inversion_timesteps(t: Int[Tensor, " B"], num_steps: int) -> Int[Tensor, "K B"]:
    """s_k = ⌊k·t / K⌋ for k = 0..K (K = ``num_steps``): evenly spaced from 0 up to t, per element."""
    k = torch.arange(num_steps + 1, dtype=torch.long)[:, None]
    return torch.div(k * t[None], num_steps, rounding_mode="floor")


def ddim_invert(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    t: Int[Tensor, " B"],
    prompt: str | Condition,
    *,
    num_steps: int = 10,
    guidance_scale: float = -7.5,
    eta: float = 0.0,
    noises: Float[Tensor, "K B *latent"] | None = None,
    generator: torch.Generator | None = None,
) -> Float[Tensor, " B *latent"]:
    """DDIM inversion x0 → x_t over :func:`inversion_timesteps` (``num_steps`` prior calls).

    Step s → s' (s < s'): ε̂ = ε̂(x_s; y, s) with CFG ``guidance_scale``, then
    x_s' = √ᾱ_s' · x̂0 + √(1−ᾱ_s') · ε̂ with x̂0 = (x_s − √(1−ᾱ_s) ε̂)/√ᾱ_s: DDIM Eq. 12 with η = 0 run
    with s and s' swapped, which the η = 0 ODE (DDIM Eq. 13) makes exact as steps shrink. x0 itself
    counts as clean (ᾱ = 1 at the start, like diffusers' ``set_alpha_to_one``); the network sees it
    at s_0 = 0.
    ``eta`` > 0 adds ``eta`` · σ_{s'→s} · z after each step, σ² = (1−ᾱ_s)/(1−ᾱ_s')·(1−ᾱ_s'/ᾱ_s)
    being the η = 1 DDIM variance of the reverse step (DDIM Eq. 16), as the SDI reference code does.

    Why not ``diffusers.DDIMInverseScheduler.step``: it takes one Python-int timestep for the whole
    batch (``timestep >= 0`` and ``alphas_cumprod[timestep]`` on a scalar) and derives the source
    timestep as ``timestep − T // num_inference_steps``, i.e. a fixed stride on a grid that runs up to
    T. SDI must end exactly at an arbitrary t that differs per element, with stride t / K, so the
    scheduler's step cannot express it; the update above is the same one line of DDIM maths.

    Args:
        prior: the diffusion prior.
        x0: clean latents (read only, no gradient).
        t: final timestep per element.
        prompt: condition for the inversion's ε̂.
        num_steps: K, the number of inversion steps (= prior calls).
        guidance_scale: CFG scale of the inversion (SDI: −7.5).
        eta: scale of the noise added after each step (SDI reference: 0.3; here default 0).
        noises: z per step, ``K x B x ...``; None draws N(0, I) when ``eta`` > 0.
        generator: RNG for ``noises`` when drawn.
    """
    if num_steps < 1:
        raise PriorInputError(f"num_inversion_steps={num_steps}: use at least 1")
    if noises is not None and noises.shape != (num_steps, *x0.shape):
        raise PriorInputError(
            f"inversion noises have shape {tuple(noises.shape)}: pass {num_steps} x {tuple(x0.shape)}"
        )
    steps = inversion_timesteps(t, num_steps)
    a = prior.alphas_cumprod.double()
    x = x0.detach()
    a_cur = torch.ones(len(t), dtype=torch.float64, device=a.device)  # x0 is clean: ᾱ = 1
    for k in range(num_steps):
        eps = prior.predict_noise(x[None], steps[k], [prompt], guidance_scale)[0]  # CFG ε̂
        a_next = a[steps[k + 1].to(a.device)]
        x = ddim_step(x, eps, a_cur, a_next)  # DDIM Eq. 9 + 12, η = 0, towards more noise
        if eta > 0:
            var = (1 - a_cur) / (1 - a_next) * (1 - a_next / a_cur)  # DDIM Eq. 16, η = 1
            if noises is None:
                device = generator.device if generator is not None else x.device
                z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
            else:
                z = noises[k].to(device=x.device, dtype=x.dtype)
            x = x + eta * batchwise(var.sqrt(), x) * z
        a_cur = a_next
    return x


def sdi(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    prompt: str | Condition,
    *,
    t: Int[Tensor, " B"] | int | None = None,
    guidance_scale: float | None = None,
    inversion_guidance_scale: float = -7.5,
    num_inversion_steps: int = 10,
    inversion_eta: float = 0.0,
    inversion_noises: Float[Tensor, "K B *latent"] | None = None,
    weighting: str = "sds",
    grad_clip: float | None = None,
    grad_clip_mode: Literal["value", "norm"] = "value",
    generator: torch.Generator | None = None,
) -> GuidanceOutput:
    """SDI: SDS with ε replaced by the noise that DDIM inversion of x0 implies.

    x_t = DDIM-invert(x0 → t) (see :func:`ddim_invert`); ε_inv = (x_t − √ᾱ_t x0)/√(1−ᾱ_t) so that
    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε_inv (DDPM Eq. 4); grad = w(t) · (ε̂(x_t; y, t) − ε_inv): SDI replaces
    SDS's random ε by ε_inv, in DreamFusion's Eq. 3 form. The SDI reference code's x̂0-target loss
    amounts to w(t) = √((1−ᾱ_t)/ᾱ_t); here w(t) is chosen by ``weighting``.
    Cost: ``num_inversion_steps`` + 1 ``predict_noise`` calls (G = 1). Per-element t is supported.

    Args:
        prior: the diffusion prior.
        x0: latents from ``prior.encode`` (differentiable).
        prompt: target text; must be non-empty. Also conditions the inversion.
        t: timestep(s); None draws U[0.02 T, 0.98 T].
        guidance_scale: CFG scale of the final ε̂; None uses the prior's default.
        inversion_guidance_scale: CFG scale during inversion (threestudio SDI: −7.5).
        num_inversion_steps: DDIM inversion steps from 0 up to t (SDI: 10).
        inversion_eta: noise added during inversion (see :func:`ddim_invert`); 0 = deterministic.
        inversion_noises: explicit per-step noises for ``inversion_eta`` > 0.
        weighting: w(t), one of :data:`~nerfstudio_distill.guidance.common.WEIGHTINGS`.
        grad_clip: clip threshold for the gradient; None disables clipping.
        grad_clip_mode: ``"value"`` clamps entries, ``"norm"`` caps each element's L2 norm.
        generator: RNG for t and inversion noises when they are drawn.
    """
    check_prompt(prompt)
    t = resolve_timesteps(prior, t, x0.shape[0], generator)
    w = weight(weighting, prior.alphas_cumprod, t)  # checked before any network call
    x_t = ddim_invert(
        prior,
        x0,
        t,
        prompt,
        num_steps=num_inversion_steps,
        guidance_scale=inversion_guidance_scale,
        eta=inversion_eta,
        noises=inversion_noises,
        generator=generator,
    ).to(x0.dtype)
    a = prior.alphas_cumprod.double()[t.to(prior.device)]
    noise = (x_t - batchwise(a.sqrt(), x0) * x0.detach()) / batchwise((1 - a).sqrt(), x0)  # inverts Eq. 4
    # CFG ε̂ (Ho & Salimans Eq. 6): one network call
    eps = prior.predict_noise(x_t[None], t, [prompt], guidance_scale)[0].to(x0.dtype)
    grad = batchwise(w, x0) * (eps - noise)  # DreamFusion Eq. 3 with ε := ε_inv
    return finish(x0, grad, t, grad_clip, grad_clip_mode, noise=noise, x_t=x_t, eps=eps, weight=w)
