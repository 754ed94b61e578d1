"""nerfacto for editing: the edit lives in the 3D field, and the unedited scene stays viewable.

- ``edit_appearance="mean"`` (default): nerfacto gives each training image its own appearance
  embedding in training mode, but the viewer, ``ns-export`` and eval render with their mean. An edit
  trained through per-image embeddings can partly live in them, where nobody sees it. So the embeddings
  are frozen and every training render uses their mean, exactly what the viewer shows.
- A "source_rgb" output: the unedited scene, for split-screen comparison in the viewer. The source (a
  frozen copy of the base) is kept outside the module tree: it never enters checkpoints and exists only
  in the training process that loaded the base.

Its parameters and checkpoints are exactly nerfacto's, so a plain ``ns-train nerfacto`` run loads as the
base.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.field_components.embedding import Embedding
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from torch import Tensor


@dataclass
class EditNerfactoModelConfig(NerfactoModelConfig):
    """nerfacto whose edit lives in the field, plus a "source_rgb" output: the scene before the edit."""

    _target: type = field(default_factory=lambda: EditNerfactoModel)
    edit_appearance: Literal["mean", "per-image"] = "mean"
    """Appearance embedding of the edit's renders. "mean": the per-image embeddings are frozen and every
    view renders with their mean (zeros with --pipeline.model.use-average-appearance-embedding False), as
    the viewer and ns-export show the scene, so the whole edit is in the 3D field. "per-image": nerfacto's
    training behaviour (each view its own trainable embedding)."""


class ViewerAppearance(Embedding):
    """nerfstudio's appearance Embedding that returns what eval mode uses for every index: the mean of the
    (frozen) embeddings, or zeros. Same parameters and state-dict keys as the Embedding it replaces."""

    average: bool = True

    def forward(self, in_tensor: Int[Tensor, "*batch"]) -> Float[Tensor, "*batch dim"]:
        value = self.mean(dim=0) if self.average else torch.zeros_like(self.embedding.weight[0])
        return value.expand(*in_tensor.shape, -1)


class EditNerfactoModel(NerfactoModel):
    """See the module docstring."""

    config: EditNerfactoModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        embedding = self.field.embedding_appearance
        if self.config.edit_appearance == "mean" and embedding is not None:
            embedding.__class__ = ViewerAppearance
            embedding.average = self.config.use_average_appearance_embedding
            embedding.requires_grad_(False)

    def keep_source(self) -> None:
        """Freeze a copy of the current weights as the unedited scene."""
        self.__dict__.pop("_source", None)
        source = copy.deepcopy(self).eval().requires_grad_(False)
        self.__dict__["_source"] = source

    @torch.no_grad()
    def get_outputs_for_camera_ray_bundle(self, camera_ray_bundle: RayBundle) -> dict[str, torch.Tensor]:
        outputs = super().get_outputs_for_camera_ray_bundle(camera_ray_bundle)
        source = self.__dict__.get("_source")
        if source is not None:
            outputs["source_rgb"] = source.get_outputs_for_camera_ray_bundle(camera_ray_bundle)["rgb"]
        return outputs
