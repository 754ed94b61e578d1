"""LoRA adapters (Hu et al., ICLR 2022) on a diffusion prior's networks, with peft: one module for every use.

A LoRA layer replaces a frozen linear map W by W + s · (α / r) · B A (LoRA, Eq. 3; α/r is peft's
``scaling``), with A ∈ R^{r×in}, B ∈ R^{out×r} and B = 0 at the start, so a fresh adapter changes nothing.
s is the strength (:func:`set_lora_scale`; 0: the base network, 1: as trained).

- ``ns-distill-personalize`` trains adapters of the UNet (and optionally the text encoder) on a scene's
  images (DreamBooth) and writes them with :func:`save_lora`;
- ``--pipeline.prior.stable-diffusion.lora`` loads them into the prior with :func:`load_lora`;
- VSD trains a camera-conditioned LoRA of the prior's UNet each step (:mod:`.camera_lora`, with
  :func:`add_lora`), and runs the base model's and the LoRA's rows in one call with :func:`lora_per_row`.

A folder of adapters holds ``lora.json`` (:data:`CONFIG_FILE`: rank, α and target modules per network, the
base model, and whatever the writer adds) and one safetensors file per network (:data:`WEIGHT_FILES`), in
peft's key format (module path + ``.lora_A.weight`` / ``.lora_B.weight``). Nothing here is pickled.

peft is imported inside functions: importing this module never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nerfstudio_distill.errors import PriorLoadError, one_line

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections (self- and cross-attention), as diffusers' train_dreambooth_lora.py
adapts them (its add_k_proj/add_v_proj exist only in UNets with added KV projections, not in SD 1.x/2.x)."""
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The CLIP text encoder's attention projections, as train_dreambooth_lora.py adapts them."""
ADAPTER = "distill"
"""Name of the adapter inside peft's layers."""
CONFIG_FILE = "lora.json"
"""What a folder of adapters is recognised by."""
WEIGHT_FILES = {"unet": "unet_lora.safetensors", "text_encoder": "text_encoder_lora.safetensors"}
"""The safetensors file of each network's adapters."""
FORMAT = 1
"""Version of the folder layout, stored in lora.json."""


@dataclass(frozen=True)
class LoraSpec:
    """Where and how large the adapters of one network are."""

    rank: int = 4
    """r: inner dimension of B A (diffusers' DreamBooth-LoRA default 4)."""
    alpha: float | None = None
    """α; the update is scaled by α / r. None: α = r (scale 1), as diffusers' DreamBooth-LoRA sets it."""
    targets: tuple[str, ...] = UNET_TARGETS
    """Names (suffixes of module paths) of the nn.Linear layers that get adapters."""

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self) -> Any:
        """peft's ``LoraConfig`` of this spec (B = 0 at the start, A Gaussian as diffusers initialises it)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.targets),
            init_lora_weights="gaussian",
            lora_dropout=0.0,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}


def import_peft() -> Any:
    """Import and return peft, or raise a one-line :class:`PriorLoadError`."""
    try:
        import peft
    except Exception as e:  # ImportError, or a broken install raising anything at import time
        raise PriorLoadError(f"LoRA adapters need peft ({one_line(e)}): pip install peft") from e
    return peft


# -------------------------------------------------------------------------------------- adapters in memory
def lora_layers(net: nn.Module, name: str = ADAPTER) -> dict[str, nn.Module]:
    """Module path -> peft LoRA layer holding adapter ``name``, for every adapted layer of ``net``."""
    import_peft()
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in net.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def add_lora(
    net: nn.Module,
    spec: LoraSpec,
    name: str = ADAPTER,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> list[nn.Parameter]:
    """Add a fresh adapter ``name`` (B = 0: ``net`` computes what it did) to the layers of ``net`` named by
    ``spec.targets``, IN PLACE, and return its parameters (A and B of each layer, trainable, in ``dtype``).
    The base weights are frozen; adapters added before stay active, trainable or not as they were. A's random start is drawn from ``seed`` (None: torch's global
    generator; with a seed the global generator is left as it was). Raises :class:`PriorLoadError` if no
    layer matches."""
    peft = import_peft()
    if lora_layers(net, name):
        raise PriorLoadError(f"{type(net).__name__} already has a LoRA adapter {name!r}: add it once")
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters_before = {p: p.requires_grad for n, p in net.named_parameters() if ".lora_" in n}
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with warnings.catch_warnings():  # peft warns that a second adapter's config replaces the first's
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                peft.inject_adapter_in_model(spec.peft_config(), net, adapter_name=name)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise PriorLoadError(
            f"no layer of the {type(net).__name__} is named {', '.join(spec.targets)} ({one_line(e, 100)}): "
            "adapters fit only the network kind they were made for"
        ) from e
    # peft makes the newest adapter the only active one; keep every adapter of the network on (a scene's
    # personalisation stays on when VSD adds its own). The base weights are frozen, and earlier adapters
    # train (or not) as before.
    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(module.lora_A.keys()))
    for n, p in net.named_parameters():
        p.requires_grad_(adapters_before.get(p, False) if ".lora_" in n else False)
    params = []
    for layer in lora_layers(net, name).values():
        for part in (layer.lora_A[name], layer.lora_B[name]):
            part.to(dtype)
            for p in part.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def lora_state_dict(net: nn.Module, name: str = ADAPTER) -> dict[str, Tensor]:
    """The adapter's weights in peft's key format (module path + ``.lora_A.weight`` / ``.lora_B.weight``),
    detached, contiguous, on the CPU."""
    import_peft()
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=name)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def set_lora_scale(net: nn.Module, scale: float, name: str = ADAPTER) -> None:
    """Strength s of adapter ``name`` in every layer: W + s · (α / r) · B A (0: the base network)."""
    for layer in lora_layers(net, name).values():
        layer.set_scale(name, float(scale))


@contextlib.contextmanager
def lora_scale(net: nn.Module, scale: float, name: str = ADAPTER) -> Iterator[None]:
    """Run the block with the adapter at strength ``scale``, then restore each layer's previous scaling."""
    layers = lora_layers(net, name)
    before = {path: layer.scaling[name] for path, layer in layers.items()}
    set_lora_scale(net, scale, name)
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.scaling[name] = before[path]


def _adapter_names_hook(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple:
    return args, {**kwargs, "adapter_names": names}


@contextlib.contextmanager
def lora_per_row(net: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run the block with row i of every adapted layer's input through adapter ``names[i]`` alone
    ("__base__": no adapter): peft's mixed-batch inference (its ``adapter_names`` argument), passed to each
    LoRA layer by a forward pre-hook as peft's own ``PeftModel`` does. Each row gets ONE adapter, so with
    two adapters on a network a row cannot have both; every layer's input must have the rows first (true of
    the attention projections of diffusers' UNets)."""
    import_peft()
    from peft.tuners.lora import LoraLayer

    hook = functools.partial(_adapter_names_hook, names=list(names))
    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, LoraLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_lora_enabled(net: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``net`` on or off (off: the base network); which parameters train is kept
    (peft's own switch would make the adapters trainable again)."""
    import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    grads = {p: p.requires_grad for p in net.parameters()}
    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
    for p, requires_grad in grads.items():
        p.requires_grad_(requires_grad)


@contextlib.contextmanager
def lora_disabled(net: nn.Module) -> Iterator[None]:
    """Run the block with every adapter of ``net`` off (the base network), then switch them on again. To
    switch off one adapter of several, use ``lora_scale(net, 0, name)``."""
    set_lora_enabled(net, False)
    try:
        yield
    finally:
        set_lora_enabled(net, True)


# ----------------------------------------------------------------------------------------- files
def write_atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place: a run stopped while
    writing never leaves a half-written file under ``path``'s name."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_lora(
    folder: str | Path,
    nets: Mapping[str, nn.Module],
    specs: Mapping[str, LoraSpec],
    info: Mapping[str, Any] | None = None,
    name: str = ADAPTER,
) -> list[Path]:
    """Write the adapters of ``nets`` (keys of :data:`WEIGHT_FILES`: "unet", "text_encoder") and
    ``lora.json`` (their specs, plus ``info``, e.g. the base model and the training settings) into
    ``folder``; each file is replaced atomically, weights first. Returns the paths written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, networks = [], {}
    for key, net in nets.items():
        path = folder / WEIGHT_FILES[key]
        state = lora_state_dict(net, name)
        write_atomic(path, lambda tmp, state=state: save_file(state, str(tmp), metadata={"format": "pt"}))
        networks[key] = {**specs[key].to_json(), "file": WEIGHT_FILES[key]}
        written.append(path)
    record = {"format": FORMAT, **(info or {}), "networks": networks}
    config = folder / CONFIG_FILE
    write_atomic(config, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str) + "\n"))
    return [*written, config]


@dataclass
class LoraFolder:
    """A folder of adapters, read and checked (not yet applied)."""

    folder: Path
    record: dict[str, Any]
    """lora.json as written."""
    specs: dict[str, LoraSpec]
    """Network ("unet", "text_encoder") -> its spec."""
    states: dict[str, dict[str, Tensor]]
    """Network -> its adapter weights (CPU)."""


def read_lora_record(folder: str | Path, flag: str) -> dict[str, Any]:
    """``folder``'s lora.json, with one-line errors naming ``flag`` when the folder or the file is missing or
    unreadable (no weights are read)."""
    folder = Path(folder).expanduser()
    hint = "a folder written by ns-distill-personalize (lora.json, unet_lora.safetensors)"
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise PriorLoadError(f"{flag} {folder} {what}: pass {hint}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PriorLoadError(
            f"{flag} {folder} holds no LoRA adapters (no {CONFIG_FILE}): pass {hint}, or train them with "
            f"ns-distill-personalize --output-dir {folder}"
        )
    try:
        record = json.loads(path.read_text())
        networks = record["networks"]
        if not isinstance(networks, dict) or not networks or not set(networks) <= set(WEIGHT_FILES):
            raise ValueError("networks")
        for entry in networks.values():
            LoraSpec(int(entry["rank"]), entry.get("alpha"), tuple(entry["targets"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PriorLoadError(
            f"{path} is not a LoRA index ({type(e).__name__}: {one_line(e, 60)}): rewrite the folder with "
            "ns-distill-personalize"
        ) from None
    for key in networks:
        if not (folder / WEIGHT_FILES[key]).is_file():
            raise PriorLoadError(
                f"{flag} {folder}: {CONFIG_FILE} lists {key} adapters but {WEIGHT_FILES[key]} is missing: "
                "copy the whole folder, or train it again with ns-distill-personalize"
            )
    return record


def read_lora(folder: str | Path, flag: str) -> LoraFolder:
    """lora.json and the weights of ``folder``; one-line :class:`PriorLoadError` naming ``flag`` when anything
    is missing or unreadable, or the weights disagree with lora.json."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    record = read_lora_record(folder, flag)
    specs, states = {}, {}
    for key, entry in record["networks"].items():
        spec = LoraSpec(int(entry["rank"]), entry.get("alpha"), tuple(entry["targets"]))
        path = folder / WEIGHT_FILES[key]
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for cut-short or foreign files
            raise PriorLoadError(
                f"{path} is not a readable safetensors file ({one_line(e, 80)}): train the adapters again "
                "with ns-distill-personalize"
            ) from None
        if not state or not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state):
            raise PriorLoadError(f"{path} holds no LoRA weights (lora_A/lora_B): train the adapters again")
        ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
        ranks |= {v.shape[1] for k, v in state.items() if k.endswith(".lora_B.weight")}
        if ranks != {spec.rank}:
            raise PriorLoadError(
                f"{path} holds adapters of rank {', '.join(map(str, sorted(ranks)))} but {CONFIG_FILE} says rank "
                f"{spec.rank}: the folder mixes two trainings; train the adapters again into an empty folder"
            )
        specs[key], states[key] = spec, state
    return LoraFolder(folder, record, specs, states)


def check_fits(net: nn.Module, state: Mapping[str, Tensor], spec: LoraSpec) -> str | None:
    """Why the adapter weights ``state`` do not fit ``net`` (None when they do): every key must name an
    nn.Linear of ``net`` of the same in/out size, and every layer ``spec.targets`` names must have weights."""
    linears = {path: m for path, m in net.named_modules() if isinstance(m, nn.Linear)}
    for key, value in state.items():
        path, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        layer = linears.get(path)
        if layer is None:
            return f"no linear layer {path}"
        want = (spec.rank, layer.in_features) if part == "lora_A" else (layer.out_features, spec.rank)
        if tuple(value.shape) != want:
            return f"{key} is {tuple(value.shape)}, the layer needs {want}"
    targeted = {p for p in linears if any(p == t or p.endswith("." + t) for t in spec.targets)}
    missing = sorted(targeted - {key.rsplit(".", 2)[0] for key in state})
    if missing:
        return f"no weights for {len(missing)} of its {len(targeted)} adapted layers, e.g. {missing[0]}"
    return None


def load_lora(
    folder: str | Path,
    nets: Mapping[str, nn.Module],
    flag: str,
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    name: str = ADAPTER,
) -> dict[str, Any]:
    """Add the adapters of ``folder`` to ``nets`` (keys "unet", "text_encoder") IN PLACE, at strength
    ``scale``, in ``dtype`` (None: each network's own), frozen; return lora.json. Every check runs before
    any network changes: a missing folder, a folder without adapters and adapters of another architecture
    or rank are one-line :class:`PriorLoadError` s naming ``flag``."""
    lora = read_lora(folder, flag)
    trained_on = lora.record.get("model")
    on = f" (they were trained on {trained_on!r})" if trained_on else ""
    for key, state in lora.states.items():
        if key not in nets:
            raise PriorLoadError(f"{flag} {lora.folder} holds {key} adapters, which this prior cannot take")
        why = check_fits(nets[key], state, lora.specs[key])
        if why:
            raise PriorLoadError(
                f"{flag} {lora.folder}: its {key} adapters do not fit this model's {key} ({why}){on}: use them "
                "with the model they were trained on, or train new ones with ns-distill-personalize"
            )
    from peft.utils import set_peft_model_state_dict

    for key, state in lora.states.items():
        net = nets[key]
        own = dtype or next(net.parameters()).dtype
        params = add_lora(net, lora.specs[key], name, dtype=own)
        result = set_peft_model_state_dict(net, state, adapter_name=name)
        unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
        if unexpected:  # cannot happen after check_fits; kept so a peft change fails loudly, not silently
            raise PriorLoadError(f"{flag} {lora.folder}: peft did not take {unexpected[0]}")
        for p in params:  # loaded adapters are frozen
            p.requires_grad_(False)
        set_lora_scale(net, scale, name)
    return lora.record
