"""One config that picks and builds a prior: Stable Diffusion, or the exact prior of an image set.

Plain dataclasses (tyro shows them as ``--pipeline.prior.*``); nothing heavy is imported until
:meth:`PriorConfig.setup` runs, so building a pipeline config never loads diffusers.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nerfstudio_distill.errors import PriorLoadError
from nerfstudio_distill.priors.base import Prior, check_device
from nerfstudio_distill.priors.instruct_pix2pix import InstructPix2PixPriorConfig
from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPriorConfig

EXACT_PRIOR_FILE = "exact_prior.json"
"""Index of an exact-prior image set: ``{"prompts": {"<prompt>": "<subfolder>", ...}, "sigma": 0.0}``."""


@dataclass
class ExactPriorConfig:
    """The closed-form denoiser of a prompt-labelled image set (no network; runs on CPU)."""

    folder: Path | None = None
    """Folder holding exact_prior.json and one subfolder of PNGs per prompt, e.g. as written by
    nerfstudio_distill.data.prior_sets. Images must have the render resolution."""
    sigma: float | None = None
    """Std of the Gaussian around each image (pixel units in [0, 1]); 0 memorises the set exactly.
    None: the value in exact_prior.json (else 0)."""
    device: str | None = None
    """Device of the image set; None: the NeRF's device."""

    def folders(self) -> dict[str, Path]:
        """prompt -> its image folder, from exact_prior.json; one line if the set is missing or empty."""
        if self.folder is None:
            raise PriorLoadError(
                "the exact prior needs an image set: pass --pipeline.prior.exact.folder DIR (a folder with "
                f"{EXACT_PRIOR_FILE})"
            )
        index_file = Path(self.folder) / EXACT_PRIOR_FILE
        if not index_file.is_file():
            raise PriorLoadError(
                f"{index_file} not found: point --pipeline.prior.exact.folder at a folder written by "
                "nerfstudio_distill.data.prior_sets (it holds exact_prior.json)"
            )
        try:
            prompts = json.loads(index_file.read_text())["prompts"]
            folders = {str(prompt): Path(self.folder) / sub for prompt, sub in prompts.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PriorLoadError(
                f"{index_file} is not an exact-prior index ({type(e).__name__}): it must hold "
                '{"prompts": {"<prompt>": "<subfolder>"}}; rewrite it with nerfstudio_distill.data.prior_sets'
            ) from None
        for prompt, folder in folders.items():
            if not any(folder.glob("*.png")):
                raise PriorLoadError(
                    f"the exact prior's folder {folder} for {prompt!r} holds no *.png: fill it, or remove the "
                    f"prompt from {index_file}"
                )
        return folders

    def sigma_value(self) -> float:
        """--pipeline.prior.exact.sigma, else the index's "sigma" (else 0); one line if it is not >= 0."""
        index_file = Path(self.folder) / EXACT_PRIOR_FILE
        where = "--pipeline.prior.exact.sigma"
        sigma = self.sigma
        if sigma is None:
            where = f'"sigma" in {index_file}'
            sigma = json.loads(index_file.read_text()).get("sigma", 0.0)
        if not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
            raise PriorLoadError(
                f"{where} is {sigma}: pass a finite standard deviation >= 0 (0 memorises the set)"
            )
        return float(sigma)

    def image_size(self) -> tuple[int, int]:
        """Height and width of the set's images (read from the first file's header)."""
        from PIL import Image

        first = sorted(next(iter(self.folders().values())).glob("*.png"))[0]
        with Image.open(first) as im:
            return im.height, im.width

    def setup(self, device: str | None = None) -> Prior:
        from nerfstudio_distill.priors.exact import ExactPrior

        prior = ExactPrior.from_folders(self.folders(), sigma=self.sigma_value())
        return prior.to(self.device or device or "cpu")


@dataclass
class PriorConfig:
    """The diffusion prior that judges rendered views."""

    kind: Literal["stable-diffusion", "instruct-pix2pix", "exact"] = "stable-diffusion"
    """stable-diffusion: a diffusers SD checkpoint (hub id or local folder). instruct-pix2pix: an
    InstructPix2Pix checkpoint, conditioned on the source view's image with the target prompt as the
    instruction (three-branch CFG: text and image scales). exact: the closed-form optimal denoiser of a
    labelled image set, for offline demos and scored CPU runs."""
    stable_diffusion: StableDiffusionPriorConfig = field(default_factory=StableDiffusionPriorConfig)
    """Options of the Stable Diffusion prior (used when kind is stable-diffusion)."""
    instruct_pix2pix: InstructPix2PixPriorConfig = field(default_factory=InstructPix2PixPriorConfig)
    """Options of the InstructPix2Pix prior (used when kind is instruct-pix2pix)."""
    exact: ExactPriorConfig = field(default_factory=ExactPriorConfig)
    """Options of the exact prior (used when kind is exact)."""

    def check(self, flag: str = "--pipeline.prior.") -> None:
        """One-line errors for the options that can be checked without loading anything."""
        check_device(self.stable_diffusion.device, f"{flag}stable-diffusion.device")
        check_device(self.instruct_pix2pix.device, f"{flag}instruct-pix2pix.device")
        check_device(self.exact.device, f"{flag}exact.device")
        if self.kind == "exact":
            self.exact.folders()
            self.exact.sigma_value()

    def setup(self, device: str | None = None) -> Prior:
        """Build the prior; ``device`` is the NeRF's, used when the prior's own device is unset."""
        if self.kind == "exact":
            return self.exact.setup(device)
        options = self.instruct_pix2pix if self.kind == "instruct-pix2pix" else self.stable_diffusion
        return options.setup(device=options.device or device)

    @property
    def default_guidance_scale(self) -> float:
        """The CFG scale a guidance method uses when ``--pipeline.guidance.guidance-scale`` is None (known
        without loading the prior): Stable Diffusion's ``--pipeline.prior.stable-diffusion.guidance-scale``
        (7.5), InstructPix2Pix's text scale ``--pipeline.prior.instruct-pix2pix.guidance-scale`` (7.5; its
        image scale is the prior's own option), the exact prior's 1."""
        if self.kind == "exact":
            from nerfstudio_distill.priors.exact import EXACT_GUIDANCE_SCALE

            return EXACT_GUIDANCE_SCALE
        if self.kind == "instruct-pix2pix":
            return self.instruct_pix2pix.guidance_scale
        return self.stable_diffusion.guidance_scale

    @property
    def takes_image(self) -> bool:
        """Whether the prior is conditioned on the source view's image (instruct-pix2pix), known without
        loading it."""
        return self.kind == "instruct-pix2pix"

    @property
    def native_resolution(self) -> bool:
        """Whether the prior takes renders at their own size (exact) rather than resized (SD)."""
        return self.kind == "exact"


def warn_unused_source_prompt(config: PriorConfig, source_prompt: str, prefix: str, image: str) -> None:
    """Warn (as the caller's caller) when a source prompt is given to a prior conditioned on images
    (instruct-pix2pix): its source branch is the empty instruction on ``image`` (e.g. "the input image");
    ``prefix`` is how the flags are written ("--pipeline." or "--")."""
    if config.takes_image and source_prompt.strip():
        warnings.warn(
            f"{prefix}source-prompt is unused with {prefix}prior.kind instruct-pix2pix: the source branch "
            f"is the empty instruction conditioned on {image}",
            UserWarning,
            stacklevel=3,
        )
