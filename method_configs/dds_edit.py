"""ns-train dds-edit: Delta Denoising Score edit of a trained nerfacto scene (baseline)."""

from method_configs._edit import edit_method
from nerfstudio_distill.guidance.config import GuidanceConfig

dds_edit = edit_method(
    "dds-edit",
    GuidanceConfig(method="dds", weighting="uniform"),
    "Edit a trained nerfacto scene with Delta Denoising Score (editing baseline).",
)
