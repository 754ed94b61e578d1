"""Pieces shared by every guidance method: noising, weightings, timestep sampling, the output type.

Notation (DDPM, Ho et al. 2020): ᾱ_t = Π_{s≤t} (1 − β_s); x0 are latents from ``prior.encode``;
``t`` is an integer timestep per batch element. Nothing here calls a network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.errors import DistillError, PriorInputError
from nerfstudio_distill.priors.base import Condition, Prior

WEIGHTINGS = ("sds", "uniform", "fantasia", "sqrt")
"""Valid names for :func:`weight`."""

ANNEALS = ("constant", "linear", "sqrt", "step")
"""Valid values of :attr:`TimestepSchedule.anneal`."""


@dataclass
class GuidanceOutput:
    """What a guidance call returns. Only ``grad``, ``loss`` and ``t`` are always set.

    ``loss`` is the surrogate ``(x0 * grad).sum()`` (see :func:`surrogate_loss`): backpropagating it
    puts exactly ``grad`` on x0. Its value is not a distance; log :attr:`grad_norm` instead.
    """

    grad: Float[Tensor, " B *latent"]
    """Gradient on x0, detached, same shape and dtype as x0."""
    loss: Float[Tensor, ""]
    """Surrogate scalar whose gradient w.r.t. x0 equals ``grad``."""
    t: Int[Tensor, " B"]
    """Timestep used for each batch element."""
    noise: Float[Tensor, " B *latent"] | None = None
    """ε used for x_t (SDS, DDS, PDS) or the inversion-implied ε_inv (SDI)."""
    x_t: Float[Tensor, " B *latent"] | None = None
    """Noisy target latents fed to the prior."""
    eps: Float[Tensor, " B *latent"] | None = None
    """CFG ε̂ of the target branch."""
    eps_src: Float[Tensor, " B *latent"] | None = None
    """CFG ε̂ of the source branch (DDS, PDS)."""
    weight: Float[Tensor, " B"] | None = None
    """w(t) applied (SDS, SDI, DDS)."""
    psi: Float[Tensor, " B"] | None = None
    """PDS ψ(t), coefficient of (x0 − x0_src), ``psi_scale`` included."""
    chi: Float[Tensor, " B"] | None = None
    """PDS χ(t), coefficient of (ε̂_tgt − ε̂_src), ``chi_scale`` included."""
    t_prev: Int[Tensor, " B"] | None = None
    """PDS previous timestep."""
    eps_lora: Float[Tensor, " B *latent"] | None = None
    """VSD: ε̂_φ, the camera-conditioned LoRA's prediction at x_t (CFG over the camera included)."""
    train_loss: Float[Tensor, ""] | None = None
    """VSD: the loss of the guidance's own trainable network (the LoRA's diffusion loss on the detached
    x0), with autograd into it; backpropagate it beside ``loss``. None for the stateless methods."""

    @property
    def grad_norm(self) -> Float[Tensor, ""]:
        """L2 norm of ``grad`` over the whole batch (a readout for logging)."""
        return self.grad.norm()


# --------------------------------------------------------------------------- schedule maths
def batchwise(v: Float[Tensor, " B"], like: Tensor) -> Tensor:
    """``v`` reshaped to ``B x 1 x ... x 1`` to broadcast against ``like``, in its dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def per_sample(values: Float[Tensor, " T"], t: Int[Tensor, " B"], like: Tensor) -> Tensor:
    """``values[t]`` shaped by :func:`batchwise`."""
    return batchwise(values[t.to(values.device)], like)


def add_noise(
    alphas_cumprod: Float[Tensor, " T"],
    x0: Float[Tensor, " B *latent"],
    noise: Float[Tensor, " B *latent"],
    t: Int[Tensor, " B"],
) -> Float[Tensor, " B *latent"]:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε  (DDPM, Ho et al. 2020, Eq. 4)."""
    a = alphas_cumprod.double()
    return per_sample(a.sqrt(), t, x0) * x0 + per_sample((1 - a).sqrt(), t, x0) * noise


def predict_x0(
    alphas_cumprod: Float[Tensor, " T"],
    x_t: Float[Tensor, " B *latent"],
    eps: Float[Tensor, " B *latent"],
    t: Int[Tensor, " B"],
) -> Float[Tensor, " B *latent"]:
    """x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  (Tweedie; DDIM, Song et al. 2021, Eq. 9)."""
    a = alphas_cumprod.double()
    return (x_t - per_sample((1 - a).sqrt(), t, x_t) * eps) / per_sample(a.sqrt(), t, x_t)


def ddim_step(
    x: Float[Tensor, " B *latent"],
    eps: Float[Tensor, " B *latent"],
    a_from: Float[Tensor, " B"],
    a_to: Float[Tensor, " B"],
) -> Float[Tensor, " B *latent"]:
    """Deterministic DDIM move of x from ᾱ = ``a_from`` to ᾱ = ``a_to`` with noise estimate ε̂:
    x̂0 = (x − √(1−ᾱ_from) ε̂)/√ᾱ_from (DDIM Eq. 9), x' = √ᾱ_to x̂0 + √(1−ᾱ_to) ε̂ (DDIM Eq. 12, η = 0).
    Towards more noise it is DDIM inversion, towards less it is DDIM sampling; ᾱ = 1 means clean."""
    x0_hat = (x - batchwise((1 - a_from).sqrt(), x) * eps) / batchwise(a_from.sqrt(), x)
    return batchwise(a_to.sqrt(), x) * x0_hat + batchwise((1 - a_to).sqrt(), x) * eps


def weight(name: str, alphas_cumprod: Float[Tensor, " T"], t: Int[Tensor, " B"]) -> Float[Tensor, " B"]:
    """Timestep weighting w(t) (float64, on ``alphas_cumprod``'s device).

    - ``"sds"``: 1 − ᾱ_t (DreamFusion, Poole et al. 2023, Eq. 3 with w(t) = σ_t²).
    - ``"uniform"``: 1 (DDS, Hertz et al. 2023).
    - ``"fantasia"`` (alias ``"sqrt"``): √ᾱ_t · (1 − ᾱ_t) (Fantasia3D's weighting as in threestudio).
    """
    a = alphas_cumprod.double()[t.to(alphas_cumprod.device)]
    if name == "sds":
        return 1 - a
    if name == "uniform":
        return torch.ones_like(a)
    if name in ("fantasia", "sqrt"):
        return a.sqrt() * (1 - a)
    raise ValueError(f"unknown weighting {name!r}: use one of {', '.join(map(repr, WEIGHTINGS))}")


# ------------------------------------------------------------------------------- timesteps
@dataclass
class TimestepSchedule:
    """Uniform t in [min, max(progress)] as fractions of the prior's T, with optional annealing of max.

    - ``"constant"``: max stays ``max_fraction``.
    - ``"linear"``: max = max_fraction − (max_fraction − final_max_fraction) · progress.
    - ``"sqrt"``: max = max_fraction − (max_fraction − final_max_fraction) · √progress
      (the fast-then-slow decrease of DreamTime / threestudio's ``sqrt_anneal``).
    - ``"step"``: max = max_fraction until progress ``step_at``, then final_max_fraction (ProlificDreamer:
      t ~ U(0.02, 0.98) for its first 5000 steps, then U(0.02, 0.5)).
    """

    min_fraction: float = 0.02
    """Lowest timestep as a fraction of T (DreamFusion: 0.02)."""
    max_fraction: float = 0.98
    """Highest timestep at progress 0 (DreamFusion: 0.98)."""
    anneal: Literal["constant", "linear", "sqrt"] = "constant"
    """How the highest timestep moves with training progress."""
    final_max_fraction: float = 0.5
    """Highest timestep at progress 1 (ignored when ``anneal="constant"``)."""
    step_at: float = 0.5
    """With ``anneal="step"``: the training progress (step / max steps) at which the highest timestep drops
    to final_max_fraction."""

    def check(self, flag: str = "--pipeline.guidance.timesteps.") -> None:
        """One-line error naming the flags (``flag`` + name) for a range no run can use. Called by
        :meth:`sample` and by the configs' checks (not at construction, so the CLIs can report it)."""
        if self.anneal not in ANNEALS:
            raise DistillError(f"{flag}anneal {self.anneal!r}: use one of {', '.join(map(repr, ANNEALS))}")
        lo, hi, end = self.min_fraction, self.max_fraction, self.final_max_fraction
        if not 0.0 <= lo <= hi <= 1.0:  # also false for NaN
            raise DistillError(
                f"{flag}min-fraction {lo} and {flag}max-fraction {hi}: use 0 <= min-fraction <= max-fraction "
                "<= 1 (e.g. 0.02 and 0.98)"
            )
        if not 0.0 <= self.step_at <= 1.0:  # also false for NaN
            raise DistillError(f"{flag}step-at {self.step_at}: pass a training progress in [0, 1]")
        if self.anneal != "constant" and not lo <= end <= hi:
            raise DistillError(
                f"{flag}final-max-fraction {end} is outside [{lo}, {hi}] (min-fraction, max-fraction): pick a "
                f"final max between them, or use {flag}anneal constant"
            )

    def max_fraction_at(self, progress: float) -> float:
        """Highest timestep fraction at ``progress`` in [0, 1] (step / max_steps)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress={progress} is outside [0, 1]: pass min(step / max_steps, 1)")
        drop = self.max_fraction - self.final_max_fraction
        if self.anneal == "linear":
            return self.max_fraction - drop * progress
        if self.anneal == "sqrt":
            return self.max_fraction - drop * math.sqrt(progress)
        if self.anneal == "step":
            return self.max_fraction if progress < self.step_at else self.final_max_fraction
        return self.max_fraction

    def bounds(self, progress: float = 0.0, num_train_timesteps: int = 1000) -> tuple[int, int]:
        """Inclusive integer range [t_min, t_max] sampled at ``progress``."""
        hi = min(int(self.max_fraction_at(progress) * num_train_timesteps), num_train_timesteps - 1)
        lo = min(int(self.min_fraction * num_train_timesteps), hi)
        return lo, hi

    def sample(
        self,
        batch: int,
        progress: float = 0.0,
        generator: torch.Generator | None = None,
        num_train_timesteps: int = 1000,
    ) -> Int[Tensor, " B"]:
        """Draw ``batch`` timesteps uniformly from :meth:`bounds` (CPU LongTensor).

        Args:
            batch: number of timesteps (one per batch element).
            progress: training progress in [0, 1] that drives the annealing.
            generator: optional CPU ``torch.Generator`` for reproducible draws.
            num_train_timesteps: T of the prior (``prior.num_train_timesteps``).
        """
        self.check()
        lo, hi = self.bounds(progress, num_train_timesteps)
        device = generator.device if generator is not None else None
        return torch.randint(lo, hi + 1, (batch,), generator=generator, device=device).cpu()


def resolve_timesteps(
    prior: Prior, t: Tensor | int | None, batch: int, generator: torch.Generator | None
) -> Int[Tensor, " B"]:
    """Explicit ``t`` (scalar or one per element) checked against the prior, or a draw from the default
    :class:`TimestepSchedule` (U[0.02 T, 0.98 T], DreamFusion)."""
    if t is None:
        return TimestepSchedule().sample(batch, 0.0, generator, prior.num_train_timesteps)
    t = prior.check_timesteps(torch.as_tensor(t).cpu())
    if t.numel() == 1:
        return t.expand(batch).clone()
    if t.numel() != batch:
        raise PriorInputError(f"got {t.numel()} timesteps for batch {batch}: pass one t, or one per element")
    return t


def resolve_noise(
    x0: Tensor, noise: Tensor | None, generator: torch.Generator | None, name: str = "noise"
) -> Float[Tensor, " B *latent"]:
    """Explicit ε (shape-checked, cast to x0's dtype) or ε ~ N(0, I) from ``generator``."""
    if noise is None:
        device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise PriorInputError(
            f"{name} has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}: pass one ε per latent"
        )
    return noise.detach().to(device=x0.device, dtype=x0.dtype)


def check_prompt(prompt: str | Condition, name: str = "prompt") -> None:
    """A target prompt must be non-empty text ("" is the unconditional branch, not a target); for a
    :class:`~nerfstudio_distill.priors.base.Condition`, its text."""
    text = prompt.prompt if isinstance(prompt, Condition) else prompt
    if not isinstance(text, str) or not text.strip():
        raise PriorInputError(
            f"{name}={prompt!r} is empty: '' means unconditional and is not a valid target; "
            "pass the text to distil"
        )


def check_source(x0: Tensor, x0_src: Tensor) -> Tensor:
    """Source latents must match x0; they never get a gradient."""
    if x0_src.shape != x0.shape:
        raise PriorInputError(
            f"x0_src has shape {tuple(x0_src.shape)} but x0 has {tuple(x0.shape)}: "
            "encode the source images the same way"
        )
    return x0_src.detach().to(device=x0.device, dtype=x0.dtype)


# ------------------------------------------------------------------------------------ loss
def surrogate_loss(x0: Float[Tensor, " B *latent"], grad: Float[Tensor, " B *latent"]) -> Float[Tensor, ""]:
    """L = Σ x0 · sg(grad), so ∂L/∂x0 = grad exactly (the backward of a product is ``1 · grad``).

    Chosen over ½‖x0 − sg(x0 − grad)‖², whose gradient x0 − (x0 − grad) is only equal up to rounding.
    """
    return (x0 * grad.detach()).sum()


def clip_grad(
    grad: Float[Tensor, " B *latent"], max_value: float | None = None, max_norm: float | None = None
) -> Float[Tensor, " B *latent"]:
    """Clamp each entry to [−max_value, max_value] and/or rescale each element's L2 norm to ≤ max_norm.

    NaNs pass through unchanged (no ``nan_to_num``): a NaN is the caller's to see.
    """
    if max_value is not None:
        grad = grad.clamp(-max_value, max_value)
    if max_norm is not None:
        norm = grad.flatten(1).norm(dim=1).reshape(-1, *([1] * (grad.ndim - 1)))
        grad = grad * (max_norm / norm).clamp(max=1.0)
    return grad


def finish(
    x0: Tensor,
    grad: Tensor,
    t: Tensor,
    grad_clip: float | None = None,
    grad_clip_mode: Literal["value", "norm"] = "value",
    **extras: Tensor,
) -> GuidanceOutput:
    """Optional clipping, cast to x0's dtype, surrogate loss: the common tail of every method."""
    if grad_clip is not None:
        if grad_clip_mode not in ("value", "norm"):
            raise ValueError(f"unknown grad_clip_mode {grad_clip_mode!r}: use 'value' or 'norm'")
        grad = clip_grad(grad, **{f"max_{grad_clip_mode}": grad_clip})
    grad = grad.detach().to(x0.dtype)
    return GuidanceOutput(grad=grad, loss=surrogate_loss(x0, grad), t=t.to(x0.device), **extras)
