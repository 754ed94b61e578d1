"""nerfacto that also renders the unedited scene, for split-screen comparison in the viewer.

Its parameters and checkpoints are exactly nerfacto's, so a plain ``ns-train nerfacto`` run loads
as the base. The source (a frozen copy of the base) is kept outside the module tree: it never
enters checkpoints and exists only in the training process that loaded the base.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig


@dataclass
class EditNerfactoModelConfig(NerfactoModelConfig):
    """nerfacto plus a "source_rgb" output: the scene before the edit."""

    _target: type = field(default_factory=lambda: EditNerfactoModel)


class EditNerfactoModel(NerfactoModel):
    """See the module docstring."""

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
