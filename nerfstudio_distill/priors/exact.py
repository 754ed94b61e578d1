"""The exact prior: the closed-form optimal denoiser of a prompt-labelled Gaussian mixture.

Data for prompt ``y`` is ``p(x_0 | y) = (1/|K_y|) Σ_{i ∈ K_y} N(x_0; μ_i, σ² I)``, where ``K_y`` are the
components labelled ``y`` (all components for the unconditional prompt ``""``). Under the DDPM forward
process ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` (Ho et al. 2020, Eq. 4) every component stays Gaussian,
``x_t | i ~ N(√ᾱ_t μ_i, v_t I)`` with ``v_t = ᾱ_t σ² + 1 − ᾱ_t``, so the MMSE noise prediction has a closed
form. With ``σ = 0`` it is the memorising denoiser of a finite training set (Karras et al. 2022, App. B.3).
It needs no weights, runs anywhere, and is the ground truth that guidance code is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError, PriorLoadError

from .base import Prior, scaled_linear_betas

EXACT_GUIDANCE_SCALE = 1.0
"""The exact prior's default CFG scale: its conditional score is exact, so CFG > 1 only extrapolates past
its images (on the edit benchmark, 7.5 wrecked the shape on one seed of three; see the README)."""


class ExactPrior(Prior):
    """Optimal denoiser of a prompt-labelled isotropic Gaussian mixture, in any dimension.

    Args:
        points: component means μ_i, ``K x *shape`` (images ``K x 3 x H x W`` in [0, 1], or e.g. ``K x 2``).
        labels: one prompt per component; ``""`` is reserved for "all components".
        sigma: shared isotropic standard deviation of every component (0 = memorise the points).
        guidance_scale: default classifier-free guidance scale.
        betas: training β schedule (default: Stable Diffusion's scaled-linear, 1000 steps).
        steps_offset: offset of DDIM grids (SD: 1).
        dtype: dtype of the distance computation. float64 by default: at small t the logits are
            differences of large numbers divided by 2·v_t ≈ 2e-3, which float32 resolves poorly. Use
            ``torch.float32`` on devices without float64 (MPS).
    """

    points: Float[Tensor, " K *shape"]
    """Component means (non-persistent buffer in ``dtype``; moves with ``.to(device)``)."""

    def __init__(
        self,
        points: Float[Tensor, " K *shape"],
        labels: Sequence[str],
        sigma: float = 0.0,
        guidance_scale: float = EXACT_GUIDANCE_SCALE,
        betas: Float[Tensor, " T"] | None = None,
        steps_offset: int = 1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(scaled_linear_betas() if betas is None else betas, guidance_scale, steps_offset)
        points = torch.as_tensor(points).detach().to(dtype)
        labels = [str(label) for label in labels]
        if points.ndim < 2 or points.shape[0] == 0:
            raise PriorInputError(
                f"points must be K x *shape with K >= 1, got shape {tuple(points.shape)}: "
                "stack them with torch.stack"
            )
        if len(labels) != points.shape[0]:
            raise PriorInputError(
                f"got {len(labels)} labels for {points.shape[0]} points: pass one label per point"
            )
        if "" in labels:
            raise PriorInputError(
                'the empty label "" is reserved for the unconditional branch: name every component'
            )
        if sigma < 0:
            raise PriorInputError(f"sigma must be >= 0, got {sigma}: pass the components' standard deviation")
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("_sq_norms", points.flatten(1).pow(2).sum(1), persistent=False)
        self.labels = labels
        self.prompts = list(dict.fromkeys(labels))
        """Distinct prompts, in first-appearance order."""
        self.sigma = float(sigma)

    @classmethod
    def from_folders(cls, folders: Mapping[str, str | Path], **kwargs) -> ExactPrior:
        """Build from image folders: ``{"a red ball": "dir1", "a blue ball": "dir2"}``.

        Every ``*.png`` directly inside each folder (sorted by name) becomes one component labelled with
        its prompt. Images load as float in [0, 1], ``3 x H x W`` (alpha dropped, grey expanded to RGB),
        and must all share one size. ``kwargs`` go to the constructor (``sigma``, ``guidance_scale``, ...).
        """
        from nerfstudio_distill.data.images import read_rgb

        images, labels, first = [], [], None
        for prompt, folder in folders.items():
            folder = Path(folder)
            files = sorted(folder.glob("*.png")) if folder.is_dir() else []
            if not files:
                raise PriorInputError(
                    f"no *.png files in {str(folder)!r} for prompt {prompt!r}: check the folder path"
                )
            for file in files:
                try:
                    image = torch.from_numpy(read_rgb(file)).permute(2, 0, 1)
                except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
                    raise PriorLoadError(
                        f"{file} cannot be read ({type(e).__name__}: {e}): replace or delete it"
                    ) from None
                if first is None:
                    first = (file, image.shape)
                elif image.shape != first[1]:
                    raise PriorInputError(
                        f"{file} is {image.shape[1]}x{image.shape[2]} but {first[0]} is "
                        f"{first[1][1]}x{first[1][2]}: resize all images to one size"
                    )
                images.append(image)
                labels.append(prompt)
        return cls(torch.stack(images), labels, **kwargs)

    # ------------------------------------------------------------------- images
    @property
    def is_image(self) -> bool:
        """Whether the components are RGB images (``K x 3 x H x W``)."""
        return self.points.ndim == 4 and self.points.shape[1] == 3

    def encode(self, images: Float[Tensor, " B *shape"]) -> Float[Tensor, " B *shape"]:
        """Identity (the mixture lives in pixel / point space), moved to the prior's device, float32.

        Image batches are validated (range, rank, channels, resolution); other point data only by shape.
        """
        shape = tuple(self.points.shape[1:])
        if self.is_image:
            self.check_images(images)
            if tuple(images.shape[2:]) != shape[1:]:
                h, w = shape[1:]
                raise PriorInputError(
                    f"images are {images.shape[2]}x{images.shape[3]} but the exact prior's are {h}x{w}: "
                    f"resize with F.interpolate(images, size=({h}, {w}), mode='bilinear', antialias=True)"
                )
        elif images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape:
            raise PriorInputError(
                f"points must be B x {' x '.join(map(str, shape))}, got shape {tuple(images.shape)}: "
                "match the components' shape"
            )
        return images.to(self.device, torch.float32)

    def decode(self, latents: Float[Tensor, " B *shape"]) -> Float[Tensor, " B *shape"]:
        """Identity; images are clamped to [0, 1]."""
        return latents.clamp(0, 1) if self.is_image else latents

    # ------------------------------------------------------------------ prompts
    def _embed(self, prompt: str) -> Bool[Tensor, " K"]:
        """Boolean mask of the components labelled ``prompt`` (all of them for ``""``)."""
        if prompt == "":
            return torch.ones(len(self.labels), dtype=torch.bool, device=self.device)
        if prompt not in self.prompts:
            known = ", ".join(repr(p) for p in self.prompts[:10]) + (
                ", ..." if len(self.prompts) > 10 else ""
            )
            raise PriorInputError(f"unknown prompt {prompt!r}: the exact prior knows {known}")
        return torch.tensor([label == prompt for label in self.labels], dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ network
    def _mixture(
        self, x_t: Float[Tensor, " N *shape"], t: Int[Tensor, " N"], masks: Bool[Tensor, "N K"]
    ) -> tuple[Float[Tensor, "N D"], Float[Tensor, "N D"], Float[Tensor, "N 1"], Float[Tensor, "N 1"]]:
        """Flattened x_t, the responsibility-weighted mean m = Σ_i w_i μ_i, ᾱ_t and v_t (all in ``dtype``)."""
        mu = self.points.flatten(1)  # K x D
        x = x_t.to(self.device, mu.dtype).flatten(1)  # N x D
        a = self.alphas_cumprod.to(mu.dtype)[t.to(self.device)][:, None]  # N x 1
        v = a * self.sigma**2 + 1 - a  # v_t = ᾱ_t σ² + 1 − ᾱ_t: Var(x_t | i) per dim (Ho et al. 2020, Eq. 4)
        # Responsibilities w_i ∝ N(x_t; √ᾱ_t μ_i, v_t I) over the masked components (Bishop 2006, Eq. 9.13):
        # −‖x − √ᾱ μ_i‖²/(2v) = (2√ᾱ x·μ_i − ᾱ‖μ_i‖²)/(2v) − ‖x‖²/(2v); the last term is constant per row and
        # cancels in the softmax (= log-sum-exp normalisation), so it is never formed.
        logits = (2 * a.sqrt() * (x @ mu.T) - a * self._sq_norms) / (2 * v)  # N x K, one matmul
        w = torch.softmax(logits.masked_fill(~masks.to(self.device), -math.inf), dim=1)
        return x, w @ mu, a, v

    def _eps(
        self, x_t: Float[Tensor, " N *shape"], t: Int[Tensor, " N"], conds: Sequence[Tensor]
    ) -> Float[Tensor, " N *shape"]:
        x, m, a, v = self._mixture(x_t, t, torch.stack(list(conds)))
        # ε̂ = E[ε | x_t] = (x_t − √ᾱ_t E[x_0 | x_t]) / √(1−ᾱ_t)  (Ho et al. 2020, Eq. 4, in expectation);
        # with E[x_0 | x_t] from `posterior_mean` this simplifies to √(1−ᾱ_t) (x_t − √ᾱ_t Σ_i w_i μ_i) / v_t.
        eps = (1 - a).sqrt() * (x - a.sqrt() * m) / v
        return eps.float().reshape(x_t.shape)

    def posterior_mean(
        self, x_t: Float[Tensor, " B *shape"], t: Int[Tensor, " B"], prompt: str = ""
    ) -> Float[Tensor, " B *shape"]:
        """E[x_0 | x_t, y] (float32, on ``x_t``'s device) for a batch sharing one prompt."""
        t = self.check_timesteps(t).to(self.device).expand(x_t.shape[0])
        mask = self.embed([prompt])[0]
        with torch.no_grad():
            x, m, a, v = self._mixture(x_t, t, mask[None].expand(x_t.shape[0], -1))
            # Per component, x_0 | x_t, i ~ N(μ_i + σ²√ᾱ_t/v_t (x_t − √ᾱ_t μ_i), ·) (Bishop 2006, Eq. 2.116);
            # averaging with the responsibilities w_i gives m + σ²√ᾱ_t/v_t (x_t − √ᾱ_t m).
            x0 = m + self.sigma**2 * a.sqrt() / v * (x - a.sqrt() * m)
        return x0.float().reshape(x_t.shape).to(x_t.device)
