"""Posterior Distillation Sampling (Koo, Park & Sung, CVPR 2024, "Posterior Distillation Sampling").

PDS matches the stochastic latents z_t of the target and the source. With DDPM posterior
q(x_{t'} | x_t, x0) = N(μ, σ_t² I) (DDPM Eq. 6–7), t' the previous timestep:

    x_t   = √ᾱ_t x0 + √(1−ᾱ_t) ε                        (DDPM Eq. 4; ε shared by target and source)
    x_t'  = √ᾱ_t' x0 + √(1−ᾱ_t') ε'                      (ε' shared too)
    x̂0    = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                    (DDIM Eq. 9)
    μ     = c0 x̂0 + c1 x_t,  c0 = √ᾱ_t' β_t / (1−ᾱ_t),  c1 = √α_t (1−ᾱ_t') / (1−ᾱ_t)   (DDPM Eq. 7)
    σ_t   = √((1−ᾱ_t') / (1−ᾱ_t) · β_t)                 (DDPM Eq. 7, β̃_t)
    z     = (x_t' − μ) / σ_t,     ∇_x0 L_PDS = z_tgt − z_src

with the one-step β_t = ``prior.betas[t]``, α_t = 1 − β_t even when t' is the previous point of an
N-step DDIM grid (as the reference code does). Taking the difference, ε and ε' cancel
(Δx_t = √ᾱ_t Δx0, Δx_t' = √ᾱ_t' Δx0, Δx̂0 = Δx0 − √(1−ᾱ_t)/√ᾱ_t Δε̂):

    z_tgt − z_src = ψ(t) (x0_tgt − x0_src) + χ(t) (ε̂_tgt − ε̂_src)
    ψ(t) = (√ᾱ_t' − c0 − c1 √ᾱ_t) / σ_t
    χ(t) = c0 √(1−ᾱ_t) / (√ᾱ_t σ_t)

so this module computes the explicit form and never draws ε'. PDS stresses that "the ratio of the
time-varying weights of the two terms matters for the quality"; ``psi_scale`` / ``chi_scale``
expose that ratio.

``rule="balanced"`` changes two things, so that no ratio needs tuning (the fixed-point analysis is in
the README's 2D toy section):
- the edit term uses the conditional noise predictions only, scaled by the CFG scale s:
  s · (ε̂(x_t, y_tgt) − ε̂(x_t^src, y_src)). CFG's remaining part, (1 − s)(ε̂(x_t, ∅) − ε̂(x_t^src, ∅)),
  grows with the edit itself and pushes past the target (DDS "strays too far"); it is dropped, which
  also halves the network batch;
- the identity term ψ(t)(x0 − x0_src) loses its component along what the prompts change as the prior
  sees it, Δx̂0 = x̂0(x_t, y_tgt) − x̂0(x_t^src, y_src) (per sample; x̂0 from the conditional ε̂ by DDIM
  Eq. 9, so Δx̂0 = (x0 − x0_src) − √((1−ᾱ_t)/ᾱ_t) (ε̂_tgt − ε̂_src)). It holds every change the prompt
  does not ask for and no longer pulls the edit back (the undershoot of the reference ψ). Δx̂0 does not
  shrink as the edit arrives, where the edit term does: an earlier version projected on the edit term,
  and near the target, where that term is mostly the render's residual error, the identity term's pull
  back to the source survived and the edit stalled (README, edit benchmark).

``weighting`` sets how the t's are weighed against each other without touching ψ/χ at any t: the whole
gradient is scaled by w(t)/χ(t), so the edit term weighs w(t) (as in DDS and SDS) and the identity term
ψ(t)/χ(t) · w(t). The published gradient (None, or "chi") weighs the edit term by χ(t), i.e. by
χ(t)√(ᾱ_t/(1−ᾱ_t)) in x0, a weight that falls about 200x from t = 0.02 T to 0.98 T. Under Adam, whose
steps divide by the gradient's running RMS, those rare large small-t draws set the step size: at the start
of an edit the drift against the noise is about half of what 1 − ᾱ_t gives, so the edit arrives later.
But small t is where ψ/χ is largest and the prior's x̂0 is local, i.e. where the identity is held: with
1 − ᾱ_t an edit lost a pattern that χ(t) kept (README, edit benchmark).

With a prior whose CFG has more branches (InstructPix2Pix: text and image), "balanced" takes the
conditional branch with every part of the condition kept, s_T · (ε̂(x_t; c_T, c_I) − ε̂(x_t^src; ∅, c_I))
with s the text scale; the image scale s_I is not used (both sides carry the same source image, and the
identity term already holds the source). "reference" uses the prior's full CFG (:meth:`Prior.cfg`) in
both ε̂, as the published gradient does.
"""

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
    check_source,
    finish,
    per_sample,
    resolve_noise,
    weight,
)
from nerfstudio_distill.priors.base import CFG, Condition, Prior

PDS_SCHEDULES = ("reference", "consecutive")
"""Valid values of ``schedule`` in :func:`pds`."""
PDS_RULES = ("reference", "balanced")
"""Valid values of ``rule`` in :func:`pds` (module docstring)."""
PDS_WEIGHTING = "chi"
"""``weighting`` of :func:`pds` that keeps the published χ(t) on the edit term (as None does)."""


def pds_timesteps(
    prior: Prior,
    t: Int[Tensor, " B"] | int | None,
    batch: int,
    schedule: str,
    num_grid_steps: int,
    generator: torch.Generator | None,
) -> tuple[Int[Tensor, " B"], Int[Tensor, " B"]]:
    """(t, t') per element. t is drawn as grid[i], i ~ U[max(1, ⌊0.02 N⌋), ⌊0.98 N⌋) on the N-step grid
    (``prior.timestep_grid(N)``); t' = grid[i − 1] (``"reference"``) or t − 1 (``"consecutive"``)."""
    if schedule not in PDS_SCHEDULES:
        raise ValueError(
            f"unknown PDS schedule {schedule!r}: use one of {', '.join(map(repr, PDS_SCHEDULES))}"
        )
    grid = prior.timestep_grid(num_grid_steps)
    if t is None:
        lo, hi = max(1, int(0.02 * num_grid_steps)), max(2, int(0.98 * num_grid_steps))
        device = generator.device if generator is not None else None
        idx = torch.randint(lo, hi, (batch,), generator=generator, device=device).cpu()
        t = grid[idx]
    else:
        t = prior.check_timesteps(torch.as_tensor(t).cpu())
        t = t.expand(batch).clone() if t.numel() == 1 else t
        if t.numel() != batch:
            raise PriorInputError(
                f"got {t.numel()} timesteps for batch {batch}: pass one t, or one per element"
            )
    if schedule == "consecutive":
        if int(t.min()) < 1:
            raise PriorInputError(f"PDS consecutive needs t >= 1, got {t.tolist()}: pass t from 1 upwards")
        return t, t - 1
    on_grid = t[:, None] == grid[None, 1:]
    if not bool(on_grid.any(1).all()):
        raise PriorInputError(
            f"t={t.tolist()} is not on the {num_grid_steps}-step DDIM grid (past its first point): "
            f"use t from prior.timestep_grid({num_grid_steps})[1:], or pass t=None"
        )
    return t, grid[on_grid.int().argmax(1)]  # grid[i] for t = grid[i + 1]


def pds_coefficients(
    prior: Prior, t: Int[Tensor, " B"], t_prev: Int[Tensor, " B"], schedule: str = "reference"
) -> tuple[Float[Tensor, " B"], Float[Tensor, " B"]]:
    """ψ(t), χ(t) in float64 (module docstring). ``"consecutive"`` (t' = t − 1) gives ψ = 0 exactly:
    ᾱ_t = α_t ᾱ_t' so c0 + c1 √ᾱ_t = √ᾱ_t' (β_t + α_t (1 − ᾱ_t')) / (1−ᾱ_t)
    = √ᾱ_t' (1 − α_t ᾱ_t') / (1−ᾱ_t) = √ᾱ_t', hence the numerator of ψ vanishes; it is set to 0
    rather than left to float32 rounding of the schedule."""
    a, b = prior.alphas_cumprod.double(), prior.betas.double()
    dev = a.device
    a_t, a_p, beta = a[t.to(dev)], a[t_prev.to(dev)], b[t.to(dev)]
    c0 = a_p.sqrt() * beta / (1 - a_t)  # DDPM Eq. 7, coefficient of x̂0
    c1 = (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)  # DDPM Eq. 7, coefficient of x_t
    sigma = ((1 - a_p) / (1 - a_t) * beta).sqrt()  # DDPM Eq. 7, √β̃_t
    psi = (a_p.sqrt() - c0 - c1 * a_t.sqrt()) / sigma  # PDS ψ(t): weight of x0_tgt − x0_src
    if schedule == "consecutive":
        psi = torch.zeros_like(psi)
    chi = c0 * (1 - a_t).sqrt() / (a_t.sqrt() * sigma)  # PDS χ(t): weight of ε̂_tgt − ε̂_src
    return psi, chi


def along(
    v: Float[Tensor, " B *latent"], direction: Float[Tensor, " B *latent"]
) -> Float[Tensor, " B *latent"]:
    """The component of each sample of ``v`` along the same sample of ``direction`` (0 where it is 0)."""
    flat_v, flat_d = v.flatten(1), direction.flatten(1)
    norm2 = flat_d.pow(2).sum(1, keepdim=True)
    coef = (flat_v * flat_d).sum(1, keepdim=True) / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)
    return (coef * flat_d).reshape(v.shape)


def pds(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    x0_src: Float[Tensor, " B *latent"],
    prompt: str | Condition,
    prompt_src: str | Condition,
    *,
    t: Int[Tensor, " B"] | int | None = None,
    noise: Float[Tensor, " B *latent"] | None = None,
    guidance_scale: float | None = None,
    schedule: Literal["reference", "consecutive"] = "reference",
    num_grid_steps: int = 500,
    psi_scale: float = 1.0,
    chi_scale: float = 1.0,
    rule: Literal["reference", "balanced"] = "reference",
    weighting: str | None = None,
    generator: torch.Generator | None = None,
) -> GuidanceOutput:
    """∇_x0 L_PDS = psi_scale · ψ(t) (x0 − x0_src) + chi_scale · χ(t) (ε̂_tgt − ε̂_src) (module docstring).

    One ``predict_noise`` call (G = 2). ``"reference"`` equals the published z_tgt − z_src;
    ``"consecutive"`` uses t' = t − 1, where ψ ≡ 0 and only the ε̂ term remains.

    Args:
        prior: the diffusion prior.
        x0: latents being edited, from ``prior.encode`` (differentiable).
        x0_src: latents of the source images, same shape; no gradient.
        prompt: target text; must be non-empty.
        prompt_src: text describing the source images.
        t: timestep(s); for ``"reference"`` on ``prior.timestep_grid(num_grid_steps)`` past its first
            point, for ``"consecutive"`` any t ≥ 1; None draws from the grid.
        noise: ε for both x_t (ε' of x_t' cancels and is never drawn); None draws N(0, I).
        guidance_scale: CFG scale of both branches (InstructPix2Pix: the text scale); None uses the
            prior's default.
        schedule: ``"reference"`` (t' = previous grid point) or ``"consecutive"`` (t' = t − 1).
        num_grid_steps: N of the DDIM grid (PDS reference: 500).
        psi_scale: factor on ψ (identity-preservation term).
        chi_scale: factor on χ (editing term).
        rule: ``"reference"`` (the published gradient) or ``"balanced"`` (module docstring).
        weighting: None or ``"chi"`` (published): the edit term weighs χ(t). A name of
            :data:`~nerfstudio_distill.guidance.common.WEIGHTINGS`: the whole gradient is scaled by w(t)/χ(t),
            so the edit term weighs w(t) as in DDS/SDS and the identity term keeps its published ratio
            ψ(t)/χ(t) to it.
        generator: RNG for t and ε when they are drawn.
    """
    if rule not in PDS_RULES:
        raise PriorInputError(f"unknown PDS rule {rule!r}: use one of {', '.join(map(repr, PDS_RULES))}")
    check_prompt(prompt)
    x0_src = check_source(x0, x0_src)
    t, t_prev = pds_timesteps(prior, t, x0.shape[0], schedule, num_grid_steps, generator)
    noise = resolve_noise(x0, noise, generator)
    # x_t of target and source with the same ε (DDPM Eq. 4)
    x_t = torch.stack([add_noise(prior.alphas_cumprod, x, noise, t) for x in (x0.detach(), x0_src)])
    psi, chi = pds_coefficients(prior, t, t_prev, schedule)
    if weighting not in (None, PDS_WEIGHTING):  # the edit term weighs w(t); ψ/χ kept per t
        w = weight(weighting, prior.alphas_cumprod, t).to(chi) / chi
        psi, chi = w * psi, w * chi
    psi, chi = psi_scale * psi, chi_scale * chi
    identity = x0.detach() - x0_src
    if rule == "reference":
        # CFG ε̂ (Ho & Salimans Eq. 6): one network call
        eps = prior.predict_noise(x_t, t, [prompt, prompt_src], guidance_scale).to(x0.dtype)
        edit = eps[0] - eps[1]
    else:
        # conditional ε̂ only (one network call of batch 2), the difference scaled by s
        scale = prior.guidance_scale if guidance_scale is None else float(guidance_scale)
        eps = prior.predict_noise(x_t, t, [prompt, prompt_src], CFG.conditional()).to(x0.dtype)
        edit = scale * (eps[0] - eps[1])
        # what the prompts change, as the prior sees it: x̂0(x_t, y_tgt) − x̂0(x_t^src, y_src) (DDIM Eq. 9)
        a = prior.alphas_cumprod.double()
        changed = identity - per_sample(((1 - a) / a).sqrt(), t, x0) * (eps[0] - eps[1])
        identity = identity - along(identity, changed)
    # z_tgt − z_src = ψ(t) (x0_tgt − x0_src) + χ(t) (ε̂_tgt − ε̂_src)  (module docstring)
    grad = batchwise(psi, x0) * identity + batchwise(chi, x0) * edit
    return finish(
        x0, grad, t, noise=noise, x_t=x_t[0], eps=eps[0], eps_src=eps[1], psi=psi, chi=chi, t_prev=t_prev
    )
