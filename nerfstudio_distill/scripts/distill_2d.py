"""``ns-distill-2d``: try an edit on one image before a 3D run.

Optimises a single image (its pixels, or its Stable Diffusion latents) with the same guidance step the 3D
pipelines use (:class:`~nerfstudio_distill.guidance.config.GuidanceConfig`), and writes the result, a strip
of snapshots and a JSON of the settings and final readouts. With the exact prior it runs in seconds on CPU;
with Stable Diffusion on a GPU it is the quick way to tune prompts, CFG and PDS's ψ/χ::

    ns-distill-2d --image photo.png --target-prompt "a photo of a man in a suit" \
        --source-prompt "a photo of a man" --guidance.method pds --output-dir tune/suit
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from PIL import Image
from torch import Tensor

from nerfstudio_distill.data.images import read_rgb
from nerfstudio_distill.errors import Distill2DError, DistillError, exit_message
from nerfstudio_distill.guidance.common import GuidanceOutput
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.priors.base import Prior
from nerfstudio_distill.priors.config import PriorConfig

OUTPUT_FILES = ("result.png", "strip.png", "distill_2d.json")
"""What ``--output-dir`` receives."""


@dataclass
class Distill2DArgs:
    """Optimise one image with sds, sdi, dds or pds and write result.png, strip.png and distill_2d.json."""

    image: Path
    """An image file (PNG, JPEG, ...), or a nerfstudio dataset folder (with transforms.json) whose frame
    --view is edited. Alpha is dropped."""
    target_prompt: str
    """What the edited image should show, e.g. "a photo of a man in a suit". Required, non-empty."""
    source_prompt: str = ""
    """What the image shows now (the source branch of dds/pds), e.g. "a photo of a man". Empty: the
    unconditional prompt."""
    view: int = 0
    """With a dataset folder: index of the frame in transforms.json's "frames" list."""
    output_dir: Path = Path("distill_2d")
    """Folder for result.png, strip.png and distill_2d.json; must be missing or empty unless --overwrite."""
    overwrite: bool = False
    """Write into a non-empty --output-dir (only the three output files are replaced)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Which distillation gradient (--guidance.method sds|sdi|dds|pds), CFG, timesteps and ψ/χ, exactly
    as --pipeline.guidance.* of the 3D methods."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The diffusion prior: --prior.kind stable-diffusion with --prior.stable-diffusion.model (hub id or
    local folder), or --prior.kind exact with --prior.exact.folder (an exact-prior image set)."""
    optimize: Literal["pixels", "latents"] = "latents"
    """What is optimised: the prior's latents (decoded for the outputs), or the pixels (the gradient flows
    back through the encoder; kept in [0, 1]). Identical for the exact prior, whose latents are pixels."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam (per-element steps of about --lr, insensitive to the gradient's scale) or plain SGD."""
    lr: float = 0.02
    """Learning rate of the optimiser."""
    steps: int = 200
    """Optimisation steps (one guidance evaluation each). The timestep annealing of --guidance.timesteps
    runs over them as over an edit's training."""
    resolution: int | None = 512
    """Short side, in pixels, of the image given to Stable Diffusion (both sides are rounded to multiples of
    its VAE factor, 8). None: the image's own size. The exact prior always takes its image set's size."""
    num_snapshots: int = 8
    """Images in strip.png, evenly spaced from the input (step 0) to the result."""
    seed: int = 0
    """Seed of the timesteps and noise of every step."""
    device: str | None = None
    """Device of the prior and the image; None: "cuda" when available, else "cpu"."""


@dataclass
class Distill2DResult:
    """What :func:`distill_image` returns."""

    image: Float[Tensor, "3 H W"]
    """The optimised image in [0, 1] (CPU)."""
    snapshots: list[tuple[int, Float[Tensor, "3 H W"]]]
    """(step, image) pairs, from step 0 (the input) to the last step (the result)."""
    readouts: dict[str, float]
    """Guidance readouts of the last step (grad_norm, t; psi, chi, t_prev for pds; weight for sds/sdi/dds),
    the mean gradient norm over the last tenth of the steps, and rms_change: the RMS difference of the result
    from the input image (pixels in [0, 1]; with SD latents it includes the VAE round trip)."""


# ------------------------------------------------------------------------------------------------- input
def load_image(path: Path, view: int = 0) -> Float[Tensor, "1 3 H W"]:
    """The input image in [0, 1]: an image file, or frame ``view`` of a nerfstudio dataset folder."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise Distill2DError(
            f"--image {path} does not exist: pass an image file, or a nerfstudio dataset folder with "
            "transforms.json"
        )
    if path.is_dir():
        index_file = path / "transforms.json"
        if not index_file.is_file():
            raise Distill2DError(
                f"--image {path} is a folder without transforms.json: pass an image file, or a nerfstudio "
                "dataset folder (e.g. one written by ns-distill-scene)"
            )
        frames = json.loads(index_file.read_text()).get("frames", [])
        if not 0 <= view < len(frames):
            raise Distill2DError(
                f"--view {view} is out of range: {index_file} has {len(frames)} frames, pass --view "
                f"0..{len(frames) - 1}"
            )
        path = path / frames[view]["file_path"]
        if not path.is_file():
            raise Distill2DError(
                f"frame {view} of the dataset, {path}, does not exist: check transforms.json"
            )
    try:
        array = read_rgb(path)
    except (UnidentifiedImageError, OSError) as e:
        raise Distill2DError(
            f"--image {path} is not an image that PIL can read ({type(e).__name__}): pass a PNG or JPEG "
            "file, or a dataset folder with transforms.json"
        ) from e
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def prior_input(
    image: Float[Tensor, "1 3 H W"], prior: Prior, resolution: int | None
) -> Float[Tensor, "1 3 h w"]:
    """Resize ``image`` for the prior: the exact prior's image size, else short side ``resolution`` with both
    sides rounded to multiples of the VAE factor (no resize when the size already fits)."""
    height, width = image.shape[-2:]
    points = getattr(prior, "points", None)
    if points is not None and getattr(prior, "is_image", False):
        size = tuple(points.shape[-2:])
    else:
        factor = getattr(prior, "vae_scale_factor", 1)
        scale = 1.0 if resolution is None else resolution / min(height, width)
        size = tuple(max(factor, round(s * scale / factor) * factor) for s in (height, width))
    if size == (height, width):
        return image
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# -------------------------------------------------------------------------------------------- optimise
def readouts(out: GuidanceOutput) -> dict[str, float]:
    """Scalars of one guidance step: gradient norm, t, and PDS's ψ, χ and t_prev when present."""
    values = {"grad_norm": float(out.grad_norm), "t": float(out.t.float().mean())}
    for name in ("psi", "chi", "t_prev", "weight"):
        value = getattr(out, name)
        if value is not None:
            values[name] = float(value.float().mean())
    return values


def distill_image(
    prior: Prior,
    image: Float[Tensor, "1 3 H W"],
    guidance: GuidanceConfig,
    target_prompt: str,
    source_prompt: str = "",
    *,
    steps: int = 200,
    lr: float = 0.02,
    optimizer: Literal["adam", "sgd"] = "adam",
    optimize: Literal["pixels", "latents"] = "latents",
    num_snapshots: int = 8,
    seed: int = 0,
) -> Distill2DResult:
    """Optimise ``image`` (already at the prior's input size) with ``guidance``; the source branch of dds/pds
    is the input image itself. See :class:`Distill2DArgs` for the options."""
    source = image.to(prior.device, torch.float32)
    with torch.no_grad():
        source_latents = prior.encode(source)
    if optimize == "latents":
        param = source_latents.clone().requires_grad_(True)
    else:
        param = source.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr) if optimizer == "adam" else torch.optim.SGD([param], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    picks = (
        {steps}
        if num_snapshots <= 1
        else set(np.linspace(0, steps, num_snapshots).round().astype(int).tolist())
    )

    def current() -> Float[Tensor, "3 H W"]:
        with torch.no_grad():
            x = prior.decode(param.detach()) if optimize == "latents" else param.detach().clamp(0, 1)
        return x[0].float().cpu()

    snapshots, grad_norms, last = [], [], {}
    for step in range(steps + 1):
        if step in picks:
            snapshots.append((step, current()))
        if step == steps:
            break
        latents = param if optimize == "latents" else prior.encode(param)
        out = guidance(
            prior,
            latents,
            target_prompt,
            x0_src=source_latents,
            prompt_src=source_prompt,
            progress=step / steps,
            generator=generator,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if optimize == "pixels":
            with torch.no_grad():
                param.clamp_(0, 1)
        last = readouts(out)
        grad_norms.append(last["grad_norm"])
    tail = grad_norms[-max(1, steps // 10) :]
    result = snapshots[-1][1]
    rms = float((result - source[0].cpu()).pow(2).mean().sqrt())
    info = {**last, "mean_grad_norm_last_tenth": sum(tail) / len(tail), "rms_change": rms}
    return Distill2DResult(image=result, snapshots=snapshots, readouts=info)


# ---------------------------------------------------------------------------------------------- output
def to_uint8(image: Float[Tensor, "3 H W"]) -> UInt8[np.ndarray, "H W 3"]:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def strip(snapshots: list[tuple[int, Float[Tensor, "3 H W"]]], min_height: int = 128) -> Image.Image:
    """Snapshots side by side, upscaled (nearest, by a whole factor) to at least ``min_height`` pixels."""
    row = np.concatenate([to_uint8(image) for _, image in snapshots], axis=1)
    factor = max(1, math.ceil(min_height / row.shape[0]))
    picture = Image.fromarray(row)
    return picture.resize((row.shape[1] * factor, row.shape[0] * factor), Image.NEAREST)


def check_output_dir(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise Distill2DError(f"--output-dir {folder} is a file: choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise Distill2DError(
            f"--output-dir {folder} exists and is not empty: pass --overwrite or choose a new --output-dir"
        )


def check_args(args: Distill2DArgs) -> None:
    """One-line errors for the options, before anything is loaded."""
    if not args.target_prompt.strip():
        raise Distill2DError('--target-prompt is empty: pass the text to edit towards, e.g. "a blue ball"')
    if args.steps < 1 or not args.lr > 0:
        raise Distill2DError(f"--steps {args.steps} --lr {args.lr}: use steps >= 1 and lr > 0")
    if args.num_snapshots < 1:
        raise Distill2DError(f"--num-snapshots {args.num_snapshots}: use at least 1")
    if args.resolution is not None and args.resolution < 8:
        raise Distill2DError(f"--resolution {args.resolution}: use at least 8, or None for the image's size")
    args.guidance.check()  # non-finite CFG/psi/chi, bad counts (flags shown as --guidance.*)


def main(args: Distill2DArgs) -> dict[str, Path]:
    """Check everything, load the image and the prior, optimise, write the outputs; returns their paths."""
    check_args(args)
    check_output_dir(args.output_dir, args.overwrite)
    image = load_image(args.image, args.view)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prior = args.prior.setup(device)
    x = prior_input(image, prior, args.resolution)
    prior.embed([args.target_prompt, args.source_prompt])  # unknown prompts fail here, before any step
    start = time.time()
    result = distill_image(
        prior,
        x,
        args.guidance,
        args.target_prompt,
        args.source_prompt,
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        optimize=args.optimize,
        num_snapshots=args.num_snapshots,
        seed=args.seed,
    )
    seconds = time.time() - start

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {name.split(".")[0]: out / name for name in OUTPUT_FILES}
    Image.fromarray(to_uint8(result.image)).save(paths["result"])
    strip(result.snapshots).save(paths["strip"])
    settings = dataclasses.asdict(args)
    kind = "exact" if args.prior.kind == "exact" else "stable_diffusion"
    settings["prior"] = {"kind": args.prior.kind, kind: settings["prior"][kind]}  # only the one in use
    report = {
        "settings": settings,
        "input_size": list(x.shape[-2:]),
        "snapshot_steps": [step for step, _ in result.snapshots],
        "readouts": result.readouts,
        "seconds": round(seconds, 2),
        "device": str(prior.device),
    }
    paths["distill_2d"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    return paths


def entrypoint() -> None:
    """``ns-distill-2d``: parse the command line, run, report bad input in one ``error:`` line."""
    import tyro

    try:
        args = tyro.cli(Distill2DArgs, prog="ns-distill-2d")
        paths = main(args)
    except DistillError as err:
        raise SystemExit(exit_message(err, flag_prefix="--")) from None
    r = json.loads(paths["distill_2d"].read_text())["readouts"]
    print(f"wrote {paths['result']} and {paths['strip']} (final grad norm {r['grad_norm']:.4g}, "
          f"RMS change {r['rms_change']:.3f})")  # fmt: skip


if __name__ == "__main__":
    entrypoint()
