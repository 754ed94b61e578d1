"""User-facing guidance options (one dataclass, shown by tyro as ``--pipeline.guidance.*``).

:class:`GuidanceConfig` turns the options into a call of :func:`~.sds.sds`, :func:`~.sdi.sdi`,
:func:`~.dds.dds`, :func:`~.pds.pds` or :func:`~.vsd.vsd`, so pipelines never branch on the method themselves.
``GuidanceConfig.setup(prior)`` builds the :class:`Guidance` module a pipeline holds: the seam for methods
with state (:class:`VSDGuidance` and its trainable LoRA score); SDS/SDI/DDS/PDS have none.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nerfstudio_distill.errors import DistillError
from nerfstudio_distill.guidance.common import WEIGHTINGS, GuidanceOutput, TimestepSchedule
from nerfstudio_distill.guidance.dds import dds
from nerfstudio_distill.guidance.pds import PDS_WEIGHTING, pds
from nerfstudio_distill.guidance.sdi import sdi
from nerfstudio_distill.guidance.sds import sds
from nerfstudio_distill.guidance.vsd import vsd
from nerfstudio_distill.priors.base import Condition, Prior


class Guidance(nn.Module):
    """A guidance method as a pipeline holds it: its settings (:attr:`config`) and its state, if any.

    Its parameters and buffers join the pipeline's checkpoints, and its parameters the optimizer under
    the param group "guidance" (give the method config an ``optimizers["guidance"]`` entry). This base
    class has none: SDS, SDI, DDS and PDS are stateless functions. A stateful method subclasses it and
    names the subclass in its :class:`Method` entry. The prior is passed to every call and never stored
    here, so its weights stay out of checkpoints.
    """

    def __init__(self, config: GuidanceConfig, prior: Prior | None) -> None:
        """``prior`` is None where nothing trains (ns-export, ns-viewer): build only what a checkpoint holds."""
        super().__init__()
        self.config = config
        """The settings in use (the viewer may swap in a checked copy)."""

    def forward(
        self,
        prior: Prior,
        x0: Float[Tensor, " B *latent"],
        prompt: str | Condition,
        **kwargs,
    ) -> GuidanceOutput:
        """One guidance evaluation with the settings in use (see :meth:`GuidanceConfig.__call__`)."""
        return self.config(prior, x0, prompt, **kwargs)

    def pop_losses(self) -> dict[str, Tensor]:
        """Losses of the method's own parameters from the calls since the last pop, by name, for the trainer to
        backpropagate beside the guidance loss (VSD: its LoRA's); empty for stateless methods."""
        return {}


class VSDGuidance(Guidance):
    """VSD with its state: the camera-conditioned LoRA ε̂_φ of the prior's UNet (adapters and camera
    embedding, :class:`~nerfstudio_distill.priors.camera_lora.CameraLora`), trained each step on the renders
    by the loss :func:`~.vsd.vsd` returns as ``train_loss``.

    The LoRA is added to the prior given here (when training); the module holds its parameters, so they
    join the optimizer ("guidance" group) and the checkpoints, adapters and embedding only. Without a prior
    (ns-export, ns-viewer) it holds nothing: the checkpoint's guidance entries are not needed to render.
    """

    def __init__(self, config: GuidanceConfig, prior: Prior | None) -> None:
        super().__init__(config, prior)
        self.lora: nn.Module | None = None
        """The CameraLora trained here (None without a prior)."""
        self._train_losses: list[tuple[Tensor, int]] = []
        if prior is None:
            return
        if not hasattr(prior, "add_camera_lora"):
            raise DistillError(
                f"--pipeline.guidance.method vsd trains a LoRA of the prior's UNet; {type(prior).__name__} has "
                "none: use --pipeline.prior.kind stable-diffusion"
            )
        from nerfstudio_distill.priors.lora import LoraSpec

        self.lora = prior.add_camera_lora(LoraSpec(rank=config.lora_rank), seed=0)

    def forward(
        self,
        prior: Prior,
        x0: Float[Tensor, " B *latent"],
        prompt: str | Condition,
        **kwargs,
    ) -> GuidanceOutput:
        """One VSD evaluation; its LoRA loss is kept for :meth:`pop_losses` (batch-weighted over the calls
        of a step)."""
        if self.lora is None or getattr(prior, "camera_lora", None) is not self.lora:
            raise DistillError(
                "this VSD guidance was built for another prior: pass the prior given to setup()"
            )
        out = super().forward(prior, x0, prompt, **kwargs)
        if out.train_loss is not None:
            self._train_losses.append((out.train_loss, x0.shape[0]))
        return out

    def pop_losses(self) -> dict[str, Tensor]:
        """{"vsd_lora": the mean LoRA loss of the calls since the last pop} (empty if none)."""
        losses, self._train_losses = self._train_losses, []
        if not losses:
            return {}
        total = sum(n for _, n in losses)
        return {"vsd_lora": sum(loss * (n / total) for loss, n in losses)}


@dataclass(frozen=True)
class Method:
    """What the pipelines need to know of a guidance method, so none of them branches on its name."""

    run: Callable[..., GuidanceOutput]
    """The guidance function: ``run(prior, x0, [x0_src,] prompt, [prompt_src,] t=, guidance_scale=,
    generator=, **options)``."""
    needs_source: bool = False
    """Takes the unedited view's latents and prompt (x0_src, prompt_src) after x0 and the prompt."""
    edits: bool = False
    """Usable to edit a trained scene (pds-edit, dds-edit, sds-edit)."""
    uses_inversion: bool = False
    """Finds its noise by DDIM inversion (several network calls per step)."""
    grid_timesteps: bool = False
    """Snaps t to its DDIM grid (``GuidanceConfig.num_grid_steps``) unless the schedule is consecutive."""
    needs_camera: bool = False
    """Takes each view's camera (VSD: its LoRA is conditioned on it), which only text to 3D has."""
    options: dict[str, str] = field(default_factory=dict)
    """Keyword of ``run`` -> the GuidanceConfig field passed to it."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Keyword of ``run`` -> this library's default where it differs from the function's own (the
    published one): used when the option's GuidanceConfig field is None."""
    module: type[Guidance] = Guidance
    """What ``GuidanceConfig.setup`` builds: a :class:`Guidance` subclass for a method with state."""


METHODS: dict[str, Method] = {
    "sds": Method(sds, edits=True, options={"weighting": "weighting", "grad_clip": "grad_clip"}),
    "sdi": Method(
        sdi,
        uses_inversion=True,
        options={
            "weighting": "weighting",
            "grad_clip": "grad_clip",
            "inversion_guidance_scale": "inversion_guidance_scale",
            "num_inversion_steps": "num_inversion_steps",
            "inversion_eta": "inversion_eta",
        },
    ),
    "dds": Method(dds, needs_source=True, edits=True, options={"weighting": "weighting"}),
    "pds": Method(
        pds,
        needs_source=True,
        edits=True,
        grid_timesteps=True,
        options={
            "schedule": "pds_schedule",
            "num_grid_steps": "num_grid_steps",
            "psi_scale": "psi_scale",
            "chi_scale": "chi_scale",
            "rule": "pds_rule",
            "weighting": "weighting",
        },
        # DDS's w(t) on the edit term, not the published χ(t): under Adam χ(t)'s rare, heavy small-t draws
        # set the step size and the edit arrived later; uniform was never behind χ(t) on the mean of the
        # five benchmark scenes (+0.3 to +2.7 dB) and kept every pattern it kept (README, edit benchmark)
        defaults={"weighting": "uniform"},
    ),
    "vsd": Method(
        vsd,
        needs_camera=True,
        module=VSDGuidance,
        options={
            "weighting": "weighting",
            "grad_clip": "grad_clip",
            "lora_guidance_scale": "lora_guidance_scale",
            "camera_dropout": "camera_dropout",
        },
    ),
}
"""The one table of guidance methods (``--pipeline.guidance.method``), by name."""

MethodName = Literal["sds", "sdi", "dds", "pds", "vsd"]
"""The names of :data:`METHODS`, for tyro's choices (a test keeps the two equal)."""


def method_names(edits: bool | None = None, needs_source: bool | None = None) -> list[str]:
    """Names of the methods with these properties (None: either), in table order."""
    return [
        name
        for name, m in METHODS.items()
        if edits in (None, m.edits) and needs_source in (None, m.needs_source)
    ]


@dataclass
class GuidanceConfig:
    """Which score-distillation gradient drives the scene, and its knobs."""

    method: MethodName = "pds"
    """sds: w(t)(ε̂ − ε) (DreamFusion). sdi: SDS with the noise found by DDIM inversion. dds: ε̂_tgt − ε̂_src
    (Delta Denoising Score). pds: ψ(t)(x0 − x0_src) + χ(t)(ε̂_tgt − ε̂_src) (Posterior Distillation Sampling).
    vsd: w(t)(ε̂ − ε̂_φ), ε̂_φ a camera-conditioned LoRA of the prior trained on the renders (ProlificDreamer;
    text to 3D only)."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale of every branch. None: the prior's default, 7.5 for Stable Diffusion
    (--pipeline.prior.stable-diffusion.guidance-scale) and 1 for the exact prior, whose conditional score
    is exact. With InstructPix2Pix it is the text scale (default 7.5); its image scale is
    --pipeline.prior.instruct-pix2pix.image-guidance-scale. Raise it (SDS text-to-3D: 50-100) for stronger, less diverse edits; 1 disables CFG and
    halves the network batch."""
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    """Range of diffusion timesteps t (fractions of T) and its annealing over training. Lower max_fraction
    for finer, more local edits; PDS snaps t to its DDIM grid."""
    weighting: Literal["sds", "uniform", "fantasia", "sqrt", "chi"] | None = None
    """w(t): 1−ᾱ_t ("sds"), 1 ("uniform"), √ᾱ_t(1−ᾱ_t) ("fantasia"/"sqrt") or, pds only, its published χ(t)
    ("chi"). None: "sds" for sds, sdi and vsd, "uniform" for dds and pds (the published ones, except PDS's
    χ(t)).
    With pds, w(t) is the weight of the edit term ε̂_tgt − ε̂_src, and the identity term keeps the published
    ratio ψ(t)/χ(t) to it. "uniform" is DDS's; "chi" (published) weighs small t most, which under Adam
    halves the edit's drift against its noise, so the edit arrives later; "sds" arrives sooner still but
    lost a pattern the prompt does not concern on one benchmark seed (README, edit benchmark)."""
    grad_clip: float | None = None
    """Clip the sds/sdi gradient on the latents to [−c, c]; None: no clipping."""
    psi_scale: float = 1.0
    """PDS: factor on ψ(t), the identity-preservation term. Below 1 lets the edit move further from the
    source; 0 reduces PDS to DDS with PDS's χ(t) weighting."""
    chi_scale: float = 1.0
    """PDS: factor on χ(t), the editing term ε̂_tgt − ε̂_src."""
    pds_rule: Literal["reference", "balanced"] = "balanced"
    """PDS: "balanced" (default) takes the edit term from the conditional ε̂ only, times the CFG scale, and
    drops the part of the identity term ψ(t)(x0 − x0_src) along what the prompts change as the prior sees
    it (x̂0 under the target minus x̂0 under the source), so the edit neither stops short (the reference ψ)
    nor overshoots (CFG), with no ratio to tune. "reference" is the published gradient
    ψ(t)(x0 − x0_src) + χ(t)(ε̂_tgt − ε̂_src) with CFG in both ε̂."""
    pds_schedule: Literal["reference", "consecutive"] = "reference"
    """PDS: "reference" uses t_prev = previous point of the DDIM grid, as the published code (ψ > 0);
    "consecutive" uses t_prev = t − 1, where ψ vanishes exactly."""
    num_grid_steps: int = 500
    """PDS: size N of the DDIM timestep grid (published: 500)."""
    num_inversion_steps: int = 10
    """SDI: DDIM inversion steps from x0 to x_t; each costs one network call."""
    inversion_guidance_scale: float = -7.5
    """SDI: CFG scale during inversion (SDI paper: −7.5)."""
    inversion_eta: float = 0.0
    """SDI: stochasticity added to each inversion step (0: deterministic DDIM)."""
    lora_rank: int = 4
    """VSD: rank of the LoRA ε̂_φ on the UNet's attention projections (threestudio's ProlificDreamer: 4,
    diffusers' LoRAAttnProcessor default). Its learning rate is --optimizers.guidance.optimizer.lr."""
    lora_guidance_scale: float = 1.0
    """VSD: CFG scale of ε̂_φ over the camera (camera against the null camera; threestudio: 1, the camera
    branch alone, one network row fewer)."""
    camera_dropout: float = 0.1
    """VSD: probability that a guidance call's LoRA loss (the views of a step that share a prompt) sees the
    null camera instead of the views' (threestudio: 0.1), so that ε̂_φ also learns the camera-free
    prediction a LoRA CFG scale other than 1 needs."""

    @property
    def spec(self) -> Method:
        """The table entry of :attr:`method`."""
        return METHODS[self.method]

    def setup(self, prior: Prior | None = None) -> Guidance:
        """The module a pipeline holds (see :class:`Guidance`), with a copy of these settings."""
        return self.spec.module(copy.deepcopy(self), prior)

    def check(self) -> None:
        """One-line errors (a warning for a negative CFG scale) for options no run can use."""
        flag = "--pipeline.guidance."
        if self.method not in METHODS:
            raise DistillError(
                f"{flag}method {self.method!r} is not a method: use one of {', '.join(METHODS)}"
            )
        for name in ("guidance_scale", "psi_scale", "chi_scale", "inversion_guidance_scale", "inversion_eta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise DistillError(f"{flag}{name.replace('_', '-')} is {value}: pass a finite number")
        for name in ("psi_scale", "chi_scale", "inversion_eta"):
            if getattr(self, name) < 0:
                raise DistillError(
                    f"{flag}{name.replace('_', '-')} is {getattr(self, name)}: pass 0 or more (0 switches the term off)"
                )
        if self.weighting == PDS_WEIGHTING and self.method != "pds":
            raise DistillError(
                f"{flag}weighting {PDS_WEIGHTING!r} is PDS's own: pick one of {', '.join(WEIGHTINGS)} for {self.method}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise DistillError(
                f"{flag}grad-clip is {self.grad_clip}: pass a positive bound, or None for no clipping"
            )
        if self.num_grid_steps < 2:
            raise DistillError(
                f"{flag}num-grid-steps is {self.num_grid_steps}: pass 2 or more (published: 500)"
            )
        if self.lora_rank < 1:
            raise DistillError(f"{flag}lora-rank is {self.lora_rank}: pass 1 or more (ProlificDreamer: 4)")
        if not 0.0 <= self.camera_dropout <= 1.0:  # also false for NaN
            raise DistillError(f"{flag}camera-dropout is {self.camera_dropout}: pass a probability in [0, 1]")
        if not math.isfinite(self.lora_guidance_scale):
            raise DistillError(
                f"{flag}lora-guidance-scale is {self.lora_guidance_scale}: pass a finite number"
            )
        if self.num_inversion_steps < 1:
            raise DistillError(f"{flag}num-inversion-steps is {self.num_inversion_steps}: pass 1 or more")
        self.timesteps.check(flag + "timesteps.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            warnings.warn(
                f"{flag}guidance-scale is {self.guidance_scale}: a negative CFG scale pushes renders away from "
                "the prompt; pass a positive scale (1 disables CFG) unless that is what you want",
                UserWarning,
                stacklevel=2,
            )

    def sample_t(self, prior: Prior, batch: int, progress: float, generator=None) -> Int[Tensor, " B"]:
        """t for this step: uniform in the (annealed) range; for PDS snapped to its grid past point 0."""
        t = self.timesteps.sample(batch, progress, generator, prior.num_train_timesteps)
        if not self.spec.grid_timesteps or self.pds_schedule == "consecutive":
            return t.clamp(min=1)
        grid = prior.timestep_grid(self.num_grid_steps)
        index = (t[:, None] - grid[None, :]).abs().argmin(1).clamp(min=1)
        return grid[index]

    def __call__(
        self,
        prior: Prior,
        x0: Float[Tensor, " B *latent"],
        prompt: str | Condition,
        *,
        x0_src: Float[Tensor, " B *latent"] | None = None,
        prompt_src: str | Condition = "",
        progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> GuidanceOutput:
        """One guidance evaluation at a t drawn for ``progress`` (step / max steps, in [0, 1])."""
        spec = self.spec
        t = self.sample_t(prior, x0.shape[0], progress, generator)
        # an option left at None takes the table's default, else the function's own (its published one)
        options = {}
        for kw, name in spec.options.items():
            value = getattr(self, name)
            value = spec.defaults.get(kw) if value is None else value
            if value is not None:
                options[kw] = value
        args: tuple = (x0, prompt)
        if spec.needs_source:
            if x0_src is None:
                raise ValueError(f"{self.method} needs source latents: pass x0_src (the unedited images)")
            args = (x0, x0_src, prompt, prompt_src)
        return spec.run(prior, *args, t=t, guidance_scale=self.guidance_scale, generator=generator, **options)
