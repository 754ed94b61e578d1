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
"""Index of an exact-prior image set: ``{"prompts": {"<prompt>": "<subfolder>", ...}, "sigma": 0.0}``; an
image-conditioned set adds ``"conditions": {"<prompt>": "<subfolder>", ...}`` (each image's condition image
under the same file name) and ``"condition_sigma"``; a camera-conditioned set adds ``"cameras": "cameras.json"``
(each image's camera, :data:`~nerfstudio_distill.priors.exact.CAMERA_FILE`) and optionally ``"camera_sigma"``
(degrees)."""


@dataclass
class ExactPriorConfig:
    """The closed-form denoiser of a prompt-labelled image set (no network; runs on CPU)."""

    folder: Path | None = None
    """Folder holding exact_prior.json and one subfolder of PNGs per prompt, e.g. as written by
    nerfstudio_distill.data.prior_sets. Images must have the render resolution."""
    sigma: float | None = None
    """Std of the Gaussian around each image (pixel units in [0, 1]); 0 memorises the set exactly.
    None: the value in exact_prior.json (else 0)."""
    condition_sigma: float | None = None
    """Image-conditioned sets (an exact InstructPix2Pix): std τ of a condition image around each pair's
    "before" image (pixel units); small: the pair whose "before" is nearest the view's original image wins.
    None: the value in exact_prior.json (else 0.1)."""
    image_guidance_scale: float = 1.0
    """Image-conditioned sets: image CFG scale s_I (1: the exact conditional, no image guidance)."""
    camera_sigma: float | None = None
    """Sets with cameras (cameras.json; text to 3D conditions each view on its camera): angular bandwidth κ
    in degrees. An image counts in proportion to exp(−d²/2κ²), d the angle between the view's and the
    image's viewing directions (seen from the world origin): small κ keeps only the images seen from near
    the view, a huge κ ignores the camera. None: "camera_sigma" in exact_prior.json, else the set's camera
    spacing (the median angle from a camera to its nearest other one)."""
    device: str | None = None
    """Device of the image set; None: the NeRF's device."""

    def _index(self) -> dict:
        """The parsed exact_prior.json; one line if the set is missing or not an index."""
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
            index = json.loads(index_file.read_text())
            for key in ("prompts", "conditions") if "conditions" in index else ("prompts",):
                index[key] = {str(prompt): Path(self.folder) / sub for prompt, sub in index[key].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PriorLoadError(
                f"{index_file} is not an exact-prior index ({type(e).__name__}): it must hold "
                '{"prompts": {"<prompt>": "<subfolder>"}}; rewrite it with nerfstudio_distill.data.prior_sets'
            ) from None
        return index

    def folders(self) -> dict[str, Path]:
        """prompt -> its image folder, from exact_prior.json; one line if the set is missing or empty."""
        folders = self._index()["prompts"]
        for prompt, folder in folders.items():
            if not any(folder.glob("*.png")):
                raise PriorLoadError(
                    f"the exact prior's folder {folder} for {prompt!r} holds no *.png: fill it, or remove the "
                    f"prompt from {Path(self.folder) / EXACT_PRIOR_FILE}"
                )
        return folders

    def condition_folders(self) -> dict[str, Path] | None:
        """prompt -> the folder of its condition images, for an image-conditioned set; None otherwise."""
        return self._index().get("conditions") if self.folder is not None else None

    def cameras(self) -> dict[Path, list[float]] | None:
        """image file -> its camera (12 numbers), for a set with cameras; None otherwise. One line when the
        cameras file is missing or unreadable, or its cameras and the set's images differ in number."""
        from nerfstudio_distill.priors.exact import CAMERA_FILE

        index = self._index() if self.folder is not None else {}
        if "cameras" not in index:
            return None
        file = Path(self.folder) / str(index["cameras"])
        if not file.is_file():
            raise PriorLoadError(
                f"{file} not found, but {Path(self.folder) / EXACT_PRIOR_FILE} lists it as the set's cameras: "
                f"write the set again with cameras (write_exact_prior_set(..., cameras=True)), or drop "
                f'"cameras" from the index'
            )
        try:
            raw = json.loads(file.read_text())
            cameras = {Path(self.folder) / name: [float(x) for x in c] for name, c in raw.items()}
            if any(len(c) != 12 for c in cameras.values()):
                raise ValueError
        except (ValueError, TypeError, AttributeError):
            raise PriorLoadError(
                f"{file} is not a cameras file: it must map each image (set_00/<name>.png) to its 12-number "
                f"camera ({CAMERA_FILE} as write_exact_prior_set writes it)"
            ) from None
        images = sum(len(list(folder.glob("*.png"))) for folder in self.folders().values())
        if len(cameras) != images:
            raise PriorLoadError(
                f"{file} holds {len(cameras)} cameras but the set has {images} images: give every image one "
                "camera (write the set again)"
            )
        return cameras

    @property
    def takes_camera(self) -> bool:
        """Whether the set has cameras (False when there is no readable set yet: check() says why)."""
        try:
            return self.folder is not None and "cameras" in self._index()
        except PriorLoadError:
            return False

    def camera_sigma_value(self) -> float | None:
        """--pipeline.prior.exact.camera-sigma, else the index's "camera_sigma" (None: the set's camera
        spacing, found when the prior is built); one line if it is not a positive finite angle."""
        value, where = self.camera_sigma, "--pipeline.prior.exact.camera-sigma"
        if value is None:
            value = self._index().get("camera_sigma")
            where = f'"camera_sigma" in {Path(self.folder) / EXACT_PRIOR_FILE}'
            if value is None:
                return None
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise PriorLoadError(f"{where} is {value}: pass a finite angle in degrees > 0")
        return float(value)

    @property
    def takes_image(self) -> bool:
        """Whether the set is image-conditioned (False when there is no readable set yet: check() says why)."""
        try:
            return self.condition_folders() is not None
        except PriorLoadError:
            return False

    def sigma_value(self, name: str = "sigma") -> float:
        """--pipeline.prior.exact.sigma (``name``: or condition-sigma), else the index's value (else 0, and
        0.1 for condition_sigma); one line if it is not a valid standard deviation."""
        from nerfstudio_distill.priors.exact import EXACT_CONDITION_SIGMA

        default, least = (
            (0.0, ">= 0 (0 memorises the set)") if name == "sigma" else (EXACT_CONDITION_SIGMA, "> 0")
        )
        where = f"--pipeline.prior.exact.{name.replace('_', '-')}"
        value = getattr(self, name)
        if value is None:
            where = f'"{name}" in {Path(self.folder) / EXACT_PRIOR_FILE}'
            value = self._index().get(name, default)
        valid = isinstance(value, (int, float)) and math.isfinite(value)
        if not (valid and (value >= 0 if name == "sigma" else value > 0)):
            raise PriorLoadError(f"{where} is {value}: pass a finite standard deviation {least}")
        return float(value)

    def image_size(self) -> tuple[int, int]:
        """Height and width of the set's images (read from the first file's header)."""
        from PIL import Image

        first = sorted(next(iter(self.folders().values())).glob("*.png"))[0]
        with Image.open(first) as im:
            return im.height, im.width

    def setup(self, device: str | None = None) -> Prior:
        from nerfstudio_distill.priors.exact import ExactPrior

        conditions, cameras = self.condition_folders(), self.cameras()
        extra = {}
        if conditions is not None:
            extra = dict(
                condition_sigma=self.sigma_value("condition_sigma"),
                image_guidance_scale=self.image_guidance_scale,
            )
        if cameras is not None:
            extra["camera_sigma"] = self.camera_sigma_value()
        prior = ExactPrior.from_folders(
            self.folders(), conditions, cameras=cameras, sigma=self.sigma_value(), **extra
        )
        return prior.to(self.device or device or "cpu")


@dataclass
class PriorConfig:
    """The diffusion prior that judges rendered views."""

    kind: Literal["stable-diffusion", "instruct-pix2pix", "exact"] = "stable-diffusion"
    """stable-diffusion: a diffusers SD checkpoint (hub id or local folder). instruct-pix2pix: an
    InstructPix2Pix checkpoint, conditioned on the source view's image with the target prompt as the
    instruction (three-branch CFG: text and image scales). exact: the closed-form optimal denoiser of a
    labelled image set, for offline demos and scored CPU runs (a set with condition images is an exact
    InstructPix2Pix: its prompts are instructions, conditioned on the source view's image)."""
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
        for kind in ("stable-diffusion", "instruct-pix2pix"):
            options = self.stable_diffusion if kind == "stable-diffusion" else self.instruct_pix2pix
            if self.kind == kind and options.lora is not None:
                from nerfstudio_distill.priors.lora import read_lora_record

                read_lora_record(options.lora, f"{flag}{kind}.lora")  # the weights are checked when loaded
                if not math.isfinite(options.lora_scale):
                    raise PriorLoadError(
                        f"{flag}{kind}.lora-scale {options.lora_scale}: pass a finite number"
                    )
        if self.kind == "exact":
            self.exact.folders()
            self.exact.sigma_value()
            if self.exact.takes_image:
                self.exact.sigma_value("condition_sigma")
            if self.exact.takes_camera:
                self.exact.cameras()
                self.exact.camera_sigma_value()

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
        """Whether the prior is conditioned on the source view's image (instruct-pix2pix, or an exact prior
        whose set has condition images), known without loading it."""
        return self.kind == "instruct-pix2pix" or (self.kind == "exact" and self.exact.takes_image)

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
