"""nerfacto for text-to-3D: a bounded object, its background, shading augmentation and the usual priors.

A thin :class:`~nerfstudio.models.nerfacto.NerfactoModel` subclass. nerfacto renders the object
(premultiplied albedo, accumulation, depth, predicted and analytic normals); this class adds:

- a bounded scene: the scene box collider, no scene contraction, a uniform initial proposal sampler;
- a background: learned (a small MLP of the view direction), white or black; per training view it can
  be replaced by a random colour (so the object cannot hide in the background);
- a density blob at the centre at initialisation, fading out linearly over ``blob_taper`` steps (its
  strength is a buffer, so exports and resumed runs see the faded value);
- shading augmentation (DreamFusion): each training view is rendered as albedo, Lambertian-shaded
  under a random light, or textureless (white albedo, shaded), as the pipeline draws it per view;
- :meth:`TextTo3DModel.regularizers`: interlevel, distortion, orientation, predicted-normal and
  opacity losses, each computed once per rendered ray batch.

The per-view draws reach the model through ``ray_bundle.metadata["shading"]`` (see
:func:`shading_metadata`), so a chunked re-render for the backward pass reproduces the same image.
``rgb`` is always the albedo over the model's own background (viewer, eval, export); ``train_rgb``
is the augmented image guidance sees (only when the metadata is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.field_components.encodings import SHEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.model_components.renderers import RGBRenderer
from nerfstudio.model_components.scene_colliders import AABBBoxCollider
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps
from torch import Tensor, nn

from nerfstudio_distill.models.regularizers import nerfacto_regularizers

ALBEDO, LAMBERTIAN, TEXTURELESS = 0, 1, 2
"""Shading modes of a training view."""


@dataclass
class TextTo3DModelConfig(NerfactoModelConfig):
    """nerfacto with a bounded object, a background, shading augmentation and regularisers."""

    _target: type = field(default_factory=lambda: TextTo3DModel)
    background_color: Literal["random", "last_sample", "black", "white"] = "black"
    """Unused: the object is rendered premultiplied and composited over --pipeline.model.background."""
    disable_scene_contraction: bool = True
    """The object is bounded by the scene box (--pipeline.datamanager.scene-bound)."""
    proposal_initial_sampler: Literal["piecewise", "uniform"] = "uniform"
    """Uniform suits the bounded box."""
    use_appearance_embedding: bool = False
    """No per-image appearance: the views are not photos."""
    predict_normals: bool = True
    """Render analytic normals (density gradient) and predicted normals (an MLP head, trained to match
    them); needed by Lambertian and textureless shading and the orientation loss."""
    average_init_density: float = 0.01
    """Initial density of the field away from the blob (low: empty space)."""
    camera_optimizer: CameraOptimizerConfig = field(default_factory=lambda: CameraOptimizerConfig(mode="off"))
    """The cameras are exact; nothing to optimise."""
    shading_normals: Literal["predicted", "analytic"] = "predicted"
    """Normals that shade: the predicted head (smooth, learns from shading) or the density gradient."""
    lambertian_prob: float = 0.5
    """Fraction of training views shaded Lambertian under a random light (after shading_start)."""
    textureless_prob: float = 0.25
    """Fraction of training views rendered textureless: white albedo, shaded (after shading_start). The
    rest are plain albedo."""
    shading_start: int = 1000
    """Step from which views may be shaded (before: albedo only, while the geometry forms)."""
    ambient: float = 0.2
    """Ambient term of the shading: ambient + (1 - ambient) * max(0, n . light)."""
    light_jitter: float = 0.5
    """Random light = the camera direction plus this much Gaussian noise, normalised."""
    background: Literal["learned", "white", "black"] = "learned"
    """Background behind the object: a small MLP of the view direction, or a constant colour."""
    random_background_prob: float = 0.5
    """Fraction of training views whose background is a random uniform colour instead."""
    blob_density: float = 10.0
    """Peak of the density blob added at the centre at initialisation (0: no blob)."""
    blob_radius: float = 0.5
    """Radius of the blob; density falls linearly from the peak at the centre to 0 there."""
    blob_taper: tuple[int, int] = (0, 1000)
    """Steps over which the blob fades linearly from full strength to nothing."""
    opacity_loss_mult: float = 1e-3
    """Weight of the opacity penalty mean(sqrt(accumulation^2 + 0.01)) (sparse, crisp objects)."""


def shading_metadata(
    num_rays: int, mode: int, light: Float[Tensor, "3"] | None, background: Float[Tensor, "3"] | None
) -> Float[Tensor, "num_rays 8"]:
    """Per-ray metadata of one view: mode, light direction, whether to replace the background, colour."""
    row = torch.zeros(8)
    row[0] = float(mode)
    if light is not None:
        row[1:4] = light.float().cpu()
    if background is not None:
        row[4], row[5:8] = 1.0, background.float().cpu()
    return row.expand(num_rays, 8).clone()


class BlobField(nn.Module):
    """nerfacto's field (``base``) with a density added at every sample (the blob)."""

    def __init__(self, base: nn.Module, extra_density) -> None:
        super().__init__()
        self.base = base
        self.__dict__["extra_density"] = extra_density  # a bound method of the model, not a submodule

    def forward(self, ray_samples, compute_normals: bool = False) -> dict[FieldHeadNames, Tensor]:
        outputs = self.base.forward(ray_samples, compute_normals=compute_normals)
        positions = ray_samples.frustums.get_positions()
        outputs[FieldHeadNames.DENSITY] = outputs[FieldHeadNames.DENSITY] + self.extra_density(positions)
        return outputs


class TextTo3DModel(NerfactoModel):
    """See the module docstring."""

    config: TextTo3DModelConfig
    blob_strength: Tensor

    def populate_modules(self) -> None:
        super().populate_modules()
        cfg = self.config
        self.collider = AABBBoxCollider(self.scene_box)
        # nerfacto renders premultiplied albedo; the background is composited in get_outputs
        self.renderer_rgb = RGBRenderer(background_color="black")
        self.register_buffer("blob_strength", torch.tensor(1.0 if cfg.blob_density > 0 else 0.0))
        if cfg.blob_density > 0:
            self.field = BlobField(self.field, self.blob)
        self.density_fns = [self._with_blob(fn) for fn in self.density_fns]
        self.background_field = None
        if cfg.background == "learned":
            encoding = SHEncoding(levels=4, implementation="torch")
            self.background_field = nn.Sequential(
                encoding,
                MLP(
                    encoding.get_out_dim(),
                    2,
                    32,
                    out_dim=3,
                    out_activation=nn.Sigmoid(),
                    implementation="torch",
                ),
            )

    # ------------------------------------------------------------------ blob
    def blob(self, positions: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs 1"]:
        """The fading density blob at ``positions``."""
        r = positions.norm(dim=-1, keepdim=True)
        return self.blob_strength * self.config.blob_density * (1 - r / self.config.blob_radius).clamp(min=0)

    def _with_blob(self, density_fn):
        def density_with_blob(positions: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return density_fn(positions, *args, **kwargs) + self.blob(positions)

        return density_with_blob if self.config.blob_density > 0 else density_fn

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes):
        start, end = self.config.blob_taper

        def taper(step: int) -> None:
            if self.config.blob_density > 0:
                self.blob_strength.fill_(float(np.interp(step, [start, max(end, start + 1)], [1.0, 0.0])))

        taper_cb = TrainingCallback(
            [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], taper, update_every_num_iters=1
        )
        return [*super().get_training_callbacks(training_callback_attributes), taper_cb]

    def get_param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().get_param_groups()
        if self.background_field is not None:
            groups["fields"] = groups["fields"] + list(self.background_field.parameters())
        return groups

    # --------------------------------------------------------------- shading
    def draw_shading(
        self, camera_positions: Float[Tensor, "B 3"], step: int, generator: torch.Generator | None = None
    ) -> Float[Tensor, "B 8"]:
        """Per-view shading mode, light and background draw for ``step`` (see :func:`shading_metadata`)."""
        cfg = self.config
        rows = []
        for position in camera_positions.detach().float().cpu():
            u = torch.rand(2, generator=generator)
            mode = ALBEDO
            if step >= cfg.shading_start:
                if u[0] < cfg.lambertian_prob:
                    mode = LAMBERTIAN
                elif u[0] < cfg.lambertian_prob + cfg.textureless_prob:
                    mode = TEXTURELESS
            jitter = cfg.light_jitter * torch.randn(3, generator=generator)
            light = torch.nn.functional.normalize(position / position.norm().clamp(min=1e-8) + jitter, dim=0)
            colour = torch.rand(3, generator=generator)
            background = colour if u[1] < cfg.random_background_prob else None
            rows.append(shading_metadata(1, mode, light, background)[0])
        return torch.stack(rows)

    # --------------------------------------------------------------- outputs
    def background_rgb(self, ray_bundle: RayBundle) -> Float[Tensor, "*bs 3"]:
        """The model's own background colour of each ray."""
        if self.background_field is not None:
            directions = (ray_bundle.directions + 1.0) / 2.0  # SHEncoding takes [0, 1]
            return self.background_field(directions.reshape(-1, 3)).reshape(*ray_bundle.shape, 3)
        value = 1.0 if self.config.background == "white" else 0.0
        return torch.full((*ray_bundle.shape, 3), value, device=ray_bundle.origins.device)

    def get_outputs(self, ray_bundle: RayBundle) -> dict[str, Any]:
        outputs = super().get_outputs(ray_bundle)
        premultiplied = outputs["rgb"]
        accumulation = outputs["accumulation"].clamp(0, 1)
        background = self.background_rgb(ray_bundle).to(premultiplied)
        outputs["rgb_object"] = premultiplied
        outputs["background"] = background
        outputs["rgb"] = premultiplied + (1 - accumulation) * background
        shading = (ray_bundle.metadata or {}).get("shading")
        if shading is not None:
            outputs["train_rgb"] = self._shade(outputs, shading.to(premultiplied))
        return outputs

    def _shade(self, outputs: dict[str, Any], shading: Float[Tensor, "*bs 8"]) -> Float[Tensor, "*bs 3"]:
        """The training image of the rays: the view's shading mode, light and background."""
        accumulation = outputs["accumulation"].clamp(0, 1)
        obj = outputs["rgb_object"]
        mode = shading[..., :1]
        if bool((mode != ALBEDO).any()):
            key = "pred_normals" if self.config.shading_normals == "predicted" else "normals"
            normals = torch.nn.functional.normalize(outputs[key] * 2 - 1, dim=-1)
            lambert = (normals * shading[..., 1:4]).sum(-1, keepdim=True).clamp(min=0)
            lambert = self.config.ambient + (1 - self.config.ambient) * lambert
            obj = torch.where(mode == LAMBERTIAN, obj * lambert, obj)
            obj = torch.where(mode == TEXTURELESS, accumulation * lambert, obj)
        background = torch.where(shading[..., 4:5] > 0, shading[..., 5:8], outputs["background"])
        return obj + (1 - accumulation) * background

    def get_rgba_image(self, outputs: dict[str, Tensor], output_name: str = "rgb") -> Tensor:
        """The object's colour with its accumulation as alpha, so exports keep only the object."""
        if output_name != "rgb" or "rgb_object" not in outputs:
            return super().get_rgba_image(outputs, output_name)
        accumulation = outputs["accumulation"].clamp(0, 1)
        rgb = (outputs["rgb_object"] / accumulation.clamp(min=1e-6)).clamp(0, 1)
        return torch.cat([rgb, accumulation], dim=-1)

    # ---------------------------------------------------------------- losses
    def regularizers(self, outputs: dict[str, Any]) -> dict[str, Tensor]:
        """Every regulariser of the rendered rays, each once and already weighted."""
        cfg = self.config
        losses = nerfacto_regularizers(self, outputs)
        if "rendered_orientation_loss" in outputs and cfg.orientation_loss_mult > 0:
            losses["orientation_loss"] = (
                cfg.orientation_loss_mult * outputs["rendered_orientation_loss"].mean()
            )
        if "rendered_pred_normal_loss" in outputs and cfg.pred_normal_loss_mult > 0:
            losses["pred_normal_loss"] = (
                cfg.pred_normal_loss_mult * outputs["rendered_pred_normal_loss"].mean()
            )
        accumulation = outputs["accumulation"]
        losses["opacity_loss"] = cfg.opacity_loss_mult * (accumulation**2 + 0.01).sqrt().mean()
        return losses

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """No ground truth: the render, its accumulation, depth and normals."""
        images = {
            "img": outputs["rgb"],
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
        }
        if "normals" in outputs:
            images["normals"] = outputs["normals"]
        metrics = {"mean_accumulation": float(outputs["accumulation"].mean())}
        return metrics, images
