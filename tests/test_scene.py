"""Tests of the synthetic scene generator (nerfstudio_distill.data.scene)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerfstudio_distill.data.scene import (
    COLOURS,
    CameraSpec,
    SceneCameras,
    SceneError,
    SceneSpec,
    generate_scene,
    load_scene,
    look_at,
    make_cameras,
    render,
    with_attributes,
)

REPO = Path(__file__).resolve().parents[1]
SCENE = SceneSpec(colour="red", pattern="stripes", stripes=4)
CAMERAS = CameraSpec(num_views=10, width=48, height=40)  # nerfstudio splits 9 train / 1 val


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scene(tmp_path_factory.mktemp("scene") / "ball", SCENE, CAMERAS)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    cameras = CameraSpec(layout="hemisphere", num_views=5, width=24, height=24, seed=3)
    a = _files(generate_scene(tmp_path / "a", SCENE, cameras))
    b = _files(generate_scene(tmp_path / "b", SCENE, cameras))
    assert a == b
    expected = {"transforms.json", "scene.json"} | {
        f"{d}/frame_{i:05d}.png" for d in ("images", "depth") for i in range(5)
    }
    assert set(a) == expected


def test_hemisphere_seed_moves_cameras_and_all_look_at_origin() -> None:
    first, second = (make_cameras(CameraSpec(layout="hemisphere", num_views=12, seed=s)) for s in (0, 1))
    assert not np.allclose(first.c2w, second.c2w)
    for cameras in (first, second, make_cameras(CameraSpec(layout="ring", num_views=7))):
        position = cameras.c2w[:, :3, 3]
        assert np.allclose(np.linalg.norm(position, axis=1), 4.5)
        forward = -cameras.c2w[:, :3, 2]  # OpenGL: the camera looks down -z
        assert np.allclose(np.einsum("ni,ni->n", forward, -position / 4.5), 1.0)
        rotation = cameras.c2w[:, :3, :3]
        assert np.allclose(rotation @ rotation.transpose(0, 2, 1), np.eye(3), atol=1e-12)
        assert np.allclose(np.linalg.det(rotation), 1.0)
    assert (first.c2w[:, 2, 3] > 0).all()  # upper hemisphere


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_centre_pixel_depth_is_camera_distance_minus_one(shape: str) -> None:
    # Azimuths 0, 90, 180, 270 degrees: the box shows a face head-on.
    cameras = make_cameras(CameraSpec(num_views=4, width=65, height=49, radius=5.0, elevation=0.0))
    out = render(SceneSpec(shape=shape), cameras)
    assert np.allclose(out["depth"][:, 24, 32], 4.0, atol=1e-5)
    rows, cols = np.nonzero(out["mask"][0])
    assert np.allclose([rows.mean(), cols.mean()], [24, 32], atol=0.5)
    assert (out["depth"][~out["mask"]] == 0).all()
    assert (out["depth"][out["mask"]] > 0).all()


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_depth_back_projects_onto_the_surface_along_nerfstudio_rays(shape: str) -> None:
    """Checks intrinsics, pixel centres, c2w convention and z-depth against nerfstudio's own rays."""
    cameras = make_cameras(CameraSpec(layout="hemisphere", num_views=3, width=40, height=30, fov=40.0))
    out = render(SceneSpec(shape=shape), cameras)
    for i in range(len(cameras)):
        rays = cameras.to_nerfstudio().generate_rays(camera_indices=i)
        z_depth = out["depth"][i][..., None].astype(np.float64)
        distance = z_depth * rays.metadata["directions_norm"].numpy()  # ray length of unit z
        points = rays.origins.numpy() + distance * rays.directions.numpy()
        mask = out["mask"][i]
        assert 0.05 < mask.mean() < 0.9
        size = np.linalg.norm(points, axis=-1) if shape == "sphere" else np.abs(points).max(axis=-1)
        assert np.allclose(size[mask], 1.0, atol=1e-4)
        if shape == "sphere":  # background rays miss: their closest approach to the origin exceeds 1
            o, d = rays.origins.numpy()[~mask], rays.directions.numpy()[~mask]
            closest = o - np.einsum("ri,ri->r", o, d)[:, None] * d
            assert (np.linalg.norm(closest, axis=-1) > 1.0 - 1e-6).all()


def test_mask_matches_projected_disc_and_background_is_exact() -> None:
    camera_spec = CameraSpec(layout="hemisphere", num_views=4, width=128, height=128, radius=4.5, fov=50.0)
    out = render(SceneSpec(background="blue", colour="yellow"), make_cameras(camera_spec))
    focal = 64 / math.tan(math.radians(25.0))
    disc_radius = focal * math.tan(math.asin(1 / 4.5))
    expected = math.pi * disc_radius**2 / 128**2
    assert np.allclose(out["mask"].mean(axis=(1, 2)), expected, rtol=0.02)
    assert (out["rgb"][~out["mask"]] == np.float32(COLOURS["blue"])).all()
    assert (out["label"][~out["mask"]] == 0).all()
    assert 0.0 <= out["rgb"].min() and out["rgb"].max() <= 1.0


def test_changing_colour_changes_only_primary_object_pixels(scene_dir: Path) -> None:
    spec, cameras = load_scene(scene_dir)
    before, after = render(spec, cameras), render(with_attributes(spec, colour="green"), cameras)
    for key in ("mask", "depth", "label"):
        assert np.array_equal(before[key], after[key])
    changed = (before["rgb"] != after["rgb"]).any(axis=-1)
    primary = before["label"] == 1
    assert primary.any() and (before["label"] == 2).any()
    assert np.array_equal(changed, primary)  # background and white stripes untouched
    with pytest.raises(SceneError, match="colour"):
        with_attributes(spec, colour="chartreuse")
    with pytest.raises(SceneError, match="colur"):
        with_attributes(spec, colur="green")


def _top_view_labels(spec: SceneSpec) -> np.ndarray:
    cameras = SceneCameras.from_poses(look_at(np.array([0.0, 0.0, 4.5])), 129, 129, fov=30.0)
    return render(spec, cameras)["label"][0]


@pytest.mark.parametrize("count", [3, 5])
def test_stripe_count_and_phase(count: int) -> None:
    labels = _top_view_labels(SceneSpec(pattern="stripes", stripes=count))
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ring = labels[
        np.round(64 + 40 * np.sin(angles)).astype(int), np.round(64 + 40 * np.cos(angles)).astype(int)
    ]
    assert set(ring.tolist()) == {1, 2}
    assert (ring != np.roll(ring, 1)).sum() == 2 * count  # k primary and k secondary bands

    shifted = _top_view_labels(SceneSpec(pattern="stripes", stripes=count, phase=0.5))
    inside = labels > 0
    assert (shifted[inside] == 3 - labels[inside]).mean() > 0.99  # half a period swaps the colours


def test_checker_count_matters_and_box_differs_from_sphere() -> None:
    two, four = (_top_view_labels(SceneSpec(pattern="checker", checks=k)) for k in (2, 4))
    assert set(np.unique(four)) == {0, 1, 2}
    assert (two != four).mean() > 0.1
    assert (four != _top_view_labels(SceneSpec(pattern="stripes", stripes=4))).mean() > 0.1
    sphere = _top_view_labels(SceneSpec()) > 0
    box = _top_view_labels(SceneSpec(shape="box")) > 0
    assert (box & sphere).sum() == sphere.sum() and box.sum() > 1.2 * sphere.sum()


def test_camera_subsets_render_the_same_views() -> None:
    cameras = make_cameras(CameraSpec(layout="hemisphere", num_views=5, width=16, height=12))
    full = render(SCENE, cameras)["rgb"]
    assert np.array_equal(render(SCENE, cameras[1:3])["rgb"], full[1:3])
    assert np.array_equal(render(SCENE, cameras[4])["rgb"], full[4:5])
    assert np.array_equal(render(SCENE, cameras[[3, 0]])["rgb"], full[[3, 0]])


def test_albedo_shading_is_unshaded_and_lambert_is_darker() -> None:
    cameras = make_cameras(CameraSpec(num_views=3, width=32, height=32))
    flat = render(SceneSpec(shading="albedo", colour="white"), cameras)
    lit = render(SceneSpec(colour="white"), cameras)
    assert np.array_equal(flat["rgb"], flat["albedo"])
    assert (lit["rgb"] <= flat["rgb"]).all() and lit["rgb"][lit["mask"]].std() > 0.05


def test_files_match_render_and_load_scene_round_trips(scene_dir: Path) -> None:
    spec, cameras = load_scene(scene_dir)
    assert spec == SCENE
    assert np.array_equal(cameras.c2w, make_cameras(CAMERAS).c2w)
    out = render(spec, cameras)
    meta = json.loads((scene_dir / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV" and (meta["w"], meta["h"]) == (48, 40)
    for i, frame in enumerate(meta["frames"]):
        image = np.asarray(Image.open(scene_dir / frame["file_path"]))
        assert image.shape == (40, 48, 3)
        assert np.array_equal(image, np.round(out["rgb"][i] * 255).astype(np.uint8))
        depth_mm = np.asarray(Image.open(scene_dir / frame["depth_file_path"])).astype(np.float64)
        assert np.abs(depth_mm / 1000 - out["depth"][i]).max() <= 0.0006


def test_nerfstudio_dataparser_reads_the_scene(scene_dir: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    parser = NerfstudioDataParserConfig(data=scene_dir).setup()
    splits = [parser.get_dataparser_outputs(split) for split in ("train", "val")]
    assert sum(len(s.image_filenames) for s in splits) == CAMERAS.num_views
    truth = render(SCENE, make_cameras(CAMERAS))["depth"]
    for outputs in splits:
        cameras = outputs.cameras
        assert len(cameras) == len(outputs.image_filenames) > 0
        assert (cameras.width == 48).all() and (cameras.height == 40).all()
        depth_files = outputs.metadata["depth_filenames"]
        assert len(depth_files) == len(outputs.image_filenames)
        for image_file, depth_file in zip(outputs.image_filenames, depth_files, strict=True):
            assert np.asarray(Image.open(image_file)).shape == (40, 48, 3)
            assert depth_file.parent.name == "depth" and depth_file.name == image_file.name
            index = int(image_file.stem.split("_")[1])
            depth = get_depth_image_from_path(depth_file, 40, 48, outputs.metadata["depth_unit_scale_factor"])
            assert np.abs(depth[..., 0].numpy() - truth[index]).max() <= 0.0006


def test_function_api_rejects_bad_input_before_writing(tmp_path: Path) -> None:
    for kwargs, match in [
        ({"width": 0}, "--resolution"),
        ({"height": 5000}, "--resolution"),
        ({"num_views": 0}, "--num-views"),
        ({"radius": 1.0}, "--radius"),
    ]:
        with pytest.raises(SceneError, match=match):
            CameraSpec(**kwargs)
    with pytest.raises(SceneError, match="red, green"):
        SceneSpec(colour="pinkish")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SceneError, match="--overwrite"):
        generate_scene(tmp_path, SCENE, CAMERAS)
    assert _files(tmp_path) == {"keep.txt": b"mine"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "nerfstudio_distill.data.scene", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--resolution", "0"], "--resolution"),
        (["--resolution", "5000"], "--resolution"),
        (["--colour", "pinkish"], "red, green, blue"),
        (["--pattern", "zigzag"], "none, stripes, checker"),
        (["--num-views", "0"], "--num-views"),
        (["--num-views", "-3"], "--num-views"),
        (["--layout", "hemisphere", "--seed", "-1"], "--seed"),
        ([], "--overwrite"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], fix: str) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = _cli("--output-dir", str(tmp_path), "--num-views", "2", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fix in lines[0], result.stderr
    assert _files(tmp_path) == {"keep.txt": b"mine"}


def test_cli_writes_and_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "box"
    common = ["--output-dir", str(folder), "--shape", "box", "--resolution", "16"]
    assert _cli(*common, "--num-views", "3").returncode == 0
    (folder / "notes.txt").write_text("keep")
    result = _cli(*common, "--num-views", "2", "--colour", "blue", "--layout", "hemisphere", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert (folder / "notes.txt").read_text() == "keep"
    spec, cameras = load_scene(folder)
    assert (spec.colour, spec.shape, len(cameras), cameras.width) == ("blue", "box", 2, 16)
