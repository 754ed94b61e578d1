"""Labelled image sets for the exact prior, rendered from a synthetic scene's own cameras.

``write_exact_prior_set(scene, out, {"a blue striped ball": [{"colour": "blue"}], ...})`` renders,
for every prompt, each listed attribute variant of the scene's object from every camera of
``transforms.json``, and writes ``out/<n>/<variant>_<frame>.png`` plus ``exact_prior.json``, the
format :class:`~nerfstudio_distill.priors.config.ExactPriorConfig` reads.
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

from nerfstudio_distill.data.scene import load_scene, render, with_attributes
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
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SceneError(f"{out} exists and is not empty: pass overwrite=True or choose another folder")
        shutil.rmtree(out)
    index = {}
    for n, (prompt, specs) in enumerate(variants.items()):
        folder = out / f"set_{n:02d}"
        folder.mkdir(parents=True)
        index[prompt] = folder.name
        for v, variant in enumerate(specs):
            for f, rgb in enumerate(render(variant, cameras)["rgb"]):
                image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
                Image.fromarray(image).save(folder / f"variant{v:02d}_frame{f:05d}.png")
    (out / EXACT_PRIOR_FILE).write_text(json.dumps({"prompts": index, "sigma": sigma}, indent=2))
    return out
