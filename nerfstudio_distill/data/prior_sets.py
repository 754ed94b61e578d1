"""Labelled image sets for the exact prior, rendered from a synthetic scene's own cameras.

``write_exact_prior_set(scene, out, {"a blue striped ball": [{"colour": "blue"}], ...})`` renders,
for every prompt, each listed attribute variant of the scene's object from every camera of
``transforms.json``, and writes ``out/<n>/<variant>_<frame>.png`` plus ``exact_prior.json``, the
format :class:`~nerfstudio_distill.priors.config.ExactPriorConfig` reads.

An image-conditioned set (an exact InstructPix2Pix) also gives, per prompt (then an instruction), the
"before" object of each variant: ``conditions={"turn the ball blue": [{"colour": "red"}], ...}``. Each
image's condition, the "before" seen from the same camera, goes to ``out/<n>/condition/`` under the same
name.

A camera-conditioned set (``cameras=True``, for text to 3D) also stores the camera of every image in
``out/cameras.json`` (:data:`~nerfstudio_distill.priors.exact.CAMERA_FILE`), listed in the index; the exact
prior then weighs each image by how near its camera's viewing direction is to the view's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nerfstudio_distill.data.scene import SceneCameras, SceneSpec, load_scene, render, with_attributes
from nerfstudio_distill.errors import SceneError
from nerfstudio_distill.priors.config import EXACT_PRIOR_FILE
from nerfstudio_distill.priors.exact import CAMERA_FILE

PATTERN_VARIANTS: list[dict[str, Any]] = [
    {},  # the object's own pattern first
    {"stripes": 4},
    {"stripes": 5},
    {"stripes": 6},
    {"pattern": "checker", "checks": 3},
    {"pattern": "none"},
    {"secondary": "yellow"},
]
"""Seven objects that differ from a striped ball only in their pattern. A prompt's set holds all of them
(in its colour), so a lost identity costs PSNR; for an unshaded ball with 3 white stripes the nearest
target image to each source view is the ideal edit (benchmarks/edit_quality.py checks it). No phase
variants: a phase shift of meridian stripes is a rotation of the ball, i.e. the same images from other
views, which a per-view prior cannot tell from the ideal edit."""


def write_exact_prior_set(
    scene_dir: str | Path,
    output_dir: str | Path,
    prompts: Mapping[str, Sequence[Mapping[str, Any]]],
    sigma: float = 0.0,
    overwrite: bool = False,
    scale: float = 1.0,
    conditions: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    condition_sigma: float | None = None,
    cameras: bool = False,
    camera_sigma: float | None = None,
) -> Path:
    """Render each prompt's attribute variants from the scene's cameras; returns ``output_dir``.

    Args:
        scene_dir: a folder written by ``ns-distill-scene``.
        output_dir: where to write; must be missing or empty unless ``overwrite``.
        prompts: prompt -> list of attribute changes (``with_attributes`` keywords); ``{}`` is the
            scene's object as it is.
        sigma: std of the exact prior's Gaussians, stored in the index.
        overwrite: replace an existing non-empty ``output_dir``.
        scale: resolution factor of the renders; match the edit's ``--pipeline.render-scale``.
        conditions: prompt -> the "before" of each of its variants (same length as ``prompts[prompt]``):
            makes the set image-conditioned; every prompt needs its list.
        condition_sigma: τ of the image condition, stored in the index (None: the prior's default).
        cameras: also store each image's camera (``cameras.json``): makes the set camera-conditioned.
        camera_sigma: κ of the camera condition in degrees, stored in the index (None: the set's camera
            spacing).
    """
    with_cameras = cameras
    spec, cameras = load_scene(scene_dir)
    if scale != 1.0:
        cameras = dataclasses.replace(
            cameras,
            **{k: getattr(cameras, k) * scale for k in ("fx", "fy", "cx", "cy")},
            width=int(cameras.width * scale),  # truncation, as nerfstudio rescales cameras
            height=int(cameras.height * scale),
        )
    variants = {p: [with_attributes(spec, **changes) for changes in v] for p, v in prompts.items()}
    if any(p != p.strip() for p in variants):
        raise SceneError(
            "a prompt starts or ends with white space, which the CLIs strip (so it could never be chosen): "
            "remove it from the prompts mapping"
        )
    if any(not p.strip() for p in variants) or any(not v for v in variants.values()):
        raise SceneError(
            "every prompt needs a non-empty text and at least one variant: fix the prompts mapping"
        )
    before = None
    if conditions is not None:
        if set(conditions) != set(variants) or any(len(conditions[p]) != len(v) for p, v in variants.items()):
            raise SceneError(
                "conditions must give every prompt one 'before' per variant: make conditions[prompt] as long "
                "as prompts[prompt], for every prompt"
            )
        before = {p: [with_attributes(spec, **changes) for changes in c] for p, c in conditions.items()}
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SceneError(f"{out} exists and is not empty: pass overwrite=True or choose another folder")
        shutil.rmtree(out)
    index: dict[str, Any] = {"prompts": {}, "sigma": sigma}
    if before is not None:
        index["conditions"] = {}
        if condition_sigma is not None:
            index["condition_sigma"] = condition_sigma
    camera_of: dict[str, list[float]] = {}
    if with_cameras:
        index["cameras"] = CAMERA_FILE
        if camera_sigma is not None:
            index["camera_sigma"] = camera_sigma
    for n, (prompt, specs) in enumerate(variants.items()):
        folder = out / f"set_{n:02d}"
        folder.mkdir(parents=True)
        index["prompts"][prompt] = folder.name
        for name, camera in _write_renders(specs, cameras, folder).items():
            camera_of[f"{folder.name}/{name}"] = camera
        if before is not None:
            (folder / "condition").mkdir()
            index["conditions"][prompt] = f"{folder.name}/condition"
            _write_renders(before[prompt], cameras, folder / "condition")
    if with_cameras:
        (out / CAMERA_FILE).write_text(json.dumps(camera_of))
    (out / EXACT_PRIOR_FILE).write_text(json.dumps(index, indent=2))
    return out


def scene_camera_conditions(cameras: SceneCameras) -> list[list[float]]:
    """Each scene camera in the layout of :func:`~nerfstudio_distill.priors.base.camera_condition`
    (nerfstudio c2w, top 3 x 4 row by row), in float64, as JSON numbers."""
    return np.asarray(cameras.c2w, dtype=np.float64)[:, :3, :4].reshape(-1, 12).tolist()


def _write_renders(specs: Sequence[SceneSpec], cameras: SceneCameras, folder: Path) -> dict[str, list[float]]:
    """``folder/variant<v>_frame<f>.png``: object ``specs[v]`` seen from camera ``f``; returns each file's
    name -> its camera (:func:`scene_camera_conditions`)."""
    encoded, written = scene_camera_conditions(cameras), {}
    for v, variant in enumerate(specs):
        for f, rgb in enumerate(render(variant, cameras)["rgb"]):
            image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
            name = f"variant{v:02d}_frame{f:05d}.png"
            Image.fromarray(image).save(folder / name)
            written[name] = encoded[f]
    return written
