"""Stable Diffusion (1.x / 2.x, ε- or v-prediction) as a :class:`Prior`.

diffusers and transformers are imported lazily, inside functions: importing this module (or the
package) never imports them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.errors import PriorInputError, PriorLoadError, one_line

from .base import Condition, Prior

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def import_diffusers() -> tuple[Any, Any]:
    """Import and return ``(diffusers, transformers)``, or raise a one-line :class:`PriorLoadError`."""
    try:
        import diffusers
        import transformers
    except Exception as e:  # ImportError, but also broken installs raising anything at import time
        raise PriorLoadError(
            f"the Stable Diffusion prior needs diffusers and transformers ({one_line(e)}): "
            "pip install 'diffusers>=0.30' transformers"
        ) from e
    return diffusers, transformers


def v_to_eps(
    v: Float[Tensor, " B *latent"], x_t: Float[Tensor, " B *latent"], alphas_cumprod_t: Float[Tensor, " B"]
) -> Float[Tensor, " B *latent"]:
    """ε from a v-prediction: with v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022, §4 / App. D) and
    x_t = √ᾱ x_0 + √(1−ᾱ) ε, one gets ε = √ᾱ v + √(1−ᾱ) x_t."""
    a = alphas_cumprod_t.reshape(-1, *([1] * (v.ndim - 1))).to(v)
    return a.sqrt() * v + (1 - a).sqrt() * x_t.to(v)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusionPriorConfig:
    """Options of :class:`StableDiffusionPrior`; ``setup()`` builds it."""

    model: str = DEFAULT_MODEL
    """Hugging Face hub id or local folder of a diffusers Stable Diffusion checkpoint (with unet/, vae/,
    text_encoder/, tokenizer/ and scheduler/ subfolders). SD 1.x and 2.x work, including v-prediction
    models such as "stabilityai/stable-diffusion-2-1-base". Point this at a local folder on machines
    without internet access."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Precision of the three networks. "auto" is fp16 on CUDA and fp32 elsewhere. Use "fp32" if you see
    NaNs or want bit-stable comparisons, "bf16" on GPUs where fp16 overflows. Noise predictions and
    latents are always returned as float32."""
    device: str | None = None
    """Device of the networks, e.g. "cuda:1" to keep Stable Diffusion on a second GPU while the NeRF
    trains on the first; inputs and outputs are moved across automatically. None: "cuda" when
    available, else "cpu"."""
    channels_last: bool = False
    """Run the UNet and VAE in channels-last memory format. Often faster with fp16 on recent NVIDIA
    GPUs; no effect on results."""
    latent_mode: Literal["mean", "sample"] = "mean"
    """Which latent the VAE encoder returns for an image: "mean" of its Gaussian posterior
    (deterministic, the usual choice for distillation) or a random "sample" from it."""
    guidance_scale: float = 7.5
    """Default classifier-free guidance scale (unitless) used when a guidance method passes none. 1
    disables CFG and halves the UNet batch; SDS-style distillation typically uses 7.5 to 100."""
    local_files_only: bool = False
    """Never contact the Hugging Face hub: load only from a local folder or the local cache. Also
    switched on by the environment variable HF_HUB_OFFLINE=1."""
    check_resolution: bool = True
    """Reject images whose height or width is not a multiple of the VAE's downsampling factor (8 for
    SD), with an error that says what size to resize to. Switch off only if you handle sizes yourself."""
    lora: Path | None = None
    """Folder of LoRA adapters written by ns-distill-personalize (lora.json, unet_lora.safetensors and, if
    trained, text_encoder_lora.safetensors), loaded onto this model for every prediction: e.g. a prior
    personalised to the scene being edited (DreamBooth). They must have been trained on this model. None:
    the model as it is."""
    lora_scale: float = 1.0
    """Strength of the LoRA adapters of the lora option: 0 is the base model, 1 as trained; values in
    between blend the two."""

    def setup(self, **overrides: Any) -> StableDiffusionPrior:
        """Load the networks and return the prior; ``overrides`` replace fields (e.g. ``device=``)."""
        return StableDiffusionPrior(self, **overrides)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def looks_like_path(model: str) -> bool:
    """Whether ``model`` is meant as a filesystem path rather than a hub id ("org/name")."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).exists()


MODEL_FLAGS = (
    "--pipeline.prior.stable-diffusion.model (ns-train; --prior.stable-diffusion.model in ns-distill-2d)"
)
"""Where users set the model, named in load errors."""
LORA_FLAGS = (
    "--pipeline.prior.stable-diffusion.lora (ns-train; --prior.stable-diffusion.lora in ns-distill-2d)"
)
"""Where users set the LoRA adapters, named in load errors."""


class StableDiffusionPrior(Prior):
    """Frozen Stable Diffusion UNet + VAE + CLIP text encoder behind the :class:`Prior` interface.

    ``StableDiffusionPrior(config)`` or ``StableDiffusionPrior(model="path", device="cpu", ...)`` (keyword
    arguments override fields of the config). Latents are ``B x 4 x H/8 x W/8`` for SD.
    :meth:`from_components` wraps networks already in memory instead of loading ``config.model``.
    """

    config_class: type[StableDiffusionPriorConfig] = StableDiffusionPriorConfig
    """The options dataclass (its defaults apply when no config is given)."""
    model_flags: str = MODEL_FLAGS
    """Where users set the model, named in load errors."""
    lora_flags: str = LORA_FLAGS
    """Where users set the LoRA adapters, named in load errors."""

    def __init__(self, config: StableDiffusionPriorConfig | None = None, **overrides: Any) -> None:
        config, dtype, device = self._resolve(config, overrides)
        diffusers, transformers = import_diffusers()
        model = os.path.expanduser(config.model)
        local = os.path.isdir(model)
        if not local and looks_like_path(config.model):
            raise PriorLoadError(
                f"model folder {config.model!r} does not exist or is not a folder: set {self.model_flags} to a "
                "folder holding unet/ vae/ text_encoder/ tokenizer/ scheduler/, or to a hub id"
            )
        offline = config.local_files_only or hub_offline()

        def load(cls: Any, subfolder: str, **kwargs: Any) -> Any:
            try:
                return cls.from_pretrained(model, subfolder=subfolder, local_files_only=offline, **kwargs)
            # OSError, huggingface_hub errors, ValueError, ...: all mean "not loadable from there".
            except Exception as e:
                if local:  # a folder: no download hint (it is not a hub id)
                    raise PriorLoadError(
                        f"could not load {subfolder}/ of the folder {config.model!r} ({one_line(e, 120)}): set "
                        f"{self.model_flags} to a diffusers pipeline folder (model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/, as save_pretrained writes it), or to a hub id"
                    ) from e
                where = "the local cache" if offline else "the hub or cache"
                raise PriorLoadError(
                    f"could not load {subfolder}/ of {config.model!r} from {where} ({one_line(e, 120)}): "
                    f"set {self.model_flags} to a local diffusers folder, or download once online "
                    f"(e.g. hf download {config.model}) and then run with HF_HUB_OFFLINE=1"
                ) from e

        # The scheduler is tiny: a missing model fails here, before any large download.
        scheduler = load(diffusers.DDIMScheduler, "scheduler")
        tokenizer = load(transformers.CLIPTokenizer, "tokenizer")
        # transformers renamed torch_dtype to dtype (4.56): load in fp32 and cast below, for any version.
        text_encoder = load(transformers.CLIPTextModel, "text_encoder")
        vae = load(diffusers.AutoencoderKL, "vae", torch_dtype=dtype)
        unet = load(diffusers.UNet2DConditionModel, "unet", torch_dtype=dtype)
        self._assemble(config, dtype, device, unet, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def from_components(
        cls,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        config: StableDiffusionPriorConfig | None = None,
        **overrides: Any,
    ) -> StableDiffusionPrior:
        """Wrap networks that are already in memory (e.g. built from a config with random weights).

        ``unet`` (``UNet2DConditionModel``), ``vae`` (``AutoencoderKL``), ``text_encoder``
        (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``) and ``scheduler`` (a diffusers scheduler with
        ``betas`` and a ``prediction_type``) are used as given: they are cast to the prior's dtype, moved to
        its device and frozen IN PLACE. ``config`` / ``overrides`` as for the constructor; ``model``,
        ``local_files_only`` are ignored (nothing is loaded).
        """
        config, dtype, device = cls._resolve(config, overrides)
        # Cast only when needed: diffusers' ModelMixin.to(dtype) logs a warning on every dtype cast.
        unet, vae = (net if net.dtype == dtype else net.to(dtype) for net in (unet, vae))
        prior = cls.__new__(cls)
        prior._assemble(config, dtype, device, unet, vae, text_encoder, tokenizer, scheduler)
        return prior

    @classmethod
    def _resolve(
        cls, config: StableDiffusionPriorConfig | None, overrides: dict[str, Any]
    ) -> tuple[StableDiffusionPriorConfig, torch.dtype, torch.device]:
        """Config with ``overrides`` applied and checked, and the resolved dtype and device."""
        config = dataclasses.replace(config or cls.config_class(), **overrides)
        if config.latent_mode not in ("mean", "sample"):
            raise PriorInputError(f"latent_mode={config.latent_mode!r}: use 'mean' or 'sample'")
        if config.dtype not in ("auto", *_DTYPES):
            raise PriorInputError(
                f"dtype={config.dtype!r}: use one of 'auto', {', '.join(map(repr, _DTYPES))}"
            )
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = (
            _DTYPES[config.dtype]
            if config.dtype != "auto"
            else (torch.float16 if device.type == "cuda" else torch.float32)
        )
        return config, dtype, device

    def _assemble(
        self,
        config: StableDiffusionPriorConfig,
        dtype: torch.dtype,
        device: torch.device,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
    ) -> None:
        """Shared tail of both constructors: schedule, casting, freezing, device placement."""
        super().__init__(
            torch.as_tensor(scheduler.betas),
            config.guidance_scale,
            getattr(scheduler.config, "steps_offset", 0),
        )
        self.config = config
        self.dtype = dtype
        self.prediction_type: str = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise PriorLoadError(
                f"prediction_type {self.prediction_type!r} of {config.model!r} is not supported: "
                "use an epsilon or v_prediction Stable Diffusion checkpoint"
            )
        latent, channels = vae.config.latent_channels, unet.config.in_channels
        want = 2 * latent if self.takes_image else latent  # InstructPix2Pix: [x_t, image latents]
        if channels != want:
            kind = {latent: "stable-diffusion", 2 * latent: "instruct-pix2pix"}.get(channels)
            hint = f"pass --pipeline.prior.kind {kind} for this checkpoint, or " if kind else ""
            raise PriorLoadError(
                f"the UNet of {config.model!r} takes {channels} input channels but {type(self).__name__} "
                f"feeds it {want}: {hint}set {self.model_flags} to a checkpoint of this kind"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(dtype)
        self.vae = vae
        self.unet = unet
        self.__dict__["camera_lora"] = None
        """VSD's camera-conditioned LoRA (:meth:`add_camera_lora`; None: none)."""
        self.lora: dict[str, Any] | None = None
        """lora.json of the adapters loaded from ``config.lora`` (None: none)."""
        if config.lora is not None:
            from .lora import load_lora

            nets = {"unet": unet, "text_encoder": self.text_encoder}
            self.lora = load_lora(config.lora, nets, self.lora_flags, scale=config.lora_scale, dtype=dtype)
        for net in (self.text_encoder, self.vae, self.unet):
            net.requires_grad_(False).eval()
        if config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.to(device)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor
        downsamples = len(unet.config.block_out_channels) - 1  # a 1x1 latent breaks the GroupNorms
        self.min_side = self.vae_scale_factor * max(2, 2**downsamples)
        """Spatial downsampling of the VAE (8 for SD): image sizes must be multiples of it."""

    # ------------------------------------------------------------------- images
    def _memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _vae_input(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        """Checked images in [0, 1] to the VAE's input: [-1, 1], the prior's dtype, device and format."""
        self.check_images(images)
        f = self.vae_scale_factor
        h, w = images.shape[-2:]
        if self.config.check_resolution and (h % f or w % f):
            nh, nw = max(f, round(h / f) * f), max(f, round(w / f) * f)
            raise PriorInputError(
                f"image size {h}x{w} is not a multiple of {f} (the VAE's downsampling factor): resize to "
                f"{nh}x{nw}, e.g. F.interpolate(images, size=({nh}, {nw}), mode='bilinear', antialias=True)"
            )
        return self._memory_format(images.to(self.device, self.dtype) * 2 - 1)  # VAE expects [-1, 1]

    def encode(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Images in [0, 1] to scaled VAE latents (float32, on the prior's device), differentiably."""
        posterior = self.vae.encode(self._vae_input(images)).latent_dist
        z = posterior.mean if self.config.latent_mode == "mean" else posterior.sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        # LDM trains on z · scaling_factor, rescaled to ~unit variance (Rombach et al. 2022, §4.3.2)
        return ((z - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """Latents back to images in [0, 1] (float32, on the prior's device); for previews."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor + shift
        images = self.vae.decode(self._memory_format(z)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ prompts
    def text_embeddings(self, prompts: Sequence[str]) -> Float[Tensor, "B L D"]:
        """CLIP last hidden states of the padded prompts, in the prior's dtype, with autograd when the text
        encoder has trainable parameters (LoRA training); :meth:`embed` is the cached, gradient-free form."""
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def _embed(self, prompt: str) -> Float[Tensor, "1 L D"]:
        """CLIP last hidden state of the padded prompt, in the prior's dtype."""
        return self.text_embeddings([prompt])

    # ------------------------------------------------------------------ network
    def _unet_input(self, x_t: Float[Tensor, "N C h w"], **conditions: Any) -> Float[Tensor, "N C_in h w"]:
        """What the UNet takes for x_t: x_t itself (InstructPix2Pix appends its image latents)."""
        return x_t

    def _eps(
        self, x_t: Float[Tensor, "N C h w"], t: Int[Tensor, " N"], conds: Sequence[Tensor], **conditions: Any
    ) -> Float[Tensor, "N C h w"]:
        t = t.to(self.device)
        out = self._unet(x_t, t, conds, **conditions)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(out, x_t.to(self.device, torch.float32), self.alphas_cumprod[t])
        return out

    def _unet(
        self,
        x_t: Float[Tensor, "N C h w"],
        t: Int[Tensor, " N"],
        conds: Sequence[Tensor],
        cameras: Sequence[Tensor | None] | None = None,
        **conditions: Any,
    ) -> Float[Tensor, "N C h w"]:
        """The UNet's raw output (ε or v, float32) for rows with text ``conds``; with a camera LoRA
        (:meth:`add_camera_lora`) rows with a camera are its ε̂_φ, rows without the UNet as loaded."""
        cond = torch.cat([c.to(self.device, self.dtype) for c in conds])
        x = self._memory_format(self._unet_input(x_t.to(self.device, self.dtype), **conditions))
        if self.camera_lora is None:
            return self.unet(x, t, encoder_hidden_states=cond).sample.float()
        return self.camera_lora.run(x, t, cond, cameras or [None] * len(x)).float()

    # --------------------------------------------------------------------- VSD
    def add_camera_lora(self, spec: Any, seed: int = 0) -> Any:
        """Add VSD's camera-conditioned LoRA to the UNet (a :class:`~.camera_lora.CameraLora`, returned for
        the caller to hold, train and save) and take cameras from now on: a row whose
        :class:`~.base.Condition` has a camera is ε̂_φ, a row without one is the UNet as loaded. Once."""
        from .camera_lora import CameraLora

        if self.camera_lora is not None:
            raise PriorLoadError("this prior already has a camera LoRA: add it once")
        lora = CameraLora(self.unet, spec, seed=seed)
        self.__dict__["camera_lora"] = lora  # not a submodule: the guidance that trains it holds it
        self.takes_camera = True
        return lora

    def training_target(
        self, x0: Float[Tensor, "B C h w"], noise: Float[Tensor, "B C h w"], t: Int[Tensor, " B"]
    ) -> Float[Tensor, "B C h w"]:
        """What the network is trained to predict at x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε: ε, or for a v-prediction
        model v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022), as diffusers trains both."""
        if self.prediction_type != "v_prediction":
            return noise
        a = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].double().reshape(-1, *([1] * (x0.ndim - 1)))
        return (a.sqrt() * noise - (1 - a).sqrt() * x0).float()

    def diffusion_loss(
        self,
        x0: Float[Tensor, "B C h w"],
        t: Int[Tensor, " B"],
        noise: Float[Tensor, "B C h w"],
        prompt: str | Condition,
    ) -> Float[Tensor, " B"]:
        """Per-sample ‖f(x_t, y, t) − target‖² / dim at x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM Eq. 4 and 14), the
        target being ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 for a v-prediction model (as diffusers trains both),
        WITH autograd into whatever of the network trains (VSD: its LoRA, for rows with a camera). ``x0``
        is detached; the text embedding is the cached one."""
        check = self.check_timesteps(t).to(self.device)
        condition = prompt if isinstance(prompt, Condition) else Condition(prompt)
        x0 = x0.detach().to(self.device, torch.float32)
        noise = noise.detach().to(self.device, torch.float32)
        a = self.alphas_cumprod[check].double().reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
        target = self.training_target(x0, noise, check)
        batch = x0.shape[0]
        conds = self.embed([condition.prompt]) * batch
        extra = self._row_conditions([condition], batch)
        pred = self._unet(x_t, check, conds, **extra)
        return (pred - target).pow(2).flatten(1).mean(1)
