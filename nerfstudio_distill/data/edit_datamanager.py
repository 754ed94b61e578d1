"""A DataManager for editing: whole training views, their original images, and their cameras.

It is nerfstudio's in-process :class:`VanillaDataManager` (so ray batches, ``ns-export``
pointcloud/poisson/tsdf and the eval loop work as for nerfacto) plus:
- :meth:`EditDataManager.source_image`: the original image of a view (the source branch of
  DDS/PDS and InstructPix2Pix's image condition), kept even after the dataset update replaces training
  images;
- :meth:`EditDataManager.view_rays`: the rays of a whole view, optionally downscaled or cropped;
- :meth:`EditDataManager.replace_train_image`: the dataset update (refinement stage, ``in2n-edit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from torch import Tensor


@dataclass
class EditDataManagerConfig(VanillaDataManagerConfig):
    """nerfstudio's VanillaDataManager that also serves whole views for guidance."""

    _target: type = field(default_factory=lambda: EditDataManager)


class EditDataManager(VanillaDataManager):
    """See the module docstring."""

    config: EditDataManagerConfig

    def setup_train(self) -> None:
        super().setup_train()
        batch = self.train_image_dataloader.cached_collated_batch
        if batch is None:
            raise ValueError(
                "editing needs every training image cached: keep "
                "--pipeline.datamanager.train-num-images-to-sample-from at -1"
            )
        self._position = {int(i): p for p, i in enumerate(batch["image_idx"])}
        order = torch.argsort(batch["image_idx"])
        self.source_images: Float[Tensor, "N H W 3"] = batch["image"][order][..., :3].clone()

    @property
    def num_train_views(self) -> int:
        return len(self.train_dataset)

    def source_image(self, index: int) -> Float[Tensor, "H W 3"]:
        """The original (unedited) image of training view ``index``."""
        return self.source_images[index]

    def view_rays(
        self,
        index: int,
        scale: float = 1.0,
        crop: tuple[int, int, int, int] | None = None,
    ) -> RayBundle:
        """Rays of training view ``index`` as an ``H x W`` bundle.

        Args:
            index: training view.
            scale: resolution factor (0.5 renders half width and height).
            crop: ``(top, left, height, width)`` in pixels of the scaled view; None: whole view.
        """
        camera = self.train_dataset.cameras[index : index + 1].to(self.device)
        if scale != 1.0:
            camera.rescale_output_resolution(scale)
        rays = camera.generate_rays(camera_indices=0, keep_shape=True)
        # appearance embedding and camera optimizer are indexed by the dataset index
        rays.camera_indices = torch.full_like(rays.camera_indices, index)
        if crop is not None:
            top, left, height, width = crop
            rays = rays[top : top + height, left : left + width]
        return rays

    def replace_train_image(self, index: int, image: Float[Tensor, "H W 3"]) -> None:
        """Make ``image`` the photometric target of view ``index`` (the dataset update)."""
        batch = self.train_image_dataloader.cached_collated_batch
        target = batch["image"][self._position[index]]
        target[..., :3] = image.to(target)
