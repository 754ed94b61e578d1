"""Keep nerfstudio models training when LPIPS's AlexNet weights cannot be downloaded.

nerfacto, splatfacto, mipnerf, tensorf, vanilla-nerf (and a few more) build torchmetrics'
``LearnedPerceptualImagePatchSimilarity`` in ``populate_modules``. It downloads
torchvision's AlexNet weights, so on an air-gapped machine the model raises ``URLError``
before step 0.

The fix is narrow:
- Only while those nerfstudio models run ``populate_modules`` (where they import and
  build the metric), torchmetrics' LPIPS class is swapped for a wrapper. Online, or with
  the weights cached, the wrapper returns the real metric: behaviour is unchanged.
- Only a *network* error (no route, DNS failure, refused, timed out) is caught. The
  metric is then replaced by :class:`LPIPSUnavailable` and one warning is emitted per
  process.
- The models' ``get_image_metrics_and_images`` drop ``lpips`` (and ``cc_lpips``) from
  the eval metrics when the metric is unavailable, so no NaN reaches the logs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
import urllib.error
import warnings

import torch
from torch import nn

MODEL_MODULES = (
    "nerfstudio.models.nerfacto",
    "nerfstudio.models.splatfacto",
    "nerfstudio.models.mipnerf",
    "nerfstudio.models.tensorf",
    "nerfstudio.models.vanilla_nerf",
    "nerfstudio.models.instant_ngp",
    "nerfstudio.models.semantic_nerfw",
    "nerfstudio.models.base_surface_model",
)
"""nerfstudio modules that build LPIPS at model init (nerfstudio 1.1.5)."""

NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, socket.timeout)
"""What a failed weight download raises; anything else propagates unchanged."""

LPIPS_KEYS = ("lpips", "cc_lpips")
_NAME = "LearnedPerceptualImagePatchSimilarity"
_warned = False


class LPIPSUnavailable(nn.Module):
    """Stands in for the LPIPS metric when its weights could not be downloaded."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


def _warn_once(err: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"LPIPS is unavailable: its AlexNet weights could not be downloaded ({err}). Training goes on"
            " and eval metrics omit lpips; to get it back, run once online or put alexnet-owt-7be5be79.pth "
            "in $TORCH_HOME/hub/checkpoints.",
            RuntimeWarning,
            stacklevel=3,
        )


def offline_tolerant(lpips_cls):
    """Wrap an LPIPS class: build it, or :class:`LPIPSUnavailable` on a network error."""
    if getattr(lpips_cls, "_offline_tolerant", False):
        return lpips_cls

    @functools.wraps(lpips_cls, updated=())
    def build(*args, **kwargs):
        try:
            return lpips_cls(*args, **kwargs)
        except NETWORK_ERRORS as err:
            _warn_once(err)
            return LPIPSUnavailable()

    build._offline_tolerant = True
    return build


@contextlib.contextmanager
def _tolerant_lpips_class():
    lpip = importlib.import_module("torchmetrics.image.lpip")
    real = getattr(lpip, _NAME)
    setattr(lpip, _NAME, offline_tolerant(real))
    try:
        yield
    finally:
        setattr(lpip, _NAME, real)


def _build_tolerantly(populate_modules):
    if getattr(populate_modules, "_offline_tolerant", False):
        return populate_modules

    @functools.wraps(populate_modules)
    def wrapper(self, *args, **kwargs):
        with _tolerant_lpips_class():
            return populate_modules(self, *args, **kwargs)

    wrapper._offline_tolerant = True
    return wrapper


def _omit_unavailable(get_metrics):
    if getattr(get_metrics, "_omits_lpips", False):
        return get_metrics

    @functools.wraps(get_metrics)
    def wrapper(self, outputs, batch):
        metrics, images = get_metrics(self, outputs, batch)
        if isinstance(getattr(self, "lpips", None), LPIPSUnavailable):
            for key in LPIPS_KEYS:
                metrics.pop(key, None)
        return metrics, images

    wrapper._omits_lpips = True
    return wrapper


def install() -> None:
    """Patch ``populate_modules`` and the metrics of the models in :data:`MODEL_MODULES`."""
    for name in MODEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional dependency of that model is missing: nothing to fix
            continue
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == name):
                continue
            if "populate_modules" in vars(cls):
                cls.populate_modules = _build_tolerantly(cls.populate_modules)
            if "get_image_metrics_and_images" in vars(cls):
                cls.get_image_metrics_and_images = _omit_unavailable(cls.get_image_metrics_and_images)
