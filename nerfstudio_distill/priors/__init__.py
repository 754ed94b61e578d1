"""Diffusion priors behind one interface (:class:`Prior`).

Importing this package never imports diffusers or transformers; :class:`StableDiffusionPrior` loads
them when it is constructed.
"""

from .base import (
    CFG,
    Branch,
    Condition,
    Prior,
    PriorInputError,
    camera_condition,
    classifier_free_guidance,
    scaled_linear_betas,
)
from .config import ExactPriorConfig, PriorConfig
from .exact import ExactPrior
from .instruct_pix2pix import InstructPix2PixPrior, InstructPix2PixPriorConfig
from .stable_diffusion import (
    PriorLoadError,
    StableDiffusionPrior,
    StableDiffusionPriorConfig,
    import_diffusers,
    v_to_eps,
)

__all__ = [
    "CFG",
    "Branch",
    "Condition",
    "ExactPrior",
    "ExactPriorConfig",
    "InstructPix2PixPrior",
    "InstructPix2PixPriorConfig",
    "Prior",
    "PriorConfig",
    "PriorInputError",
    "PriorLoadError",
    "StableDiffusionPrior",
    "StableDiffusionPriorConfig",
    "camera_condition",
    "classifier_free_guidance",
    "import_diffusers",
    "scaled_linear_betas",
    "v_to_eps",
]
