"""DataManagers for editing: whole training views, their original images, and their cameras.

It is nerfstudio's in-process :class:`VanillaDataManager` (so ray batches, ``ns-export``
pointcloud/poisson/tsdf and the eval loop work as for nerfacto) plus:
- :meth:`EditDataManager.source_image`: the original image of a view (the source branch of
  DDS/PDS and InstructPix2Pix's image condition), kept even after the dataset update replaces training
  images;
- :meth:`EditDataManager.view_rays`: the rays of a whole view, optionally downscaled or cropped;
- :meth:`EditDataManager.replace_train_image`: the dataset update (refinement stage, ``in2n-edit``).

:class:`EditFullImageDataManager` is the same for Gaussian splats (``pds-splatfacto``): nerfstudio's
:class:`FullImageDatamanager`, as splatfacto trains with, with ``view_camera`` instead of ``view_rays``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import (
    FullImageDatamanager,
    FullImageDatamanagerConfig,
)
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


@dataclass
class EditFullImageDataManagerConfig(FullImageDatamanagerConfig):
    """nerfstudio's FullImageDatamanager (splatfacto's) that also serves the views' original images and
    cameras for guidance."""

    _target: type = field(default_factory=lambda: EditFullImageDataManager)


class EditFullImageDataManager(FullImageDatamanager):
    """The same editing API as :class:`EditDataManager` for models that render whole images from a camera
    (Gaussian splats): nerfstudio's :class:`FullImageDatamanager` (so the photometric step of the dataset
    update, the eval loop and ``ns-export gaussian-splat`` work as for splatfacto) plus
    :meth:`source_image`, :meth:`view_camera` and :meth:`replace_train_image`."""

    config: EditFullImageDataManagerConfig

    def setup_train(self) -> None:
        super().setup_train()
        # the cache is built lazily by nerfstudio; build it now and keep the originals apart from it
        self.source_images: Float[Tensor, "N H W 3"] = torch.stack(
            [_as_float(data["image"])[..., :3] for data in self.cached_train]
        ).clone()

    @property
    def num_train_views(self) -> int:
        return len(self.train_dataset)

    def source_image(self, index: int) -> Float[Tensor, "H W 3"]:
        """The original (unedited) image of training view ``index``."""
        return self.source_images[index]

    def view_camera(self, index: int, scale: float = 1.0) -> Cameras:
        """Camera of training view ``index`` (a batch of one, on the device), its resolution times ``scale``
        (0.5: half width and height), tagged with its index as nerfstudio's ``next_train`` does."""
        camera = self.train_dataset.cameras[index : index + 1].to(self.device)
        if scale != 1.0:
            camera.rescale_output_resolution(scale)
        camera.metadata = {**(camera.metadata or {}), "cam_idx": index}
        return camera

    def replace_train_image(self, index: int, image: Float[Tensor, "H W 3"]) -> None:
        """Make ``image`` the photometric target of view ``index`` (the dataset update)."""
        target = self.cached_train[index]["image"]
        value = image.detach().clamp(0, 1).to(target.device)
        if target.dtype == torch.uint8:
            value = (value * 255).round()
        target[..., :3] = value.to(target.dtype)


def _as_float(image: Tensor) -> Float[Tensor, "H W C"]:
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()
