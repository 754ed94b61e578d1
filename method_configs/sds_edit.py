"""ns-train sds-edit: Score Distillation Sampling edit of a trained nerfacto scene (baseline)."""

from method_configs._edit import edit_method
from nerfstudio_distill.guidance.config import GuidanceConfig

sds_edit = edit_method(
    "sds-edit",
    GuidanceConfig(method="sds"),
    "Edit a trained nerfacto scene with Score Distillation Sampling (baseline; ignores the source).",
)
