"""SDEdit (Meng et al., ICLR 2022): re-noise an image a little, then denoise it under a prompt.

Used by the edit pipeline's dataset update (Instruct-NeRF2NeRF's iterative dataset update): the
refinement stage of the guidance edits, as the PDS paper does after its PDS stage, and the whole of
``in2n-edit``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError
from nerfstudio_distill.guidance.common import add_noise, check_prompt, ddim_step, resolve_noise
from nerfstudio_distill.priors.base import Condition, Prior


def sdedit(
    prior: Prior,
    x0: Float[Tensor, " B *latent"],
    prompt: str | Condition,
    *,
    strength: float = 0.3,
    num_steps: int = 10,
    guidance_scale: float | None = None,
    noise: Float[Tensor, " B *latent"] | None = None,
    generator: torch.Generator | None = None,
) -> Float[Tensor, " B *latent"]:
    """x_{t0} ~ q(x_{t0} | x0) with t0 = strength·(T−1) (DDPM Eq. 4), then ``num_steps`` deterministic
    DDIM steps (Eq. 12, η = 0) down to a clean sample under ``prompt`` (``num_steps`` prior calls).

    Args:
        prior: the diffusion prior.
        x0: latents to edit (read only).
        prompt: target text; must be non-empty.
        strength: how far to re-noise, as a fraction of T (SDEdit's t0); small keeps more of x0.
        num_steps: DDIM steps from t0 back to 0.
        guidance_scale: CFG scale; None uses the prior's default.
        noise: ε of the re-noising; None draws N(0, I).
        generator: RNG for ``noise`` when drawn.
    """
    check_prompt(prompt)
    if not 0.0 < strength <= 1.0 or num_steps < 1:
        raise PriorInputError(
            f"sdedit strength={strength}, num_steps={num_steps}: use 0 < strength <= 1 and num_steps >= 1"
        )
    batch = x0.shape[0]
    t0 = round(strength * (prior.num_train_timesteps - 1))
    steps = torch.linspace(t0, 0, num_steps + 1).round().long()  # s_0 = t0 > ... > s_K = 0
    a = prior.alphas_cumprod.double()
    noise = resolve_noise(x0, noise, generator)
    x = add_noise(prior.alphas_cumprod, x0.detach(), noise, steps[:1].expand(batch))
    for k in range(num_steps):
        eps = prior.predict_noise(x[None], steps[k].expand(batch), [prompt], guidance_scale)[0].to(x.dtype)
        a_to = a[steps[k + 1]] if k + 1 < num_steps else torch.ones((), dtype=a.dtype, device=a.device)
        x = ddim_step(x, eps, a[steps[k]].expand(batch), a_to.expand(batch))  # towards less noise
    return x
