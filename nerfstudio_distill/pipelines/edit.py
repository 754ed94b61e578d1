"""Text-driven editing of a trained scene: one edit pipeline with two modes (``mode``), for two scene
representations (the model config): nerfacto (``*-edit``) and Gaussian splats (``*-splatfacto``).

``distill`` (``pds-edit``, ``dds-edit``, ``sds-edit``; only ``guidance.method`` differs): each step renders
one training view with gradients, encodes it, asks the guidance function for the gradient on the latents,
and backpropagates it into the field, with the opacity anchor (``opacity_tolerance``) holding the view's
opacity at the scene's before the edit. The source branch (DDS/PDS) is the view's original image, encoded
once and cached. With an image-conditioned prior (InstructPix2Pix) every branch is also conditioned on the
view's original image: the target prompt is the instruction, and the source branch of DDS/PDS is the empty
instruction with that same image (as DreamCatalyst does). An optional refinement stage (the last
``refine_steps`` steps) then runs the dataset update below, as the PDS paper does after PDS; it first
replaces every training image by a render of the distilled scene.

``dataset-update`` (``in2n-edit``): the whole run is the dataset update, Instruct-NeRF2NeRF's method,
starting from the original photos.

The dataset update (:meth:`EditPipeline._update_step`) is shared by both: every ``refine_every`` steps the
next training image, in turn, is replaced by an SDEdit of its render (re-noised to ``refine_strength``·T,
fixed or drawn from a range, then denoised under the target prompt; with InstructPix2Pix conditioned on
the view's original image), and the scene trains on those images with the model's photometric losses
(nerfacto's; splatfacto's L1 + SSIM, with its densification).

Where the representation matters (:attr:`EditPipeline.whole_views`): nerfacto renders a view's rays
(:meth:`EditDataManager.view_rays`), in chunks, with nerfacto's proposal and distortion regularisers;
Gaussian splats render a view's camera (:meth:`EditFullImageDataManager.view_camera`) whole, in one
differentiable pass at ``render_scale``, a crop being a slice of that render, with no regulariser; their
densification runs only in the refinement stage
(:class:`~nerfstudio_distill.models.edit_splatfacto.EditSplatfactoModel`).

The prior is built only when training (never by ``ns-export``/``ns-viewer``) and is kept outside
the module tree, so its weights never enter checkpoints.

On N GPUs (``--machine.num-devices N``) each rank distils its own view per step and the gradients are
averaged (:mod:`nerfstudio_distill.pipelines.distributed`); the dataset update edits N views per update,
one per rank, and every rank receives all of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import DataManagerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.viewer.viewer_elements import ViewerNumber, ViewerText
from torch import Tensor, nn

from nerfstudio_distill.data.edit_datamanager import (
    EditDataManager,
    EditDataManagerConfig,
    EditFullImageDataManager,
)
from nerfstudio_distill.errors import DistillError
from nerfstudio_distill.guidance.config import GuidanceConfig, method_names
from nerfstudio_distill.guidance.sdedit import sdedit
from nerfstudio_distill.models.edit_nerfacto import EditNerfactoModelConfig
from nerfstudio_distill.models.edit_splatfacto import EditSplatfactoModel
from nerfstudio_distill.models.regularizers import nerfacto_regularizers
from nerfstudio_distill.pipelines import distributed
from nerfstudio_distill.pipelines.common import (
    Anchor,
    TrainingPrior,
    WholeRender,
    check_model_numbers,
    first_non_finite,
    live_prompt,
    prior_size,
    render_in_chunks,
    to_prior,
)
from nerfstudio_distill.pipelines.trainer import dataparser_outputs
from nerfstudio_distill.priors.base import Condition, instruction_conditions
from nerfstudio_distill.priors.config import PriorConfig, warn_unused_source_prompt


@dataclass
class EditPipelineConfig(VanillaPipelineConfig):
    """Edit a trained scene so its views match a target prompt."""

    _target: type = field(default_factory=lambda: EditPipeline)
    datamanager: DataManagerConfig = field(default_factory=EditDataManagerConfig)
    """Serves whole training views, their original images and cameras: rays for nerfacto
    (EditDataManagerConfig), cameras and full images for Gaussian splats (EditFullImageDataManagerConfig)."""
    model: ModelConfig = field(default_factory=EditNerfactoModelConfig)
    """The scene model; must match the settings of the base run (nerfacto for *-edit, splatfacto for
    *-splatfacto). Both edit models add a "source_rgb" output (the scene before the edit) for the viewer's
    split screen."""
    target_prompt: str = ""
    """What the edited scene should show, e.g. "a photo of a man in a suit". Required. With
    --pipeline.prior.kind instruct-pix2pix it is the instruction, e.g. "turn him into a clown", and each
    view is edited conditioned on its original image."""
    source_prompt: str = ""
    """What the scene shows now, e.g. "a photo of a man" (the source branch of DDS/PDS). Empty: the
    unconditional prompt. Unused with instruct-pix2pix, whose source branch is the empty instruction
    conditioned on the view's original image (as DreamCatalyst)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Which distillation gradient (pds, dds, sds) and its options. In dataset-update mode only its
    guidance-scale is used (the SDEdit's CFG)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The diffusion model that judges the renders. instruct-pix2pix conditions every branch on the view's
    original image, with three-branch CFG: --pipeline.guidance.guidance-scale is its text scale and
    --pipeline.prior.instruct-pix2pix.image-guidance-scale its image scale."""
    prior_resolution: int | None = 512
    """Short side, in pixels, of the images given to the prior (renders are resized bilinearly). 512
    suits SD 1.5; None feeds renders at their own size (the exact prior needs that)."""
    render_scale: float = 1.0
    """Fraction of a view's resolution rendered per step (0.5: half width and height). Lower is faster
    and lighter; the render is then upsampled to prior_resolution. Gaussian splats render the whole view
    at this scale in one pass."""
    crop_size: int | None = None
    """Render a random square crop of this many pixels (of the scaled view) instead of the whole
    view. None: whole view. Gaussian splats rasterise the whole scaled view and cut the crop from it (the
    guidance sees the crop; the cost is the whole view's)."""
    chunk_size: int = 16384
    """nerfacto: rays rendered at once. Larger renders are done in two passes (render, then backpropagate
    chunk by chunk), so memory stays bounded by this number. Unused by Gaussian splats (one pass)."""
    guidance_weight: float = 1.0
    """Multiplier of the guidance gradient on the render."""
    opacity_tolerance: float | None = 0.1
    """Opacity anchor: each guided view's opacity (nerfacto's accumulation, the splats' alpha) is held at the
    scene's before the edit by the loss ½·k·Σ(opacity − opacity_before)² over the render's pixels, with k =
    the guidance gradient's mean per-pixel norm / this tolerance: an opacity change of this size is pulled
    back as hard as the guidance pushes an average pixel, whatever the prior's gradient scale. It stops the
    guidance from changing a colour by thinning the surface (a hole shows the background, a shortcut to a
    darker colour that wrecks the shape); shapes can still change where rays stay opaque. None: off (for
    edits that must make things appear or vanish against an empty background). pds-edit and pds-splatfacto
    default to None: PDS's identity term holds the scene to its photos. A resumed edit holds the
    opacity it resumed with. Not used by the dataset update (photometric)."""
    mode: Literal["distill", "dataset-update"] = "distill"
    """distill: every step distils the prior's guidance (--pipeline.guidance.method) into the field, then
    the optional refinement stage (--pipeline.refine-steps). dataset-update (ns-train in2n-edit): the whole
    run is Instruct-NeRF2NeRF's iterative dataset update. The training images start as the original
    photos; every --pipeline.refine-every steps the next one is replaced by an SDEdit of its render under
    the target prompt (with instruct-pix2pix conditioned on the view's original image; with a text-only
    prior, stable-diffusion or exact, a plain SDEdit of the render), and the scene trains on them with the
    model's photometric losses (nerfacto's; splatfacto's). Of --pipeline.guidance only guidance-scale is
    used there."""
    refine_steps: int = 0
    """distill mode: run the last refine_steps of --max-num-iterations as the refinement stage (the dataset
    update, starting from renders of the distilled scene). 0: no refinement. Gaussian splats densify only
    in this stage (splatfacto's strategy, its warm-up and intervals counted from the stage's first step)."""
    refine_every: int = 10
    """Dataset update: replace one training image, the next in turn, every this many steps (IN2N's edit
    rate)."""
    refine_strength: float | tuple[float, float] = 0.3
    """Dataset update: how far each SDEdit re-noises the render, as a fraction of T (SDEdit's t0; small keeps
    more of the render). Two numbers (min max): each update draws it uniformly from that range, seeded by
    --pipeline.seed and the step (IN2N: 0.02 0.98)."""
    refine_denoise_steps: int = 10
    """Dataset update: DDIM steps of each SDEdit denoising (one prior call each; IN2N: 20)."""
    seed: int = 0
    """Seed of the view, crop, timestep and noise draws (on N GPUs each rank adds its rank, so ranks draw
    different views)."""

    def check(self, trainer: TrainerConfig) -> None:
        """Called by DistillTrainer before anything is written: see :func:`check_edit`."""
        check_edit(self, trainer)

    @property
    def base_method(self) -> str:
        """The nerfstudio method whose runs this edit starts from (``--load-dir``): splatfacto for a
        Gaussian-splat model, nerfacto otherwise. DistillTrainer checks the base run against it."""
        return "splatfacto" if isinstance(self.model, SplatfactoModelConfig) else "nerfacto"


class DistillationPanel(nn.Module):
    """Controls in the viewer's "Distillation" folder (the attribute name is the folder label)."""

    def __init__(self, config: EditPipelineConfig, g: GuidanceConfig) -> None:
        """``g``: the guidance settings in use (a CFG scale of None already resolved to the prior's)."""
        super().__init__()
        self.target_prompt = ViewerText(
            "Target prompt", config.target_prompt, hint="Used from the next step on"
        )
        self.guidance_scale = ViewerNumber(
            "CFG scale", g.guidance_scale, hint="Classifier-free guidance (InstructPix2Pix: the text scale)"
        )
        self.psi_scale = ViewerNumber("PDS psi scale", g.psi_scale, hint="Identity-preservation term")
        self.chi_scale = ViewerNumber("PDS chi scale", g.chi_scale, hint="Editing term")
        self.prompt_in_use = ViewerText("Prompt in use", "-", disabled=True, hint="Target of the last step")
        self.t = ViewerText("Current t", "-", disabled=True)
        self.loss = ViewerText("Guidance |grad|", "-", disabled=True)


class EditPipeline(TrainingPrior, VanillaPipeline):
    """See the module docstring."""

    config: EditPipelineConfig
    datamanager: EditDataManager | EditFullImageDataManager

    def __init__(
        self, config: EditPipelineConfig, device: str, test_mode: str = "val", **kwargs: Any
    ) -> None:
        training = test_mode == "val"
        if training:
            check_prompts(config)
        world_size = kwargs.pop("world_size", 1)  # no DDP wrapper: see _setup_ranks
        super().__init__(config, device, test_mode=test_mode, world_size=1, **kwargs)
        self.grad_scaler = kwargs.get("grad_scaler")
        # The base run learned the camera poses from photos; guidance must not move them.
        self.model.camera_optimizer.requires_grad_(False)
        self.register_buffer("edit_start_step", torch.tensor(-1, dtype=torch.long))
        self._setup_prior(config.prior, device, training)
        self._setup_guidance(config.guidance, config.prior)
        self.Distillation = DistillationPanel(config, self.guidance.config)
        if training:  # the prior knows its prompts (the exact prior refuses unknown ones)
            self.prior.embed([config.target_prompt.strip(), config.source_prompt.strip()])
        self._source_latents: dict[tuple[int, bool], Tensor] = {}
        self._opacity_before: dict[tuple[int, float], Tensor] = {}
        self._num_steps = 1
        self._update_started = False
        self._prompt = config.target_prompt.strip()
        """The target prompt in use (the panel's, once the prior can take it)."""
        self._setup_ranks(world_size)

    # --------------------------------------------------------------- schedule
    def start_edit(self, start_step: int, num_steps: int) -> None:
        """Called by the trainer once the checkpoint is loaded (a resumed run keeps its start)."""
        if int(self.edit_start_step) < 0:
            self.edit_start_step.fill_(start_step)
            # the weights are still the base's: keep them for the viewer's source_rgb
            if hasattr(self.model, "keep_source"):
                self.model.keep_source()
        self._num_steps = max(num_steps, 1)
        if isinstance(self.model, EditSplatfactoModel):  # densify only in the photometric stage
            start = self._update_start()
            self.model.densify_from = None if start is None else int(self.edit_start_step) + start

    @property
    def whole_views(self) -> bool:
        """Whether the model renders whole views from a camera in one pass (Gaussian splats) rather than
        rays (nerfacto)."""
        return isinstance(self.model, SplatfactoModel)

    def _stage_step(self, step: int) -> int:
        return step - max(int(self.edit_start_step), 0)

    def _update_start(self) -> int | None:
        """Stage step at which the dataset update starts: 0 in dataset-update mode, the refinement stage's
        first step in distill mode, None without refinement."""
        if self.config.mode == "dataset-update":
            return 0
        if self.config.refine_steps > 0:
            return self._num_steps - self.config.refine_steps
        return None

    # -------------------------------------------------------------- training
    def get_train_loss_dict(self, step: int):
        self._sync_viewer_inputs(self.Distillation)
        start = self._update_start()
        if start is not None and self._stage_step(step) >= start:
            return self._update_step(step, self._stage_step(step) - start)
        rng = self.step_generator(step)
        index = int(torch.randint(self.datamanager.num_train_views, (1,), generator=rng))
        rays, crop, scale = self._view(index, rng)
        panel = self.Distillation
        settings = self._viewer_guidance()
        stage_steps = max(self._num_steps - self.config.refine_steps, 1)
        progress = min(max(self._stage_step(step) / stage_steps, 0.0), 1.0)

        def guide(latents: Tensor, outputs: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
            source = self._source(index, crop, scale) if settings.spec.needs_source else None
            self._prompt = live_prompt(self.prior, panel.target_prompt.value, self._prompt, lambda p: [p])
            prompt, prompt_src = self._conditions(self._prompt, index, crop, scale)
            out = self.guidance(
                self.prior,
                latents,
                prompt,
                x0_src=source,
                prompt_src=prompt_src,
                progress=progress,
                generator=rng,
            )
            metrics = {"guidance_grad_norm": out.grad_norm.detach(), "guidance_t": out.t.float().mean()}
            if out.psi is not None:
                metrics.update(psi=out.psi.float().mean(), chi=out.chi.float().mean())
            panel.prompt_in_use.value = self._prompt
            panel.t.value = str(out.t.tolist())
            panel.loss.value = f"{float(out.grad_norm):.4g}"
            return out.loss, out.grad, metrics

        anchor = None if self.config.opacity_tolerance is None else self._anchor(index, crop, scale)
        return self.guidance_step(
            step, rays, guide, output="rgb", regularizers=self._regularizers, anchor=anchor
        )

    def _anchor(self, index: int, crop: tuple[int, int, int, int] | None, scale: float) -> Anchor:
        """The opacity anchor of view ``index`` (see ``opacity_tolerance``)."""
        before = self._opacity(index, scale)
        if crop is not None:
            top, left, height, width = crop
            before = before[top : top + height, left : left + width]

        def anchor(opacity: Tensor, grad: Tensor) -> Tensor:
            k = grad.detach().norm(dim=-1).mean() / self.config.opacity_tolerance
            return 0.5 * k * ((opacity - before.to(opacity)) ** 2).sum()

        return anchor

    def _opacity(self, index: int, scale: float) -> Tensor:
        """View ``index``'s whole opacity image (``H x W x 1``, at ``scale``) in the scene before the edit (the
        model's kept source; a resumed edit: its weights when it resumed); cached (float16, on the CPU)."""
        if (index, scale) not in self._opacity_before:
            reference = self.model.__dict__.get("_source", self.__dict__.get("_resumed_scene"))
            if reference is None:  # a resumed edit: keep_source's copy, kept out of the viewer's source_rgb
                self.model.keep_source()
                reference = self.__dict__["_resumed_scene"] = self.model.__dict__.pop("_source")
            with torch.no_grad():
                if self.whole_views:
                    outputs = reference.guidance_outputs(self.datamanager.view_camera(index, scale))
                else:
                    rays = self.datamanager.view_rays(index, scale)
                    outputs = render_in_chunks(reference, rays, self.config.chunk_size, with_grad=False)
            self._opacity_before[(index, scale)] = outputs["accumulation"].detach().half().cpu()
        return self._opacity_before[(index, scale)]

    def _viewer_guidance(self) -> GuidanceConfig:
        """The guidance settings with the panel's CFG, ψ and χ scales, if they pass the config's checks."""
        panel = self.Distillation
        return self.apply_viewer_values(
            guidance_scale=float(panel.guidance_scale.value),
            psi_scale=float(panel.psi_scale.value),
            chi_scale=float(panel.chi_scale.value),
        )

    def _view(
        self, index: int, rng: torch.Generator
    ) -> tuple[RayBundle | WholeRender, tuple[int, int, int, int] | None, float]:
        """What to render of view ``index`` this step (its rays, or for whole views the render itself), the
        crop ``(top, left, height, width)`` of the scaled view (None: whole view) and the scale."""
        scale = self.config.render_scale
        camera = self.datamanager.train_dataset.cameras[index]
        height, width = int(camera.height * scale), int(camera.width * scale)
        crop = None
        if self.config.crop_size is not None and self.config.crop_size < min(height, width):
            size = self.config.crop_size
            top = int(torch.randint(height - size + 1, (1,), generator=rng))
            left = int(torch.randint(width - size + 1, (1,), generator=rng))
            crop = (top, left, size, size)
        if self.whole_views:
            camera = self.datamanager.view_camera(index, scale)
            return lambda: self._render_camera(camera, crop), crop, scale
        return self.datamanager.view_rays(index, scale, crop), crop, scale

    def _render(self, rays: RayBundle, with_grad: bool) -> dict[str, Any]:
        """Render an ``H x W`` bundle in chunks; outputs reshaped to ``H x W x C``."""
        return render_in_chunks(self.model, rays, self.config.chunk_size, with_grad)

    def _render_camera(self, camera: Cameras, crop: tuple[int, int, int, int] | None) -> dict[str, Any]:
        """Whole-view render of a Gaussian-splat model with autograd, on the viewer's background; image
        outputs cut to ``crop``."""
        outputs = self.model.guidance_outputs(camera)
        if crop is None:
            return outputs
        top, left, height, width = crop
        size = outputs["rgb"].shape[:2]
        return {
            key: value[top : top + height, left : left + width]
            if torch.is_tensor(value) and value.ndim == 3 and value.shape[:2] == size
            else value
            for key, value in outputs.items()
        }

    def _regularizers(self, outputs: dict[str, Any]) -> dict[str, Tensor]:
        """nerfacto's proposal (interlevel) and distortion losses for the rendered rays (training mode);
        none for Gaussian splats (splatfacto's only one, the optional scale regulariser, is part of its
        photometric loss)."""
        if self.whole_views:
            return {}
        return nerfacto_regularizers(self.model, outputs)

    def _to_prior(self, image: Float[Tensor, "H W 3"]) -> Float[Tensor, "1 3 h w"]:
        """Render (or source image) to the prior's input: channels first, resized to prior_resolution."""
        return to_prior(image, self.config.prior_resolution, self.prior.size_multiple)

    def _conditions(
        self, prompt: str, index: int, crop: tuple[int, int, int, int] | None, scale: float
    ) -> tuple[str | Condition, str | Condition]:
        """The target and source conditions of view ``index``: the two prompts; for a prior conditioned on
        images (InstructPix2Pix), the target prompt as the instruction and the empty instruction, both with
        the view's original image, cut like the render (the source branch of DreamCatalyst)."""
        if not self.prior.takes_image:
            return prompt, self.config.source_prompt
        return instruction_conditions(prompt, self._source(index, crop, scale, condition=True))

    def _source(
        self, index: int, crop: tuple[int, int, int, int] | None, scale: float, condition: bool = False
    ) -> Tensor:
        """Latents of view ``index``'s original image, cut like the render (``condition``: the prior's image
        condition of it, :meth:`~nerfstudio_distill.priors.base.Prior.encode_condition`); cached for whole
        views."""
        if crop is None and (index, condition) in self._source_latents:
            return self._source_latents[(index, condition)]
        image = self.datamanager.source_image(index).to(self.device)
        if scale != 1.0:
            size = (int(image.shape[0] * scale), int(image.shape[1] * scale))
            image = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
        if crop is not None:
            top, left, height, width = crop
            image = image[top : top + height, left : left + width]
        with torch.no_grad():
            x = self._to_prior(image.float())
            latents = self.prior.encode_condition(x) if condition else self.prior.encode(x)
        if crop is None:
            self._source_latents[(index, condition)] = latents
        return latents

    # --------------------------------------------------------- dataset update
    def _update_step(self, step: int, k: int):
        """Step ``k`` of the dataset update: every ``refine_every`` steps the next training image in turn (on
        N GPUs the next N, one per rank) is replaced by :meth:`_edit_view`; then the model's photometric step
        (nerfstudio's, as nerfacto or splatfacto train) on the (partly edited) images."""
        views = self.datamanager.num_train_views
        if not self._update_started:
            # The refinement stage starts from the distilled scene, and so does a resumed run (the images
            # it edited are not in checkpoints); a new dataset-update run starts from the original photos.
            if self.config.mode == "distill" or k > 0:
                self._replace_views(list(range(views)), self._render_view)
            self._update_started = True
        if k % self.config.refine_every == 0:
            first = (k // self.config.refine_every) * self.world_size
            indices = [(first + r) % views for r in range(self.world_size)]
            self._replace_views(indices, lambda index: self._edit_view(index, step))
        outputs, losses, metrics = super().get_train_loss_dict(step)
        if self.world_size > 1:  # nerfstudio's photometric step, its gradients averaged too
            bad = first_non_finite(losses)
            reason = None if bad is None else f"the {bad} is NaN/Inf"
            losses, reason = self._backward_and_average(losses, reason, backward=True)
            if reason is not None:
                return self.skip_step(step, reason, outputs, metrics)
        return outputs, losses, metrics

    def _replace_views(self, indices: list[int], make: Callable[[int], Tensor]) -> None:
        """Make ``make(index)`` the training image of each view of ``indices``. On N processes they are made
        N at a time, one by each rank, and sent to every rank, so all ranks train on the same images."""
        for start in range(0, len(indices), self.world_size):
            batch = indices[start : start + self.world_size]
            images = [
                make(index).to(self.device, torch.float32)
                if owner == self.rank
                else torch.empty((*self.datamanager.source_image(index).shape[:2], 3), device=self.device)
                for owner, index in enumerate(batch)
            ]
            distributed.broadcast_tensors(images, owners=list(range(len(batch))))
            for index, image in zip(batch, images, strict=True):
                self.datamanager.replace_train_image(index, image)

    def _edit_view(self, index: int, step: int) -> Float[Tensor, "H W 3"]:
        """SDEdit of view ``index``'s render under the target prompt (conditioned on the view's original image
        for an image-conditioned prior), at the size of the view's training image. The strength and noise
        come from the pipeline seed and ``step``, so a run is reproducible."""
        scale = self.config.render_scale
        render = self._render_view(index, scale)  # the size the edit gives the prior
        rng = self.step_generator(step)
        strength = sdedit_strength(self.config.refine_strength, rng)
        with torch.no_grad(), torch.autocast(device_type=render.device.type, enabled=False):
            latents = self.prior.encode(self._to_prior(render))
            panel = self.Distillation
            self._prompt = live_prompt(self.prior, panel.target_prompt.value, self._prompt, lambda p: [p])
            edited = sdedit(
                self.prior,
                latents,
                self._conditions(self._prompt, index, None, scale)[0],
                strength=strength,
                num_steps=self.config.refine_denoise_steps,
                guidance_scale=self._viewer_guidance().guidance_scale,
                generator=rng,
            )
            image = self.prior.decode(edited)
        panel.prompt_in_use.value = self._prompt
        panel.t.value = f"{round(strength * (self.prior.num_train_timesteps - 1))} (SDEdit)"
        size = self.datamanager.source_image(index).shape[:2]
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image[0].permute(1, 2, 0)

    def _render_view(self, index: int, scale: float = 1.0) -> Float[Tensor, "H W 3"]:
        """View ``index`` as the scene looks now, without autograd (Gaussian splats: in eval mode, as the
        viewer shows it)."""
        with torch.no_grad():
            if not self.whole_views:
                return self._render(self.datamanager.view_rays(index, scale), with_grad=False)["rgb"].clamp(
                    0, 1
                )
            training = self.model.training
            self.model.eval()
            try:
                return self.model.get_outputs(self.datamanager.view_camera(index, scale))["rgb"].clamp(0, 1)
            finally:
                self.model.train(training)

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool | None = None):
        """Strict model loading: a base that does not match the data or model settings is an error."""
        model_state = {k[len("_model.") :]: v for k, v in state_dict.items() if k.startswith("_model.")}
        if model_state and all(k.startswith("module.") for k in model_state):  # a base trained with DDP
            model_state = {k[len("module.") :]: v for k, v in model_state.items()}
        check_state_matches(self.model.state_dict(), model_state, resizable=self._resizable_keys())
        return super().load_state_dict(state_dict, strict=True)

    def _resizable_keys(self) -> tuple[str, ...]:
        """State keys whose first dimension may differ from the model's: a splat model's Gaussians (their
        number grows and shrinks in training; splatfacto's ``load_state_dict`` resizes them)."""
        if not self.whole_views:
            return ()
        return tuple(f"gauss_params.{name}" for name in self.model.gauss_params)


def strength_range(strength: float | tuple[float, float]) -> tuple[float, float]:
    """(min, max) of ``refine_strength``; a single strength is both."""
    if isinstance(strength, (tuple, list)):
        low, high = strength
        return float(low), float(high)
    return float(strength), float(strength)


def sdedit_strength(strength: float | tuple[float, float], generator: torch.Generator) -> float:
    """The SDEdit strength of one dataset update: ``strength``, or for a range (min, max) one draw from
    U[min, max] (t0 ~ U[min, max]·T, as IN2N draws t between its lower and upper bound)."""
    low, high = strength_range(strength)
    if high == low:
        return low  # nothing drawn: a fixed strength leaves the generator's stream as it was
    return low + (high - low) * float(torch.rand((), generator=generator))


def check_prompts(config: EditPipelineConfig) -> None:
    """One-line errors (and a warning) for the prompts of an edit."""
    if not config.target_prompt.strip():
        raise DistillError('an edit needs a target: pass --pipeline.target-prompt "a photo of ..."')
    if config.prior.takes_image:
        warn_unused_source_prompt(
            config.prior, config.source_prompt, "--pipeline.", "the view's original image"
        )
    elif config.mode == "dataset-update":
        if config.source_prompt.strip():
            warnings.warn(
                "--pipeline.source-prompt is unused by the dataset update (an SDEdit of the render under the "
                "target prompt)",
                UserWarning,
                stacklevel=2,
            )
    elif config.target_prompt.strip() == config.source_prompt.strip():
        warnings.warn(
            "--pipeline.target-prompt equals --pipeline.source-prompt: DDS/PDS will leave the scene "
            "unchanged (a valid no-op check)",
            UserWarning,
            stacklevel=2,
        )


def check_edit(config: EditPipelineConfig, trainer: TrainerConfig) -> None:
    """One-line errors for an edit's options, its dataset and (exact prior) its prompts and sizes."""
    check_prompts(config)
    if trainer.prompt is not None:  # ns-train's alias for --pipeline.model.prompt, which nothing reads
        raise DistillError(
            f"--prompt {trainer.prompt!r} sets --pipeline.model.prompt, which an edit does not use: pass "
            "--pipeline.target-prompt instead"
        )
    config.guidance.check()
    if config.mode == "distill" and not config.guidance.spec.edits:
        edits = method_names(edits=True)
        raise DistillError(
            f"--pipeline.guidance.method {config.guidance.method} is not an edit method: use "
            f"{', '.join(edits)} (or the matching ns-train method, e.g. {edits[-1]}-edit or {edits[-1]}-splatfacto)"
        )
    config.prior.check()
    check_model_numbers(config.model)
    densifies = config.mode == "dataset-update" or config.refine_steps > 0
    if isinstance(config.model, SplatfactoModelConfig) and densifies and trainer.machine.num_devices > 1:
        # the guidance stage keeps the Gaussians in number, so its averaged gradients keep the ranks equal;
        # splatfacto's densification would split and prune by each rank's own 2D gradients
        raise DistillError(
            f"--machine.num-devices {trainer.machine.num_devices}: a Gaussian-splat edit densifies in its "
            "refinement stage, which is not shared between GPUs: pass --pipeline.refine-steps 0, or "
            "--machine.num-devices 1"
        )
    flag = "--pipeline."
    for name, value in [("render_scale", config.render_scale), ("guidance_weight", config.guidance_weight)]:
        if not math.isfinite(value):
            raise DistillError(f"{flag}{name.replace('_', '-')} is {value}: pass a finite number")
    tolerance = config.opacity_tolerance
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise DistillError(
            f"{flag}opacity-tolerance is {tolerance}: pass an opacity change > 0 (DDS and SDS default to 0.1), "
            "or None to turn the opacity anchor off"
        )
    if not config.render_scale > 0:
        raise DistillError(
            f"{flag}render-scale is {config.render_scale}: pass a fraction > 0 of the view size (0.5: half "
            "width and height)"
        )
    minimums = [
        ("crop_size", config.crop_size, 1, "a crop side in pixels, or None for whole views"),
        ("chunk_size", config.chunk_size, 1, "a number of rays per chunk (default 16384)"),
        ("prior_resolution", config.prior_resolution, 1, "a side in pixels (SD 1.5: 512), or None"),
        ("refine_steps", config.refine_steps, 0, "0 (no refinement) or more steps"),
        ("refine_every", config.refine_every, 1, "1 or more steps"),
        ("refine_denoise_steps", config.refine_denoise_steps, 1, "1 or more DDIM steps"),
    ]
    for name, value, least, what in minimums:
        if value is not None and value < least:
            raise DistillError(f"{flag}{name.replace('_', '-')} is {value}: pass {what}")
    low, high = strength_range(config.refine_strength)
    if not 0 < low <= high <= 1:
        shown = f"{low:g}" if isinstance(config.refine_strength, (int, float)) else f"{low:g} {high:g}"
        raise DistillError(
            f"{flag}refine-strength is {shown}: pass a fraction of T in (0, 1] (default 0.3), or a range min "
            "max of them (in2n-edit: 0.02 0.98)"
        )
    if config.mode == "dataset-update" and config.refine_steps:
        raise DistillError(
            f"{flag}refine-steps {config.refine_steps} is for {flag}mode distill: in {flag}mode dataset-update "
            "(in2n-edit) the whole run is the dataset update; drop the flag"
        )
    if config.mode == "distill" and config.refine_steps >= trainer.max_num_iterations:
        raise DistillError(
            f"{flag}refine-steps {config.refine_steps} leaves no edit steps in a run of --max-num-iterations "
            f"{trainer.max_num_iterations}: pass fewer refinement steps, or more iterations"
        )
    outputs = dataparser_outputs(trainer)
    if outputs is None:
        raise DistillError(
            "an edit needs the scene's dataset: pass --data (the folder the base run trained on)"
        )
    if config.prior.kind == "exact":
        check_exact_prior(config, outputs.cameras)


def check_exact_prior(config: EditPipelineConfig, cameras) -> None:
    """The exact prior must know the prompts, and each render must reach it at its images' size."""
    exact = config.prior.exact
    prompts = list(exact.folders())
    # an image-conditioned set (an exact InstructPix2Pix) has no use for the source prompt (a warning says so)
    for name in ("target_prompt",) if exact.takes_image else ("target_prompt", "source_prompt"):
        prompt = getattr(config, name).strip()
        if prompt and prompt not in prompts:
            raise DistillError(
                f"--pipeline.{name.replace('_', '-')} {prompt!r} is not a prompt of the exact prior, which "
                f"knows {', '.join(map(repr, prompts))}: pass one of them"
            )
    want = exact.image_size()
    scale = config.render_scale
    for height, width in sorted(
        {(int(h), int(w)) for h, w in zip(cameras.height.flatten(), cameras.width.flatten(), strict=True)}
    ):
        h, w = int(height * scale), int(width * scale)
        if min(h, w) < 1:
            raise DistillError(
                f"--pipeline.render-scale {scale:g} renders the {height}x{width} views at {h}x{w} pixels: pass a "
                "larger scale"
            )
        if config.crop_size is not None and config.crop_size < min(h, w):
            h = w = config.crop_size
        got = prior_size(h, w, config.prior_resolution)
        if got == want:
            continue
        if config.prior_resolution is not None:
            fix = "pass --pipeline.prior-resolution None (the exact prior takes renders at their own size)"
        elif config.crop_size is not None and config.crop_size < min(int(height * scale), int(width * scale)):
            fix = "pass --pipeline.crop-size None, or write the prior set at the crop size"
        else:
            fix = (
                f"pass --pipeline.render-scale {want[0] / height:g}, or write the prior set with "
                f"write_exact_prior_set(..., scale={scale:g})"
            )
        raise DistillError(
            f"the exact prior's images are {want[0]}x{want[1]} but the {height}x{width} views reach it at "
            f"{got[0]}x{got[1]}: {fix}"
        )


def check_state_matches(
    expected: dict[str, Tensor], loaded: dict[str, Tensor], resizable: tuple[str, ...] = ()
) -> None:
    """Raise one line naming the first differences between a checkpoint and the model. The keys of
    ``resizable`` may differ in their first dimension (a number of Gaussians), not in the others."""

    def same_shape(key: str, have: Tensor, got: Tensor) -> bool:
        if key in resizable:
            return have.ndim == got.ndim and have.shape[1:] == got.shape[1:]
        return have.shape == got.shape

    problems = [f"{k} missing" for k in expected if k not in loaded]
    problems += [f"{k} unexpected" for k in loaded if k not in expected]
    problems += [
        f"{k} is {list(loaded[k].shape)} in the checkpoint but {list(v.shape)} here"
        for k, v in expected.items()
        if k in loaded and not same_shape(k, v, loaded[k])
    ]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DistillError(
            f"the --load-dir checkpoint does not match this scene/model: {'; '.join(problems[:3])}{more}: "
            "use the same --data and model settings as the base run"
        )
