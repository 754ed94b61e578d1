"""nerfacto's sampling regularisers, for models and pipelines that render whole images in training mode."""

from __future__ import annotations

from typing import Any

from nerfstudio.model_components.losses import distortion_loss, interlevel_loss
from nerfstudio.models.base_model import Model
from torch import Tensor


def nerfacto_regularizers(model: Model, outputs: dict[str, Any]) -> dict[str, Tensor]:
    """nerfacto's proposal (interlevel) and distortion losses for the rendered rays (training mode)."""
    if "weights_list" not in outputs:
        return {}
    weights, samples = outputs["weights_list"], outputs["ray_samples_list"]
    cfg = model.config
    return {
        "interlevel_loss": cfg.interlevel_loss_mult * interlevel_loss(weights, samples),
        "distortion_loss": cfg.distortion_loss_mult * distortion_loss(weights, samples),
    }
