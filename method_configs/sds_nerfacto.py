"""ns-train sds-nerfacto: text-to-3D with Score Distillation Sampling (DreamFusion)."""

from method_configs._text_to_3d import text_to_3d_method
from nerfstudio_distill.guidance.common import TimestepSchedule
from nerfstudio_distill.guidance.config import GuidanceConfig

sds_nerfacto = text_to_3d_method(
    "sds-nerfacto",
    GuidanceConfig(
        method="sds",
        guidance_scale=100.0,
        timesteps=TimestepSchedule(
            min_fraction=0.02, max_fraction=0.98, anneal="sqrt", final_max_fraction=0.5
        ),
    ),
    "Create a scene from a text prompt with Score Distillation Sampling (exportable).",
)
