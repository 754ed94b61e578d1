"""The offline demo (`make demo`): edit a synthetic red striped ball into a blue one with pds-edit
(nerfacto) or pds-splatfacto (Gaussian splats, ``--representation splatfacto``).

Every stage is nerfstudio's real command line, run as a subprocess:
1. ``ns-distill-scene`` writes a 24-view dataset of a red striped ball;
2. ``ns-train nerfacto`` (or ``splatfacto``) trains the base scene on CPU;
3. the exact prior's image sets are rendered (source and target prompts);
4. ``ns-train pds-edit`` (or ``pds-splatfacto``) ``--load-dir <base>`` edits it;
5. ``ns-export tsdf`` writes a mesh of the edit (splats: ``ns-export gaussian-splat``, a .ply);
6. before/after images and a turntable GIF are rendered from both runs.

The representations differ only in their row of :data:`REPRESENTATIONS`. No model hub is contacted. ``--prompt "a green striped ball"`` reruns it with another target from
the scene's vocabulary (colours and patterns of ``ns-distill-scene``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from nerfstudio_distill.data.scene import COLOURS, CameraSpec, SceneSpec, generate_scene
from nerfstudio_distill.errors import DemoError

PATTERN_WORDS = {"striped": "stripes", "checkered": "checker", "plain": "none"}
SHAPE_WORDS = {"ball": "sphere", "sphere": "sphere", "box": "box", "cube": "box"}
MARKER = "demo.json"
BIN = Path(sys.executable).parent

# A small nerfacto for 2 CPU cores; the edit must use the same field settings as the base.
FIELD = [
    "--pipeline.model.implementation", "torch",
    "--pipeline.model.hidden-dim", "32",
    "--pipeline.model.hidden-dim-color", "32",
    "--pipeline.model.num-levels", "8",
    "--pipeline.model.log2-hashmap-size", "14",
    "--pipeline.model.num-nerf-samples-per-ray", "16",
    "--pipeline.model.num-proposal-samples-per-ray", "32", "16",
    "--pipeline.model.background-color", "black",  # the scene's background
    "--pipeline.model.camera-optimizer.mode", "off",
]  # fmt: skip
# Gaussian splats on CPU, also the settings of benchmarks/edit_quality.py --representation splatfacto (it
# imports them), where a 600-step base from 2000 random Gaussians reached 24.9 dB; the edit uses the same.
SPLATS = [
    "--pipeline.model.random-init", "True",
    "--pipeline.model.random-scale", "1.0",  # the dataparser fits the cameras (radius 4) in [-1, 1]
    "--pipeline.model.sh-degree", "1",  # the scene is unshaded
    "--pipeline.model.background-color", "black",  # the scene's background
]  # fmt: skip
SPLAT_BASE = [
    "--pipeline.model.num-downscales", "0",
    "--pipeline.model.warmup-length", "100",
    "--pipeline.model.refine-every", "50",
]  # fmt: skip
"""The splatfacto base densifies within a few hundred steps (its default warm-up is 500), as the benchmark's."""
SPLAT_EDIT = ["--optimizers.features-dc.optimizer.lr", "0.05"]
"""pds-splatfacto's defaults but for the colours' rate: at splatfacto's 2.5e-3, 150 Adam steps move a
Gaussian's colour by at most about 0.1 (a DC coefficient step times 0.28), and the demo's ball stayed red;
at 0.05 its body turned violet to blue (0.025 left it redder; 0.1 was no bluer in one try). 0.05 is
about :func:`~nerfstudio_distill.models.edit_splatfacto.colour_lr` of the 150-step edit (0.047)."""


@dataclass(frozen=True)
class Representation:
    """What the demo runs for one scene representation; every other stage is the same for all."""

    base: str
    """``ns-train`` method of the base."""
    edit: str
    """``ns-train`` method of the edit (it loads the base)."""
    model: tuple[str, ...]
    """Model flags of the base and the edit (the edit checks that the checkpoint matches them)."""
    base_flags: tuple[str, ...]
    """Flags of the base only."""
    base_steps: int
    """Default ``--base-steps``."""
    edit_flags: tuple[str, ...]
    """Flags of the edit only, besides the prompts, the exact prior and the render scale."""
    export: tuple[str, ...]
    """``ns-export`` subcommand and its flags (besides --load-config and --output-dir)."""
    exported: str
    """What the export is called in the summary; also its folder in ``--output-dir``."""
    exported_file: str
    """The file ``ns-export`` writes in that folder."""


REPRESENTATIONS = {
    "nerfacto": Representation(
        base="nerfacto",
        edit="pds-edit",
        model=tuple(FIELD),
        base_flags=("--pipeline.datamanager.train-num-rays-per-batch", "1024"),
        base_steps=300,
        edit_flags=(),  # pds-edit's defaults
        export=("tsdf", "--resolution", "64", "--batch-size", "4", "--texture-method", "tsdf"),
        exported="mesh",
        exported_file="tsdf_mesh.ply",
    ),
    "splatfacto": Representation(
        base="splatfacto",
        edit="pds-splatfacto",
        model=(*SPLATS, "--pipeline.model.num-random", "2000"),
        base_flags=tuple(SPLAT_BASE),
        base_steps=600,
        edit_flags=tuple(SPLAT_EDIT),
        export=("gaussian-splat",),
        exported="splat",
        exported_file="splat.ply",
    ),
}
"""The demo's scene representations (``--representation``)."""


@dataclass
class DemoArgs:
    """Run the whole offline demo: scene, base nerfacto, pds-edit, mesh, pictures (or, with
    --representation splatfacto: base splatfacto, pds-splatfacto, a .ply of the Gaussians, pictures)."""

    prompt: str = "a blue striped ball"
    """Target of the edit, in the scene's vocabulary: "a <colour> [striped|checkered|plain] ball".
    Colours: red, green, blue, yellow, orange, purple, pink, cyan, brown, white, gray, black."""
    output_dir: Path = Path("demo_outputs")
    """Where everything goes. A folder made by an earlier demo is replaced; any other non-empty
    folder is refused."""
    representation: Literal["nerfacto", "splatfacto"] = "nerfacto"
    """The scene model: "nerfacto" (base ``ns-train nerfacto``, edit ``pds-edit``, a mesh from
    ``ns-export tsdf``) or "splatfacto" (Gaussian splats on the plugin's CPU rasterizer: base
    ``ns-train splatfacto``, edit ``pds-splatfacto``, the Gaussians as a .ply from
    ``ns-export gaussian-splat``)."""
    base_steps: int | None = None
    """Training steps of the base; None: the representation's (nerfacto 300, splatfacto 600)."""
    edit_steps: int = 150
    """Steps of the edit (pds-edit or pds-splatfacto)."""
    render_scale: float = 0.5
    """Resolution factor of the views rendered for guidance (the exact prior's images match it)."""


def parse_prompt(prompt: str) -> dict[str, str]:
    """Attribute changes that a target prompt asks for; one-line error if it is outside the vocabulary."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colours = [w for w in words if w in COLOURS]
    if len(colours) != 1:
        raise DemoError(
            f"--prompt {prompt!r} must name one colour of the scene: use e.g. 'a green striped ball' "
            f"(colours: {', '.join(COLOURS)})"
        )
    changes = {"colour": colours[0]}
    patterns = [PATTERN_WORDS[w] for w in words if w in PATTERN_WORDS]
    if patterns:
        changes["pattern"] = patterns[-1]
    return changes


def run(command: list[str], log: Path) -> None:
    """Run one of nerfstudio's console scripts; its output goes to ``log``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    print(f"$ {' '.join(command)}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(BIN / command[0]), *command[1:]], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(
            f"error: {command[0]} failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail)
        )


def prepare_output(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise DemoError(
                f"{folder} exists and was not made by the demo: pass --output-dir to a new folder"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def main(args: DemoArgs) -> dict[str, Path]:
    start = time.time()
    changes = parse_prompt(args.prompt)
    out = args.output_dir.resolve()
    prepare_output(out)
    (out / MARKER).write_text(json.dumps({k: str(v) for k, v in dataclasses.asdict(args).items()}, indent=2))
    logs = out / "logs"
    logs.mkdir()

    # The design of benchmarks/edit_quality.py, where PDS reaches the ideal edit: unshaded colours (with
    # Lambert shading the pixel-space nearest neighbour of a red view is a darker blue view from another
    # camera, not the same view in blue) and white stripes on a black background.
    source = SceneSpec(
        colour="red", pattern="stripes", stripes=3, secondary="white", background="black", shading="albedo"
    )
    source_prompt = "a red striped ball"
    scene = generate_scene(out / "scene", source, CameraSpec(num_views=24, width=64, height=64, elevation=15))
    print(f"1/6 scene: {scene}", flush=True)

    rep = REPRESENTATIONS[args.representation]
    common = ["--machine.device-type", "cpu", "--vis", "tensorboard", "--output-dir", str(out / "runs")]
    common += ["--experiment-name", "ball", "--data", str(scene), *rep.model]
    base_steps = rep.base_steps if args.base_steps is None else args.base_steps
    run(["ns-train", rep.base, *common, "--max-num-iterations", str(base_steps), "--timestamp", "base"]
        + list(rep.base_flags), logs / "base.log")  # fmt: skip
    base = out / "runs" / "ball" / rep.base / "base"
    print(f"2/6 base {rep.base}: {base}", flush=True)

    from nerfstudio_distill.data.prior_sets import PATTERN_VARIANTS, write_exact_prior_set

    # the same seven objects under each prompt, so the target image nearest to the source is the ideal
    # edit (the source with only the asked-for change), not just any ball of the target colour
    targets = [changes] + [
        {**variant, "colour": changes["colour"]}
        for variant in PATTERN_VARIANTS[1:]
        if variant.get("pattern") != changes.get("pattern")
    ]
    prompts = {source_prompt: PATTERN_VARIANTS, args.prompt: targets}
    prior = write_exact_prior_set(scene, out / "prior", prompts, scale=args.render_scale)
    print(f"3/6 exact prior: {prior}", flush=True)

    # guidance and learning rates: the edit method's defaults (splats: see SPLAT_EDIT)
    run(["ns-train", rep.edit, *common, "--max-num-iterations", str(args.edit_steps), "--timestamp", "edit"]
        + ["--load-dir", str(base / "nerfstudio_models"), "--steps-per-save", str(args.edit_steps)]
        + ["--pipeline.target-prompt", args.prompt, "--pipeline.source-prompt", source_prompt]
        + ["--pipeline.prior.kind", "exact", "--pipeline.prior.exact.folder", str(prior)]
        + ["--pipeline.prior-resolution", "None", "--pipeline.render-scale", str(args.render_scale)]
        + list(rep.edit_flags), logs / "edit.log")  # fmt: skip
    edit = out / "runs" / "ball" / rep.edit / "edit"
    print(f"4/6 {rep.edit}: {edit}", flush=True)

    exported = out / rep.exported / rep.exported_file
    run(["ns-export", *rep.export, "--load-config", str(edit / "config.yml"), "--output-dir", str(exported.parent)],
        logs / "export.log")  # fmt: skip
    print(f"5/6 {rep.exported}: {exported}", flush=True)

    from nerfstudio_distill.scripts.pictures import before_after

    with warnings.catch_warnings():  # nerfstudio's deprecation warnings would bury the summary below
        warnings.simplefilter("ignore")
        pictures = before_after(base / "config.yml", edit / "config.yml", out / "pictures", every=2)
    print(f"6/6 pictures: {pictures['strip']} and {pictures['gif']}", flush=True)

    outputs = {
        "scene": scene,
        "base run": base,
        "edited run": edit,
        rep.exported: exported,
        "before/after": pictures["strip"],
        "turntable": pictures["gif"],
        "logs": logs,
    }
    print(f"\nDone in {time.time() - start:.0f} s. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:<13} {path}")
    print(f"\nLook at the edit in nerfstudio's viewer:\n  ns-viewer --load-config {edit / 'config.yml'}")
    return outputs


def entrypoint() -> None:
    args = tyro.cli(DemoArgs)
    try:
        main(args)
    except DemoError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    entrypoint()
