"""ns-train sdi-nerfacto: text-to-3D with Score Distillation via Inversion (SDI)."""

from method_configs._text_to_3d import text_to_3d_method
from nerfstudio_distill.guidance.common import TimestepSchedule
from nerfstudio_distill.guidance.config import GuidanceConfig

sdi_nerfacto = text_to_3d_method(
    "sdi-nerfacto",
    GuidanceConfig(
        method="sdi",
        guidance_scale=7.5,
        timesteps=TimestepSchedule(
            min_fraction=0.02, max_fraction=0.98, anneal="linear", final_max_fraction=0.2
        ),
        num_inversion_steps=10,
        inversion_guidance_scale=-7.5,
    ),
    "Create a scene from a text prompt with Score Distillation via Inversion (sharper than SDS; exportable).",
)
