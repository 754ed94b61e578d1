"""ns-distill-2d: one image edited with the exact prior (and a tiny random SD), outputs, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_distill.data.prior_sets import write_exact_prior_set
from nerfstudio_distill.data.scene import CameraSpec, SceneSpec, generate_scene, with_attributes
from nerfstudio_distill.guidance.common import TimestepSchedule
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from nerfstudio_distill.scripts import distill_2d
from nerfstudio_distill.scripts.distill_2d import distill_image, load_image, prior_input
from tests.conftest import BIN

SOURCE, TARGET = "a red striped ball", "a blue striped ball"
VIEW = 2


@pytest.fixture(scope="module")
def ball(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(scene, exact-prior folder, the ideal edit of view VIEW): an unshaded 8-view 32 px striped ball,
    so the nearest blue image to each red view is its own blue twin."""
    root = tmp_path_factory.mktemp("ball")
    spec = SceneSpec(colour="red", pattern="stripes", stripes=3, shading="albedo", background="gray")
    cameras = CameraSpec(num_views=8, width=32, height=32)
    scene = generate_scene(root / "scene", spec, cameras)
    prior = write_exact_prior_set(scene, root / "prior", {SOURCE: [{}], TARGET: [{"colour": "blue"}]})
    blue = generate_scene(root / "blue", with_attributes(spec, colour="blue"), cameras)
    return scene, prior, blue / "images" / f"frame_{VIEW:05d}.png"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_prior(folder: Path):
    return PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder)).setup("cpu")


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("method", ["sds", "dds", "pds"])
def test_edit_moves_the_image_to_the_target(ball, method):
    scene, prior_dir, ideal_file = ball
    prior = exact_prior(prior_dir)
    image = prior_input(load_image(scene, VIEW), prior, None)
    ideal = load_image(ideal_file)[0]
    guidance = GuidanceConfig(method=method, psi_scale=0.2)
    result = distill_image(prior, image, guidance, TARGET, SOURCE, steps=150, num_snapshots=4)
    before, after = rms(image[0], ideal), rms(result.image, ideal)
    assert after < 0.35 * before, (method, before, after)
    assert [s for s, _ in result.snapshots] == [0, 50, 100, 150]
    assert torch.equal(result.snapshots[0][1], image[0]) and torch.equal(
        result.snapshots[-1][1], result.image
    )
    assert result.readouts["grad_norm"] > 0 and result.readouts["rms_change"] > 0.1
    assert ("psi" in result.readouts) == (method == "pds")


@pytest.mark.parametrize("method", ["sds", "dds", "pds"])
def test_exact_instruct_pix2pix_edit_reaches_the_ideal(ball, tmp_path, method):
    """An image-conditioned exact prior (edit pairs) at its defaults: the instruction, conditioned on the
    input image, moves it to its own blue twin; the source branch is the empty instruction on it."""
    scene, _, ideal_file = ball
    pairs = write_exact_prior_set(
        scene,
        tmp_path / "pairs",
        {"make it blue": [{"colour": "blue"}], "leave it": [{}]},
        conditions={"make it blue": [{}], "leave it": [{}]},
    )
    prior = exact_prior(pairs)
    assert prior.takes_image
    image = prior_input(load_image(scene, VIEW), prior, None)
    ideal = load_image(ideal_file)[0]
    result = distill_image(prior, image, GuidanceConfig(method=method), "make it blue", steps=150)
    before, after = rms(image[0], ideal), rms(result.image, ideal)
    assert after < 0.35 * before, (method, before, after)


def test_pixels_equal_latents_for_the_exact_prior(ball):
    scene, prior_dir, _ = ball
    prior = exact_prior(prior_dir)
    image = prior_input(load_image(scene, VIEW), prior, None)
    kwargs = dict(steps=20, lr=0.01, optimizer="sgd")
    guidance = GuidanceConfig(method="pds", timesteps=TimestepSchedule(max_fraction=0.5))
    a = distill_image(prior, image, guidance, TARGET, SOURCE, optimize="pixels", **kwargs)
    b = distill_image(prior, image, guidance, TARGET, SOURCE, optimize="latents", **kwargs)
    assert rms(a.image, image[0]) > 1e-3
    torch.testing.assert_close(a.image, b.image, atol=1e-5, rtol=0)


def cli_args(scene: Path, prior: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--image", str(scene), "--view", str(VIEW), "--target-prompt", TARGET, "--source-prompt", SOURCE,
        "--prior.kind", "exact", "--prior.exact.folder", str(prior), "--output-dir", str(out), *extra,
    ]  # fmt: skip


def run_entrypoint(monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["ns-distill-2d", *args])
    distill_2d.entrypoint()


def test_cli_writes_result_strip_and_json(ball, tmp_path, monkeypatch, capsys):
    scene, prior, _ = ball
    out = tmp_path / "out"
    args = cli_args(scene, prior, out, "--steps", "12", "--num-snapshots", "4", "--guidance.psi-scale", "0.5")
    run_entrypoint(monkeypatch, args)
    assert capsys.readouterr().out.startswith(f"wrote {out / 'result.png'} and {out / 'strip.png'}")
    assert sorted(p.name for p in out.iterdir()) == sorted(distill_2d.OUTPUT_FILES)
    assert Image.open(out / "result.png").size == (32, 32)
    assert Image.open(out / "strip.png").size == (4 * 32 * 4, 32 * 4)  # 4 snapshots, upscaled x4 to 128 px
    report = json.loads((out / "distill_2d.json").read_text())
    assert report["snapshot_steps"] == [0, 4, 8, 12]
    assert report["settings"]["guidance"]["psi_scale"] == 0.5
    assert report["settings"]["prior"] == {
        "kind": "exact",
        "exact": {
            "folder": str(prior),
            "sigma": None,
            "condition_sigma": None,
            "camera_sigma": None,
            "image_guidance_scale": 1.0,
            "device": None,
        },
    }
    assert {"grad_norm", "t", "psi", "chi", "rms_change"} <= set(report["readouts"])


def test_stable_diffusion_path_runs_with_a_tiny_model(ball, tmp_path, monkeypatch):
    from tests.tiny_sd import build_tiny_sd

    scene, _, _ = ball
    model = build_tiny_sd(tmp_path / "sd")
    for optimize in ("latents", "pixels"):
        out = tmp_path / optimize
        args = ["--image", str(scene / "images" / "frame_00000.png"), "--target-prompt", "a blue ball"]
        args += ["--source-prompt", "a red ball", "--prior.stable-diffusion.model", str(model)]
        args += ["--resolution", "16", "--steps", "3", "--optimize", optimize, "--output-dir", str(out)]
        run_entrypoint(monkeypatch, args + ["--device", "cpu", "--guidance.guidance-scale", "2"])
        report = json.loads((out / "distill_2d.json").read_text())
        assert Image.open(out / "result.png").size == (16, 16)
        assert report["input_size"] == [16, 16] and np.isfinite(report["readouts"]["grad_norm"])


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing-image", ["does not exist", "--image"]),
        ("not-an-image", ["not an image", "PNG"]),
        ("view-out-of-range", ["--view 8 is out of range", "0..7"]),
        ("output-not-empty", ["not empty", "--overwrite"]),
        ("empty-target", ["--target-prompt is empty"]),
        ("unknown-prompt", ["unknown prompt", TARGET]),
        ("infinite-lr", ["--lr inf", "finite"]),
        ("diverging-lr", ["diverged", "lower --lr", "nothing was written"]),
        ("unknown-device", ["--device 'banana'", "cpu"]),
        (
            "backwards-timesteps",
            ["--guidance.timesteps.min-fraction 0.9", "--guidance.timesteps.max-fraction 0.2"],
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ball, tmp_path, monkeypatch, capsys, case, needles):
    scene, prior, _ = ball
    out = tmp_path / "out"
    args = cli_args(scene, prior, out)
    if case == "missing-image":
        args[1] = str(tmp_path / "nope.png")
    elif case == "not-an-image":
        (tmp_path / "notes.png").write_text("not a picture")
        args[1] = str(tmp_path / "notes.png")
    elif case == "view-out-of-range":
        args[3] = "8"
    elif case == "output-not-empty":
        out.mkdir()
        (out / "result.png").write_text("keep me")
    elif case == "empty-target":
        args[5] = " "
    elif case == "unknown-prompt":
        args[5] = "a green ball"
    elif case == "infinite-lr":
        args += ["--lr", "inf"]
    elif case == "diverging-lr":  # #15: a run that blows up writes no NaN picture and fails
        args += ["--lr", "1e30", "--optimizer", "sgd", "--steps", "5"]
    elif case == "unknown-device":
        args += ["--device", "banana"]
    elif case == "backwards-timesteps":
        args += ["--guidance.timesteps.min-fraction", "0.9", "--guidance.timesteps.max-fraction", "0.2"]
    with pytest.raises(SystemExit) as exit_info:
        run_entrypoint(monkeypatch, args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message
    if case == "output-not-empty":
        assert [p.name for p in out.iterdir()] == ["result.png"] and (
            out / "result.png"
        ).read_text() == "keep me"
    else:
        assert not out.exists()


def test_bad_input_exits_non_zero_with_one_stderr_line(tmp_path):
    proc = subprocess.run(
        [str(BIN / "ns-distill-2d"), "--image", str(tmp_path / "missing.png"), "--target-prompt", "a ball"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: --image {tmp_path / 'missing.png'} does not exist: pass an image file, or a nerfstudio "
        "dataset folder with transforms.json"
    ]
    assert not (tmp_path / "distill_2d").exists()


# ----------------------------------------------------------------------------------------------- --sweep
def test_sweep_writes_a_contact_sheet_and_one_cell_per_setting(ball, tmp_path, monkeypatch, capsys):
    scene, prior, _ = ball
    out = tmp_path / "out"
    sweeps = ["--sweep", "psi-scale=0,1", "--sweep", "guidance-scale=1,7.5"]
    run_entrypoint(
        monkeypatch,
        cli_args(
            scene,
            prior,
            out,
            "--steps",
            "150",
            "--guidance.inversion-eta",
            "0.1",
            "--guidance.pds-rule",
            "reference",
            *sweeps,
        ),
    )
    assert capsys.readouterr().out.startswith(f"wrote {out / 'sweep.png'} and {out / 'sweep.json'} (4 edits;")
    assert sorted(p.name for p in out.iterdir()) == sorted(distill_2d.SWEEP_FILES)

    # sheet: input tile, row labels, 2x2 grid of 128 px tiles (32 px upscaled x4)
    gap, band, tile = distill_2d.GAP, distill_2d.LABEL_BAND, 128
    gutter = max(distill_2d.text_width(f"psi-scale={v}") for v in (0, 1)) + gap
    sheet = np.asarray(Image.open(out / "sweep.png").convert("RGB"))
    assert sheet.shape == (band + 2 * (tile + gap), 2 * gap + tile + gutter + 2 * (tile + gap), 3)
    image = (load_image(scene, VIEW)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(
        sheet[band : band + tile, gap : gap + tile], image.repeat(4, 0).repeat(4, 1)
    )

    report = json.loads((out / "sweep.json").read_text())
    assert report["sweeps"] == [
        {"name": "psi-scale", "values": [0.0, 1.0]},
        {"name": "guidance-scale", "values": [1.0, 7.5]},
    ]
    cells = report["cells"]
    assert [(c["row"], c["column"]) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    base = report["settings"]["guidance"]
    for cell in cells:
        psi, cfg = cell["values"]["psi-scale"], cell["values"]["guidance-scale"]
        assert cell["label"] == f"psi-scale={psi:g}, guidance-scale={cfg:g}"
        assert cell["guidance"] == {**base, "psi_scale": psi, "guidance_scale": cfg}  # nothing else differs
        assert cell["guidance"]["inversion_eta"] == 0.1  # the non-swept --guidance options reach every cell
        assert {"psi", "chi", "rms_change"} <= set(cell["readouts"])
    rms_change = {
        (c["values"]["psi-scale"], c["values"]["guidance-scale"]): c["readouts"]["rms_change"] for c in cells
    }
    for cfg in (1.0, 7.5):  # without the identity term the edit moves the image further
        assert rms_change[0.0, cfg] > 1.2 * rms_change[1.0, cfg] > 0, rms_change


def test_one_sweep_is_one_row_and_can_vary_the_method(ball, tmp_path):
    scene, prior, _ = ball
    args = distill_2d.Distill2DArgs(
        image=scene,
        view=VIEW,
        target_prompt=TARGET,
        source_prompt=SOURCE,
        prior=PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior)),
        output_dir=tmp_path / "out",
        steps=4,
        sweep=("method=dds,pds",),
    )
    paths = distill_2d.main(args)
    sheet = Image.open(paths["sweep"])
    gap, band = distill_2d.GAP, distill_2d.LABEL_BAND
    assert sheet.size == (2 * gap + 128 + 2 * (128 + gap), band + 128 + gap)  # no row labels
    cells = json.loads(paths["sweep_json"].read_text())["cells"]
    assert [c["guidance"]["method"] for c in cells] == ["dds", "pds"]
    assert ["psi" in c["readouts"] for c in cells] == [False, True]


def test_sweep_sets_timesteps_together():
    base = GuidanceConfig(timesteps=TimestepSchedule(min_fraction=0.02, max_fraction=0.98))
    sweeps = distill_2d.parse_sweeps(("timesteps.min-fraction=0.99", "guidance.timesteps.max_fraction=0.995"))
    [[cell]] = distill_2d.sweep_grid(base, sweeps)  # min 0.99 > the base's max 0.98 until both are set
    assert cell.guidance.timesteps == TimestepSchedule(min_fraction=0.99, max_fraction=0.995)
    assert base.timesteps.max_fraction == 0.98


@pytest.mark.parametrize(
    "sweeps, needles",
    [
        (["lr=0.1,0.2"], ["--sweep lr=0.1,0.2", "NAME=V1,V2,...", "psi-scale"]),
        (["psi-scale"], ["NAME=V1,V2,..."]),
        (["psi-scale="], ["empty value", "psi-scale=0.25,0.5,1"]),
        (["psi-scale=0.5,,1"], ["empty value"]),
        (["guidance-scale=7.5,high"], ["must be numbers"]),
        (["method=pds,nerf"], ["'nerf' is not a method", "sds, sdi, dds, pds"]),
        (["psi-scale=0,1", "chi-scale=1,2", "guidance-scale=7.5"], ["given 3 times", "at most 2"]),
        (["psi-scale=0,1", "psi-scale=0.5"], ["psi-scale is given twice"]),
        (["psi-scale=0,.1,.2,.3,.4,.5,1", "guidance-scale=1,2,4,8,16,32"], ["7x6 grid of 42", "at most 36"]),
        (["psi-scale=0.5,-1"], ["--sweep cell psi-scale=-1:", "--guidance.psi-scale", "0 or more"]),
        (["guidance-scale=7.5,nan"], ["guidance-scale=nan", "finite"]),
        (["timesteps.max-fraction=0.5,1.5"], ["timesteps.max-fraction=1.5", "min-fraction <= max-fraction"]),
    ],
)
def test_bad_sweep_is_one_line_and_writes_nothing(ball, tmp_path, monkeypatch, sweeps, needles):
    scene, prior, _ = ball
    out = tmp_path / "out"
    args = cli_args(scene, prior, out, *(arg for sweep in sweeps for arg in ("--sweep", sweep)))
    with pytest.raises(SystemExit) as exit_info:
        run_entrypoint(monkeypatch, args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()


def test_sweep_keeps_the_output_dir_rule(ball, tmp_path, monkeypatch):
    scene, prior, _ = ball
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.png").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty: pass --overwrite"):
        run_entrypoint(monkeypatch, cli_args(scene, prior, out, "--sweep", "psi-scale=0,1"))
    assert (out / "sweep.png").read_text() == "keep me"
