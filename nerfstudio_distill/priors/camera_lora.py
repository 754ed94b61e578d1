"""A camera-conditioned LoRA of a Stable Diffusion UNet: ProlificDreamer's ε̂_φ(x_t, y, t, c).

VSD (Wang et al. 2023, "ProlificDreamer", §4 and Algorithm 1) trains, next to the scene, a copy of the
prior's noise predictor that learns the distribution of the *current renders*: a LoRA of the pretrained
UNet, conditioned on the camera c. As in threestudio's ``stable_diffusion_vsd_guidance.py``, the camera
enters as an embedding added to the UNet's time embedding (diffusers' ``class_embedding`` slot:
``emb = time_embedding(t) + class_embedding(c)``), for the LoRA only.

:class:`CameraLora` holds the adapter's weights (the very Parameters peft put into the UNet's layers) and
the camera embedding, so its state dict is exactly the trainable part: a checkpoint never holds a UNet
weight. The prior runs it (``StableDiffusionPrior.add_camera_lora``): in a call, every row whose
:class:`~nerfstudio_distill.priors.base.Condition` has a camera is ε̂_φ, every row without one is the UNet
exactly as it was before the LoRA was added (adapter off, camera embedding exactly 0), see :meth:`run`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nerfstudio_distill.errors import PriorInputError, PriorLoadError

from .lora import LoraSpec, add_lora, lora_layers, lora_per_row, lora_scale

CAMERA_DIM = 12
"""Size of the camera encoding (:func:`~nerfstudio_distill.priors.base.camera_condition`: c2w[:3, :4])."""
VSD_ADAPTER = "vsd"
"""Name of the VSD adapter in peft's layers (a personalisation adapter, "distill", may sit beside it)."""


class CameraEmbedding(nn.Module):
    """c ↦ Linear(D → E) → SiLU → Linear(E → E), E the UNet's time-embedding width (SD 1.5: 1280): the
    shape of threestudio's camera embedding (diffusers' ``TimestepEmbedding(16, 1280)`` on the flattened
    4 x 4 c2w; here the 3 x 4 part, D = 12). The last layer starts at zero, so a fresh ε̂_φ is exactly the
    pretrained model, as ProlificDreamer initialises φ (threestudio keeps diffusers' random init there)."""

    def __init__(self, camera_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(camera_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, camera: Float[Tensor, "N D"]) -> Float[Tensor, "N E"]:
        return self.linear_2(self.act(self.linear_1(camera)))


class _RowEmbedding(nn.Module):
    """The UNet's ``class_embedding`` during one call: the camera embedding on the rows in ``on``, exact
    zeros elsewhere (so ``emb + 0`` leaves those rows' time embedding untouched)."""

    def __init__(self, embedding: CameraEmbedding, on: Tensor) -> None:
        super().__init__()
        self.embedding = embedding
        self.on = on

    def forward(self, cameras: Float[Tensor, "N D"]) -> Float[Tensor, "N E"]:
        emb = self.embedding(cameras.to(self.embedding.linear_1.weight.dtype))
        return torch.where(self.on[:, None], emb, torch.zeros((), dtype=emb.dtype, device=emb.device))


@contextlib.contextmanager
def _class_embedding(unet: nn.Module, module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` as the UNet's class embedding (it has none of its own)."""
    unet.class_embedding = module
    try:
        yield
    finally:
        unet.class_embedding = None


def key_of(path: str) -> str:
    """peft's state-dict key → a parameter name (no dots): ``a.b.lora_A.weight`` → ``a__b__lora_A__weight``."""
    return path.replace(".", "__")


class CameraLora(nn.Module):
    """ε̂_φ's trainable part: LoRA adapter ``name`` of a UNet plus a :class:`CameraEmbedding`.

    ``CameraLora(unet, spec)`` adds the adapter to ``unet`` IN PLACE (B = 0, A from ``seed``; the base
    weights and other adapters stay as they are) and keeps its Parameters in :attr:`adapters`, under
    peft's key names with dots as ``__``; the UNet itself is not a submodule, so ``state_dict`` holds the
    adapter and the embedding only. Loading a state dict writes into the UNet's adapter layers.
    """

    def __init__(
        self,
        unet: nn.Module,
        spec: LoraSpec,
        camera_dim: int = CAMERA_DIM,
        name: str = VSD_ADAPTER,
        seed: int = 0,
    ) -> None:
        super().__init__()
        config = unet.config
        if getattr(unet, "class_embedding", None) is not None or config.get("class_embeddings_concat"):
            raise PriorLoadError(
                f"this UNet has a class embedding of its own ({config.get('class_embed_type')}): VSD's camera "
                "embedding needs that slot free; use a text-to-image Stable Diffusion 1.x/2.x checkpoint"
            )
        self.name = name
        self.spec = spec
        self.camera_dim = camera_dim
        add_lora(unet, spec, name, dtype=torch.float32, seed=seed)
        self.adapters = nn.ParameterDict(
            {
                key_of(f"{path}.{part}.weight"): getattr(layer, part)[name].weight
                for path, layer in lora_layers(unet, name).items()
                for part in ("lora_A", "lora_B")
            }
        )
        embed_dim = unet.time_embedding.linear_2.out_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = CameraEmbedding(camera_dim, embed_dim)
        device = next(unet.parameters()).device
        self.embedding.to(device)
        self.__dict__["unet"] = unet  # not a submodule: its weights stay out of state_dict

    def check_cameras(self, cameras: Float[Tensor, "N D"]) -> None:
        if cameras.ndim != 2 or cameras.shape[1] != self.camera_dim:
            raise PriorInputError(
                f"cameras have shape {tuple(cameras.shape)}: the VSD LoRA takes one camera_condition(c2w) "
                f"per row ({self.camera_dim} numbers)"
            )

    def run(
        self,
        x: Float[Tensor, "N C h w"],
        t: Int[Tensor, " N"],
        text: Float[Tensor, "N L E"],
        cameras: Sequence[Tensor | None],
    ) -> Float[Tensor, "N C h w"]:
        """The UNet's raw output (ε or v) for ``N`` rows: row i is ε̂_φ under ``cameras[i]`` (adapter on,
        camera embedding added), or, where ``cameras[i]`` is None, the UNet as it was before this adapter
        (adapter at strength 0, time embedding + exact zeros). Other adapters of the UNet (a loaded
        personalisation) stay on for every row.

        One UNet call when every row is of one kind, or when this is the UNet's only adapter (peft's per-row
        adapter selection, ``adapter_names``); otherwise two calls, one per kind, since peft selects one
        adapter per row and a personalised ε̂_φ row needs two. Autograd as the caller has it."""
        unet = self.unet
        on = torch.tensor([c is not None for c in cameras], device=x.device)
        if not bool(on.any()):
            with lora_scale(unet, 0.0, self.name):
                return unet(x, t, encoder_hidden_states=text).sample
        dtype = self.embedding.linear_1.weight.dtype
        zero = torch.zeros(self.camera_dim, dtype=dtype, device=x.device)
        labels = torch.stack([zero if c is None else c.to(x.device, dtype).reshape(-1) for c in cameras])
        self.check_cameras(labels)
        if bool(on.all()):
            with _class_embedding(unet, _RowEmbedding(self.embedding, on)):
                return unet(x, t, encoder_hidden_states=text, class_labels=labels).sample
        others = [n for n in next(iter(lora_layers(unet, self.name).values())).lora_A if n != self.name]
        if not others:
            names = [self.name if o else "__base__" for o in on.tolist()]
            with lora_per_row(unet, names), _class_embedding(unet, _RowEmbedding(self.embedding, on)):
                return unet(x, t, encoder_hidden_states=text, class_labels=labels).sample
        rows_on, rows_off = on.nonzero()[:, 0], (~on).nonzero()[:, 0]
        out_on = self.run(x[rows_on], t[rows_on], text[rows_on], [cameras[i] for i in rows_on.tolist()])
        out_off = self.run(x[rows_off], t[rows_off], text[rows_off], [None] * len(rows_off))
        out = out_on.new_empty((len(cameras), *out_on.shape[1:]))
        out[rows_on], out[rows_off] = out_on, out_off
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rank={self.spec.rank}, camera_dim={self.camera_dim}"
