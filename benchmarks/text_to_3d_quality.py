"""Text-to-3D scored end to end on CPU: sds-nerfacto, sdi-nerfacto (and vsd-nerfacto) with a prior of one object.

The "diffusion model" is the exact prior (:class:`~nerfstudio_distill.priors.exact.ExactPrior`) of
``ns-distill-scene`` renders of one object: ``num_prior_views`` cameras on the hemisphere layout
(Fibonacci directions, elevation asin(0.1) .. asin(0.95) = 5.7 .. 71.8 degrees), at the radius, field of
view and resolution that the random-camera DataManager is set to, so every render has the size of the
prior's images and its cameras come from the same distribution. Each image is labelled with the
view-dependent prompt of its camera ("<prompt>, front view", side, back, overhead), exactly as the
pipeline labels its renders.

``--prior view-prompt`` (the default) is that prior. ``--prior camera`` is the same image set with each
image's camera stored (``cameras.json``), so the exact prior is also conditioned on each rendered view's
camera: an image counts by exp(−d²/2κ²), d the angle between its camera's and the view's viewing
directions. κ (``--camera-sigma``, degrees) defaults to the set's camera spacing, the median angle from
a prior camera to its nearest neighbour (6.3° for the 400 default views), a choice made from the set
alone, not by the held-out scores. ``--camera-sigma 0.63`` (a tenth of it) is the nearest-camera limit;
the README gives both runs.

``--prior sd`` replaces the exact prior by a network that has learned the same view-prompt set: the small
Stable Diffusion of ``benchmarks/stand_in_sd.py`` (trained first and kept in ``--workdir``, or given by
``--sd-model``), loaded by the Stable Diffusion prior as any diffusers folder. It is what VSD needs, a
"pretrained" UNet for its LoRA to adapt, so ``--methods vsd`` (vsd-nerfacto; its LoRA at its own AdamW lr
1e-4, the field at the benchmark's) runs only with it.

Both methods train from the same initialisation with the same budget (steps, views per step, seed,
CFG, t schedule). Scores, on ``num_test_views`` held-out cameras (the hemisphere layout with another
seed) against the generator's ground truth:
- ``psnr``: of the render (the model's own white background) vs the exact render;
- ``mask_iou``: IoU of accumulation > 0.5 vs the object mask;
- ``depth_error``: mean |z-depth - true z-depth| on the object pixels (scene units; object radius 1);
- ``seconds``: wall time of training.

Run ``python benchmarks/text_to_3d_quality.py`` (table) or ``--json`` (last line is one JSON object).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also when run as a script
from seeds import add_seeds_argument, mean_and_spread  # noqa: E402

from nerfstudio_distill.data.prior_sets import scene_camera_conditions
from nerfstudio_distill.data.scene import (
    CameraSpec,
    SceneCameras,
    SceneSpec,
    generate_scene,
    load_scene,
    make_cameras,
    render,
    to_uint8,
    with_attributes,
)
from nerfstudio_distill.pipelines.text_to_3d import view_name, view_prompt
from nerfstudio_distill.priors.config import EXACT_PRIOR_FILE
from nerfstudio_distill.priors.exact import CAMERA_FILE

HEMISPHERE_ELEVATION = (math.degrees(math.asin(0.1)), math.degrees(math.asin(0.95)))
"""Elevation band of ns-distill-scene's hemisphere layout (z in [0.1, 0.95] of the unit sphere)."""
METHODS = ("sds", "sdi", "vsd")
"""Methods the benchmark can train (``--methods``; vsd needs ``--prior sd``, a network for its LoRA)."""
PRIORS = ("view-prompt", "camera", "sd")
"""--prior: the exact prior with view prompts only (the default), or with view prompts and each view's
camera; or "sd", a small Stable Diffusion trained on the view-prompt set (benchmarks/stand_in_sd.py)."""


@dataclass
class Settings:
    """Everything that defines one benchmark run (shared by both methods)."""

    prompt: str = "a red striped ball"
    """Base prompt of the object (view suffixes are added)."""
    shape: str = "sphere"
    """Object shape (ns-distill-scene)."""
    colour: str = "red"
    """Object colour."""
    pattern: str = "stripes"
    """Object pattern."""
    resolution: int = 32
    """Render and prior image size (square)."""
    radius: float = 4.0
    """Camera distance (fixed, as the prior's cameras)."""
    fov: float = 40.0
    """Vertical field of view in degrees (fixed)."""
    num_prior_views: int = 400
    """Images of the exact prior (hemisphere layout, seed 0)."""
    num_test_views: int = 16
    """Held-out cameras (hemisphere layout, another seed)."""
    steps: int = 600
    """Training steps of each method."""
    num_views: int = 2
    """Views per step."""
    cfg: float = 1.0
    """Classifier-free guidance scale."""
    t_max: float = 0.5
    """Highest t at step 0 (fraction of T)."""
    t_final: float = 0.05
    """Highest t at the end (linear annealing)."""
    t_min: float = 0.02
    """Lowest t."""
    lr: float = 1e-2
    """Adam learning rate of the fields (decays to a tenth)."""
    blob_taper: float = 0.75
    """Fraction of the steps over which the initial density blob fades out."""
    weighting: str = "sds"
    """w(t) of both methods: sds (1 - alpha_bar), uniform or fantasia."""
    sigma: float = 0.0
    """Std of the exact prior's Gaussian around each image (0: it memorises them exactly)."""
    inversion_steps: int = 5
    """SDI: DDIM inversion steps."""
    inversion_cfg: float = 1.0
    """SDI: CFG scale of the inversion."""
    seed: int = 0
    """Seed of the run."""
    prior: str = "view-prompt"
    """view-prompt: the images labelled by view prompt only; camera: also conditioned on each view's camera."""
    camera_sigma: float | None = None
    """--prior camera: angular bandwidth κ in degrees (None: the prior set's camera spacing)."""
    lora_lr: float | None = None
    """VSD: the AdamW learning rate of its LoRA (None: vsd-nerfacto's, 1e-4)."""
    sd_model: str | None = None
    """--prior sd: the Stable Diffusion folder (None: train the stand-in on the view-prompt set, in the
    work folder, with benchmarks/stand_in_sd.py's defaults)."""


def camera_angles(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elevation and azimuth (degrees) of cameras ``N x 4 x 4`` around the origin."""
    p = c2w[:, :3, 3]
    elevation = np.degrees(np.arcsin(p[:, 2] / np.linalg.norm(p, axis=1)))
    return elevation, np.degrees(np.arctan2(p[:, 1], p[:, 0]))


def write_view_prior_set(
    folder: Path,
    spec: SceneSpec,
    camera_spec: CameraSpec,
    prompts: Mapping[str, Mapping[str, Any]],
    sigma: float = 0.0,
    cameras: bool = False,
    camera_sigma: float | None = None,
) -> Path:
    """Write ``folder/scene`` with ``ns-distill-scene`` and the exact-prior image set ``folder/prior``.

    ``prompts`` maps each base prompt to attribute changes of the object (``{}``: the object itself).
    Every variant is rendered from every camera of the scene and each image is labelled with the
    view-dependent prompt of its camera, e.g. "a red striped ball, side view". ``cameras``: also store each
    image's camera (``cameras.json``; the exact prior is then camera-conditioned, with κ ``camera_sigma``
    in degrees, None: the set's camera spacing).
    """
    with_cameras = cameras
    scene = generate_scene(folder / "scene", spec, camera_spec, overwrite=True)
    _, cameras = load_scene(scene)
    elevation, azimuth = camera_angles(cameras.c2w)
    encoded = scene_camera_conditions(cameras)
    prior = folder / "prior"
    shutil.rmtree(prior, ignore_errors=True)
    index: dict[str, str] = {}
    camera_of: dict[str, list[float]] = {}
    for base, changes in prompts.items():
        images = render(with_attributes(spec, **changes), cameras)["rgb"]
        for i, (e, a) in enumerate(zip(elevation, azimuth, strict=True)):
            label = view_prompt(base, view_name(float(e), float(a)))
            sub = prior / index.setdefault(label, f"set_{len(index):02d}")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(images[i])).save(sub / f"frame_{i:05d}.png")
            camera_of[f"{sub.name}/frame_{i:05d}.png"] = encoded[i]
    meta: dict[str, Any] = {"prompts": index, "sigma": sigma}
    if with_cameras:
        (prior / CAMERA_FILE).write_text(json.dumps(camera_of))
        meta["cameras"] = CAMERA_FILE
        if camera_sigma is not None:
            meta["camera_sigma"] = camera_sigma
    (prior / EXACT_PRIOR_FILE).write_text(json.dumps(meta, indent=2))
    return prior


def pipeline_config(s: Settings, method: str, prior_folder: Path, tiny: bool = True):
    """The sds-nerfacto / sdi-nerfacto / vsd-nerfacto pipeline config, set for the prior of ``prior_folder``
    (an exact-prior set, or with ``--prior sd`` a Stable Diffusion folder)."""
    from method_configs.sdi_nerfacto import sdi_nerfacto
    from method_configs.sds_nerfacto import sds_nerfacto
    from method_configs.vsd_nerfacto import vsd_nerfacto

    trainer = {"sds": sds_nerfacto, "sdi": sdi_nerfacto, "vsd": vsd_nerfacto}[method].config
    pipe = trainer.pipeline
    dm = replace(
        pipe.datamanager,
        radius=(s.radius, s.radius),
        fov=(s.fov, s.fov),
        elevation=HEMISPHERE_ELEVATION,
        azimuth=(-180.0, 180.0),
        azimuth_warmup=0,
        resolutions=(s.resolution,),
        resolution_milestones=(),
        num_views=s.num_views,
        scene_bound=1.25,
        num_eval_views=8,
    )
    model = replace(
        pipe.model,
        implementation="torch",
        background="white",
        random_background_prob=0.0,
        lambertian_prob=0.0,
        textureless_prob=0.0,
        predict_normals=False,
        blob_radius=1.0,
        blob_taper=(0, int(s.steps * s.blob_taper)),
        opacity_loss_mult=0.0,
        **(
            dict(
                hidden_dim=32,
                hidden_dim_color=32,
                num_levels=8,
                max_res=128,
                log2_hashmap_size=14,
                num_nerf_samples_per_ray=24,
                num_proposal_iterations=1,  # one small proposal grid: the torch hash grid is the CPU cost
                num_proposal_samples_per_ray=(24,),
                proposal_net_args_list=[
                    {
                        "hidden_dim": 16,
                        "log2_hashmap_size": 10,
                        "num_levels": 2,
                        "max_res": 32,
                        "use_linear": False,
                    }
                ],
            )
            if tiny
            else {}
        ),
    )
    from nerfstudio_distill.guidance.common import TimestepSchedule
    from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
    from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPriorConfig

    guidance = replace(
        pipe.guidance,
        guidance_scale=s.cfg,
        timesteps=TimestepSchedule(
            min_fraction=s.t_min, max_fraction=s.t_max, anneal="linear", final_max_fraction=s.t_final
        ),
        weighting=s.weighting,
        num_inversion_steps=s.inversion_steps,
        inversion_guidance_scale=s.inversion_cfg,
    )
    return replace(
        pipe,
        datamanager=dm,
        model=model,
        prompt=s.prompt,
        guidance=guidance,
        prior=(
            PriorConfig(
                kind="stable-diffusion",
                stable_diffusion=StableDiffusionPriorConfig(
                    model=str(prior_folder), dtype="fp32", device="cpu", local_files_only=True
                ),
            )
            if s.prior == "sd"
            else PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior_folder, sigma=s.sigma))
        ),
        prior_resolution=None,
        seed=s.seed,
    ), trainer.optimizers


def train(s: Settings, method: str, prior_folder: Path) -> tuple[object, float]:
    """Train one method in-process (as ns-train does, minus logging); returns the pipeline and seconds."""
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes
    from nerfstudio.engine.optimizers import Optimizers

    config, optimizer_config = pipeline_config(s, method, prior_folder)
    torch.manual_seed(s.seed)
    pipe = config.setup(device="cpu", test_mode="val")
    pipe.start_edit(0, s.steps)
    groups = {name: params for name, params in pipe.get_param_groups().items() if params}
    optimizer_config = {  # the field's groups at the benchmark's lr; VSD's LoRA ("guidance") at its own
        name: {**group, "optimizer": replace(group["optimizer"], lr=s.lora_lr or group["optimizer"].lr)}
        if name == "guidance"
        else {
            "optimizer": replace(group["optimizer"], lr=s.lr),
            "scheduler": replace(group["scheduler"], lr_final=s.lr / 10, max_steps=max(s.steps, 1)),
        }
        for name, group in optimizer_config.items()
        if name in groups
    }
    optimizers = Optimizers(optimizer_config, groups)
    callbacks = pipe.get_training_callbacks(TrainingCallbackAttributes(optimizers, None, pipe, None))
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    pipe.train()
    start = time.perf_counter()
    for step in range(s.steps):
        for cb in callbacks:
            cb.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        optimizers.zero_grad_all()
        _, losses, _ = pipe.get_train_loss_dict(step)
        sum(losses.values()).backward()
        optimizers.optimizer_step_all()
        optimizers.scheduler_step_all(step)
        for cb in callbacks:
            cb.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    return pipe, time.perf_counter() - start


@torch.no_grad()
def score(pipe, spec: SceneSpec, cameras: SceneCameras) -> dict[str, float]:
    """PSNR, mask IoU and object depth error of the pipeline's renders at ``cameras``."""
    truth = render(spec, cameras)
    pipe.eval()
    psnr, iou, depth_err = [], [], []
    ns_cameras = cameras.to_nerfstudio()
    for i in range(len(cameras)):
        out = pipe.model.get_outputs_for_camera(ns_cameras[i : i + 1])
        rays = ns_cameras[i : i + 1].generate_rays(camera_indices=0, keep_shape=True)
        rgb = out["rgb"].clamp(0, 1).numpy()
        mse = float(np.mean((rgb - truth["rgb"][i]) ** 2))
        psnr.append(10 * math.log10(1.0 / max(mse, 1e-10)))
        mask, true_mask = out["accumulation"][..., 0].numpy() > 0.5, truth["mask"][i]
        iou.append(float((mask & true_mask).sum() / max((mask | true_mask).sum(), 1)))
        z = (out["depth"] / rays.metadata["directions_norm"])[..., 0].numpy()  # ray distance -> z-depth
        depth_err.append(float(np.abs(z - truth["depth"][i])[true_mask].mean()))
    pipe.train()
    return {
        "psnr": float(np.mean(psnr)),
        "mask_iou": float(np.mean(iou)),
        "depth_error": float(np.mean(depth_err)),
    }


@torch.no_grad()
def turntable(pipe, cameras: SceneCameras) -> list[np.ndarray]:
    """uint8 RGB renders of the pipeline's model from ``cameras`` (a ring: a turntable)."""
    pipe.eval()
    ns_cameras = cameras.to_nerfstudio()
    frames = [
        (pipe.model.get_outputs_for_camera(ns_cameras[i : i + 1])["rgb"].clamp(0, 1).numpy() * 255 + 0.5)
        for i in range(len(cameras))
    ]
    pipe.train()
    return [f.astype(np.uint8) for f in frames]


def write_pictures(columns: dict[str, list[np.ndarray]], folder: Path, zoom: int = 3) -> dict[str, Path]:
    """``text_to_3d.gif`` (a turntable, the columns side by side) and ``text_to_3d.png`` (six views per
    row, one row per column name, top to bottom)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    n = len(columns[names[0]])

    def big(image: np.ndarray) -> Image.Image:
        pil = Image.fromarray(image)
        return pil.resize((pil.width * zoom, pil.height * zoom), Image.NEAREST)

    frames = [big(np.concatenate([columns[c][i] for c in names], 1)) for i in range(n)]
    paths = {"gif": folder / "text_to_3d.gif", "strip": folder / "text_to_3d.png"}
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=120, loop=0)
    picks = np.linspace(0, n, 6, endpoint=False).astype(int)
    rows = [np.concatenate([columns[c][i] for i in picks], 1) for c in names]
    big(np.concatenate(rows, 0)).save(paths["strip"])
    return paths


def resolve_methods(s: Settings, methods: tuple[str, ...] | None) -> tuple[str, ...]:
    """The methods to train (None: sds and sdi, and vsd with ``--prior sd``); a one-line ValueError for
    a combination that cannot run."""
    if s.prior not in PRIORS:
        raise ValueError(f"--prior {s.prior}: pass one of {', '.join(PRIORS)}")
    methods = methods or (METHODS if s.prior == "sd" else METHODS[:2])
    if "vsd" in methods and s.prior != "sd":
        raise ValueError("--methods vsd trains a LoRA of a network prior: pass --prior sd")
    if s.sd_model is not None and not Path(s.sd_model).is_dir():
        raise ValueError(
            f"--sd-model {s.sd_model} is not a folder: pass a Stable Diffusion folder, or leave it out"
        )
    return methods


def run(
    s: Settings,
    methods: tuple[str, ...] | None = None,
    workdir: Path | None = None,
    pictures: Path | None = None,
) -> dict[str, dict]:
    """Build the prior, train every method, score them; returns ``{method: metrics}`` and, as
    ``"untrained"``, the score of the initial field (the density blob alone), the floor to beat.

    ``methods``: None trains sds and sdi (and vsd with ``--prior sd``). With ``--prior sd`` and no
    ``sd_model``, the stand-in Stable Diffusion is trained on the view-prompt set first (about 16 minutes on
    2 cores) and kept in ``workdir`` (reused by the next run there with the same set).

    ``pictures``: also write a turntable (24 views on a 30-degree ring) of the ground truth and of each
    method there (:func:`write_pictures`).
    """
    spec = SceneSpec(shape=s.shape, colour=s.colour, pattern=s.pattern)
    common = dict(radius=s.radius, fov=s.fov, width=s.resolution, height=s.resolution, layout="hemisphere")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp)
        methods = resolve_methods(s, methods)
        prior = write_view_prior_set(
            folder,
            spec,
            CameraSpec(num_views=s.num_prior_views, seed=0, **common),
            {s.prompt: {}},
            s.sigma,
            cameras=s.prior == "camera",
            camera_sigma=s.camera_sigma,
        )
        if s.prior == "sd":
            from stand_in_sd import train_stand_in

            prior = Path(s.sd_model) if s.sd_model else train_stand_in(prior, folder / "stand_in_sd")
        test = generate_scene(
            folder / "test",
            spec,
            CameraSpec(num_views=s.num_test_views, seed=12345, **common),
            overwrite=True,
        )
        _, test_cameras = load_scene(test)
        ring = make_cameras(CameraSpec(num_views=24, elevation=30.0, **{**common, "layout": "ring"}))
        columns = {"ground truth": [to_uint8(im) for im in render(spec, ring)["rgb"]]}
        untrained, _ = train(replace(s, steps=0), methods[0], prior)  # the initial field: its blob alone
        results = {}
        for method in methods:
            pipe, seconds = train(s, method, prior)
            results[method] = {**score(pipe, spec, test_cameras), "seconds": seconds}
            columns[method] = turntable(pipe, ring)
        results["untrained"] = {**score(untrained, spec, test_cameras), "seconds": 0.0}
        if pictures is not None:
            write_pictures(columns, pictures)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    for name, value in asdict(defaults).items():
        if name == "prior":
            parser.add_argument("--prior", choices=PRIORS, default=value)
            continue
        if name == "sd_model":
            parser.add_argument(
                "--sd-model",
                default=None,
                help="--prior sd: a Stable Diffusion folder (default: train the stand-in)",
            )
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float if value is None else type(value), default=value
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--pictures", type=Path, default=None, help="write text_to_3d.gif and text_to_3d.png here"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="default: sds sdi (and vsd with --prior sd)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the prior set, test scene and stand-in SD here"
    )
    add_seeds_argument(parser)
    args = vars(parser.parse_args())
    as_json, pictures, seeds = args.pop("json"), args.pop("pictures"), args.pop("seeds")
    methods, workdir = args.pop("methods"), args.pop("workdir")
    methods = tuple(methods) if methods else None
    settings = Settings(**args)
    try:
        resolve_methods(settings, methods)
    except ValueError as e:
        parser.error(str(e))  # one line and exit status 2, before anything is written
    if seeds:
        per_seed = [
            run(replace(settings, seed=seed), methods, workdir, pictures if i == 0 else None)
            for i, seed in enumerate(seeds)
        ]
        results = {"seeds": seeds, "per_seed": per_seed, **mean_and_spread(per_seed, list(per_seed[0]))}
        names = list(per_seed[0])
    else:
        results, names = run(settings, methods, workdir, pictures), None
    print(f"{'method':10s} {'PSNR dB':>14s} {'mask IoU':>14s} {'depth err':>14s} {'seconds':>8s}")
    for method in names or list(results):
        r = results[method]
        sd = r.get("std")
        cells = [
            f"{r[k]:.3f}" + (f" ± {sd[k]:.3f}" if sd else "") for k in ("psnr", "mask_iou", "depth_error")
        ]
        print(f"{method:10s} {cells[0]:>14s} {cells[1]:>14s} {cells[2]:>14s} {r['seconds']:8.1f}")
    if seeds:
        print(f"mean ± std over seeds {seeds}")
    if as_json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
