"""Synthetic scenes: an analytic object, ray-traced exactly, written as a nerfstudio-data dataset.

The object (a sphere of radius 1 or a box of half-size 1, centred at the origin, world +z up) carries a
named colour and an optional stripes/checker pattern in a second colour, shaded Lambertian with one fixed
light plus ambient (view-independent), or unshaded.  Everything is deterministic given the specs, so other
code can re-render the *same* object with other attributes, from the same cameras or any other camera::

    spec, cameras = load_scene("data/ball")
    target = render(with_attributes(spec, colour="blue"), cameras)  # the ideal "make it blue" edit

Conventions:

* ``c2w`` matrices are OpenGL/nerfstudio camera-to-world: the camera looks down its -z axis, +y is up.
* Intrinsics are OpenCV pixel units (v grows downwards); ray through pixel (u, v) passes its centre
  (u + 0.5, v + 0.5).  ``fov`` is the vertical field of view; pixels are square.
* Depth is z-depth along the camera's viewing axis (not the distance along the ray) and is **0 on the
  background**, both in :func:`render` and in the 16-bit millimetre PNGs under ``depth/`` (nerfstudio
  treats depth 0 as "no measurement").
* Pattern coordinates are object-space spherical angles of the surface point: azimuth ``atan2(y, x)``
  around +z and polar angle from +z.  ``stripes=k`` gives k primary and k secondary meridian bands;
  ``checks=k`` gives 2k cells around the equator and k from pole to pole; ``phase`` shifts either pattern
  in azimuth by that fraction of one period.
"""

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float, UInt8
from PIL import Image

from nerfstudio_distill.errors import SceneError

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.55, 0.70),
    "cyan": (0.10, 0.80, 0.85),
    "brown": (0.50, 0.30, 0.12),
    "white": (1.00, 1.00, 1.00),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.00, 0.00, 0.00),
}
"""Named colours (linear RGB in [0, 1]) usable as object, pattern and background colour."""
SHAPES = ("sphere", "box")
PATTERNS = ("none", "stripes", "checker")
SHADINGS = ("lambert", "albedo")
LAYOUTS = ("ring", "hemisphere")

LIGHT_DIR: Float[np.ndarray, "3"] = np.array([0.4, 0.3, 0.866]) / np.linalg.norm([0.4, 0.3, 0.866])
"""Direction towards the single directional light (world frame)."""
AMBIENT = 0.3
"""Lambert shading factor is ``AMBIENT + (1 - AMBIENT) * max(0, n . LIGHT_DIR)``."""
MAX_RESOLUTION = 4096
MAX_VIEWS = 10_000
MAX_RADIUS = 60.0  # keeps depth in millimetres inside uint16
BOUNDING_RADIUS = math.sqrt(3.0)  # the box's corners; the sphere is smaller
LABEL_BACKGROUND, LABEL_PRIMARY, LABEL_SECONDARY = 0, 1, 2
SCENE_FORMAT = "nerfstudio-distill-scene"


def _check_name(kind: str, value: str, valid: Sequence[str], flag: str) -> None:
    if value not in valid:
        raise SceneError(f"unknown {kind} {value!r}: set {flag} to one of {', '.join(valid)}")


def _check_range(name: str, value: float, low: float, high: float, flag: str) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and low <= value <= high):
        raise SceneError(f"{name} {value} is out of range: set {flag} between {low:.3g} and {high:.3g}")


def _check_whole(spec: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SceneError(f"{name} must be a whole number, got {value!r}: pass an integer")


@dataclass(frozen=True)
class SceneSpec:
    """What the object looks like; validated on construction."""

    shape: str = "sphere"
    """Object shape: sphere (radius 1) or box (half-size 1), centred at the origin."""
    colour: str = "red"
    """Primary colour name (see COLOURS)."""
    pattern: str = "none"
    """Surface pattern: none, stripes (meridian bands) or checker."""
    stripes: int = 4
    """Number of primary stripes around the equator (pattern=stripes); as many secondary ones between."""
    checks: int = 4
    """Checker density (pattern=checker): 2*checks cells around the equator, checks from pole to pole."""
    phase: float = 0.0
    """Azimuthal shift of the pattern, as a fraction of one stripe/checker period."""
    secondary: str = "white"
    """Colour name of the pattern's second colour."""
    background: str = "white"
    """Background colour name."""
    shading: str = "lambert"
    """lambert: fixed directional light plus ambient (view-independent); albedo: unshaded colours."""

    def __post_init__(self) -> None:
        _check_whole(self, ("stripes", "checks"))
        _check_name("shape", self.shape, SHAPES, "--shape")
        _check_name("pattern", self.pattern, PATTERNS, "--pattern")
        _check_name("shading", self.shading, SHADINGS, "--shading")
        for name in ("colour", "secondary", "background"):
            kind = "colour" if name == "colour" else f"{name} colour"
            _check_name(kind, getattr(self, name), tuple(COLOURS), f"--{name}")
        _check_range("stripe count", self.stripes, 1, 64, "--stripes")
        _check_range("checker count", self.checks, 1, 64, "--checks")
        _check_range("phase", self.phase, -1e6, 1e6, "--phase")


@dataclass(frozen=True)
class CameraSpec:
    """How the cameras are placed; validated on construction.  All cameras look at the origin."""

    layout: str = "ring"
    """ring: fixed elevation, evenly spaced azimuth from 0; hemisphere: seeded Fibonacci directions."""
    num_views: int = 24
    """Number of cameras."""
    radius: float = 4.5
    """Distance of every camera from the origin (must clear the object's bounding sphere, sqrt(3))."""
    fov: float = 50.0
    """Vertical field of view in degrees."""
    width: int = 64
    """Image width in pixels."""
    height: int = 64
    """Image height in pixels."""
    elevation: float = 20.0
    """Ring elevation above the xy-plane in degrees (ring layout only)."""
    seed: int = 0
    """Seed of the hemisphere layout's random offset and rotation (the ring ignores it)."""

    def __post_init__(self) -> None:
        _check_whole(self, ("num_views", "width", "height", "seed"))
        _check_name("layout", self.layout, LAYOUTS, "--layout")
        _check_range("number of views", self.num_views, 1, MAX_VIEWS, "--num-views")
        _check_range("width", self.width, 1, MAX_RESOLUTION, "--resolution (or --width)")
        _check_range("height", self.height, 1, MAX_RESOLUTION, "--resolution (or --height)")
        _check_range("radius", self.radius, 1.01 * BOUNDING_RADIUS, MAX_RADIUS, "--radius")
        _check_range("fov", self.fov, 1.0, 170.0, "--fov")
        _check_range("elevation", self.elevation, -89.0, 89.0, "--elevation")
        _check_range("seed", self.seed, 0, 2**32 - 1, "--seed")


@dataclass(frozen=True, eq=False)
class SceneCameras:
    """A batch of pinhole cameras sharing one set of intrinsics."""

    c2w: Float[np.ndarray, "n 4 4"]
    """Camera-to-world matrices, OpenGL convention (camera looks down -z, +y up)."""
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_poses(
        cls, c2w: Float[np.ndarray, "n 4 4"] | Float[np.ndarray, "4 4"], width: int, height: int, fov: float
    ) -> "SceneCameras":
        """Cameras at the given poses with a centred principal point and vertical ``fov`` in degrees."""
        focal = 0.5 * height / math.tan(math.radians(fov) / 2)
        c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
        return cls(c2w, focal, focal, width / 2, height / 2, int(width), int(height))

    def __len__(self) -> int:
        return len(self.c2w)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> "SceneCameras":
        c2w = self.c2w[index].reshape(-1, 4, 4)
        return dataclasses.replace(self, c2w=c2w)

    def to_nerfstudio(self) -> Any:
        """These cameras as ``nerfstudio.cameras.cameras.Cameras`` (in this raw world frame, i.e. before
        the dataparser's orientation/centring/scaling)."""
        import torch
        from nerfstudio.cameras.cameras import Cameras, CameraType

        return Cameras(
            camera_to_worlds=torch.from_numpy(self.c2w[:, :3, :4]).float(),
            fx=self.fx,
            fy=self.fy,
            cx=self.cx,
            cy=self.cy,
            width=self.width,
            height=self.height,
            camera_type=CameraType.PERSPECTIVE,
        )


def with_attributes(spec: SceneSpec, **changes: Any) -> SceneSpec:
    """The same scene with some attributes replaced, e.g. ``with_attributes(spec, colour="blue")``."""
    fields = [f.name for f in dataclasses.fields(SceneSpec)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise SceneError(f"unknown scene attribute(s) {', '.join(unknown)}: use any of {', '.join(fields)}")
    return dataclasses.replace(spec, **changes)


def look_at(
    eye: Float[np.ndarray, "3"],
    target: Float[np.ndarray, "3"] = np.zeros(3),
    up: Float[np.ndarray, "3"] = np.array([0.0, 0.0, 1.0]),
) -> Float[np.ndarray, "4 4"]:
    """OpenGL camera-to-world matrix of a camera at ``eye`` looking at ``target``."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    back = eye - target
    back = back / np.linalg.norm(back)
    right = np.cross(up, back)
    if np.linalg.norm(right) < 1e-8:  # looking along `up`: any perpendicular will do
        right = np.cross(np.array([0.0, 1.0, 0.0]), back)
    right = right / np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(back, right), back, eye
    return c2w


def camera_positions(camera_spec: CameraSpec) -> Float[np.ndarray, "n 3"]:
    """Camera centres of a layout (deterministic given the spec, including its seed)."""
    n = camera_spec.num_views
    if camera_spec.layout == "ring":
        azimuth = 2 * np.pi * np.arange(n) / n
        z = np.full(n, math.sin(math.radians(camera_spec.elevation)))
    else:  # Fibonacci lattice on the band z in [0.1, 0.95] of the unit hemisphere, randomly shifted
        rng = np.random.default_rng(camera_spec.seed)
        offset, rotation = rng.random(2)
        z = 0.1 + 0.85 * (np.arange(n) + offset) / n
        azimuth = 2 * np.pi * rotation + np.pi * (3 - math.sqrt(5)) * np.arange(n)
    ring = np.sqrt(1 - z**2)
    return camera_spec.radius * np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=-1)


def make_cameras(camera_spec: CameraSpec) -> SceneCameras:
    """The cameras of a layout, all looking at the origin with world +z up."""
    c2w = np.stack([look_at(p) for p in camera_positions(camera_spec)])
    return SceneCameras.from_poses(c2w, camera_spec.width, camera_spec.height, camera_spec.fov)


def _intersect(
    shape: str, origin: Float[np.ndarray, "3"], dirs: Float[np.ndarray, "r 3"]
) -> tuple[Float[np.ndarray, " r"], Bool[np.ndarray, " r"], Float[np.ndarray, "r 3"]]:
    """First hit ``t`` along (unnormalised) ``dirs``, whether there is one, and the unit surface normal."""
    if shape == "sphere":
        a = np.einsum("ri,ri->r", dirs, dirs)
        half_b = dirs @ origin
        disc = half_b**2 - a * (origin @ origin - 1.0)
        t = (-half_b - np.sqrt(np.maximum(disc, 0.0))) / a
        hit = (disc >= 0) & (t > 0)
        normal = origin + t[:, None] * dirs
    else:
        safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
        t1, t2 = (-1.0 - origin) / safe, (1.0 - origin) / safe
        t = np.minimum(t1, t2).max(axis=1)
        hit = (np.maximum(t1, t2).min(axis=1) >= t) & (t > 0)
        point = origin + t[:, None] * dirs
        axis = np.abs(point).argmax(axis=1)
        normal = np.zeros_like(point)
        normal[np.arange(len(point)), axis] = np.sign(point[np.arange(len(point)), axis])
    normal = normal / np.linalg.norm(normal, axis=1, keepdims=True).clip(1e-12)
    return np.where(hit, t, 0.0), hit, normal


def _pattern_is_secondary(spec: SceneSpec, points: Float[np.ndarray, "r 3"]) -> Bool[np.ndarray, " r"]:
    """Which surface points take the secondary colour."""
    if spec.pattern == "none":
        return np.zeros(len(points), dtype=bool)
    azimuth = np.arctan2(points[:, 1], points[:, 0]) / (2 * np.pi)  # in turns
    count = spec.stripes if spec.pattern == "stripes" else spec.checks
    cell = np.floor(2 * (count * azimuth - spec.phase)).astype(np.int64)
    if spec.pattern == "checker":
        polar = np.arccos(np.clip(points[:, 2] / np.linalg.norm(points, axis=1).clip(1e-12), -1, 1))
        cell += np.minimum(np.floor(polar / np.pi * count), count - 1).astype(np.int64)
    return cell % 2 == 1


def _render_view(spec: SceneSpec, cameras: SceneCameras, index: int) -> dict[str, np.ndarray]:
    c2w = cameras.c2w[index]
    u = (np.arange(cameras.width) + 0.5 - cameras.cx) / cameras.fx
    v = -(np.arange(cameras.height) + 0.5 - cameras.cy) / cameras.fy
    uu, vv = np.meshgrid(u, v)
    # Camera-space directions have z = -1, so the hit parameter t is the z-depth itself.
    dirs = np.stack([uu, vv, -np.ones_like(uu)], axis=-1).reshape(-1, 3) @ c2w[:3, :3].T
    origin = c2w[:3, 3]
    depth, hit, normal = _intersect(spec.shape, origin, dirs)
    secondary = _pattern_is_secondary(spec, origin + depth[:, None] * dirs)
    label = np.where(hit, np.where(secondary, LABEL_SECONDARY, LABEL_PRIMARY), LABEL_BACKGROUND)
    palette = np.array([COLOURS[spec.background], COLOURS[spec.colour], COLOURS[spec.secondary]])
    albedo = palette[label]
    shade = np.ones(len(dirs))
    if spec.shading == "lambert":
        shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT_DIR, 0.0, None)
    rgb = np.where(hit[:, None], albedo * shade[:, None], albedo)
    shape = (cameras.height, cameras.width)
    return {
        "rgb": rgb.reshape(*shape, 3).astype(np.float32),
        "depth": depth.reshape(shape).astype(np.float32),
        "mask": hit.reshape(shape),
        "albedo": albedo.reshape(*shape, 3).astype(np.float32),
        "label": label.reshape(shape).astype(np.uint8),
    }


def render(spec: SceneSpec, cameras: SceneCameras) -> dict[str, np.ndarray]:
    """Ray-trace the object exactly from every camera.

    Returns a dict of
        ``rgb``: Float[N, H, W, 3] in [0, 1] (background pixels are exactly the background colour),
        ``depth``: Float[N, H, W] z-depth along the camera axis, 0 on the background,
        ``mask``: Bool[N, H, W] object pixels,
        ``albedo``: Float[N, H, W, 3] unshaded colours (background colour outside the object),
        ``label``: UInt8[N, H, W] 0 background, 1 primary colour, 2 pattern's secondary colour.
    """
    views = [_render_view(spec, cameras, i) for i in range(len(cameras))]
    return {key: np.stack([view[key] for view in views]) for key in views[0]}


def to_uint8(rgb: Float[np.ndarray, "h w 3"]) -> UInt8[np.ndarray, "h w 3"]:
    """Float RGB in [0, 1] as the uint8 image ns-distill-scene writes."""
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise SceneError(f"output path {output_dir} is a file: choose a folder for --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise SceneError(
            f"output folder {output_dir} exists and is not empty: "
            "pass --overwrite or choose a new --output-dir"
        )


def generate_scene(
    output_dir: str | Path, spec: SceneSpec, camera_spec: CameraSpec, overwrite: bool = False
) -> Path:
    """Render the scene and write a nerfstudio-data dataset; returns the folder.

    Writes ``transforms.json`` (OPENCV intrinsics, OpenGL c2w per frame), ``images/frame_%05d.png``
    (RGB), ``depth/frame_%05d.png`` (16-bit z-depth in millimetres, 0 on the background) and
    ``scene.json`` (the specs, for :func:`load_scene`).  With ``overwrite`` only those files and folders
    are replaced; anything else in the folder is left alone.  Raises :class:`SceneError` before writing
    anything if an input is invalid.
    """
    output_dir = Path(output_dir)
    if not isinstance(spec, SceneSpec) or not isinstance(camera_spec, CameraSpec):
        raise SceneError("pass a SceneSpec and a CameraSpec")
    _check_output_dir(output_dir, overwrite)
    cameras = make_cameras(camera_spec)

    for stale in ("images", "depth"):
        shutil.rmtree(output_dir / stale, ignore_errors=True)
    (output_dir / "images").mkdir(parents=True)
    (output_dir / "depth").mkdir()
    frames = []
    for i in range(len(cameras)):
        view = _render_view(spec, cameras, i)
        name = f"frame_{i:05d}.png"
        Image.fromarray(to_uint8(view["rgb"])).save(output_dir / "images" / name)
        depth_mm = np.round(view["depth"].astype(np.float64) * 1000).astype(np.uint16)
        Image.fromarray(depth_mm).save(output_dir / "depth" / name)
        frames.append(
            {
                "file_path": f"images/{name}",
                "depth_file_path": f"depth/{name}",
                "transform_matrix": cameras.c2w[i].tolist(),
            }
        )
    transforms = {
        "camera_model": "OPENCV",
        "fl_x": cameras.fx,
        "fl_y": cameras.fy,
        "cx": cameras.cx,
        "cy": cameras.cy,
        "w": cameras.width,
        "h": cameras.height,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
    }
    scene = {
        "format": SCENE_FORMAT,
        "version": 1,
        "scene": dataclasses.asdict(spec),
        "cameras": dataclasses.asdict(camera_spec),
        "depth_unit": "millimetres, z-depth along the camera axis, 0 on background",
    }
    (output_dir / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n")
    (output_dir / "scene.json").write_text(json.dumps(scene, indent=2) + "\n")
    return output_dir


def load_specs(folder: str | Path) -> tuple[SceneSpec, CameraSpec]:
    """The specs stored in a generated scene's ``scene.json``."""
    path = Path(folder) / "scene.json"
    if not path.is_file():
        raise SceneError(f"{path} not found: point at a folder written by ns-distill-scene")
    meta = json.loads(path.read_text())
    if meta.get("format") != SCENE_FORMAT:
        raise SceneError(f"{path} is not a {SCENE_FORMAT} file: regenerate it with ns-distill-scene")
    return SceneSpec(**meta["scene"]), CameraSpec(**meta["cameras"])


def load_scene(folder: str | Path) -> tuple[SceneSpec, SceneCameras]:
    """The object spec and the exact cameras (from ``transforms.json``, in frame order) of a scene."""
    spec, _ = load_specs(folder)
    meta = json.loads((Path(folder) / "transforms.json").read_text())
    c2w = np.array([frame["transform_matrix"] for frame in meta["frames"]], dtype=np.float64)
    cameras = SceneCameras(c2w, meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], meta["w"], meta["h"])
    return spec, cameras


@dataclass
class SceneArgs:
    """Write a synthetic nerfstudio-data scene (transforms.json, images/, depth/, scene.json)."""

    output_dir: Path
    """Folder to write; must be missing or empty unless --overwrite."""
    shape: str = "sphere"
    """Object shape: sphere or box."""
    colour: str = "red"
    """Object colour: red, green, blue, yellow, orange, purple, pink, cyan, brown, white, gray, black."""
    pattern: str = "none"
    """Surface pattern: none, stripes or checker."""
    stripes: int = 4
    """Number of primary stripes around the equator (with --pattern stripes)."""
    checks: int = 4
    """Checker density: 2*checks cells around the equator (with --pattern checker)."""
    phase: float = 0.0
    """Azimuthal shift of the pattern as a fraction of one period."""
    secondary: str = "white"
    """Second colour of the pattern (a colour name)."""
    background: str = "white"
    """Background colour name."""
    shading: str = "lambert"
    """lambert (fixed light plus ambient) or albedo (unshaded)."""
    num_views: int = 24
    """Number of cameras."""
    resolution: int = 64
    """Image width and height in pixels (1 to 4096)."""
    width: int | None = None
    """Image width, overriding --resolution."""
    height: int | None = None
    """Image height, overriding --resolution."""
    layout: str = "ring"
    """Camera layout: ring (fixed elevation) or hemisphere (seeded Fibonacci directions)."""
    radius: float = 4.5
    """Camera distance from the origin."""
    fov: float = 50.0
    """Vertical field of view in degrees."""
    elevation: float = 20.0
    """Ring elevation in degrees."""
    seed: int = 0
    """Seed of the hemisphere layout."""
    overwrite: bool = False
    """Replace the scene files in a non-empty --output-dir."""

    def specs(self) -> tuple[SceneSpec, CameraSpec]:
        scene_fields = {f.name for f in dataclasses.fields(SceneSpec)}
        camera_fields = {f.name for f in dataclasses.fields(CameraSpec)} - {"width", "height"}
        args = dataclasses.asdict(self)
        width = self.resolution if self.width is None else self.width
        height = self.resolution if self.height is None else self.height
        return (
            SceneSpec(**{k: v for k, v in args.items() if k in scene_fields}),
            CameraSpec(**{k: v for k, v in args.items() if k in camera_fields}, width=width, height=height),
        )


def main(args: SceneArgs) -> Path:
    spec, camera_spec = args.specs()
    folder = generate_scene(args.output_dir, spec, camera_spec, overwrite=args.overwrite)
    print(f"wrote {camera_spec.num_views} views of a {spec.colour} {spec.shape} to {folder}")
    return folder


def entrypoint() -> None:
    """``ns-distill-scene``: parse the command line, write the scene, report bad input in one line."""
    import tyro

    args = tyro.cli(SceneArgs, prog="ns-distill-scene")
    try:
        main(args)
    except SceneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entrypoint()
