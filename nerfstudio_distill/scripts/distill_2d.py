"""``ns-distill-2d``: try an edit on one image before a 3D run.

Optimises a single image (its pixels, or its Stable Diffusion latents) with the same guidance step the 3D
pipelines use (:class:`~nerfstudio_distill.guidance.config.GuidanceConfig`), and writes the result, a strip
of snapshots and a JSON of the settings and final readouts. With the exact prior it runs in seconds on CPU;
with Stable Diffusion on a GPU it is the quick way to tune prompts, CFG and PDS's ψ/χ::

    ns-distill-2d --image photo.png --target-prompt "a photo of a man in a suit" \
        --source-prompt "a photo of a man" --guidance.method pds --output-dir tune/suit

With ``--prior.kind instruct-pix2pix`` the target prompt is the instruction and every step is conditioned
on the input image, as an edit of a scene conditions each view on its original image (dds/pds's source
branch: the empty instruction on the same image)::

    ns-distill-2d --image photo.png --target-prompt "turn him into a clown" \
        --prior.kind instruct-pix2pix --guidance.method pds --output-dir tune/clown

``--sweep NAME=V1,V2,...`` (once or twice) runs one such edit per value (per pair of values) of guidance
options and writes a contact sheet of the grid (sweep.png) and each cell's readouts (sweep.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from jaxtyping import Float, UInt8
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from nerfstudio_distill.data.images import read_rgb
from nerfstudio_distill.errors import Distill2DError, DistillError, exit_message
from nerfstudio_distill.guidance.common import GuidanceOutput
from nerfstudio_distill.guidance.config import METHODS, GuidanceConfig
from nerfstudio_distill.priors.base import Condition, Prior, check_device, instruction_conditions
from nerfstudio_distill.priors.config import PriorConfig, warn_unused_source_prompt

OUTPUT_FILES = ("result.png", "strip.png", "distill_2d.json")
"""What ``--output-dir`` receives."""
SWEEP_FILES = ("sweep.png", "sweep.json")
"""What ``--output-dir`` receives with ``--sweep``."""
SWEEP_OPTIONS: dict[str, tuple[str, ...]] = {
    "guidance-scale": ("guidance_scale",),
    "psi-scale": ("psi_scale",),
    "chi-scale": ("chi_scale",),
    "timesteps.min-fraction": ("timesteps", "min_fraction"),
    "timesteps.max-fraction": ("timesteps", "max_fraction"),
    "method": ("method",),
}
"""Guidance options ``--sweep`` can vary (named as after ``--guidance.``) and their GuidanceConfig fields."""
SWEEP_EXAMPLES = {
    "guidance-scale": "7.5,30,100",
    "psi-scale": "0.25,0.5,1",
    "chi-scale": "0.5,1,2",
    "timesteps.min-fraction": "0.02,0.2,0.4",
    "timesteps.max-fraction": "0.5,0.75,0.98",
    "method": "dds,pds",
}
"""Values of each swept option that the error messages suggest."""
MAX_SWEEPS, MAX_SWEEP_CELLS = 2, 36
"""At most two swept options (rows, columns) and this many cells in the grid."""


@dataclass
class Distill2DArgs:
    """Optimise one image with sds, sdi, dds or pds and write result.png, strip.png and distill_2d.json (with
    --sweep: one edit per grid cell, written as sweep.png and sweep.json)."""

    image: Path
    """An image file (PNG, JPEG, ...), or a nerfstudio dataset folder (with transforms.json) whose frame
    --view is edited. Alpha is dropped."""
    target_prompt: str
    """What the edited image should show, e.g. "a photo of a man in a suit"; with --prior.kind
    instruct-pix2pix the instruction, e.g. "turn him into a clown". Required, non-empty."""
    source_prompt: str = ""
    """What the image shows now (the source branch of dds/pds), e.g. "a photo of a man". Empty: the
    unconditional prompt. Unused with instruct-pix2pix, whose source branch is the empty instruction
    conditioned on the input image."""
    view: int = 0
    """With a dataset folder: index of the frame in transforms.json's "frames" list."""
    output_dir: Path = Path("distill_2d")
    """Folder for result.png, strip.png and distill_2d.json (with --sweep: sweep.png and sweep.json); must
    be missing or empty unless --overwrite."""
    overwrite: bool = False
    """Write into a non-empty --output-dir (only the output files are replaced)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Which distillation gradient (--guidance.method sds|sdi|dds|pds), CFG, timesteps and ψ/χ, exactly
    as --pipeline.guidance.* of the 3D methods."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The diffusion prior: --prior.kind stable-diffusion with --prior.stable-diffusion.model (hub id or
    local folder), --prior.kind instruct-pix2pix with --prior.instruct-pix2pix.model (every step
    conditioned on the input image; --prior.instruct-pix2pix.image-guidance-scale its image CFG), or
    --prior.kind exact with --prior.exact.folder (an exact-prior image set)."""
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
    sweep: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """NAME=V1,V2,...: run one edit per value of a --guidance option (psi-scale, chi-scale, guidance-scale,
    timesteps.min-fraction, timesteps.max-fraction, method) and write a contact sheet, sweep.png, and
    sweep.json instead of the usual outputs. Give it twice for a grid (first option down the rows, second
    across the columns; at most 36 cells). Every cell has the same image, prior, seed, steps and lr."""


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
    if min(size) < prior.min_side:
        raise Distill2DError(
            f"--image is {height}x{width}, which reaches the prior at {size[0]}x{size[1]}: it needs at least "
            f"{prior.min_side} px on the short side; pass --resolution 512 (or a larger image)"
        )
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
    is the input image itself. With a prior conditioned on images (InstructPix2Pix) every branch is also
    conditioned on the input image, the target prompt is the instruction and the source branch the empty
    instruction (``source_prompt`` unused), as in the edit pipeline. See :class:`Distill2DArgs` for the
    options."""
    source = image.to(prior.device, torch.float32)
    with torch.no_grad():
        source_latents = prior.encode(source)
        target: str | Condition = target_prompt
        source_condition: str | Condition = source_prompt
        if prior.takes_image:
            target, source_condition = instruction_conditions(target_prompt, prior.encode_condition(source))
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
            target,
            x0_src=source_latents,
            prompt_src=source_condition,
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


# ----------------------------------------------------------------------------------------------- sweep
@dataclass(frozen=True)
class Sweep:
    """One ``--sweep``: a guidance option and the values it takes."""

    name: str
    """The option as after --guidance., dashed (a key of :data:`SWEEP_OPTIONS`)."""
    values: tuple[float | str, ...]
    """Its values, in the order given (strings for ``method``)."""


@dataclass(frozen=True)
class SweepCell:
    """One cell of the grid: the swept values and the guidance they give."""

    values: dict[str, float | str]
    """Swept option -> value, rows' option first."""
    guidance: GuidanceConfig
    """--guidance with those values set."""

    @property
    def label(self) -> str:
        return ", ".join(option_label(name, value) for name, value in self.values.items())


def option_label(name: str, value: float | str) -> str:
    """``psi-scale=0.5``: how sweep.png and the messages name a value."""
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def parse_sweep(text: str) -> Sweep:
    """``NAME=V1,V2,...`` -> :class:`Sweep`; NAME may also be written ``guidance.psi_scale``."""
    name, equals, listed = text.partition("=")
    name = name.strip().removeprefix("--").removeprefix("guidance.").replace("_", "-")
    if not equals or name not in SWEEP_OPTIONS:
        raise Distill2DError(
            f"--sweep {text}: use NAME=V1,V2,... with NAME one of {', '.join(SWEEP_OPTIONS)}, "
            "e.g. --sweep psi-scale=0.25,0.5,1"
        )
    example = SWEEP_EXAMPLES[name]
    items = [item.strip() for item in listed.split(",")]
    if not all(items):
        raise Distill2DError(
            f"--sweep {text}: an empty value; give comma-separated values, e.g. {name}={example}"
        )
    if name == "method":
        wrong = [item for item in items if item not in METHODS]
        if wrong:
            raise Distill2DError(f"--sweep {text}: {wrong[0]!r} is not a method; use {', '.join(METHODS)}")
        return Sweep(name, tuple(items))
    try:
        return Sweep(name, tuple(float(item) for item in items))
    except ValueError:
        raise Distill2DError(f"--sweep {text}: the values must be numbers, e.g. {name}={example}") from None


def parse_sweeps(texts: tuple[str, ...]) -> list[Sweep]:
    """Every ``--sweep``, checked as a whole: at most two options, each once, at most 36 cells."""
    if len(texts) > MAX_SWEEPS:
        raise Distill2DError(
            f"--sweep is given {len(texts)} times: a sheet is a grid of at most {MAX_SWEEPS} options "
            "(rows, columns); drop the others"
        )
    sweeps = [parse_sweep(text) for text in texts]
    if len(sweeps) == 2 and sweeps[0].name == sweeps[1].name:
        raise Distill2DError(
            f"--sweep {sweeps[0].name} is given twice: list all its values in one --sweep {sweeps[0].name}=..."
        )
    cells = math.prod(len(sweep.values) for sweep in sweeps)
    if cells > MAX_SWEEP_CELLS:
        shape = "x".join(str(len(sweep.values)) for sweep in sweeps)
        raise Distill2DError(
            f"--sweep gives a {shape} grid of {cells} edits: use at most {MAX_SWEEP_CELLS}, with fewer values"
        )
    return sweeps


def with_values(guidance: GuidanceConfig, values: dict[str, float | str]) -> GuidanceConfig:
    """``guidance`` with the swept ``values`` set (all timesteps fields in one replace), then checked."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = SWEEP_OPTIONS[name]
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    label = ", ".join(option_label(name, value) for name, value in values.items())
    try:
        for group, fields in nested.items():
            top[group] = dataclasses.replace(getattr(guidance, group), **fields)
        config = dataclasses.replace(guidance, **top)
        config.check()
    except ValueError as err:  # DistillError of check(), and TimestepSchedule's range errors
        raise Distill2DError(f"--sweep cell {label}: {err}") from None
    return config


def sweep_grid(guidance: GuidanceConfig, sweeps: list[Sweep]) -> list[list[SweepCell]]:
    """The grid's cells, rows by columns, every one checked: one sweep is one row; with two, the first
    runs down the rows and the second across the columns."""
    *row_sweeps, column_sweep = sweeps
    rows = [{sweep.name: value} for sweep in row_sweeps for value in sweep.values] or [{}]
    grid = []
    for row in rows:
        cells = [{**row, column_sweep.name: value} for value in column_sweep.values]
        grid.append([SweepCell(values, with_values(guidance, values)) for values in cells])
    return grid


# ---------------------------------------------------------------------------------------------- output
def to_uint8(image: Float[Tensor, "3 H W"]) -> UInt8[np.ndarray, "H W 3"]:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def strip(snapshots: list[tuple[int, Float[Tensor, "3 H W"]]], min_height: int = 128) -> Image.Image:
    """Snapshots side by side, upscaled (nearest, by a whole factor) to at least ``min_height`` pixels."""
    row = np.concatenate([to_uint8(image) for _, image in snapshots], axis=1)
    factor = max(1, math.ceil(min_height / row.shape[0]))
    picture = Image.fromarray(row)
    return picture.resize((row.shape[1] * factor, row.shape[0] * factor), Image.NEAREST)


GAP = 4
"""Pixels between the tiles of sweep.png, and around them."""
LABEL_BAND = 20
"""Height in pixels of sweep.png's top band, which holds the column labels."""


def text_width(text: str) -> int:
    """Width in pixels of ``text`` in PIL's default font (0 for no text)."""
    return math.ceil(ImageFont.load_default().getbbox(text)[2]) if text else 0


def upscaled(image: Float[Tensor, "3 H W"], min_height: int) -> Image.Image:
    """``image`` upscaled (nearest, by a whole factor) to at least ``min_height`` pixels."""
    factor = max(1, math.ceil(min_height / image.shape[-2]))
    height, width = image.shape[-2:]
    return Image.fromarray(to_uint8(image)).resize((width * factor, height * factor), Image.NEAREST)


def contact_sheet(
    image: Float[Tensor, "3 H W"],
    results: list[list[Float[Tensor, "3 H W"]]],
    row_labels: list[str],
    column_labels: list[str],
    min_height: int = 128,
) -> Image.Image:
    """The input tile (labelled "input"), then the row labels, then the grid of ``results`` under the column
    labels; tiles upscaled as in :func:`strip`, on white with :data:`GAP` pixels between them."""
    tile = upscaled(image, min_height)
    column = max(tile.width, *(text_width(label) + GAP for label in [*column_labels, "input"]))
    gutter = max(text_width(label) for label in row_labels)
    gutter += GAP if gutter else 0
    left = 2 * GAP + column + gutter  # x of the grid's first column
    size = (left + len(column_labels) * (column + GAP), LABEL_BAND + len(row_labels) * (tile.height + GAP))
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()

    def place(picture: Image.Image, x: int, y: int, label: str | None = None) -> None:
        sheet.paste(picture, (x + (column - picture.width) // 2, y))
        if label is not None:
            draw.text((x + (column - text_width(label)) // 2, GAP), label, fill="black", font=font)

    place(tile, GAP, LABEL_BAND, "input")
    for i, (row_label, row) in enumerate(zip(row_labels, results, strict=True)):
        y = LABEL_BAND + i * (tile.height + GAP)
        draw.text(
            (left - GAP - text_width(row_label), y + tile.height // 2 - 6), row_label, fill="black", font=font
        )
        for j, (column_label, result) in enumerate(zip(column_labels, row, strict=True)):
            place(
                upscaled(result, min_height), left + j * (column + GAP), y, column_label if i == 0 else None
            )
    return sheet


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
    warn_unused_source_prompt(args.prior, args.source_prompt, "--", "the input image")
    if args.steps < 1 or not (math.isfinite(args.lr) and args.lr > 0):
        raise Distill2DError(f"--steps {args.steps} --lr {args.lr}: use steps >= 1 and a finite lr > 0")
    check_device(args.device, "--device")
    args.prior.check()  # devices, the exact prior's set (flags shown as --prior.*)
    if args.num_snapshots < 1:
        raise Distill2DError(f"--num-snapshots {args.num_snapshots}: use at least 1")
    if args.resolution is not None and args.resolution < 8:
        raise Distill2DError(f"--resolution {args.resolution}: use at least 8, or None for the image's size")
    args.guidance.check()  # non-finite CFG/psi/chi, bad counts (flags shown as --guidance.*)
    if args.guidance.spec.needs_camera:
        raise Distill2DError(
            f"--guidance.method {args.guidance.method} needs the camera of each view of a 3D scene, which one "
            f"image has not: use ns-train {args.guidance.method}-nerfacto"
        )
    if args.sweep:
        sweep_grid(args.guidance, parse_sweeps(args.sweep))  # checks every cell's options


def settings_of(args: Distill2DArgs) -> dict[str, Any]:
    """``args`` as JSON-ready data, with only the prior in use."""
    settings = dataclasses.asdict(args)
    kind = args.prior.kind.replace("-", "_")  # the field of PriorConfig with its options
    settings["prior"] = {"kind": args.prior.kind, kind: settings["prior"][kind]}
    return settings


def run_edit(
    args: Distill2DArgs, prior: Prior, x: Float[Tensor, "1 3 h w"], guidance: GuidanceConfig, snapshots: int
) -> tuple[Distill2DResult, float]:
    """:func:`distill_image` with the options of ``args`` and ``guidance``; returns (result, seconds)."""
    start = time.time()
    result = distill_image(
        prior,
        x,
        guidance,
        args.target_prompt,
        args.source_prompt,
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        optimize=args.optimize,
        num_snapshots=snapshots,
        seed=args.seed,
    )
    if not torch.isfinite(result.image).all():  # nothing is written from a diverged run
        raise Distill2DError(
            f"the optimisation diverged (NaN/Inf) with --lr {args.lr:g} and --optimizer {args.optimizer}: "
            "lower --lr (Adam's default is 0.02); nothing was written"
        )
    return result, time.time() - start


def write_single(args: Distill2DArgs, prior: Prior, x: Float[Tensor, "1 3 h w"]) -> dict[str, Path]:
    """One edit: result.png, strip.png and distill_2d.json."""
    result, seconds = run_edit(args, prior, x, args.guidance, args.num_snapshots)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name.split(".")[0]: args.output_dir / name for name in OUTPUT_FILES}
    Image.fromarray(to_uint8(result.image)).save(paths["result"])
    strip(result.snapshots).save(paths["strip"])
    report = {
        "settings": settings_of(args),
        "input_size": list(x.shape[-2:]),
        "snapshot_steps": [step for step, _ in result.snapshots],
        "readouts": result.readouts,
        "seconds": round(seconds, 2),
        "device": str(prior.device),
    }
    paths["distill_2d"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    return paths


def write_sweep(args: Distill2DArgs, prior: Prior, x: Float[Tensor, "1 3 h w"]) -> dict[str, Path]:
    """One edit per cell of the --sweep grid: sweep.png and sweep.json (each cell's guidance and readouts)."""
    sweeps = parse_sweeps(args.sweep)
    grid = sweep_grid(args.guidance, sweeps)
    results, cells = [], []
    for i, row in enumerate(grid):
        results.append([])
        for j, cell in enumerate(row):
            result, seconds = run_edit(args, prior, x, cell.guidance, 1)
            results[-1].append(result.image)
            cells.append({"row": i, "column": j, "label": cell.label, "values": cell.values})
            cells[-1].update(guidance=dataclasses.asdict(cell.guidance), readouts=result.readouts)
            cells[-1]["seconds"] = round(seconds, 2)
            print(f"cell {len(cells)}/{len(grid) * len(row)} {cell.label}: RMS change "
                  f"{result.readouts['rms_change']:.3f} ({seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    rows = [option_label(sweeps[0].name, v) for v in sweeps[0].values] if len(sweeps) == 2 else [""]
    columns = [option_label(sweeps[-1].name, v) for v in sweeps[-1].values]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"sweep": args.output_dir / SWEEP_FILES[0], "sweep_json": args.output_dir / SWEEP_FILES[1]}
    contact_sheet(x[0].cpu(), results, rows, columns).save(paths["sweep"])
    report = {
        "settings": settings_of(args),
        "sweeps": [{"name": sweep.name, "values": list(sweep.values)} for sweep in sweeps],
        "input_size": list(x.shape[-2:]),
        "cells": cells,
        "seconds": round(sum(cell["seconds"] for cell in cells), 2),
        "device": str(prior.device),
    }
    paths["sweep_json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    return paths


def main(args: Distill2DArgs) -> dict[str, Path]:
    """Check everything, load the image and the prior (once), optimise, write the outputs; returns their
    paths (keys result, strip, distill_2d; with --sweep: sweep, sweep_json)."""
    check_args(args)
    check_output_dir(args.output_dir, args.overwrite)
    image = load_image(args.image, args.view)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prior = args.prior.setup(device)
    x = prior_input(image, prior, args.resolution)
    prompts = [args.target_prompt, "" if prior.takes_image else args.source_prompt]
    prior.embed(prompts)  # unknown prompts fail here, before any step
    return write_sweep(args, prior, x) if args.sweep else write_single(args, prior, x)


def summary(paths: dict[str, Path]) -> str:
    """The line printed after a run: what was written and the final readouts."""
    if "sweep" in paths:
        cells = json.loads(paths["sweep_json"].read_text())["cells"]
        low, high = (f(cells, key=lambda c: c["readouts"]["rms_change"]) for f in (min, max))
        return (f"wrote {paths['sweep']} and {paths['sweep_json']} ({len(cells)} edits; RMS change "
                f"{low['readouts']['rms_change']:.3f} at {low['label']} to {high['readouts']['rms_change']:.3f} "
                f"at {high['label']})")  # fmt: skip
    r = json.loads(paths["distill_2d"].read_text())["readouts"]
    return (f"wrote {paths['result']} and {paths['strip']} (final grad norm {r['grad_norm']:.4g}, "
            f"RMS change {r['rms_change']:.3f})")  # fmt: skip


def entrypoint() -> None:
    """``ns-distill-2d``: parse the command line, run, report bad input in one ``error:`` line."""
    try:
        args = tyro.cli(Distill2DArgs, prog="ns-distill-2d")
        paths = main(args)
    except DistillError as err:
        raise SystemExit(exit_message(err, flag_prefix="--")) from None
    print(summary(paths))


if __name__ == "__main__":
    entrypoint()
