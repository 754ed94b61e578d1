"""The exact prior: the closed-form optimal denoiser of a prompt-labelled Gaussian mixture.

Data for prompt ``y`` is ``p(x_0 | y) = (1/|K_y|) Σ_{i ∈ K_y} N(x_0; μ_i, σ² I)``, where ``K_y`` are the
components labelled ``y`` (all components for the unconditional prompt ``""``). Under the DDPM forward
process ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` (Ho et al. 2020, Eq. 4) every component stays Gaussian,
``x_t | i ~ N(√ᾱ_t μ_i, v_t I)`` with ``v_t = ᾱ_t σ² + 1 − ᾱ_t``, so the MMSE noise prediction has a closed
form. With ``σ = 0`` it is the memorising denoiser of a finite training set (Karras et al. 2022, App. B.3).
It needs no weights, runs anywhere, and is the ground truth that guidance code is tested against.

Image condition (an exact InstructPix2Pix): when every component also carries a condition image ``c_i``
(the "before" of an edit pair whose "after" is ``μ_i``), the data is the mixture over pairs
``p(x_0, c | y) = (1/|K_y|) Σ_{i ∈ K_y} N(x_0; μ_i, σ² I) N(c; c_i, τ² I)``. Conditioning on a view's image
``c`` multiplies each component's weight by ``N(c; c_i, τ² I)``, so the denoiser favours the pairs whose
"before" looks like ``c``; a branch that drops the image uses the plain mixture. With the condition equal to
a set member and a small τ it is that member's pair alone.

Camera condition (for text to 3D): when every component also carries the camera ``c_i`` it was seen from
(:func:`~nerfstudio_distill.priors.base.camera_condition`), the data is the mixture over (image, camera)
pairs, with a camera's viewing direction ``u(c)`` (its position seen from the world origin, the object's
centre) spread around ``u(c_i)`` by an angular bandwidth κ. Conditioning on a view's camera ``c`` multiplies
each weight by ``exp(−d(c, c_i)² / 2κ²)``, ``d`` the angle between ``u(c)`` and ``u(c_i)``, so only the
images seen from near the view's direction count: a view prompt pins a camera to a quadrant, a camera to
about κ. κ → ∞ is the plain mixture, κ → 0 the images of the nearest camera alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError, PriorLoadError

from .base import CFG, Condition, Prior, scaled_linear_betas

EXACT_GUIDANCE_SCALE = 1.0
"""The exact prior's default CFG scale: its conditional score is exact, so CFG > 1 only extrapolates past
its images (on the edit benchmark, 7.5 wrecked the shape on one seed of three; see the README)."""

CAMERA_FILE = "cameras.json"
"""A camera-conditioned set's cameras, next to exact_prior.json: ``{"<subfolder>/<image>.png": [12 numbers],
...}``, one entry per image, each :func:`~nerfstudio_distill.priors.base.camera_condition` of the camera
the image was seen from (nerfstudio's camera-to-world, top 3 x 4 row by row)."""

EXACT_CONDITION_SIGMA = 0.1
"""Default τ of an image-conditioned exact prior (pixel units in [0, 1]): a condition image whose pixels
are 0.1 off a set member's on average already weighs e^(−1/2) per pixel, i.e. the nearest pair wins."""


class ExactPrior(Prior):
    """Optimal denoiser of a prompt-labelled isotropic Gaussian mixture, in any dimension.

    Args:
        points: component means μ_i, ``K x *shape`` (images ``K x 3 x H x W`` in [0, 1], or e.g. ``K x 2``).
        labels: one prompt per component; ``""`` is reserved for "all components".
        sigma: shared isotropic standard deviation of every component (0 = memorise the points).
        guidance_scale: default classifier-free guidance scale.
        betas: training β schedule (default: Stable Diffusion's scaled-linear, 1000 steps).
        steps_offset: offset of DDIM grids (SD: 1).
        conditions: condition images c_i, one per component, shaped like ``points`` (the "before" of each
            edit pair); None: no image condition.
        condition_sigma: τ, the standard deviation of a condition image around its c_i (pixel units).
        image_guidance_scale: default image CFG scale s_I of an image-conditioned prior (1: the exact
            conditional, no image guidance).
        cameras: the camera of each component, ``K x 12``
            (:func:`~nerfstudio_distill.priors.base.camera_condition` of its camera-to-world); makes the
            prior take a camera condition. None: no camera condition.
        camera_sigma: κ, the angular bandwidth of the camera condition, in degrees. None: the set's camera
            spacing (:func:`camera_spacing`, the median angle from a camera to its nearest other one).
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
        conditions: Float[Tensor, " K *shape"] | None = None,
        condition_sigma: float = EXACT_CONDITION_SIGMA,
        image_guidance_scale: float = 1.0,
        cameras: Float[Tensor, "K 12"] | None = None,
        camera_sigma: float | None = None,
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
        if conditions is not None:
            conditions = torch.as_tensor(conditions).detach().to(dtype)
            if conditions.shape != points.shape:
                raise PriorInputError(
                    f"conditions have shape {tuple(conditions.shape)} but the points {tuple(points.shape)}: "
                    "pass one condition image per component, the size of the components"
                )
            if not condition_sigma > 0:
                raise PriorInputError(
                    f"condition_sigma must be > 0, got {condition_sigma}: pass the condition images' "
                    f"standard deviation (default {EXACT_CONDITION_SIGMA})"
                )
            self.register_buffer("conditions", conditions, persistent=False)
            self.register_buffer("_cond_sq_norms", conditions.flatten(1).pow(2).sum(1), persistent=False)
        self.takes_image = conditions is not None
        self.camera_sigma: float | None = None
        """κ in degrees (None without cameras)."""
        if cameras is not None:
            cameras = torch.as_tensor(cameras).detach().to(dtype)
            if cameras.shape != (points.shape[0], 12):
                raise PriorInputError(
                    f"cameras have shape {tuple(cameras.shape)} for {points.shape[0]} components: pass one "
                    "camera_condition(c2w) per component (K x 12)"
                )
            directions = viewing_directions(cameras)
            if camera_sigma is None:
                camera_sigma = camera_spacing(directions)
            if not (math.isfinite(camera_sigma) and camera_sigma > 0):
                raise PriorInputError(
                    f"camera_sigma is {camera_sigma}: pass a finite angular bandwidth in degrees > 0 (e.g. the "
                    "angle between neighbouring cameras of the set)"
                )
            self.register_buffer("camera_directions", directions, persistent=False)
            self.camera_sigma = float(camera_sigma)
        self.takes_camera = cameras is not None
        self.condition_sigma = float(condition_sigma)
        self.image_guidance_scale = float(image_guidance_scale)
        self.labels = labels
        self.prompts = list(dict.fromkeys(labels))
        """Distinct prompts, in first-appearance order."""
        self.sigma = float(sigma)

    @classmethod
    def from_folders(
        cls,
        folders: Mapping[str, str | Path],
        condition_folders: Mapping[str, str | Path] | None = None,
        cameras: Mapping[Path, Sequence[float]] | None = None,
        **kwargs,
    ) -> ExactPrior:
        """Build from image folders: ``{"a red ball": "dir1", "a blue ball": "dir2"}``.

        Every ``*.png`` directly inside each folder (sorted by name) becomes one component labelled with
        its prompt. Images load as float in [0, 1], ``3 x H x W`` (alpha dropped, grey expanded to RGB),
        and must all share one size. ``condition_folders`` (same prompts) make an image-conditioned prior:
        each component's condition image is the PNG of the same name in its prompt's condition folder.
        ``cameras`` (image file -> its 12-number camera, as in :data:`CAMERA_FILE`) make a camera-conditioned
        prior; every image needs its camera.
        ``kwargs`` go to the constructor (``sigma``, ``guidance_scale``, ``condition_sigma``, ...).
        """
        from nerfstudio_distill.data.images import read_rgb

        def load(file: Path) -> Tensor:
            try:
                return torch.from_numpy(read_rgb(file)).permute(2, 0, 1)
            except FileNotFoundError:
                raise PriorLoadError(
                    f"{file} not found: every image of an image-conditioned set needs its condition image "
                    "of the same name"
                ) from None
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
                raise PriorLoadError(
                    f"{file} cannot be read ({type(e).__name__}: {e}): replace or delete it"
                ) from None

        if condition_folders is not None and set(condition_folders) != set(folders):
            raise PriorInputError(
                f"condition folders for {sorted(condition_folders)} but images for {sorted(folders)}: give "
                "every prompt a condition folder"
            )
        images, conditions, labels, first = [], [], [], None
        image_cameras = []
        by_file = {Path(f).resolve(): c for f, c in cameras.items()} if cameras is not None else None
        for prompt, folder in folders.items():
            folder = Path(folder)
            files = sorted(folder.glob("*.png")) if folder.is_dir() else []
            if not files:
                raise PriorInputError(
                    f"no *.png files in {str(folder)!r} for prompt {prompt!r}: check the folder path"
                )
            for file in files:
                image = load(file)
                if condition_folders is not None:
                    condition = load(Path(condition_folders[prompt]) / file.name)
                    if condition.shape != image.shape:
                        raise PriorInputError(
                            f"the condition image of {file} is {condition.shape[1]}x{condition.shape[2]} but "
                            f"the image {image.shape[1]}x{image.shape[2]}: write both at one size"
                        )
                    conditions.append(condition)
                if first is None:
                    first = (file, image.shape)
                elif image.shape != first[1]:
                    raise PriorInputError(
                        f"{file} is {image.shape[1]}x{image.shape[2]} but {first[0]} is "
                        f"{first[1][1]}x{first[1][2]}: resize all images to one size"
                    )
                if by_file is not None:
                    if file.resolve() not in by_file:
                        raise PriorLoadError(
                            f"{file} has no camera: every image of a camera-conditioned set needs one in its "
                            f"{CAMERA_FILE}"
                        )
                    image_cameras.append(torch.as_tensor(by_file[file.resolve()], dtype=torch.float64))
                images.append(image)
                labels.append(prompt)
        if conditions:
            kwargs["conditions"] = torch.stack(conditions)
        if by_file is not None:
            kwargs["cameras"] = torch.stack(image_cameras)
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

    def encode_condition(self, images: Float[Tensor, " B *shape"]) -> Float[Tensor, " B *shape"]:
        """The image condition (:attr:`Condition.image`) of an image-conditioned prior: the images
        themselves, validated as :meth:`encode` does (the pairs live in pixel space)."""
        if not self.takes_image:
            return super().encode_condition(images)
        return self.encode(images)

    def cfg(self, scale: float) -> CFG:
        """Text CFG at ``scale``; for an image-conditioned prior InstructPix2Pix's three branches, ``scale``
        being the text one and :attr:`image_guidance_scale` the image one."""
        if self.takes_image:
            return CFG.instruct(text_scale=scale, image_scale=self.image_guidance_scale)
        return CFG.text(scale)

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
        self,
        x_t: Float[Tensor, " N *shape"],
        t: Int[Tensor, " N"],
        masks: Bool[Tensor, "N K"],
        images: Sequence[Tensor | None] | None = None,
        cameras: Sequence[Tensor | None] | None = None,
    ) -> tuple[Float[Tensor, "N D"], Float[Tensor, "N D"], Float[Tensor, "N 1"], Float[Tensor, "N 1"]]:
        """Flattened x_t, the responsibility-weighted mean m = Σ_i w_i μ_i, ᾱ_t and v_t (all in ``dtype``).

        ``images`` / ``cameras``: per row, a condition image / camera (or None where the row's branch drops
        it)."""
        mu = self.points.flatten(1)  # K x D
        x = x_t.to(self.device, mu.dtype).flatten(1)  # N x D
        a = self.alphas_cumprod.to(mu.dtype)[t.to(self.device)][:, None]  # N x 1
        v = a * self.sigma**2 + 1 - a  # v_t = ᾱ_t σ² + 1 − ᾱ_t: Var(x_t | i) per dim (Ho et al. 2020, Eq. 4)
        # Responsibilities w_i ∝ N(x_t; √ᾱ_t μ_i, v_t I) over the masked components (Bishop 2006, Eq. 9.13):
        # −‖x − √ᾱ μ_i‖²/(2v) = (2√ᾱ x·μ_i − ᾱ‖μ_i‖²)/(2v) − ‖x‖²/(2v); the last term is constant per row and
        # cancels in the softmax (= log-sum-exp normalisation), so it is never formed.
        logits = (2 * a.sqrt() * (x @ mu.T) - a * self._sq_norms) / (2 * v)  # N x K, one matmul
        if images is not None and any(image is not None for image in images):
            logits = logits + self._condition_logits(images, mu.dtype)
        if cameras is not None and any(camera is not None for camera in cameras):
            logits = logits + self._camera_logits(cameras, mu.dtype)
        w = torch.softmax(logits.masked_fill(~masks.to(self.device), -math.inf), dim=1)
        return x, w @ mu, a, v

    def _condition_logits(self, images: Sequence[Tensor | None], dtype: torch.dtype) -> Float[Tensor, "N K"]:
        """log N(c; c_i, τ² I) per row and component, up to a per-row constant (the same expansion as the
        x_t term: −‖c − c_i‖²/(2τ²) = (2 c·c_i − ‖c_i‖²)/(2τ²) − ‖c‖²/(2τ²)); 0 on rows without an image."""
        if not self.takes_image:
            raise PriorInputError(
                "this exact prior takes no image condition: write its set with conditions= "
                "(write_exact_prior_set), or drop image= from the Condition"
            )
        shape = tuple(self.conditions.shape[1:])
        bad = [tuple(i.shape) for i in images if i is not None and tuple(i.shape) != shape]
        if bad:
            raise PriorInputError(
                f"the image condition has shape {bad[0]} but the prior's condition images are {shape}: encode "
                "the conditioning image at the render's size with prior.encode_condition(images)"
            )
        keep = torch.tensor([i is not None for i in images], device=self.device)
        c = torch.stack([self.conditions[0] * 0 if i is None else i.to(self.device, dtype) for i in images])
        cond = self.conditions.flatten(1)
        logits = (2 * (c.flatten(1) @ cond.T) - self._cond_sq_norms) / (2 * self.condition_sigma**2)
        return logits * keep[:, None]

    def _camera_logits(self, cameras: Sequence[Tensor | None], dtype: torch.dtype) -> Float[Tensor, "N K"]:
        """−d(c, c_i)² / 2κ² per row and component, d the angle between the viewing directions; 0 on rows
        without a camera."""
        if not self.takes_camera:
            raise PriorInputError(
                "this exact prior takes no camera condition: write its set with cameras "
                "(write_exact_prior_set(..., cameras=True)), or drop camera= from the Condition"
            )
        bad = [tuple(c.shape) for c in cameras if c is not None and tuple(c.shape) != (12,)]
        if bad:
            raise PriorInputError(
                f"the camera condition has shape {bad[0]} per view: encode cameras with "
                "camera_condition(c2w) (12 numbers per view)"
            )
        keep = torch.tensor([c is not None for c in cameras], device=self.device)
        c = torch.stack(
            [self.camera_directions.new_tensor(0).expand(12) if c is None else c for c in cameras]
        )
        u = viewing_directions(c.to(self.device, dtype), allow_origin=True)  # N x 3
        angle = angle_between(u, self.camera_directions.to(dtype))  # N x K, radians
        logits = -(angle**2) / (2 * math.radians(self.camera_sigma) ** 2)
        return logits * keep[:, None]

    def _eps(
        self,
        x_t: Float[Tensor, " N *shape"],
        t: Int[Tensor, " N"],
        conds: Sequence[Tensor],
        images: Sequence[Tensor | None] | None = None,
        cameras: Sequence[Tensor | None] | None = None,
    ) -> Float[Tensor, " N *shape"]:
        x, m, a, v = self._mixture(x_t, t, torch.stack(list(conds)), images, cameras)
        # ε̂ = E[ε | x_t] = (x_t − √ᾱ_t E[x_0 | x_t]) / √(1−ᾱ_t)  (Ho et al. 2020, Eq. 4, in expectation);
        # with E[x_0 | x_t] from `posterior_mean` this simplifies to √(1−ᾱ_t) (x_t − √ᾱ_t Σ_i w_i μ_i) / v_t.
        eps = (1 - a).sqrt() * (x - a.sqrt() * m) / v
        return eps.float().reshape(x_t.shape)

    def posterior_mean(
        self, x_t: Float[Tensor, " B *shape"], t: Int[Tensor, " B"], prompt: str | Condition = ""
    ) -> Float[Tensor, " B *shape"]:
        """E[x_0 | x_t, y] (float32, on ``x_t``'s device) for a batch sharing one prompt (a
        :class:`Condition` with an image or a camera: E[x_0 | x_t, y, c])."""
        condition = prompt if isinstance(prompt, Condition) else Condition(prompt)
        batch = x_t.shape[0]
        t = self.check_timesteps(t).to(self.device).expand(batch)
        mask = self.embed([condition.prompt])[0]
        extra = self._row_conditions([condition], batch)
        with torch.no_grad():
            x, m, a, v = self._mixture(
                x_t, t, mask[None].expand(batch, -1), extra.get("images"), extra.get("cameras")
            )
            # Per component, x_0 | x_t, i ~ N(μ_i + σ²√ᾱ_t/v_t (x_t − √ᾱ_t μ_i), ·) (Bishop 2006, Eq. 2.116);
            # averaging with the responsibilities w_i gives m + σ²√ᾱ_t/v_t (x_t − √ᾱ_t m).
            x0 = m + self.sigma**2 * a.sqrt() / v * (x - a.sqrt() * m)
        return x0.float().reshape(x_t.shape).to(x_t.device)


def viewing_directions(cameras: Float[Tensor, "N 12"], allow_origin: bool = False) -> Float[Tensor, "N 3"]:
    """Unit direction from the world origin (the object's centre) to each camera's position, for cameras
    encoded by :func:`~nerfstudio_distill.priors.base.camera_condition` (the position is the last column of
    the 3 x 4). ``allow_origin``: a camera at the origin gets the zero vector (else a one-line error)."""
    position = cameras.reshape(-1, 3, 4)[:, :, 3]
    norm = position.norm(dim=1, keepdim=True)
    if not allow_origin and bool((norm < 1e-9).any()):
        raise PriorInputError(
            "a camera sits at the world origin, so it has no viewing direction: the camera condition needs "
            "cameras around an object at the origin"
        )
    return position / norm.clamp_min(1e-12)


def angle_between(u: Float[Tensor, "N 3"], w: Float[Tensor, "K 3"]) -> Float[Tensor, "N K"]:
    """Angles (radians) between unit vectors, as atan2(‖u × w‖, u · w) (accurate near 0 and π, unlike acos)."""
    cos = u @ w.T
    sin = torch.linalg.cross(
        u[:, None, :].expand(-1, w.shape[0], -1), w[None].expand(u.shape[0], -1, -1)
    ).norm(dim=-1)
    return torch.atan2(sin, cos)


def camera_spacing(directions: Float[Tensor, "K 3"]) -> float:
    """The median angle, in degrees, from each distinct viewing direction to its nearest other one: the
    angular spacing of a set's cameras, the default κ of a camera-conditioned exact prior. One-line error
    when all cameras share one direction (no spacing to take)."""
    _, group = torch.unique(torch.round(directions.double() * 1e6), dim=0, return_inverse=True)
    one = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=group.device)
    one.scatter_(0, group, torch.arange(len(group), device=group.device))  # a member of each direction
    distinct = directions[one].double()  # unrounded
    if distinct.shape[0] < 2:
        raise PriorInputError(
            "every camera of the set looks from one direction, so there is no camera spacing to take κ from: "
            "pass camera_sigma (degrees)"
        )
    angle = angle_between(distinct, distinct)
    angle.fill_diagonal_(math.inf)
    return float(torch.rad2deg(angle.min(dim=1).values.median()))
