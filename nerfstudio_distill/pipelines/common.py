"""Pieces every distillation pipeline shares: chunked differentiable rendering, the prior's input and
the NaN/Inf guard.

A guidance step renders whole images with autograd. A ray-based model (nerfacto) renders a bundle of
rays; when an image has more rays than ``chunk_size`` it is done in two passes: render without autograd,
get the gradient on the image from the guidance, then re-render chunk by chunk with autograd and push each
chunk's slice of that gradient (:func:`backward_in_chunks`), so memory stays bounded by the chunk size. A
model that rasterises whole images from a camera (Gaussian splats) renders the view in one pass
(:data:`WholeRender`).

On several GPUs (``--machine.num-devices N``) each rank does this for its own view(s), then the gradients
are averaged over the ranks before the optimizer step (:mod:`nerfstudio_distill.pipelines.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.models.base_model import Model
from nerfstudio.viewer.viewer_elements import ViewerParameter
from torch import Tensor

from nerfstudio_distill.errors import DistillError, PriorInputError
from nerfstudio_distill.guidance.config import Guidance, GuidanceConfig
from nerfstudio_distill.pipelines import distributed
from nerfstudio_distill.priors.base import Prior
from nerfstudio_distill.priors.config import PriorConfig

Regularizers = Callable[[dict[str, Any]], dict[str, Tensor]]
"""Model outputs of some rays -> named, already weighted regulariser losses of those rays."""

WholeRender = Callable[[], dict[str, Any]]
"""Renders a whole view with autograd in one pass and returns the model outputs as ``H x W x C`` images
(Gaussian splats: ``model.get_outputs(camera)``, cut to the crop)."""

Guide = Callable[[Float[Tensor, "B C h w"], dict[str, Any]], tuple[Tensor, Tensor, dict[str, Any]]]
"""(latents of the render, render outputs) -> (surrogate loss, guidance gradient on the latents, metrics):
the method-specific middle of :meth:`TrainingPrior.guidance_step`."""

Anchor = Callable[[Float[Tensor, "*shape 1"], Float[Tensor, "*shape 3"]], Tensor]
"""(the render's accumulated opacity, the guidance gradient on the render) -> an image-space loss on the
opacity (:meth:`TrainingPrior.guidance_step`'s ``anchor``)."""


def render_in_chunks(model: Model, rays: RayBundle, chunk_size: int, with_grad: bool) -> dict[str, Any]:
    """Render a ``*shape`` bundle in chunks; tensor outputs reshaped to ``*shape x C``.

    With a single chunk in training mode, nerfacto's ``weights_list``/``ray_samples_list`` are passed
    through (flat), for :func:`~nerfstudio_distill.models.regularizers.nerfacto_regularizers`.
    """
    shape = rays.shape
    flat = rays.flatten()
    chunks = []
    with torch.set_grad_enabled(with_grad):
        for start in range(0, len(flat), chunk_size):
            chunks.append(model(flat[start : start + chunk_size]))
    outputs: dict[str, Any] = {}
    first = min(len(flat), chunk_size)
    for key, value in chunks[0].items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == first:
            outputs[key] = torch.cat([c[key] for c in chunks]).reshape(*shape, -1)
    if len(chunks) == 1 and "weights_list" in chunks[0]:  # nerfacto returns them in training mode
        outputs.update(weights_list=chunks[0]["weights_list"], ray_samples_list=chunks[0]["ray_samples_list"])
    return outputs


def backward_in_chunks(
    model: Model,
    rays: RayBundle,
    grads: dict[str, Float[Tensor, "*shape C"]],
    chunk_size: int,
    regularizers: Regularizers | None = None,
    grad_scaler: Any = None,
) -> None:
    """Second pass: re-render each chunk with autograd and backpropagate its slice of each gradient in
    ``grads`` (output name -> the gradient on that output image, e.g. "rgb"), plus the chunk's share of the
    regularisers."""
    flat = rays.flatten()
    flat_grads = {key: grad.reshape(-1, grad.shape[-1]) for key, grad in grads.items()}
    n = len(flat)
    for start in range(0, n, chunk_size):
        out = model(flat[start : start + chunk_size])
        share = len(out[next(iter(grads))]) / n
        loss = sum((out[key] * grad[start : start + chunk_size]).sum() for key, grad in flat_grads.items())
        if regularizers is not None:
            loss = loss + share * sum(regularizers(out).values())
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()


def prior_size(height: int, width: int, size: int | None, multiple: int = 1) -> tuple[int, int]:
    """Size of an ``height x width`` render at the prior's input: short side scaled to ``size`` (None: as
    it is), then each side rounded to a multiple of ``multiple`` (SD's VAE needs 8)."""
    if size is not None and min(height, width) != size:
        factor = size / min(height, width)
        height, width = round(height * factor), round(width * factor)
    return tuple(max(multiple, round(side / multiple) * multiple) for side in (height, width))


def to_prior(
    image: Float[Tensor, "*batch H W C"], size: int | None, multiple: int = 1
) -> Float[Tensor, "B 3 h w"]:
    """Renders (``H x W x C`` or ``B x H x W x C``) to the prior's input: RGB in [0, 1], channels first,
    resized bilinearly to :func:`prior_size` (not at all when that is their size)."""
    x = image[..., :3].clamp(0, 1)
    x = (x[None] if x.ndim == 3 else x).permute(0, 3, 1, 2)
    target = prior_size(*x.shape[-2:], size, multiple)
    if target != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x


def check_model_numbers(model: Any, names: tuple[str, ...] = ()) -> None:
    """One-line error for a loss weight (every ``*_mult`` field of the model config) or one of ``names``
    that is not a finite number >= 0."""
    fields = [n for n in vars(model) if n.endswith("_mult")] + list(names)
    for name in fields:
        value = getattr(model, name)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise DistillError(
                f"--pipeline.model.{name.replace('_', '-')} is {value}: pass a finite number >= 0"
            )


def first_non_finite(named: dict[str, Tensor]) -> str | None:
    """Name of the first tensor in ``named`` with a NaN/Inf, else None."""
    return next((name for name, value in named.items() if not torch.isfinite(value).all()), None)


def grads_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient accumulated in ``module`` is finite."""
    return all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def live_prompt(prior: Prior, typed: str, current: str, prompts_of: Callable[[str], list[str]]) -> str:
    """The prompt to use now: ``typed`` (from the viewer panel) once the prior can take every prompt it
    leads to (``prompts_of(typed)``), else ``current``.

    The viewer sends the text on every keystroke, so a prompt being typed arrives letter by letter; the
    exact prior refuses prompts it has no images for. Either way training keeps the current prompt (with
    a warning) instead of crashing, and takes the new one when it is complete.
    """
    typed = typed.strip()
    if not typed or typed == current:
        return current
    try:
        prior.embed(prompts_of(typed))
    except PriorInputError as err:
        warnings.warn(f"keeping the prompt {current!r}: {err}", RuntimeWarning, stacklevel=2)
        return current
    return typed


class TrainingPrior:
    """Pipeline mixin: the diffusion prior, built only when training (``ns-train``; never by ``ns-export``
    or ``ns-viewer``) and kept outside the module tree, so its weights never enter checkpoints; the
    guidance training step both pipelines share (:meth:`guidance_step`); the skipping of a step whose
    render, gradient or loss is not finite (:meth:`skip_step`); and, on several GPUs, the explicit
    averaging of gradients over the ranks (:meth:`_setup_ranks`)."""

    skip_reason: str | None = None
    """Why the last step was skipped (None: it was not); DistillTrainer counts skipped steps."""
    world_size: int = 1
    """Processes training together (``--machine.num-devices``); above 1 see :meth:`_setup_ranks`."""
    rank: int = 0
    """This process's global rank: it seeds the step's draws (:meth:`step_generator`)."""
    guidance: Guidance
    """The guidance method and the settings in use (a module: its parameters, if any, train and are saved)."""
    _refused_viewer_values: str | None = None
    """The error of the last viewer values refused (warned about once)."""

    def _setup_ranks(self, world_size: int) -> None:
        """Call once the pipeline's modules are built. Several processes (nerfstudio passes ``world_size``,
        which our pipelines keep from VanillaPipeline so it builds no DDP wrapper): every rank takes rank 0's
        parameters and buffers, draws its own views and noise (:meth:`step_generator`), and averages its
        gradients with the others' in every step (:meth:`_backward_and_average`); see
        :mod:`nerfstudio_distill.pipelines.distributed`."""
        self.world_size = world_size
        self.rank = distributed.rank() if world_size > 1 else 0
        if world_size > 1:
            distributed.broadcast_module(self)

    def step_generator(self, step: int, rank: int | None = None) -> torch.Generator:
        """The generator of step ``step``'s draws on ``rank`` (default: this process's), from
        ``--pipeline.seed``."""
        return distributed.step_generator(self.config.seed, step, self.rank if rank is None else rank)

    def _sync_viewer_inputs(self, panel: torch.nn.Module) -> None:
        """Several processes: the values of ``panel``'s inputs become rank 0's, the only rank with a viewer."""
        if self.world_size <= 1:
            return
        inputs = [e for e in vars(panel).values() if isinstance(e, ViewerParameter) and not e.disabled]
        values = distributed.broadcast_objects([e.value for e in inputs])
        for element, value in zip(inputs, values, strict=True):
            if element.value != value:
                element.value = value

    def _backward_and_average(
        self, losses: dict[str, Tensor], reason: str | None, backward: bool
    ) -> tuple[dict[str, Tensor], str | None]:
        """Several processes: backpropagate the sum of ``losses`` here (``backward``; the trainer would do it
        after we return, too late to average), then average every trainable parameter's gradient over the
        ranks. Returns the losses for the trainer to log (detached leaves: its own backward then does
        nothing) and the reason to skip the step: ``reason``, or another rank's (all ranks skip together)."""
        if backward and reason is None:
            total = functools.reduce(torch.add, losses.values())  # as the trainer sums them
            with torch.autocast(device_type=total.device.type, enabled=False):
                (self.grad_scaler.scale(total) if self.grad_scaler is not None else total).backward()
        params = [p for p in self.parameters() if p.requires_grad]
        if distributed.average_gradients(params, skip=reason is not None) and reason is None:
            reason = "another rank's render, guidance gradient or loss has NaN/Inf"
        return {name: value.detach().requires_grad_() for name, value in losses.items()}, reason

    def _setup_guidance(self, config: GuidanceConfig, prior: PriorConfig) -> None:
        """Build :attr:`guidance` (after :meth:`_setup_prior`); it gets the prior only when training. A CFG
        scale of None becomes the prior's default (:attr:`PriorConfig.default_guidance_scale`) in the
        settings in use, so the viewer shows the number that is applied."""
        if config.guidance_scale is None:
            config = dataclasses.replace(config, guidance_scale=prior.default_guidance_scale)
        self.guidance = config.setup(self.__dict__.get("_prior"))

    def get_param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """nerfstudio's param groups, plus "guidance" when the guidance method has trainable parameters."""
        groups = super().get_param_groups()
        params = [p for p in self.guidance.parameters() if p.requires_grad]
        if params:
            groups["guidance"] = params
        return groups

    def apply_viewer_values(self, **values: Any) -> GuidanceConfig:
        """The guidance settings in use, with the viewer's ``values`` (field names; dotted for nested ones,
        e.g. ``timesteps.min_fraction``) applied to a copy that must pass ``check()`` before it replaces
        them. Values no run can use keep the settings in use, with one warning (until they change); the
        pipeline's config is never written."""
        current = self.guidance.config
        candidate = copy.deepcopy(current)
        for name, value in values.items():
            *path, last = name.split(".")
            setattr(functools.reduce(getattr, path, candidate), last, value)
        if candidate == current:
            return current
        try:
            candidate.check()
        except DistillError as err:
            if str(err) != self._refused_viewer_values:
                warnings.warn(
                    f"viewer values refused, keeping the settings in use: {err}", RuntimeWarning, stacklevel=2
                )
                self._refused_viewer_values = str(err)
            return current
        self._refused_viewer_values = None
        self.guidance.config = candidate
        return candidate

    def skip_step(self, step: int, reason: str, outputs: dict[str, Any], metrics: dict[str, Any]):
        """Drop this step's gradients and return a zero loss, with a RuntimeWarning naming step and reason."""
        for p in self.parameters():
            p.grad = None
        self.skip_reason = reason
        warnings.warn(f"step {step}: {reason}; step skipped", RuntimeWarning, stacklevel=3)
        zero = torch.zeros((), device=self.device, requires_grad=True)
        return outputs, {"guidance": zero}, metrics

    def guidance_step(
        self,
        step: int,
        rays: RayBundle | WholeRender,
        guide: Guide,
        *,
        output: str,
        regularizers: Regularizers,
        anchor: Anchor | None = None,
    ):
        """One guidance training step, as ``get_train_loss_dict`` returns it: render ``rays`` (``*shape``;
        or call a :data:`WholeRender`), encode the ``output`` image with autocast off (the guidance picks its
        precision), ``guide`` it, skip the step on a NaN/Inf render, gradient or loss, then backpropagate
        ``guidance_weight`` x the guidance loss plus ``regularizers``: in one pass with autograd, or for rays
        in two (render, then chunk by chunk, see :func:`backward_in_chunks`) when the render has more rays
        than ``chunk_size``. The guidance's own losses (:meth:`Guidance.pop_losses`: VSD's LoRA loss) join the
        returned losses as they are (not times ``guidance_weight``). ``prior_resolution``, ``chunk_size`` and ``guidance_weight`` are the pipeline
        config's. On several processes the backward is done here and the gradients averaged over the ranks
        (:meth:`_backward_and_average`).

        ``anchor`` (edits): an image-space loss on the render's "accumulation" output, given it and the
        guidance gradient on the image; the step then takes the gradient on the image first and
        backpropagates both image gradients into the model (in one pass as the surrogate
        Σ image·gradient, whose gradient is the same)."""
        chunk_size, prior_resolution = self.config.chunk_size, self.config.prior_resolution
        if isinstance(rays, RayBundle):
            single_pass = math.prod(rays.shape) <= chunk_size
            outputs = render_in_chunks(self.model, rays, chunk_size, with_grad=single_pass)
        else:
            single_pass = True
            outputs = rays()
        split = anchor is not None or not single_pass  # take the gradient on the image first
        keys = [output, "accumulation"] if anchor is not None else [output]
        leaves = {key: outputs[key].detach().requires_grad_(True) for key in keys} if split else {}
        image = leaves[output] if split else outputs[output]
        with torch.autocast(device_type=image.device.type, enabled=False):
            latents = self.prior.encode(to_prior(image.float(), prior_resolution, self.prior.size_multiple))
            loss, grad, metrics = guide(latents, outputs)
        # the guidance's own losses (VSD: its LoRA's), backpropagated by the trainer into its parameters only
        own = {name: value.to(image.device) for name, value in self.guidance.pop_losses().items()}

        loss = loss.to(image.device) * self.config.guidance_weight
        losses: dict[str, Tensor] = {}
        reason = None
        if not torch.isfinite(image).all():
            reason = "the render has NaN/Inf (the field has diverged)"
        elif not torch.isfinite(grad).all():
            reason = "the guidance gradient has NaN/Inf"
        elif not split:
            losses = {"guidance": loss, **regularizers(outputs), **own}
            bad = first_non_finite(losses)
            reason = None if bad is None else f"the {bad} is NaN/Inf"
        elif (bad := first_non_finite({"guidance loss": loss, **own})) is not None:
            reason = f"the {bad} is NaN/Inf"
        else:
            grads = {output: torch.autograd.grad(loss, image)[0]}
            if anchor is not None:
                opacity = leaves["accumulation"]
                anchor_loss = anchor(opacity, grads[output])
                grads["accumulation"] = torch.autograd.grad(anchor_loss, opacity)[0]
                metrics["opacity_anchor"] = anchor_loss.detach()
            if single_pass:  # the surrogate has the same gradient; the trainer backpropagates it
                surrogate = sum((outputs[key] * grad).sum() for key, grad in grads.items())
                losses = {"guidance": surrogate, **regularizers(outputs), **own}
                bad = first_non_finite(losses)
                reason = None if bad is None else f"the {bad} is NaN/Inf"
            else:
                scaler = self.grad_scaler
                backward_in_chunks(self.model, rays, grads, chunk_size, regularizers, scaler)
                losses = {"guidance": torch.zeros((), device=image.device, requires_grad=True), **own}
        if self.world_size > 1:
            losses, reason = self._backward_and_average(losses, reason, backward=single_pass)
        if reason is not None:
            return self.skip_step(step, reason, outputs, metrics)
        if (self.world_size > 1 or not single_pass) and not grads_finite(self.model):
            return self.skip_step(step, "the field's gradients have NaN/Inf", outputs, metrics)
        return outputs, losses, metrics

    def _setup_prior(self, config: PriorConfig, device: str, training: bool) -> None:
        self.__dict__["_prior"] = config.setup(device=str(device)) if training else None

    @property
    def prior(self) -> Prior:
        if self.__dict__.get("_prior") is None:
            raise DistillError(
                "the prior is only loaded for training (ns-train), not by ns-export or ns-viewer"
            )
        return self.__dict__["_prior"]
