"""Text-to-3D: random views -> shading -> prior -> guidance (SDS, SDI or VSD) -> field.

One pipeline serves ``sds-nerfacto``, ``sdi-nerfacto`` and ``vsd-nerfacto``; only ``guidance.method``
differs (VSD's LoRA gives the prior a camera input, so its views' cameras reach it; its LoRA loss joins the
step's losses through ``TrainingPrior.guidance_step``). Each step
draws ``num_views`` random cameras (:mod:`nerfstudio_distill.data.random_cameras`), renders them with
gradients at the scheduled resolution, each with its own shading and background
(:mod:`nerfstudio_distill.models.text_to_3d`), and asks the guidance for the gradient on the renders
under the view-dependent prompt of each camera ("<prompt>, front view", side, back or overhead), and,
for a prior that takes cameras, each view's camera (:func:`~nerfstudio_distill.priors.base.camera_condition`).
Views that share a prompt share one guidance call. Large renders go through the two-pass chunked backward of
:mod:`nerfstudio_distill.pipelines.common`.

As in the edit pipeline, the prior is built only when training (never by ``ns-export``/``ns-viewer``)
and kept outside the module tree, so its weights never enter checkpoints; a NaN/Inf guidance gradient
skips the step with a warning; configuration errors are one line (``error: ...`` via DistillTrainer). On N
GPUs each rank draws and renders its own ``num_views`` cameras and the gradients are averaged
(:mod:`nerfstudio_distill.pipelines.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.viewer.viewer_elements import ViewerNumber, ViewerSlider, ViewerText
from torch import Tensor, nn

from nerfstudio_distill.data.random_cameras import (
    RandomCameras,
    RandomCamerasConfig,
    RandomViews,
    check_camera_config,
)
from nerfstudio_distill.errors import DistillError
from nerfstudio_distill.guidance.config import GuidanceConfig, method_names
from nerfstudio_distill.models.text_to_3d import TextTo3DModel, TextTo3DModelConfig
from nerfstudio_distill.pipelines.common import (
    TrainingPrior,
    check_model_numbers,
    live_prompt,
    render_in_chunks,
)
from nerfstudio_distill.priors.base import Condition, Prior, camera_condition
from nerfstudio_distill.priors.config import PriorConfig

VIEWS = ("front", "side", "back", "overhead")
"""View names of the view-dependent prompts."""


@dataclass
class TextTo3DPipelineConfig(VanillaPipelineConfig):
    """Create a scene from a text prompt by score distillation."""

    _target: type = field(default_factory=lambda: TextTo3DPipeline)
    datamanager: RandomCamerasConfig = field(default_factory=RandomCamerasConfig)
    """Random cameras around the object (no --data)."""
    model: TextTo3DModelConfig = field(default_factory=TextTo3DModelConfig)
    """The scene: nerfacto with a background, shading augmentation and regularisers."""
    prompt: str = ""
    """What to create, e.g. "a ripe pineapple". Required; editable live in the viewer."""
    view_prompts: bool = True
    """Append ", front view", ", side view", ", back view" or ", overhead view" by camera angle."""
    overhead_elevation: float = 60.0
    """Cameras above this elevation (degrees) are "overhead"."""
    front_width: float = 90.0
    """Azimuth span (degrees) centred on 0 that is "front"; the same span centred on 180 is "back", the
    rest "side"."""
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(method="sds"))
    """Which distillation gradient (sds, sdi, vsd) and its options (CFG, t range and annealing, weighting,
    SDI inversion, VSD's LoRA)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The diffusion model that judges the renders."""
    prior_resolution: int | None = 512
    """Size, in pixels, of the images given to the prior (renders are resized bilinearly). 512 suits SD
    1.5; None feeds renders at their own size (the exact prior needs that)."""
    chunk_size: int = 16384
    """Rays rendered at once. Larger batches are done in two passes (render, then backpropagate chunk
    by chunk), so memory stays bounded by this number."""
    guidance_weight: float = 1.0
    """Multiplier of the guidance gradient on the renders."""
    seed: int = 0
    """Seed of the camera, shading, timestep and noise draws (on N GPUs each rank adds its rank, so ranks
    draw different cameras)."""

    def check(self, trainer: Any) -> None:
        """Called by DistillTrainer before anything is written."""
        check_text_to_3d(self)
        check_camera_config(self.datamanager)


def view_name(
    elevation: float, azimuth: float, overhead_elevation: float = 60.0, front_width: float = 90.0
) -> str:
    """front, side, back or overhead for a camera at ``elevation``/``azimuth`` degrees (azimuth 0: front)."""
    if elevation > overhead_elevation:
        return "overhead"
    a = abs((azimuth + 180.0) % 360.0 - 180.0)  # 0 front .. 180 back
    if a <= front_width / 2:
        return "front"
    if a >= 180.0 - front_width / 2:
        return "back"
    return "side"


def view_prompt(prompt: str, view: str | None) -> str:
    """``"<prompt>, <view> view"`` (the prompt alone for None)."""
    return prompt if view is None else f"{prompt}, {view} view"


class TextTo3DPanel(nn.Module):
    """Controls in the viewer's "Distillation" folder (the attribute name is the folder label)."""

    def __init__(self, config: TextTo3DPipelineConfig, g: GuidanceConfig) -> None:
        """``g``: the guidance settings in use (a CFG scale of None already resolved to the prior's)."""
        super().__init__()
        self.prompt = ViewerText("Prompt", config.prompt, hint="Used from the next step on")
        self.guidance_scale = ViewerNumber("CFG scale", g.guidance_scale, hint="Classifier-free guidance")
        self.t_min = ViewerSlider("t min", g.timesteps.min_fraction, 0.0, 1.0, 0.01, hint="Fraction of T")
        self.t_max = ViewerSlider(
            "t max", g.timesteps.max_fraction, 0.0, 1.0, 0.01, hint="Fraction of T, at step 0"
        )
        self.t = ViewerText("Current t", "-", disabled=True)
        self.loss = ViewerText("Guidance |grad|", "-", disabled=True)
        self.views = ViewerText("Last prompts", "-", disabled=True)


class TextTo3DPipeline(TrainingPrior, VanillaPipeline):
    """See the module docstring."""

    config: TextTo3DPipelineConfig
    datamanager: RandomCameras
    model: TextTo3DModel

    def __init__(
        self, config: TextTo3DPipelineConfig, device: str, test_mode: str = "val", **kwargs: Any
    ) -> None:
        training = test_mode == "val"
        if training:
            check_text_to_3d(config)
        world_size = kwargs.pop("world_size", 1)  # no DDP wrapper: see _setup_ranks
        super().__init__(config, device, test_mode=test_mode, world_size=1, **kwargs)
        self.grad_scaler = kwargs.get("grad_scaler")
        self._setup_prior(config.prior, device, training)
        self._setup_guidance(config.guidance, config.prior)
        self.Distillation = TextTo3DPanel(config, self.guidance.config)
        self._views = self.reachable_views()
        if training:
            check_prior_takes(self.prior, config, self._views)
        self._num_steps: int | None = None
        self._prompt = config.prompt.strip()
        """The base prompt in use (the panel's, once the prior can take it)."""
        self._setup_ranks(world_size)

    def start_edit(self, start_step: int, num_steps: int) -> None:
        """Called by DistillTrainer once the checkpoint is loaded: the run's length, for t annealing."""
        self._num_steps = max(num_steps, 1)

    # ---------------------------------------------------------------- prompts
    def view_of(self, elevation: float, azimuth: float) -> str | None:
        if not self.config.view_prompts:
            return None
        return view_name(elevation, azimuth, self.config.overhead_elevation, self.config.front_width)

    def reachable_views(self) -> list[str | None]:
        """The view names the camera ranges can produce (checked against the prior's prompts)."""
        lo, hi = self.datamanager.config.elevation
        a_lo, a_hi = self.datamanager.config.azimuth
        names = {
            self.view_of(float(e), float(a))
            for e in np.linspace(lo, hi, 61)
            for a in np.linspace(a_lo, a_hi, 181)
        }
        return sorted(names, key=lambda v: VIEWS.index(v) if v in VIEWS else -1)

    def prompts_of(self, views: RandomViews, prompt: str) -> list[str]:
        return [
            view_prompt(prompt, self.view_of(float(e), float(a)))
            for e, a in zip(views.elevation, views.azimuth, strict=True)
        ]

    def view_condition(self, prompt: str, c2w: Float[Tensor, "b 3 4"]) -> str | Condition:
        """What the prior is conditioned on for views rendered from ``c2w`` under ``prompt``: with a prior
        that takes cameras (:attr:`Prior.takes_camera`, e.g. an exact prior whose set has cameras)
        ``Condition(prompt, camera=camera_condition(c2w))``, one camera per view; else the prompt alone,
        so priors without a camera input (Stable Diffusion) get exactly what they got before."""
        if not self.prior.takes_camera:
            return prompt
        return Condition(prompt, camera=camera_condition(c2w))

    # --------------------------------------------------------------- training
    def get_train_loss_dict(self, step: int):
        self._sync_viewer_inputs(self.Distillation)
        rng = self.step_generator(step)
        views = self.datamanager.sample_views(step, rng)
        rays = views.rays()
        b, h, w = rays.shape
        positions = views.cameras.camera_to_worlds[:, :3, 3]
        shading = self.model.draw_shading(positions, step, rng).to(rays.origins.device)
        rays.metadata["shading"] = shading[:, None, None, :].expand(b, h, w, -1).contiguous()
        panel = self.Distillation
        t_min, t_max = sorted((float(panel.t_min.value), float(panel.t_max.value)))
        final = self.guidance.config.timesteps.final_max_fraction
        self.apply_viewer_values(
            **{
                "guidance_scale": float(panel.guidance_scale.value),
                "timesteps.min_fraction": t_min,
                "timesteps.max_fraction": t_max,
                "timesteps.final_max_fraction": min(max(final, t_min), t_max),
            }
        )
        self._prompt = live_prompt(
            self.prior, panel.prompt.value, self._prompt, lambda p: [view_prompt(p, v) for v in self._views]
        )
        prompts = self.prompts_of(views, self._prompt)
        c2w = views.cameras.camera_to_worlds
        progress = 0.0 if self._num_steps is None else min(max(step / self._num_steps, 0.0), 1.0)

        def guide(latents: Tensor, outputs: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
            """One guidance call per distinct view prompt; views that share a prompt share the call."""
            loss, grads, ts = torch.zeros((), device=rays.origins.device), [], []
            for p in dict.fromkeys(prompts):
                index = torch.tensor([i for i, q in enumerate(prompts) if q == p])
                condition = self.view_condition(p, c2w[index])
                out = self.guidance(self.prior, latents[index], condition, progress=progress, generator=rng)
                loss = loss + out.loss.to(rays.origins.device)
                grads.append(out.grad)
                ts.append(out.t)
            grad, t = torch.cat([g.flatten() for g in grads]), torch.cat(ts)
            metrics = {
                "guidance_grad_norm": grad.norm().detach(),
                "guidance_t": t.float().mean(),
                "accumulation": outputs["accumulation"].detach().mean(),
                "blob_strength": self.model.blob_strength.detach().clone(),
                "resolution": torch.tensor(float(h)),
            }
            panel.t.value = str(t.tolist())
            panel.loss.value = f"{float(metrics['guidance_grad_norm']):.4g}"
            panel.views.value = "; ".join(dict.fromkeys(prompts))
            return loss, grad, metrics

        return self.guidance_step(step, rays, guide, output="train_rgb", regularizers=self.model.regularizers)

    # ------------------------------------------------------------ evaluation
    def render_views(self, views: RandomViews) -> dict[str, Float[Tensor, "B H W C"]]:
        """Render views without gradients (the model's own background, no augmentation)."""
        return render_in_chunks(self.model, views.rays(), self.config.chunk_size, with_grad=False)

    def get_eval_loss_dict(self, step: int):
        """Regularisers and coverage of one random view (there is no ground truth)."""
        self.eval()
        views = self.datamanager.sample_views(None, torch.Generator().manual_seed(step), num_views=1)
        outputs = self.render_views(views)
        losses = self.model.regularizers(outputs)
        metrics = {"accumulation": outputs["accumulation"].mean()}
        self.train()
        return outputs, losses, metrics

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: int | None = None, output_path=None, get_std: bool = False
    ):
        """Mean accumulation over the fixed cameras (there is no ground truth)."""
        self.eval()
        cameras = self.datamanager.eval_dataset.cameras
        values = []
        for i in range(len(cameras)):
            outputs = self.model.get_outputs_for_camera(cameras[i : i + 1].to(self.device))
            values.append(float(outputs["accumulation"].mean()))
        self.train()
        return {"mean_accumulation": float(np.mean(values)), "num_views": len(values)}


def check_text_to_3d(config: TextTo3DPipelineConfig) -> None:
    """One-line errors for the settings of a text-to-3D run (before anything is built)."""
    if not config.prompt.strip():
        raise DistillError('text-to-3D needs a prompt: pass --pipeline.prompt "a ripe pineapple"')
    config.guidance.check()
    config.prior.check()
    for name, value in [("chunk_size", config.chunk_size), ("prior_resolution", config.prior_resolution)]:
        if value is not None and value < 1:
            raise DistillError(f"--pipeline.{name.replace('_', '-')} is {value}: pass 1 or more")
    if not math.isfinite(config.guidance_weight):
        raise DistillError(f"--pipeline.guidance-weight is {config.guidance_weight}: pass a finite number")
    if config.guidance.spec.needs_source:
        raise DistillError(
            f"--pipeline.guidance.method {config.guidance.method} needs a source image; text-to-3D has none: "
            f"use {' or '.join(method_names(needs_source=False))}"
        )
    model = config.model
    check_model_numbers(
        model, ("blob_density", "blob_radius", "ambient", "light_jitter", "average_init_density")
    )
    if model.blob_taper[0] > model.blob_taper[1]:
        raise DistillError(
            f"--pipeline.model.blob-taper {model.blob_taper[0]} {model.blob_taper[1]} runs backwards: pass the "
            "first step, then the last (e.g. 0 1000)"
        )
    probs = (model.lambertian_prob, model.textureless_prob, model.random_background_prob)
    if any(not 0 <= p <= 1 for p in probs) or model.lambertian_prob + model.textureless_prob > 1:
        raise DistillError(
            "--pipeline.model.lambertian-prob, textureless-prob and random-background-prob must lie in [0, 1] "
            f"and the first two sum to at most 1, got {probs}"
        )
    if model.lambertian_prob + model.textureless_prob > 0 and not model.predict_normals:
        raise DistillError(
            "shaded views need normals: pass --pipeline.model.predict-normals True, or set "
            "--pipeline.model.lambertian-prob 0 --pipeline.model.textureless-prob 0"
        )


def check_prior_takes(prior: Prior, config: TextTo3DPipelineConfig, views: list[str | None]) -> None:
    """One-line errors when the prior cannot take the renders: their size, or (exact prior) a prompt."""
    from nerfstudio_distill.priors.exact import ExactPrior

    sizes = sorted({config.prior_resolution or int(r) for r in config.datamanager.resolutions})
    if isinstance(prior, ExactPrior) and prior.is_image:
        h, w = prior.points.shape[-2:]
        if sizes != [h] or h != w:
            raise DistillError(
                f"the exact prior's images are {h}x{w} but renders reach it at {', '.join(map(str, sizes))} px: "
                f"pass --pipeline.datamanager.resolutions {h} --pipeline.prior-resolution None"
            )
        missing = [
            view_prompt(config.prompt, v) for v in views if view_prompt(config.prompt, v) not in prior.prompts
        ]
        if missing:
            raise DistillError(
                f"the exact prior has no images for {', '.join(map(repr, missing))}: label its image set with "
                "these prompts, or change --pipeline.prompt / --pipeline.view-prompts"
            )
    elif any(s % 8 for s in sizes):
        raise DistillError(
            f"Stable Diffusion takes sizes divisible by 8, but renders reach it at {', '.join(map(str, sizes))} px: "
            "pass --pipeline.prior-resolution 512 (or --pipeline.datamanager.resolutions divisible by 8)"
        )
