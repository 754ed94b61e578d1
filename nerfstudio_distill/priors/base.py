"""The one interface every diffusion prior implements.

A prior hides its network. Guidance code (``nerfstudio_distill.guidance``) only ever
calls :meth:`Prior.encode`, :meth:`Prior.predict_noise`, :meth:`Prior.timestep_grid`
and reads :attr:`Prior.alphas_cumprod`, so Stable Diffusion and the closed-form exact
prior are interchangeable.

Conventions
- Images are ``B x 3 x H x W`` in [0, 1]. Latents are whatever ``encode`` returns.
- ``t`` is an integer training timestep in ``[0, num_train_timesteps)``, one per batch
  element.
- Each group of a call has a :class:`Condition`: its text, and optionally an image (latents of a
  conditioning image, which an image-conditioned prior such as InstructPix2Pix concatenates to the
  network input's channels) and a camera (:func:`camera_condition`: the camera-to-world matrix, one
  encoding for all priors). A plain string is the text-only condition.
- Classifier-free guidance is a :class:`CFG`: a list of :class:`Branch` es, each keeping some parts of
  the condition and dropping the rest. Two-branch text CFG and InstructPix2Pix's three-branch CFG are
  the same code. A dropped text is the empty prompt ``""``. A bare scale means the prior's own CFG at
  that scale (:meth:`Prior.cfg`): text CFG, or for InstructPix2Pix its three branches with the scale as
  the text one, so guidance methods pass one number whatever the prior.
- The network never records autograd; the only differentiable path is ``encode``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nerfstudio_distill.errors import PriorInputError, PriorLoadError

__all__ = [
    "CFG",
    "Branch",
    "Condition",
    "Prior",
    "PriorInputError",
    "camera_condition",
    "classifier_free_guidance",
    "instruction_conditions",
    "scaled_linear_betas",
]


def classifier_free_guidance(
    eps_uncond: Float[Tensor, "*bs"], eps_cond: Float[Tensor, "*bs"], scale: float
) -> Float[Tensor, "*bs"]:
    """ε̂ = ε̂(x_t, ∅) + s · (ε̂(x_t, y) − ε̂(x_t, ∅))  (Ho & Salimans 2022, Eq. 6)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass(frozen=True, eq=False)
class Condition:
    """What one group of a :meth:`Prior.predict_noise` call is conditioned on."""

    prompt: str = ""
    """The text ("" is the unconditional prompt)."""
    image: Float[Tensor, "b C h w"] | None = None
    """Latents of a conditioning image, one per batch element (b = B) or one for all (b = 1), as the
    prior expects them (InstructPix2Pix: the VAE latents of the source view, concatenated to x_t's
    channels). None: no image condition."""
    camera: Float[Tensor, "b D"] | None = None
    """A camera per batch element (b = B) or one for all (b = 1), encoded by :func:`camera_condition` (one
    encoding for every prior: the camera-to-world matrix in nerfstudio's convention, its top 3 x 4
    flattened row by row, D = 12). None: no camera condition."""


def camera_condition(c2w: Float[Tensor, "B 3 4"] | Float[Tensor, "B 4 4"]) -> Float[Tensor, "B 12"]:
    """The camera encoding of :attr:`Condition.camera`, shared by every prior and pipeline.

    ``c2w``: camera-to-world matrices in nerfstudio's convention (OpenGL camera axes: the camera looks
    down its −z, +y up; ``c2w[:, :3, 3]`` is the camera's position in world units), ``B x 3 x 4`` as in
    ``Cameras.camera_to_worlds``, or ``B x 4 x 4``. Returns ``c2w[:, :3, :4].reshape(B, 12)``: rotation
    and position, row by row (float32, detached, on ``c2w``'s device).
    """
    if c2w.ndim != 3 or c2w.shape[1] not in (3, 4) or c2w.shape[2] != 4:
        raise PriorInputError(
            f"camera-to-world matrices must be B x 3 x 4 (or B x 4 x 4), got shape {tuple(c2w.shape)}: "
            "pass cameras.camera_to_worlds"
        )
    return c2w[:, :3, :4].detach().float().reshape(c2w.shape[0], 12)


def instruction_conditions(instruction: str, image: Float[Tensor, "b C h w"]) -> tuple[Condition, Condition]:
    """The target and source conditions of an edit by a prior conditioned on images (InstructPix2Pix):
    the instruction and the empty instruction, both on ``image``, the condition latents of the unedited
    image (:meth:`Prior.encode_condition`). The source branch is DreamCatalyst's."""
    return Condition(instruction, image=image), Condition("", image=image)


@dataclass(frozen=True)
class Branch:
    """One network evaluation of a :class:`CFG`: the condition with some of its parts kept."""

    scale: float = 1.0
    """s_i on (ε̂_i − ε̂_{i−1}); unused for the first branch."""
    text: bool = True
    """Keep the prompt (False: the empty prompt "")."""
    image: bool = True
    """Keep the image condition (False: none)."""
    camera: bool = True
    """Keep the camera condition (False: none)."""

    def apply(self, condition: Condition) -> Condition:
        """The condition this branch evaluates."""
        return Condition(
            condition.prompt if self.text else "",
            condition.image if self.image else None,
            condition.camera if self.camera else None,
        )


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance over branches 0..k: ε̂ = ε̂_0 + Σ_{i≥1} s_i (ε̂_i − ε̂_{i−1}).

    Text CFG (Ho & Salimans 2022, Eq. 6) is [unconditional, conditional] with s_1 = s;
    InstructPix2Pix (Brooks et al. 2023, Eq. 3) is [(∅, ∅), (∅, image), (text, image)] with s_I, s_T.
    """

    branches: tuple[Branch, ...]
    """Branch 0 first; one network row per branch, group and batch element."""

    @classmethod
    def conditional(cls) -> CFG:
        """ε̂(x_t, c): the conditional branch alone, every part of the condition kept (no guidance)."""
        return cls((Branch(),))

    @classmethod
    def text(cls, scale: float) -> CFG:
        """ε̂(∅) + s (ε̂(y) − ε̂(∅)); scale 1 is the conditional branch alone (half the batch)."""
        if scale == 1.0:
            return cls.conditional()
        return cls((Branch(text=False, image=False, camera=False), Branch(scale=scale)))

    @classmethod
    def instruct(cls, text_scale: float, image_scale: float) -> CFG:
        """ε̂(∅, ∅) + s_I (ε̂(∅, c_I) − ε̂(∅, ∅)) + s_T (ε̂(c_T, c_I) − ε̂(∅, c_I)) (InstructPix2Pix Eq. 3);
        both scales 1 is the conditional branch alone (the sum telescopes to ε̂(c_T, c_I))."""
        if text_scale == 1.0 and image_scale == 1.0:
            return cls.conditional()
        return cls(
            (
                Branch(text=False, image=False),
                Branch(scale=image_scale, text=False),
                Branch(scale=text_scale),
            )
        )

    def combine(self, eps: Float[Tensor, " K *bs"]) -> Float[Tensor, " *bs"]:
        """ε̂ = ε̂_0 + Σ_{i≥1} s_i (ε̂_i − ε̂_{i−1}) from the branches' predictions stacked in order."""
        out = eps[0]
        for i in range(1, len(self.branches)):
            out = out + self.branches[i].scale * (eps[i] - eps[i - 1])
        return out


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Float[Tensor, " T"]:
    """Stable Diffusion's "scaled_linear" β schedule (linear in √β), in float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def check_device(device: str | torch.device | None, flag: str) -> None:
    """One-line :class:`~nerfstudio_distill.errors.PriorLoadError` naming ``flag`` when ``device`` is not a
    device of this machine (None: the default, always fine)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PriorLoadError(f"{flag} {device!r} is not a device: pass cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PriorLoadError(f"{flag} {device}: this machine has no usable CUDA GPU: pass cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PriorLoadError(
            f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s): pass cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PriorLoadError(f"{flag} {device}: MPS is not available here: pass cpu")


class Prior(nn.Module, abc.ABC):
    """Base class: subclasses implement ``encode``, ``_embed`` and ``_eps``.

    The batching of branches and classifier-free guidance live here, once, so every
    prior evaluates all branches of a step in exactly one network call.
    """

    betas: Float[Tensor, " T"]
    """Per-step β_t of the training schedule (float32, on the prior's device)."""
    alphas_cumprod: Float[Tensor, " T"]
    """ᾱ_t = Π_{s≤t} (1 − β_s) (float32, on the prior's device)."""
    guidance_scale: float
    """Default classifier-free guidance scale when a call gives none."""
    steps_offset: int
    """Offset added to DDIM grids, as in the model's scheduler config (SD: 1)."""
    size_multiple: int = 1
    """Image sides must be multiples of this (SD: 8, its VAE's downsampling factor)."""
    min_side: int = 1
    """Shortest image side the network takes (SD: 64 for SD 1.5, whose UNet halves 8 latent pixels 3 times)."""

    def __init__(self, betas: Float[Tensor, " T"], guidance_scale: float, steps_offset: int = 1) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float(), persistent=False)
        self.guidance_scale = float(guidance_scale)
        self.steps_offset = int(steps_offset)
        self._embedding_cache: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def timestep_grid(self, num_steps: int) -> Int[Tensor, " N"]:
        """Ascending DDIM grid of ``num_steps`` timesteps ("leading" spacing plus
        ``steps_offset``, as diffusers' ``DDIMScheduler.set_timesteps``)."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise PriorInputError(
                f"num_steps={num_steps} is outside [1, {self.num_train_timesteps}]: "
                "pick a grid size in that range"
            )
        ratio = self.num_train_timesteps // num_steps
        grid = torch.arange(num_steps, dtype=torch.long) * ratio + self.steps_offset
        return grid.clamp(max=self.num_train_timesteps - 1)

    def check_timesteps(self, t: Tensor) -> Int[Tensor, " B"]:
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps:
            raise PriorInputError(
                f"timestep(s) {t.tolist()} outside the schedule: "
                f"use integers in [0, {self.num_train_timesteps - 1}]"
            )
        return t

    # ------------------------------------------------------------------- images
    @abc.abstractmethod
    def encode(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Images in [0, 1] to latents, differentiably."""

    def decode(self, latents: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """Latents back to images in [0, 1] (for previews; no gradient needed)."""
        return latents.clamp(0, 1)

    @staticmethod
    def check_images(images: Tensor) -> None:
        """One-line errors for the usual mistakes with rendered images."""
        if images.ndim != 4:
            raise PriorInputError(
                f"images must be B x 3 x H x W, got shape {tuple(images.shape)}: "
                "add a batch dim with images[None]"
            )
        if images.shape[1] != 3:
            raise PriorInputError(
                f"images must have 3 channels (RGB) in dim 1, got {images.shape[1]}: "
                "drop alpha with images[:, :3] or permute B x H x W x 3 to B x 3 x H x W"
            )
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise PriorInputError(
                f"images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]: "
                "clamp them, or map [-1, 1] with (x + 1) / 2"
            )

    # ------------------------------------------------------------------ prompts
    @abc.abstractmethod
    def _embed(self, prompt: str) -> Tensor:
        """Condition for one prompt (text embedding, or a label mask). ``""`` = unconditional."""

    def embed(self, prompts: Sequence[str]) -> list[Tensor]:
        """Cached conditions: each distinct prompt is encoded once per prior."""
        out = []
        for p in prompts:
            if p not in self._embedding_cache:
                self._embedding_cache[p] = self._embed(p)
            out.append(self._embedding_cache[p])
        return out

    # ------------------------------------------------------------------ network
    takes_image: bool = False
    """Whether ``_eps`` takes an image condition (``images=``); a Condition with an image is refused else."""
    takes_camera: bool = False
    """Whether ``_eps`` takes a camera condition (``cameras=``); a Condition with a camera is refused else."""

    @abc.abstractmethod
    def _eps(self, x_t: Float[Tensor, " N *latent"], t: Int[Tensor, " N"], conds: Sequence[Tensor]) -> Tensor:
        """ONE network evaluation of ε̂ for a batch whose row i has text condition ``conds[i]``.

        Priors with ``takes_image`` / ``takes_camera`` also get ``images=`` / ``cameras=``: one entry per
        row, the row's image latents ``C x h x w`` / camera ``D``, or None where the row's branch drops
        it (each prior applies its own null condition, e.g. zeros for InstructPix2Pix). Neither keyword
        is passed when no group of the call has that condition. Returns float32 on the prior's device.
        Called without autograd.
        """

    def cfg(self, scale: float) -> CFG:
        """The CFG a bare scale means for this prior: two-branch text CFG at ``scale``. Priors with more
        branches override it (InstructPix2Pix: its three branches, ``scale`` being the text one)."""
        return CFG.text(scale)

    def encode_condition(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Images in [0, 1] to the image condition this prior takes (:attr:`Condition.image`), without
        gradient. Only priors with :attr:`takes_image` have one."""
        raise PriorInputError(
            f"{type(self).__name__} takes no image condition: use a prior conditioned on images "
            "(--pipeline.prior.kind instruct-pix2pix)"
        )

    def diffusion_loss(
        self,
        x0: Float[Tensor, " B *latent"],
        t: Int[Tensor, " B"],
        noise: Float[Tensor, " B *latent"],
        prompt: str | Condition,
    ) -> Float[Tensor, " B"]:
        """The network's per-sample training loss at x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, with autograd into its
        trainable parts (VSD's LoRA). Only priors with a trainable network have one."""
        raise PriorInputError(
            f"{type(self).__name__} has no network to train: VSD needs the Stable Diffusion prior "
            "(--pipeline.prior.kind stable-diffusion)"
        )

    def predict_noise(
        self,
        x_t: Float[Tensor, "G B *latent"],
        t: Int[Tensor, " B"],
        prompts: Sequence[str | Condition],
        guidance_scale: float | CFG | None = None,
    ) -> Float[Tensor, "G B *latent"]:
        """CFG noise prediction for G groups in one network call.

        Group g is ``x_t[g]`` under ``prompts[g]`` (a :class:`Condition`, or a string for text only).
        ``guidance_scale`` is a bare scale, which means :meth:`cfg` of it (text CFG; None: the prior's
        default scale; 1 runs the conditional branch alone), or a :class:`CFG` with any branches. The call has batch K·G·B for K branches:
        SDS uses G = 1 (2 branches); DDS and PDS use G = 2 (4 branches).
        Returns float32 on ``x_t``'s device, detached.
        """
        if isinstance(guidance_scale, CFG):
            cfg = guidance_scale
        else:
            cfg = self.cfg(self.guidance_scale if guidance_scale is None else float(guidance_scale))
        conditions = [c if isinstance(c, Condition) else Condition(c) for c in prompts]
        groups = x_t.shape[0]
        if len(conditions) != groups:
            raise PriorInputError(
                f"got {len(conditions)} prompts for {groups} groups: pass one prompt per group"
            )
        t = self.check_timesteps(t).to(self.device)
        batch = x_t.shape[1]
        if t.numel() == 1:
            t = t.expand(batch)
        out_device = x_t.device
        x = x_t.detach().to(self.device)
        # Rows: the last branch's groups first (the conditional one, as diffusers orders its batches).
        rows = [branch.apply(c) for branch in reversed(cfg.branches) for c in conditions]
        conds = [e for e in self.embed([c.prompt for c in rows]) for _ in range(batch)]
        extra = self._row_conditions(rows, batch)
        x_in = torch.cat([x] * len(cfg.branches)).flatten(0, 1)
        with torch.no_grad():
            eps = self._eps(x_in, t.repeat(len(rows)), conds, **extra).float()
        eps = eps.unflatten(0, (len(cfg.branches), groups, batch)).flip(0)  # branch 0 first
        return cfg.combine(eps).to(out_device)

    def _row_conditions(self, rows: Sequence[Condition], batch: int) -> dict[str, list[Tensor | None]]:
        """``images=`` / ``cameras=`` of ``_eps`` (one entry per network row) for the conditions that any
        row has; a one-line error when this prior cannot take them."""
        extra = {}
        for kind, takes in (("image", self.takes_image), ("camera", self.takes_camera)):
            values = [getattr(c, kind) for c in rows]
            if all(v is None for v in values):
                continue
            if not takes:
                raise PriorInputError(
                    f"{type(self).__name__} takes no {kind} condition: drop {kind}= from the Condition, or use "
                    f"a prior conditioned on {kind}s"
                )
            per_row: list[Tensor | None] = []
            for v in values:
                if v is not None and (v.ndim < 2 or v.shape[0] not in (1, batch)):
                    raise PriorInputError(
                        f"the {kind} condition has shape {tuple(v.shape)}: pass one {kind} per batch element "
                        f"({batch} x ...) or one for all (1 x ...)"
                    )
                per_row += [
                    None if v is None else v[b if v.shape[0] > 1 else 0].to(self.device) for b in range(batch)
                ]
            extra[f"{kind}s"] = per_row
        return extra
