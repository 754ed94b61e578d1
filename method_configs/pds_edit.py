"""ns-train pds-edit: Posterior Distillation Sampling edit of a trained nerfacto scene."""

from method_configs._edit import edit_method
from nerfstudio_distill.guidance.config import GuidanceConfig

pds_edit = edit_method(
    "pds-edit",
    GuidanceConfig(method="pds"),
    "Edit a trained nerfacto scene with Posterior Distillation Sampling (keeps identity).",
)
