"""A DataManager without data: random cameras around the origin, for text-to-3D.

Training views are drawn from an orbit (radius, elevation, azimuth and field-of-view ranges, all
uniform; elevation uniform on the sphere's area, so below the horizon is allowed), looking at the
origin with world +z up (:func:`~nerfstudio_distill.data.scene.look_at`, the convention of
``ns-distill-scene``). The azimuth range can start at its centre (the front) and widen to its full
span over ``azimuth_warmup`` steps, and the render resolution follows a step schedule.

It is also a complete nerfstudio DataManager for the tools that read a trained run (nerfstudio's
RandomCamerasDataManager is not: ``ns-export`` fails on it, nerfstudio #2121):

- ``next_train(step)`` returns ``train_pixel_sampler.num_rays_per_batch`` random rays from random
  cameras, which ``ns-export pointcloud``/``poisson`` turn into points;
- ``train_dataset``/``eval_dataset`` hold a fixed, evenly spread set of cameras (with
  ``_dataparser_outputs``, ``cameras`` and ``scene_box``), which ``ns-export tsdf`` renders and the
  viewer draws; ``train_dataparser_outputs`` carries the (identity) dataparser transform.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.data.datamanagers.random_cameras_datamanager import RandomCamerasDataManager
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.pixel_samplers import PixelSamplerConfig
from nerfstudio.data.scene_box import SceneBox
from torch import Tensor

from nerfstudio_distill.data.scene import look_at
from nerfstudio_distill.errors import DistillError

FLAG = "--pipeline.datamanager."


@dataclass
class RandomCamerasConfig(DataManagerConfig):
    """Random cameras on an orbit around the origin (no --data)."""

    _target: type = field(default_factory=lambda: RandomCameras)
    radius: tuple[float, float] = (3.0, 3.5)
    """Range of the camera distance from the origin (min max); equal values fix it."""
    elevation: tuple[float, float] = (-10.0, 60.0)
    """Range of the camera elevation above the xy-plane in degrees (min max, within -90..90); negative
    is below the horizon. Drawn uniformly on the sphere's area."""
    azimuth: tuple[float, float] = (-180.0, 180.0)
    """Range of the camera azimuth around +z in degrees (min max, at most 360 apart); 0 is the front
    (camera on +x), +-180 the back."""
    azimuth_warmup: int = 0
    """Steps over which the azimuth range widens linearly from its centre to its full span (0: full
    span from the start)."""
    fov: tuple[float, float] = (40.0, 70.0)
    """Range of the vertical field of view in degrees (min max, inside 0..180)."""
    resolutions: tuple[int, ...] = (64,)
    """Render resolution (square, pixels) of each stage of the schedule."""
    resolution_milestones: tuple[int, ...] = ()
    """Steps at which the next resolution starts; one fewer than --pipeline.datamanager.resolutions
    (ignored when there is only one)."""
    num_views: int = 1
    """Views rendered per step (the batch)."""
    scene_bound: float = 1.0
    """Half size of the scene box (the object lives in [-b, b]^3); cameras must stay outside it."""
    num_eval_views: int = 32
    """Fixed, evenly spread cameras of the eval/train dataset: drawn in the viewer, rendered by
    `ns-export tsdf` and by evaluation."""
    eval_resolution: int | None = None
    """Resolution of the fixed cameras; None: the last training resolution."""
    train_num_rays_per_batch: int = 4096
    """Random rays returned by next_train (what `ns-export pointcloud`/`poisson` sample)."""


@dataclass
class RandomViews:
    """A batch of sampled views."""

    cameras: Cameras
    """B pinhole cameras (square images of ``resolution`` pixels)."""
    elevation: Float[Tensor, " B"]
    """Elevation of each camera above the xy-plane, degrees."""
    azimuth: Float[Tensor, " B"]
    """Azimuth of each camera around +z, degrees in [-180, 180), 0 on +x."""
    resolution: int
    """Image width and height in pixels."""

    def __len__(self) -> int:
        return len(self.elevation)

    def rays(self) -> RayBundle:
        """All rays of every view, ``B x H x W``; ``camera_indices`` is the view's index."""
        b, r = len(self), self.resolution
        device = self.cameras.device
        grid = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij"), -1) + 0.5
        coords = grid.to(device, torch.float32).expand(b, r, r, 2)
        index = torch.arange(b, device=device).view(b, 1, 1, 1).expand(b, r, r, 1)
        return generate_rays(self.cameras, index, coords)


def generate_rays(cameras: Cameras, index: Tensor, coords: Tensor) -> RayBundle:
    """``cameras.generate_rays`` for per-ray camera indices, without the torch 2.9 deprecation warning
    that nerfstudio 1.1.5's indexing raises for them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        return cameras.generate_rays(camera_indices=index, coords=coords)


def check_camera_config(config: RandomCamerasConfig) -> None:
    """One-line errors naming the flag to fix, for every camera setting."""

    def ordered(name: str, value: tuple[float, ...], example: str) -> tuple[float, float]:
        if len(value) != 2:
            raise DistillError(f"{FLAG}{name} takes two numbers (min max), got {value}: e.g. {example}")
        lo, hi = float(value[0]), float(value[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DistillError(f"{FLAG}{name} must be finite, got {value}: e.g. {FLAG}{name} {example}")
        if lo > hi:
            raise DistillError(
                f"{FLAG}{name} ({lo:g}, {hi:g}) is given backwards: pass the smaller value first, "
                f"{FLAG}{name} {hi:g} {lo:g}"
            )
        return lo, hi

    if config.data is not None:
        raise DistillError(
            f"text-to-3D makes the scene from the prompt alone and reads no data: drop --data {config.data}"
        )
    radius = ordered("radius", config.radius, "3.0 3.5")
    if radius[0] <= 0:
        raise DistillError(f"{FLAG}radius must be > 0, got {radius[0]:g}: e.g. {FLAG}radius 3.0 3.5")
    if radius[0] <= config.scene_bound:
        raise DistillError(
            f"{FLAG}radius {radius[0]:g} puts cameras inside the scene box (half size {config.scene_bound:g}): "
            f"pass a radius above {config.scene_bound:g}, or a smaller {FLAG}scene-bound"
        )
    fov = ordered("fov", config.fov, "40 70")
    if fov[0] <= 0 or fov[1] >= 180:
        raise DistillError(
            f"{FLAG}fov must lie inside (0, 180) degrees, got {config.fov}: e.g. {FLAG}fov 40 70"
        )
    elevation = ordered("elevation", config.elevation, "-10 60")
    if elevation[0] < -90 or elevation[1] > 90:
        raise DistillError(
            f"{FLAG}elevation must lie in [-90, 90] degrees, got {config.elevation}: e.g. {FLAG}elevation -10 60"
        )
    azimuth = ordered("azimuth", config.azimuth, "-180 180")
    if azimuth[1] - azimuth[0] > 360:
        raise DistillError(
            f"{FLAG}azimuth {config.azimuth} spans more than 360 degrees: e.g. {FLAG}azimuth -180 180"
        )
    if not config.resolutions or any(int(r) < 1 for r in config.resolutions):
        raise DistillError(
            f"{FLAG}resolutions must be positive pixel counts, got {config.resolutions}: e.g. {FLAG}resolutions 64"
        )
    milestones = tuple(config.resolution_milestones) if len(config.resolutions) > 1 else ()
    if len(milestones) != len(config.resolutions) - 1 or list(milestones) != sorted(set(milestones)):
        raise DistillError(
            f"{FLAG}resolution-milestones {milestones} must be {len(config.resolutions) - 1} increasing steps, "
            f"one per change of {FLAG}resolutions {config.resolutions}"
        )
    if config.num_views < 1 or config.num_eval_views < 1 or config.azimuth_warmup < 0:
        raise DistillError(
            f"{FLAG}num-views and num-eval-views must be >= 1 and azimuth-warmup >= 0, got "
            f"{config.num_views}, {config.num_eval_views}, {config.azimuth_warmup}"
        )


class BlankViewsDataset(InputDataset):
    """The fixed cameras as a dataset with blank images (the viewer draws them; nothing trains on them)."""

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, index: int) -> dict:
        camera = self.cameras[index]
        return {"image": torch.zeros(int(camera.height), int(camera.width), 3), "image_idx": index}


class RandomCameras(RandomCamerasDataManager):
    """See the module docstring. (A subclass of nerfstudio's RandomCamerasDataManager only so that
    `ns-export` accepts it; none of its code runs.)"""

    config: RandomCamerasConfig

    def __init__(
        self,
        config: RandomCamerasConfig,
        device: torch.device | str = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        check_camera_config(config)
        self.config = config
        self.device = device
        self.test_mode = test_mode
        self.world_size, self.local_rank = world_size, local_rank
        self.sampler = None
        b = float(config.scene_bound)
        scene_box = SceneBox(aabb=torch.tensor([[-b, -b, -b], [b, b, b]], dtype=torch.float32))
        self.train_dataparser_outputs = DataparserOutputs(
            image_filenames=[], cameras=self.fixed_cameras(), scene_box=scene_box
        )
        self.train_dataset = BlankViewsDataset(self.train_dataparser_outputs)
        self.eval_dataset = BlankViewsDataset(self.train_dataparser_outputs)
        self.train_pixel_sampler = PixelSamplerConfig(
            num_rays_per_batch=config.train_num_rays_per_batch
        ).setup()
        self._last_resolution = int(config.resolutions[0])
        DataManager.__init__(self)

    def setup_train(self) -> None:
        """Nothing to load."""

    def setup_eval(self) -> None:
        """Nothing to load."""

    # ----------------------------------------------------------------- sampling
    def resolution_at(self, step: int) -> int:
        """Render resolution of ``step`` (the schedule of resolutions/resolution_milestones)."""
        resolutions = self.config.resolutions
        stage = sum(step >= m for m in self.config.resolution_milestones) if len(resolutions) > 1 else 0
        return int(resolutions[stage])

    def azimuth_range_at(self, step: int | None) -> tuple[float, float]:
        """Azimuth range at ``step`` (None: the full range), widened from the centre by the warm-up."""
        lo, hi = self.config.azimuth
        warmup = self.config.azimuth_warmup
        frac = 1.0 if step is None or warmup == 0 else min(max(step / warmup, 0.0), 1.0)
        centre = (lo + hi) / 2
        return centre - frac * (centre - lo), centre + frac * (hi - centre)

    def sample_views(
        self,
        step: int | None,
        generator: torch.Generator | None = None,
        num_views: int | None = None,
        resolution: int | None = None,
    ) -> RandomViews:
        """Draw views for ``step`` (None: full azimuth range, last resolution), from ``generator``."""
        cfg = self.config
        n = cfg.num_views if num_views is None else num_views
        res = resolution or (self.resolution_at(step) if step is not None else int(cfg.resolutions[-1]))
        self._last_resolution = res

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        z = uniform(*(math.sin(math.radians(e)) for e in cfg.elevation))  # uniform on the sphere's area
        elevation = torch.rad2deg(torch.asin(z.clamp(-1, 1)))
        azimuth = uniform(*self.azimuth_range_at(step))
        return self._views(elevation, azimuth, uniform(*cfg.radius), uniform(*cfg.fov), res)

    def fixed_cameras(self) -> Cameras:
        """``num_eval_views`` cameras spread evenly (Fibonacci) over the elevation and azimuth ranges,
        at the middle radius and field of view."""
        cfg = self.config
        n = cfg.num_eval_views
        lo, hi = (math.sin(math.radians(e)) for e in cfg.elevation)
        i = torch.arange(n, dtype=torch.float64)
        elevation = torch.rad2deg(torch.asin((lo + (hi - lo) * (i + 0.5) / n).clamp(-1, 1)))
        turn = torch.remainder(i * (3 - math.sqrt(5)) / 2, 1.0)  # golden-angle spread
        azimuth = cfg.azimuth[0] + (cfg.azimuth[1] - cfg.azimuth[0]) * turn
        radius = torch.full((n,), sum(cfg.radius) / 2, dtype=torch.float64)
        fov = torch.full((n,), sum(cfg.fov) / 2, dtype=torch.float64)
        res = cfg.eval_resolution or int(cfg.resolutions[-1])
        return self._views(elevation, azimuth, radius, fov, res).cameras.to("cpu")

    def _views(
        self, elevation: Tensor, azimuth: Tensor, radius: Tensor, fov: Tensor, res: int
    ) -> RandomViews:
        el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
        eye = radius[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
        c2w = torch.from_numpy(np.stack([look_at(p) for p in eye.numpy()]))
        focal = 0.5 * res / torch.tan(torch.deg2rad(fov) / 2)  # as SceneCameras.from_poses
        cameras = Cameras(
            camera_to_worlds=c2w[:, :3, :4].float(),
            fx=focal[:, None].float(),
            fy=focal[:, None].float(),
            cx=res / 2,
            cy=res / 2,
            width=res,
            height=res,
            camera_type=CameraType.PERSPECTIVE,
        ).to(self.device)
        wrapped = torch.remainder(azimuth + 180.0, 360.0) - 180.0
        return RandomViews(cameras, elevation.float(), wrapped.float(), res)

    # ------------------------------------------------------- nerfstudio interface
    def _random_rays(self, step: int | None) -> tuple[RayBundle, dict]:
        n = self.train_pixel_sampler.num_rays_per_batch
        views = self.sample_views(step, num_views=max(1, min(n, 64)))
        res = views.resolution
        index = torch.randint(len(views), (n,))
        coords = torch.randint(res, (n, 2)).float() + 0.5
        rays = generate_rays(views.cameras, index[:, None].to(self.device), coords.to(self.device))
        return rays, {"elevation": views.elevation[index], "azimuth": views.azimuth[index]}

    def next_train(self, step: int) -> tuple[RayBundle, dict]:
        """Random rays from random cameras of the full range (``ns-export pointcloud``/``poisson``)."""
        self.train_count += 1
        return self._random_rays(None)

    def next_eval(self, step: int) -> tuple[RayBundle, dict]:
        """Random rays from random cameras of the full range."""
        self.eval_count += 1
        return self._random_rays(None)

    def next_eval_image(self, step: int) -> tuple[Cameras, dict]:
        """One of the fixed cameras, in turn."""
        index = self.eval_count % len(self.eval_dataset)
        self.eval_count += 1
        return self.eval_dataset.cameras[index : index + 1].to(self.device), {"image_idx": index}

    def get_train_rays_per_batch(self) -> int:
        return self.config.num_views * self._last_resolution**2

    def get_eval_rays_per_batch(self) -> int:
        return self.train_pixel_sampler.num_rays_per_batch

    def get_param_groups(self) -> dict:
        return {}
