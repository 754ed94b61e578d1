"""Score-distillation guidance on latents: SDS, SDI, DDS, PDS, VSD.

Every method takes latents x0 from ``prior.encode``, talks to the network only through
:meth:`~nerfstudio_distill.priors.base.Prior.predict_noise`, and returns a :class:`GuidanceOutput`
whose ``loss`` backpropagates exactly ``grad`` into x0. Pure torch: no nerfstudio import.
"""

from nerfstudio_distill.guidance.common import (
    ANNEALS,
    WEIGHTINGS,
    GuidanceOutput,
    TimestepSchedule,
    add_noise,
    clip_grad,
    ddim_step,
    predict_x0,
    surrogate_loss,
    weight,
)
from nerfstudio_distill.guidance.config import METHODS, Guidance, GuidanceConfig, Method, VSDGuidance
from nerfstudio_distill.guidance.dds import dds
from nerfstudio_distill.guidance.pds import PDS_SCHEDULES, pds, pds_coefficients
from nerfstudio_distill.guidance.sdedit import sdedit
from nerfstudio_distill.guidance.sdi import ddim_invert, sdi
from nerfstudio_distill.guidance.sds import sds
from nerfstudio_distill.guidance.vsd import vsd

__all__ = [
    "ANNEALS",
    "PDS_SCHEDULES",
    "WEIGHTINGS",
    "METHODS",
    "Guidance",
    "GuidanceConfig",
    "Method",
    "GuidanceOutput",
    "TimestepSchedule",
    "add_noise",
    "clip_grad",
    "dds",
    "ddim_invert",
    "ddim_step",
    "pds",
    "pds_coefficients",
    "predict_x0",
    "sdedit",
    "sdi",
    "sds",
    "surrogate_loss",
    "vsd",
    "VSDGuidance",
    "weight",
]
