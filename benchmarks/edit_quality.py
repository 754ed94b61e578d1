"""End-to-end, scored comparison of ``ns-train pds-edit``, ``dds-edit``, ``sds-edit`` and ``in2n-edit`` on CPU.

The run, built entirely from the generator and nerfstudio's real CLIs:

1. ``ns-distill-scene`` (Python API): the source object, a red ball with 3 white stripes on a black
   background, unshaded (``shading="albedo"``), seen from a ring of cameras. (White stripes on a white
   background were invisible to nerfacto: base PSNR 18.5 dB instead of 26.5 dB.)
2. The exact prior (``write_exact_prior_set``, memorising, σ = 0 by default) of two prompts with the same
   seven patterns: "a red ball" = red balls with 3, 4, 5 or 6 white stripes, a 3-checker, no pattern, or
   3 yellow stripes; "a blue ball" = the same seven in blue. The ideal edit (the generator's render of
   the source with only ``colour="blue"``) is one member of the target set; the six other blue balls
   make a loss of identity cost PSNR.
   The exact InstructPix2Pix (``write_exact_prior_set(..., conditions=...)``) holds edit pairs: under the
   instruction ("make the ball blue") each of the seven red objects seen from each camera ("before", the
   image condition) with its blue version ("after"); under "leave it as it is" the same "before" with
   itself. Conditioned on a training view's original image it knows that view's ideal edit (the pair
   whose "before" it is), as a real InstructPix2Pix would propose an edit of the view.
3. ``ns-train nerfacto`` on the source images (a small field), then ``ns-train pds-edit``,
   ``dds-edit`` and ``sds-edit --load-dir <base>`` with the same steps, CFG, t range, lr and seed;
   each method keeps its published weighting (SDS 1−ᾱ_t, DDS uniform, PDS ψ/χ). Two more rows run on
   the exact InstructPix2Pix: ``pds-ip2p`` (``pds-edit``, the source branch the empty instruction on the
   view's image) and ``in2n`` (``in2n-edit``: Instruct-NeRF2NeRF's iterative dataset update), both at
   their defaults (CFG: the prior's own, 1 and image scale 1).
4. Every run is loaded with ``eval_setup`` and rendered from the dataparser's train *and* eval cameras
   (nerfstudio-data holds out about every 10th frame); ground truth is rendered by the generator from
   the same frames (dataparser image filename -> frame of ``transforms.json``).

Why identity is measurable by construction: per view, the target-set image nearest (L2) to the source
image must be the ideal edit of that view (or a pixel-identical copy: the ball is symmetric under
rotation about its axis, so other views of the same object can coincide). :func:`identity_check`
verifies it on the written PNGs and reports the margin, min over views and over all differing target
images of d²(source, other) / d²(source, ideal). Two choices make it hold:
- shading is off: with the Lambert light, a darker view of a wrong blue ball is nearer (L2) to a bright
  red view than the ideal edit is (measured at 16 views, 48 px: 7 of 16 views wrong);
- no phase variants: a phase shift of meridian stripes is a rotation of the ball, i.e. the same
  images from other views, which a per-view prior cannot tell from the ideal edit.

Metrics, per method (renders of all dataparser frames, train + eval):
- ``psnr_to_ideal``: mean per-image PSNR (dB) of the edited renders against the ideal edit
  (``psnr_to_ideal_eval``: held-out frames only).
- ``target_accuracy``: of the pixels the ideal edit shows blue (the generator's label "primary"),
  the fraction whose rendered colour is nearest (RGB) to blue among the colours of the two prompt
  sets (red, blue, white, yellow). ``pattern_accuracy``: of all object pixels (generator mask), the
  fraction whose nearest palette colour is the ideal edit's colour there (blue body, white stripes;
  a plain blue ball scores about 0.5); ``stripe_accuracy``: the same on the stripe pixels only (the
  part the edit must not touch). ``colour_progress``: mean over those body pixels of the
  projection of (rendered − red) on (blue − red), / |blue − red|²: 0 unchanged, 1 the ideal colour.
  It shows what the accuracy hides: a body halfway between red and blue is a tie for the classifier.
- ``depth_change``: mean over object pixels of |depth_edit − depth_base| (nerfacto's depth along the
  ray, converted to generator units with ``dataparser_scale``) / object diameter (2), each pixel
  capped at 1 (a hole counts as one diameter, not as the distance to the far plane).
- ``seconds``: wall time of the edit's ``ns-train`` process (start-up included).
- ``depth_error``: the same mean against the generator's depth (over the source's object pixels), for the
  base and each edit: whether an edit moved its base's geometry towards the truth or away from it (on a
  base that never settled, a large depth change can be a repair).
The base reports ``psnr_to_source`` and ``depth_error`` as sanity checks, and ``psnr_to_ideal``, the no-edit reference.

    .venv/bin/python benchmarks/edit_quality.py            # table; --json: last line is one JSON object
    .venv/bin/python benchmarks/edit_quality.py --steps 100 --resolution 32 --methods pds --keep
    .venv/bin/python benchmarks/edit_quality.py --seeds 0 1 2 --jobs 2   # mean ± std over three seeds
    .venv/bin/python benchmarks/edit_quality.py --representation splatfacto --methods pds dds sds

``--representation splatfacto`` runs the same scene, prior, settings and scores on Gaussian splats: the
base is ``ns-train splatfacto`` (``--gaussians`` random Gaussians in the scene's box, SH degree 1, black
background, densifying from step 100) and the rows are ``pds-splatfacto``, ``dds-splatfacto``,
``sds-splatfacto`` (and ``pds-ip2p`` on splats); in2n-edit has no splat method. Depth is splatfacto's
expected depth along the camera axis, turned into distance along the ray as nerfacto's.
``s_per_step`` (both representations) is the edit process's wall time over its steps, start-up included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also when run as a script
from seeds import add_seeds_argument, mean_and_spread  # noqa: E402

from nerfstudio_distill.data.prior_sets import PATTERN_VARIANTS, write_exact_prior_set
from nerfstudio_distill.data.scene import (
    COLOURS,
    LABEL_PRIMARY,
    LABEL_SECONDARY,
    CameraSpec,
    SceneCameras,
    SceneSpec,
    generate_scene,
    load_scene,
    render,
    with_attributes,
)
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.models.edit_splatfacto import colour_lr
from nerfstudio_distill.scripts.demo import SPLAT_BASE, SPLATS


@dataclass(frozen=True)
class Row:
    """One row of the benchmark: an edit method and the prior it runs with."""

    method: str
    """The ``ns-train`` method."""
    instruct: bool = False
    """Runs with the exact InstructPix2Pix (``--pipeline.prior.kind exact`` on the image-conditioned set):
    the target prompt is the scene's instruction, and every step is conditioned on the view's original
    image."""


ROWS = {
    "pds": Row("pds-edit"),
    "dds": Row("dds-edit"),
    "sds": Row("sds-edit"),
    "pds-ip2p": Row("pds-edit", instruct=True),
    "in2n": Row("in2n-edit", instruct=True),
}
"""The benchmark's rows (``--methods``), by name, in table order."""
METHODS = tuple(ROWS)
PER_IMAGE_KEYS = ("psnr_to_ideal", "target_accuracy", "colour_progress")
"""Scores also reported from per-image renders (``--appearance per-image``, suffix ``_per_image``)."""
OBJECT_DIAMETER = 2.0
"""The depth-change scale in generator units (sphere of radius 1; the box's faces are as far apart)."""


@dataclass(frozen=True)
class BenchScene:
    """One benchmark scene: the source object, the edit, and the prompts of the exact prior's two sets."""

    source: SceneSpec
    """The object the base is trained on (unshaded, on black)."""
    change: dict[str, str]
    """The edit: ``with_attributes(source, **change)`` is the ideal edit (only the body colour changes)."""
    prompts: tuple[str, str]
    """(source prompt, target prompt)."""
    instruction: str
    """The edit as an instruction (the exact InstructPix2Pix's target prompt)."""
    patterns: tuple[dict[str, Any], ...]
    """The objects of each prompt's set, as changes to ``source`` (the first must be ``{}``, the source's
    own pattern); the target set adds ``change`` to each."""

    @property
    def palette(self) -> list[str]:
        """Colours on the objects of the two sets: the classes of the accuracy metrics."""
        seconds = {p.get("secondary", self.source.secondary) for p in self.patterns}
        return sorted({self.source.colour, self.change["colour"], *seconds})


SCENES = {
    "ball": BenchScene(
        SceneSpec(colour="red", pattern="stripes", stripes=3, secondary="white", background="black", shading="albedo"),
        {"colour": "blue"},
        ("a red ball", "a blue ball"),
        "make the ball blue",
        tuple(PATTERN_VARIANTS),
    ),
    # Not tuned on: another shape, pattern and edit, with its own seven patterns.
    "box": BenchScene(
        SceneSpec(shape="box", colour="green", pattern="checker", checks=2, secondary="yellow", background="black", shading="albedo"),
        {"colour": "purple"},
        ("a green box", "a purple box"),
        "make the box purple",
        ({}, {"checks": 3}, {"checks": 4}, {"pattern": "stripes", "stripes": 2}, {"pattern": "stripes", "stripes": 4},
         {"pattern": "none"}, {"secondary": "white"}),
    ),
    # Added to test PDS's weighting, never tuned on: an orange ball with a cyan checker, to green. The
    # checks' colour lies farther from orange than green does (grey did not: a target image with more grey
    # was nearer to the source than the ideal edit, which the identity check caught).
    "orb": BenchScene(
        SceneSpec(colour="orange", pattern="checker", checks=3, secondary="cyan", background="black", shading="albedo"),
        {"colour": "green"},
        ("an orange ball", "a green ball"),
        "make the ball green",
        ({}, {"checks": 2}, {"checks": 4}, {"pattern": "stripes", "stripes": 3}, {"pattern": "stripes", "stripes": 5},
         {"pattern": "none"}, {"secondary": "white"}),
    ),
    # Added untouched, to check PDS's candidate weighting (uniform): a pink box with blue stripes, to yellow.
    "crate": BenchScene(
        SceneSpec(shape="box", colour="pink", pattern="stripes", stripes=3, secondary="blue", background="black", shading="albedo"),
        {"colour": "yellow"},
        ("a pink box", "a yellow box"),
        "make the box yellow",
        ({}, {"stripes": 2}, {"stripes": 5}, {"pattern": "checker", "checks": 2}, {"pattern": "checker", "checks": 3},
         {"pattern": "none"}, {"secondary": "white"}),
    ),
    # Added untouched when the crate's bases would not settle (3000 steps: seed 0 29.3 dB to the source,
    # seed 1 11.9 dB, empty): a sphere, which settles here, with another stripe count, colours and edit.
    # The edit was first to cyan; the identity check failed (12/16 views), so it became pink before any run.
    "bead": BenchScene(
        SceneSpec(colour="yellow", pattern="stripes", stripes=4, secondary="purple", background="black", shading="albedo"),
        {"colour": "pink"},
        ("a yellow ball", "a pink ball"),
        "make the ball pink",
        ({}, {"stripes": 3}, {"stripes": 6}, {"pattern": "checker", "checks": 2}, {"pattern": "checker", "checks": 3},
         {"pattern": "none"}, {"secondary": "white"}),
    ),
}  # fmt: skip
"""Benchmark scenes by name (``--scene``)."""
KEEP = "leave it as it is"
"""The exact InstructPix2Pix's second instruction, whose pairs are identity edits: with it, the empty
instruction on a view (the source branch of DDS/PDS) means "this view, edited or not", as a real
InstructPix2Pix trained on both kinds of pair would."""


@dataclass
class Settings:
    """Everything that defines one run; the edit settings are shared by all methods."""

    steps: int = 200
    """Edit steps of every method (``--max-num-iterations`` after ``--load-dir``)."""
    base_steps: int | None = None
    """Steps of the base ``ns-train nerfacto`` (or ``splatfacto``); None: 1000 for nerfacto, where the bases
    have mostly settled (37-43 dB to the source on the ball, 25-37 dB on the box; 300 steps left them
    unsettled and broke some, which an edit then moved or repaired), 300 for splatfacto (see the README:
    longer splat bases densify past what the CPU rasteriser can edit in time)."""
    views: int = 16
    """Ring cameras (nerfstudio-data holds out about every 10th as eval)."""
    resolution: int = 48
    """Image width and height in pixels (the exact prior takes renders at this size)."""
    radius: float = 4.0
    """Camera distance (object radius 1): with fov 40° the ball spans about 70 % of the image."""
    fov: float = 40.0
    """Vertical field of view in degrees."""
    cfg: float | None = None
    """Classifier-free guidance scale of every method; None: the methods' default (the prior's own: 1 for
    the exact prior, whose conditional score is exact)."""
    lr: float | None = None
    """Learning rate of the field's Adam during the edit (``--optimizers.fields.optimizer.lr``); None: the
    methods' default (3e-3)."""
    opacity_tolerance: str | None = None
    """``--pipeline.opacity-tolerance`` of every edit: a number, or "None" (no opacity anchor); None: the
    methods' default (DDS and SDS 0.1, PDS none)."""
    t_min: float = 0.02
    """Lowest t of the edit, as a fraction of T (PDS snaps t to its 500-step grid)."""
    t_max: float = 0.98
    """Highest t of the edit, as a fraction of T."""
    psi_scale: float = 1.0
    """PDS factor on ψ(t) (1 = the paper's coefficients)."""
    pds_rule: str = GuidanceConfig().pds_rule
    """``--pipeline.guidance.pds-rule`` of the PDS edit ("reference" or "balanced"; default: pds-edit's)."""
    appearance: str = "mean"
    """``--pipeline.model.edit-appearance`` of the edits: "mean" (the default: renders use the frozen mean
    appearance embedding, as the viewer) or "per-image" (nerfacto's per-view trainable embeddings)."""
    sigma: float = 0.0
    """Std of the exact prior's Gaussian around each image (0: memorise the sets)."""
    rays_per_batch: int = 1024
    """Rays per step of the base nerfacto."""
    seed: int = 0
    """Seed of the base and of the edits' view/t/noise draws."""
    scene: str = "ball"
    """Which scene of SCENES: "ball" (a red ball with 3 white stripes, edited to blue; the settings above
    were chosen on it), "box" (a green box with yellow checks, edited to purple; not tuned on), "orb" (an
    orange ball with a cyan checker, edited to green; never tuned on), "crate" (a pink box with blue
    stripes, edited to yellow; never tuned on; its bases do not settle) or "bead" (a yellow ball with 4
    purple stripes, edited to pink; never tuned on)."""
    threads: int = 1
    """torch threads of every ns-train and of the evaluation. On a busy 2-core machine one thread ran a
    nerfacto step 4-6x faster than two (two threads mostly wait for each other)."""
    methods: tuple[str, ...] = METHODS
    """Which edits to run."""
    representation: str = "nerfacto"
    """The scene model of the base and the edits: "nerfacto" (``*-edit``) or "splatfacto" (Gaussian splats,
    ``*-splatfacto``; no in2n row)."""
    gaussians: int = 2000
    """Random Gaussians the splatfacto base starts from (representation splatfacto)."""

    def __post_init__(self) -> None:
        if self.base_steps is None:
            self.base_steps = 300 if self.representation == "splatfacto" else 1000


# Small nerfacto for CPU; identical in the base and every edit (the edit checks the checkpoint matches).
FIELD_FLAGS = [
    "--pipeline.model.implementation", "torch",
    "--pipeline.model.hidden-dim", "32",
    "--pipeline.model.hidden-dim-color", "32",
    "--pipeline.model.num-levels", "8",
    "--pipeline.model.log2-hashmap-size", "14",
    "--pipeline.model.num-proposal-samples-per-ray", "32", "16",
    "--pipeline.model.num-nerf-samples-per-ray", "16",
    "--pipeline.model.background-color", "black",  # the scene's background
    "--pipeline.model.camera-optimizer.mode", "off",  # exact synthetic poses
]  # fmt: skip
NO_EVAL = ["--steps-per-eval-batch", "1000000", "--steps-per-eval-image", "1000000"]
NO_EVAL += ["--steps-per-eval-all-images", "1000000"]


# ------------------------------------------------------------------------------------- data
def make_data(s: Settings, work: Path) -> tuple[Path, Path, Path]:
    """Write the scene, the exact prior's two labelled sets and the exact InstructPix2Pix's pairs (for each
    pattern, its source-coloured object "before" and, under the instruction, the edited one "after"; under
    :data:`KEEP`, the object unchanged); returns their folders."""
    camera = CameraSpec(
        num_views=s.views, width=s.resolution, height=s.resolution, radius=s.radius, fov=s.fov
    )
    bench = SCENES[s.scene]
    scene = generate_scene(work / "scene", bench.source, camera, overwrite=True)
    prompts = {
        bench.prompts[0]: list(bench.patterns),
        bench.prompts[1]: [{**p, **bench.change} for p in bench.patterns],
    }
    prior = write_exact_prior_set(scene, work / "prior", prompts, sigma=s.sigma, overwrite=True)
    before = list(bench.patterns)
    instruct = write_exact_prior_set(
        scene,
        work / "prior_instruct",
        {bench.instruction: prompts[bench.prompts[1]], KEEP: before},
        sigma=s.sigma,
        overwrite=True,
        conditions={bench.instruction: before, KEEP: before},
    )
    return scene, prior, instruct


def _load_png(path: Path) -> Float[np.ndarray, " D"]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64).ravel() / 255.0


def identity_check(scene: Path, prior: Path, target_prompt: str) -> dict[str, Any]:
    """Per view, is the target-set image nearest (L2) to the source image the ideal edit of that view?

    Compares the PNGs the prior actually loads. Target images pixel-identical to the ideal view count as
    the ideal (rotational symmetry). Returns ``ideal_is_nearest`` (views where it holds / all) and
    ``margin`` = min over views of d²(source, nearest other target image) / d²(source, ideal).
    """
    index = json.loads((prior / "exact_prior.json").read_text())["prompts"]
    target = sorted((prior / index[target_prompt]).glob("*.png"))
    images = np.stack([_load_png(p) for p in target])
    names = [p.name for p in target]
    holds, margin = 0, math.inf
    views = sorted((scene / "images").glob("frame_*.png"))
    for f, path in enumerate(views):
        source = _load_png(path)
        d2 = ((images - source) ** 2).sum(1)
        ideal = names.index(f"variant00_frame{f:05d}.png")  # patterns[0] = the source's pattern
        same = np.abs(images - images[ideal]).max(1) < 1e-9
        holds += bool(same[d2.argmin()])
        margin = min(margin, float(d2[~same].min() / d2[ideal]))
    return {"ideal_is_nearest": f"{holds}/{len(views)}", "margin": round(margin, 3)}


# ------------------------------------------------------------------------------------ ns-train
def offline_env(work: Path, threads: int = 1) -> dict[str, str]:
    """Environment of an ns-train that must not reach the network (downloads fail at once)."""
    env = dict(os.environ)
    closed = "http://127.0.0.1:9"
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        http_proxy=closed,
        https_proxy=closed,
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        TORCH_HOME=str(work / "torch_home"),
        PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    )
    return env


def ns_train(
    method: str, args: list[str], work: Path, threads: int = 1, log: Any = print, name: str | None = None
) -> float:
    """Run ``ns-train <method> <args>`` from this venv, logging to ``work/logs/<name or method>.log``;
    returns its wall time; raises with the log tail."""
    cmd = [str(Path(sys.executable).parent / "ns-train"), method, *args]
    log_file = work / "logs" / f"{name or method}.log"
    log_file.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as out:
        env = offline_env(work, threads)
        proc = subprocess.run(cmd, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"ns-train {method} failed ({proc.returncode}); log {log_file}:\n{tail}")
    log(f"ns-train {method} ({name or method}): {seconds:.0f} s")
    return seconds


def model_flags(s: Settings) -> list[str]:
    """The scene model's flags, shared by the base and the edits."""
    if s.representation == "splatfacto":
        return [*SPLATS, "--pipeline.model.num-random", str(s.gaussians)]  # the demo's, as many as asked
    return FIELD_FLAGS


def method_of(s: Settings, row: Row) -> str:
    """The ``ns-train`` method of ``row`` for the settings' representation (pds-edit -> pds-splatfacto)."""
    if s.representation == "splatfacto":
        return row.method.removesuffix("-edit") + "-splatfacto"
    return row.method


def base_method(s: Settings) -> str:
    return "splatfacto" if s.representation == "splatfacto" else "nerfacto"


def common_flags(s: Settings, scene: Path, work: Path, steps: int, timestamp: str) -> list[str]:
    return [
        "--machine.device-type", "cpu", "--vis", "tensorboard", *model_flags(s), *NO_EVAL,
        "--machine.seed", str(s.seed), "--max-num-iterations", str(steps),
        "--output-dir", str(work / "out"), "--timestamp", timestamp,
        "--data", str(scene),
    ]  # fmt: skip


def edit_flags(s: Settings, prior: Path, base_models: Path, row: Row = ROWS["pds"]) -> list[str]:
    """The flags of one row's edit (shared by all rows but for the prompts and the ray batch of in2n-edit);
    for a row with ``instruct``, ``prior`` is the exact InstructPix2Pix, the target prompt the instruction,
    and there is no source prompt."""
    method, instruct = row.method, row.instruct
    bench = SCENES[s.scene]
    prompts = (
        ["--pipeline.target-prompt", bench.instruction]
        if instruct
        else ["--pipeline.target-prompt", bench.prompts[1], "--pipeline.source-prompt", bench.prompts[0]]
    )
    flags = [
        "--load-dir", str(base_models),
        *prompts,
        "--pipeline.prior.kind", "exact",
        "--pipeline.prior.exact.folder", str(prior),
        "--pipeline.prior-resolution", "None",
        "--pipeline.guidance.timesteps.min-fraction", str(s.t_min),
        "--pipeline.guidance.timesteps.max-fraction", str(s.t_max),
        "--pipeline.guidance.psi-scale", str(s.psi_scale),
        "--pipeline.guidance.pds-rule", s.pds_rule,
        "--pipeline.seed", str(s.seed),
        "--steps-per-save", "1000000",  # the trainer still saves the last step
    ]  # fmt: skip
    if s.representation == "nerfacto":
        flags += ["--pipeline.model.edit-appearance", s.appearance]
    else:  # the colours' rate for an edit this short (splatfacto's 2.5e-3 suits ~3000 steps; colour_lr)
        flags += ["--optimizers.features-dc.optimizer.lr", f"{colour_lr(s.steps):.4g}"]
    if method == "in2n-edit":
        # one view's rays per photometric step, what a guidance edit renders per step, so every row costs
        # about the same per step (in2n-edit's default, IN2N's 16384 rays, is 7x that at 48 px)
        flags += ["--pipeline.datamanager.train-num-rays-per-batch", str(s.resolution**2)]
    if s.cfg is not None:
        flags += ["--pipeline.guidance.guidance-scale", str(s.cfg)]
    if s.opacity_tolerance is not None:
        flags += ["--pipeline.opacity-tolerance", s.opacity_tolerance]
    if s.lr is not None:
        group = "means" if s.representation == "splatfacto" else "fields"
        flags += [f"--optimizers.{group}.optimizer.lr", str(s.lr)]
    return flags


def run_dir(work: Path, method: str, timestamp: str) -> Path:
    return work / "out" / "scene" / method / timestamp


# ---------------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def _offline_here(work: Path, threads: int) -> Iterator[None]:
    """This process made offline (as :func:`offline_env`) with ``threads`` torch threads; restored after."""
    import torch

    saved, saved_threads = dict(os.environ), torch.get_num_threads()
    os.environ.update(offline_env(work, threads))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(saved_threads)


def render_run(run: Path, per_image: bool = False) -> dict[str, Any]:
    """Load a finished run with ``eval_setup`` and render every train and eval camera of its dataparser.

    Returns ``frames`` (index into transforms.json, from the image filenames), ``eval`` (held-out mask),
    ``rgb`` N x H x W x 3, ``depth`` N x H x W (nerfacto's depth in generator units; a Gaussian-splat run's
    expected z-depth turned into distance along the ray, the same) and ``scale``.
    Renders use what the viewer shows (nerfacto in eval mode: the mean appearance embedding).
    ``per_image``: train views render with their own appearance embedding instead (what a guidance render
    saw during an edit with ``--pipeline.model.edit-appearance per-image``); held-out views have none and
    keep the mean.
    """
    import torch
    from nerfstudio.models.splatfacto import SplatfactoModel

    from nerfstudio_distill.scripts.pictures import load_run

    pipeline = load_run(run / "config.yml", test_mode="test")
    splats = isinstance(pipeline.model, SplatfactoModel)
    view = _splat_view if splats else _nerfacto_view
    dm = pipeline.datamanager
    scale = float(dm.train_dataparser_outputs.dataparser_scale)
    frames, held_out, rgb, depth = [], [], [], []
    for dataset, is_eval in ((dm.train_dataset, False), (dm.eval_dataset, True)):
        cameras = dataset.cameras.to(pipeline.device)
        own = per_image and not is_eval
        if not splats:
            # camera index i of the train set = its appearance embedding; the field uses the embedding of
            # the ray's camera only in training mode (nerfacto_field), the rest of the model stays in eval
            pipeline.model.field.train(own)
        for i, filename in enumerate(dataset._dataparser_outputs.image_filenames):
            frames.append(int(Path(filename).stem.split("_")[-1]))  # images/frame_00012.png -> 12
            held_out.append(is_eval)
            with torch.no_grad():
                image, distance = view(pipeline, cameras, i, own)
            rgb.append(image.clamp(0, 1).cpu().numpy())
            depth.append(distance.cpu().numpy() / scale)
    return {
        "frames": np.array(frames),
        "eval": np.array(held_out),
        "rgb": np.stack(rgb),
        "depth": np.stack(depth),
        "scale": scale,
    }


def _nerfacto_view(pipeline: Any, cameras: Any, i: int, own: bool) -> tuple[Any, Any]:
    """Camera ``i``'s render and depth (distance along the ray); ``own``: with its appearance embedding."""
    if own:
        bundle = cameras.generate_rays(camera_indices=i, keep_shape=True)
    else:
        bundle = cameras[i : i + 1].generate_rays(camera_indices=0, keep_shape=True)
    out = pipeline.model.get_outputs_for_camera_ray_bundle(bundle)
    return out["rgb"], out["depth"][..., 0]


def _splat_view(pipeline: Any, cameras: Any, i: int, own: bool) -> tuple[Any, Any]:
    """Camera ``i``'s render of a Gaussian-splat run, as the viewer shows it (``own`` is moot: splats have no
    appearance embedding), and its expected z-depth turned into distance along the ray."""
    import torch

    camera = cameras[i : i + 1]
    out = pipeline.model.get_outputs_for_camera(camera)
    # z-depth -> distance along the ray: times |(x, y, 1)| in normalised image coordinates
    h, w = out["rgb"].shape[:2]
    x = (torch.arange(w) + 0.5 - float(camera.cx)) / float(camera.fx)
    y = (torch.arange(h) + 0.5 - float(camera.cy)) / float(camera.fy)
    stretch = torch.sqrt(1 + x[None, :] ** 2 + y[:, None] ** 2)
    return out["rgb"], out["depth"][..., 0].cpu() * stretch


def psnr(a: Float[np.ndarray, "N H W 3"], b: Float[np.ndarray, "N H W 3"]) -> float:
    """Mean over images of the per-image PSNR in dB (images in [0, 1])."""
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10))))


def classify(rgb: Float[np.ndarray, "*p 3"], names: list[str]) -> np.ndarray:
    """Index into ``names`` of the nearest (RGB L2) of those colours (the scene is unshaded)."""
    palette = np.array([COLOURS[c] for c in names])
    return ((rgb[..., None, :] - palette) ** 2).sum(-1).argmin(-1)


def score(
    run: dict[str, Any], truth: dict[str, np.ndarray], base: dict[str, Any] | None, bench: BenchScene
) -> dict[str, float]:
    """Metrics of one rendered run against the ideal edit (see the module docstring)."""
    ideal, mask = truth["ideal_rgb"], truth["mask"]
    body: Bool[np.ndarray, "N H W"] = truth["ideal_label"] == LABEL_PRIMARY
    stripes: Bool[np.ndarray, "N H W"] = truth["ideal_label"] == LABEL_SECONDARY
    names = bench.palette
    labels = classify(run["rgb"], names)
    ideal_labels = classify(truth["ideal_albedo"], names)
    blue = names.index(bench.change["colour"])  # the target colour
    # how far the body moved from the source colour to the target colour (0: unchanged, 1: the ideal)
    start, end = np.array(COLOURS[bench.source.colour]), np.array(COLOURS[bench.change["colour"]])
    progress = (run["rgb"][body] - start) @ (end - start) / ((end - start) ** 2).sum()
    result = {
        "psnr_to_ideal": psnr(run["rgb"], ideal),
        "psnr_to_ideal_eval": psnr(run["rgb"][run["eval"]], ideal[run["eval"]]),
        "target_accuracy": float((labels[body] == blue).mean()),
        "pattern_accuracy": float((labels[mask] == ideal_labels[mask]).mean()),
        "stripe_accuracy": float((labels[stripes] == names.index(bench.source.secondary)).mean()),
        "colour_progress": float(progress.mean()),
    }
    if base is not None:
        change = np.minimum(np.abs(run["depth"] - base["depth"]) / OBJECT_DIAMETER, 1.0)  # a hole counts 1
        result["depth_change"] = float(change[mask].mean())
        result["depth_error"] = depth_error(run, truth)
    return result


def depth_error(run: dict[str, Any], truth: dict[str, np.ndarray]) -> float:
    """Mean over the source's object pixels of |depth − true depth| / object diameter, each pixel capped at
    1: how far a run's geometry is from the generator's (the base's, or an edit's: an edit may move its
    base's depth towards the truth or away from it)."""
    error = np.minimum(np.abs(run["depth"] - truth["ray_depth"]) / OBJECT_DIAMETER, 1.0)
    return float(error[truth["source_mask"]].mean())


def ground_truth(scene: Path, frames: np.ndarray, change: dict[str, str]) -> dict[str, np.ndarray]:
    """Source and ideal-edit renders of the given frames of transforms.json."""
    spec, cameras = load_scene(scene)
    cams: SceneCameras = cameras[frames]
    source, ideal = render(spec, cams), render(with_attributes(spec, **change), cams)
    # z-depth -> distance along the ray (nerfacto's depth): times |(x, y, -1)| in normalised image coords
    x = (np.arange(cams.width) + 0.5 - cams.cx) / cams.fx
    y = (np.arange(cams.height) + 0.5 - cams.cy) / cams.fy
    stretch = np.sqrt(1 + x[None, :] ** 2 + y[:, None] ** 2)
    return {
        "source_rgb": source["rgb"],
        "source_mask": source["mask"],
        "ray_depth": source["depth"] * stretch,
        "ideal_rgb": ideal["rgb"],
        "ideal_albedo": ideal["albedo"],
        "ideal_label": ideal["label"],
        "mask": ideal["mask"],
    }


# --------------------------------------------------------------------------------------- run
BASE_FIELDS = (
    "representation",
    "gaussians",
    "scene",
    "seed",
    "base_steps",
    "views",
    "resolution",
    "radius",
    "fov",
    "rays_per_batch",
    "sigma",
)
"""Settings that decide the base (``--reuse-base`` reuses a base only when all of them match)."""


def run(
    s: Settings, workdir: Path | None = None, keep: bool = False, log: Any = print, reuse_base: bool = False
) -> dict[str, Any]:
    """Scene, prior, base nerfacto, the edits and their scores; returns the result dict.

    ``workdir``: where to write (default: a temporary folder, deleted afterwards unless ``keep``).
    ``reuse_base``: if ``workdir`` holds a finished base of the same :data:`BASE_FIELDS`, skip training it
    (the base is bitwise reproducible, so only time is saved) and rerun only the edits.
    """
    unknown = set(s.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}: use any of {', '.join(METHODS)}")
    if s.representation not in ("nerfacto", "splatfacto"):
        raise ValueError(f"representation {s.representation!r}: use nerfacto or splatfacto")
    if s.representation == "splatfacto":
        if "in2n" in s.methods:
            raise ValueError("in2n has no Gaussian-splat method: leave it out of --methods")
        if s.appearance != "mean":
            raise ValueError("--appearance is nerfacto's appearance embedding: splats have none")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edit_quality_")
        workdir = Path(tmp.name)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        scene, prior, instruct = make_data(s, work)
        bench = SCENES[s.scene]
        check = identity_check(scene, prior, bench.prompts[1])
        log(
            f"identity check: ideal edit nearest in {check['ideal_is_nearest']} views, margin {check['margin']}"
        )

        base_run = run_dir(work, base_method(s), "base")
        base_key = {name: getattr(s, name) for name in BASE_FIELDS}
        marker = work / "base.json"
        kept = json.loads(marker.read_text()) if reuse_base and marker.exists() else {}
        if kept.get("settings") == base_key:
            base_seconds = kept["seconds"]
            log(f"reusing the base in {base_run}")
        else:
            shutil.rmtree(work / "out", ignore_errors=True)
            base_flags = (
                SPLAT_BASE
                if s.representation == "splatfacto"
                else ["--pipeline.datamanager.train-num-rays-per-batch", str(s.rays_per_batch)]
            )
            base_seconds = ns_train(
                base_method(s), [*common_flags(s, scene, work, s.base_steps, "base"), *base_flags],
                work, s.threads, log,
            )  # fmt: skip
            marker.write_text(json.dumps({"settings": base_key, "seconds": base_seconds}))
        seconds = {}
        for name in s.methods:
            row = ROWS[name]
            method = method_of(s, row)
            shutil.rmtree(run_dir(work, method, name), ignore_errors=True)  # a reused workdir
            flags = common_flags(s, scene, work, s.steps, name) + edit_flags(
                s, instruct if row.instruct else prior, base_run / "nerfstudio_models", row
            )
            seconds[name] = ns_train(method, flags, work, s.threads, log, name)

        with _offline_here(work, s.threads):
            base = render_run(base_run)
            edits = {m: render_run(run_dir(work, method_of(s, ROWS[m]), m)) for m in s.methods}
        truth = ground_truth(scene, base["frames"], bench.change)
        result: dict[str, Any] = {}
        for method, edited in edits.items():
            assert (edited["frames"] == base["frames"]).all()
            result[method] = {
                **score(edited, truth, base, bench),
                "seconds": seconds[method],
                "s_per_step": seconds[method] / s.steps,
            }
        if s.appearance == "per-image":  # what the guidance saw: each train view with its own embedding
            with _offline_here(work, s.threads):
                seen = {
                    m: render_run(run_dir(work, method_of(s, ROWS[m]), m), per_image=True) for m in s.methods
                }
            for method, edited in seen.items():
                scores = score(edited, truth, base, bench)
                result[method] |= {f"{key}_per_image": scores[key] for key in PER_IMAGE_KEYS}
        result["base"] = {
            "psnr_to_source": psnr(base["rgb"], truth["source_rgb"]),
            "depth_error": depth_error(base, truth),
            **score(base, truth, None, bench),
            "seconds": base_seconds,
        }
        result["identity_check"] = check
        result["settings"] = {**asdict(s), "eval_frames": base["frames"][base["eval"]].tolist()}
        if keep:
            result["workdir"] = str(work)
        return _rounded(result)
    finally:
        if tmp is not None and not keep:
            tmp.cleanup()


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    return value


def over_seeds(
    s: Settings,
    seeds: list[int],
    jobs: int,
    log: Any = print,
    workdir: Path | None = None,
    reuse_base: bool = False,
) -> dict[str, Any]:
    """:func:`run` once per seed (``jobs`` at a time, each in its own folder: ``workdir/seed<N>`` if given,
    else a temporary one); the mean and the spread (population std) of every score, and each seed's
    result. Same seed, same numbers: CPU runs are bitwise reproducible (the compat layer seeds
    nerfstudio's ray workers)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> dict[str, Any]:
        result = run(
            dataclasses.replace(s, seed=seed),
            None if workdir is None else workdir / f"seed{seed}",
            log=lambda m: log(f"[seed {seed}] {m}"),
            reuse_base=reuse_base,
        )
        log(f"[seed {seed}] done")
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, seeds))
    names = [name for name in ("base", *METHODS) if name in results[0]]
    summary: dict[str, Any] = {"seeds": seeds, "per_seed": results, **mean_and_spread(results, names)}
    summary["identity_check"] = results[0]["identity_check"]
    return summary


def _cell(r: dict[str, Any], key: str, digits: int, scale: float = 1.0, unit: str = "") -> str:
    """``r[key]`` formatted, with `` ± spread`` when ``r`` is a mean over seeds."""
    text = f"{scale * r[key]:.{digits}f}{unit}"
    return text + (f" ± {scale * r['std'][key]:.{digits}f}{unit}" if "std" in r else "")


def table(result: dict[str, Any]) -> str:
    """Markdown table of the result (of one seed, or mean ± spread over seeds)."""
    rows = [
        "| run | PSNR to ideal (dB) | held-out | target acc. | colour progress | stripes kept "
        "| depth change | depth error | time (s) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("base", *METHODS):
        if name not in result:
            continue
        r = result[name]
        depth = _cell(r, "depth_change", 1, 100, " %") if "depth_change" in r else "—"
        per_step = f"{r['s_per_step']:.2f}" if "s_per_step" in r else "—"  # the base: none
        rows.append(
            f"| {'base (no edit)' if name == 'base' else name.upper()} | {_cell(r, 'psnr_to_ideal', 2)} | "
            f"{_cell(r, 'psnr_to_ideal_eval', 2)} | {_cell(r, 'target_accuracy', 3)} | "
            f"{_cell(r, 'colour_progress', 2)} | {_cell(r, 'stripe_accuracy', 3)} | {depth} | "
            f"{_cell(r, 'depth_error', 1, 100, ' %')} | {r['seconds']:.0f} | "
            f"{per_step} |"
        )
    seen = [name for name in METHODS if "psnr_to_ideal_per_image" in result.get(name, {})]
    if seen:  # --appearance per-image: the same edits rendered as the guidance saw them
        rows += ["", "| run, per-image renders (as the guidance saw them) | PSNR to ideal (dB) | target acc. "
                 "| colour progress |", "|---|---|---|---|"]  # fmt: skip
        for name in seen:
            r = result[name]
            rows.append(
                f"| {name.upper()} | {_cell(r, 'psnr_to_ideal_per_image', 2)} | "
                f"{_cell(r, 'target_accuracy_per_image', 3)} | {_cell(r, 'colour_progress_per_image', 2)} |"
            )
    base = result["base"]
    seeds = f"mean ± std over seeds {result['seeds']}; " if "seeds" in result else ""
    settings = result["per_seed"][0]["settings"] if "per_seed" in result else result["settings"]
    rows.append(
        f"{settings['representation']}; {seeds}base: PSNR to the source {base['psnr_to_source']:.2f} dB, depth error "
        f"{100 * base['depth_error']:.1f} % of the object size; identity check {result['identity_check']}"
    )
    return "\n".join(rows)


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "methods":
            parser.add_argument(flag, nargs="+", choices=METHODS, default=list(METHODS))
        elif f.name == "scene":
            parser.add_argument(flag, choices=list(SCENES), default=defaults.scene)
        elif f.name == "opacity_tolerance":  # a number or "None"
            parser.add_argument(flag, default=None, help='a number or "None"; default: the methods\' own')
        elif f.name == "base_steps":
            parser.add_argument(
                flag, type=int, default=None, help="default: 1000 (nerfacto), 300 (splatfacto)"
            )
        elif getattr(defaults, f.name) is None:  # cfg, lr: None leaves the method's default
            parser.add_argument(flag, type=float, default=None, help="default: the methods' own")
        else:
            parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (scene, prior, runs)")
    parser.add_argument(
        "--reuse-base",
        action="store_true",
        help="with --workdir: skip the base nerfacto if the folder holds one of the same settings (try edit "
        "settings without retraining it; with --seeds each seed keeps its own workdir/seed<N>)",
    )
    parser.add_argument("--json", action="store_true", help="last line: the result as one JSON object")
    add_seeds_argument(parser)
    parser.add_argument(
        "--jobs", type=int, default=1, help="with --seeds: seeds run at once (one thread each)"
    )
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(Settings)}
    values["methods"] = tuple(values["methods"])
    return Settings(**values), args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s, args = parse(argv)
    start = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.seeds:
        result = over_seeds(s, args.seeds, args.jobs, log, args.workdir, args.reuse_base)
    else:
        result = run(s, args.workdir, args.keep, log=log, reuse_base=args.reuse_base)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result) if args.json else f"{table(result)}\n{result['seconds']} s in all")
    return result


if __name__ == "__main__":
    main()
