"""Labelled image sets for the exact prior, rendered from a synthetic scene's own cameras.

``write_exact_prior_set(scene, out, {"a blue striped ball": [{"colour": "blue"}], ...})`` renders,
for every prompt, each listed attribute variant of the scene's object from every camera of
``transforms.json``, and writes ``out/<n>/<variant>_<frame>.png`` plus ``exact_prior.json``, the
format :class:`~nerfstudio_distill.priors.config.ExactPriorConfig` reads.

An image-conditioned set (an exact InstructPix2Pix) also gives, per prompt (then an instruction), the
"before" object of each variant: ``conditions={"turn the ball blue": [{"colour": "red"}], ...}``. Each
image's condition, the "before" seen from the same camera, goes to ``out/<n>/condition/`` under the same
name.
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
    """
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
    for n, (prompt, specs) in enumerate(variants.items()):
        folder = out / f"set_{n:02d}"
        folder.mkdir(parents=True)
        index["prompts"][prompt] = folder.name
        _write_renders(specs, cameras, folder)
        if before is not None:
            (folder / "condition").mkdir()
            index["conditions"][prompt] = f"{folder.name}/condition"
            _write_renders(before[prompt], cameras, folder / "condition")
    (out / EXACT_PRIOR_FILE).write_text(json.dumps(index, indent=2))
    return out


def _write_renders(specs: Sequence[SceneSpec], cameras: SceneCameras, folder: Path) -> None:
    """``folder/variant<v>_frame<f>.png``: object ``specs[v]`` seen from camera ``f``."""
    for v, variant in enumerate(specs):
        for f, rgb in enumerate(render(variant, cameras)["rgb"]):
            image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
            Image.fromarray(image).save(folder / f"variant{v:02d}_frame{f:05d}.png")
