"""Text-to-3D (sds-nerfacto, sdi-nerfacto): random cameras, the model, the pipeline, bad input, the CLI
(train -> resume -> ns-export pointcloud/tsdf) and a small scored run with the exact prior."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from benchmarks.text_to_3d_quality import HEMISPHERE_ELEVATION, write_view_prior_set
from nerfstudio_distill.data.random_cameras import RandomCamerasConfig, check_camera_config
from nerfstudio_distill.data.scene import CameraSpec, SceneSpec
from nerfstudio_distill.guidance.common import GuidanceOutput
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.models.text_to_3d import LAMBERTIAN, TEXTURELESS, TextTo3DModelConfig
from nerfstudio_distill.pipelines.text_to_3d import (
    TextTo3DPipelineConfig,
    check_prior_takes,
    check_text_to_3d,
    view_name,
)
from nerfstudio_distill.pipelines.trainer import DistillError
from nerfstudio_distill.priors.base import Condition, Prior, camera_condition
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from tests.conftest import (
    CPU_NERFACTO,
    TINY_FIELD_SETTINGS,
    assert_error_line,
    ns_export,
    ns_export_main,
    ns_train_here,
    ns_train_main,
    run_here,
)

RED, BLUE = "a red striped ball", "a blue striped ball"
RES, RADIUS, FOV = 16, 4.0, 40.0


def one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.fixture(scope="module")
def prior_set(tmp_path_factory) -> Path:
    """Exact prior of a red and a blue striped ball: 40 hemisphere views each, labelled by view."""
    folder = tmp_path_factory.mktemp("t2d_prior")
    cameras = CameraSpec(layout="hemisphere", num_views=40, radius=RADIUS, fov=FOV, width=RES, height=RES)
    spec = SceneSpec(colour="red", pattern="stripes", stripes=3)
    return write_view_prior_set(folder, spec, cameras, {RED: {}, BLUE: {"colour": "blue"}})


def tiny_model(**changes) -> TextTo3DModelConfig:
    config = TextTo3DModelConfig(
        **TINY_FIELD_SETTINGS,
        eval_num_rays_per_chunk=4096,
        shading_start=0,
    )
    return dataclasses.replace(config, **changes)


def cameras(**changes) -> RandomCamerasConfig:
    config = RandomCamerasConfig(
        radius=(RADIUS, RADIUS),
        fov=(FOV, FOV),
        elevation=HEMISPHERE_ELEVATION,
        resolutions=(RES,),
        num_views=2,
        num_eval_views=6,
    )
    return dataclasses.replace(config, **changes)


def t2d_config(prior_folder: Path, method: str = "sds", **changes) -> TextTo3DPipelineConfig:
    config = TextTo3DPipelineConfig(
        datamanager=cameras(),
        model=tiny_model(),
        prompt=RED,
        guidance=GuidanceConfig(method=method, guidance_scale=1.0, num_inversion_steps=2),
        prior=PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior_folder)),
        prior_resolution=None,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture
def pipeline(prior_set):
    pipe = t2d_config(prior_set).setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    return pipe


def datamanager(**changes):
    return cameras(**changes).setup(device="cpu", test_mode="val")


def field_grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.model.field.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ cameras
def test_views_follow_the_ranges_and_look_at_the_origin():
    dm = datamanager(elevation=(-30.0, 10.0), radius=(2.5, 3.0), fov=(30.0, 60.0), num_views=64)
    views = dm.sample_views(step=100, generator=torch.Generator().manual_seed(0))
    assert len(views) == 64 and views.resolution == RES
    assert views.elevation.min() >= -30 - 1e-4 and views.elevation.max() <= 10 + 1e-4
    assert (views.elevation < 0).any()  # below the horizon
    distance = views.cameras.camera_to_worlds[:, :3, 3].norm(dim=-1)
    assert distance.min() >= 2.5 - 1e-5 and distance.max() <= 3.0 + 1e-5
    fov = 2 * torch.rad2deg(torch.atan(0.5 * RES / views.cameras.fy[:, 0]))
    assert fov.min() >= 30 - 1e-3 and fov.max() <= 60 + 1e-3
    rays = views.rays()
    assert rays.shape == (64, RES, RES)
    # the mean direction of the central pixels points from the camera to the origin
    centre = rays.directions[:, RES // 2 - 1 : RES // 2 + 1, RES // 2 - 1 : RES // 2 + 1].mean((1, 2))
    to_origin = -rays.origins[:, 0, 0] / rays.origins[:, 0, 0].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(torch.nn.functional.normalize(centre, dim=-1), to_origin, atol=1e-4, rtol=0)


def test_azimuth_warmup_widens_from_the_front():
    dm = datamanager(azimuth_warmup=100, num_views=200)
    rng = torch.Generator().manual_seed(0)
    assert dm.sample_views(0, rng).azimuth.abs().max() < 1e-3
    half = dm.sample_views(50, rng).azimuth.abs()
    assert 60 < half.max() <= 90 + 1e-3
    assert dm.sample_views(100, rng).azimuth.abs().max() > 160
    assert dm.sample_views(None, rng).azimuth.abs().max() > 160  # export/eval: the full range


def test_resolution_schedule():
    dm = datamanager(resolutions=(16, 24, 32), resolution_milestones=(10, 20))
    assert [dm.resolution_at(s) for s in (0, 9, 10, 19, 20, 1000)] == [16, 16, 24, 24, 32, 32]
    assert dm.sample_views(15).rays().shape == (2, 24, 24)


def test_what_the_exporters_use():
    dm = datamanager()
    dm.train_pixel_sampler.num_rays_per_batch = 300  # as ns-export pointcloud sets it
    rays, batch = dm.next_train(0)
    assert rays.shape == (300,) and batch["elevation"].shape == (300,)
    outputs = dm.train_dataset._dataparser_outputs
    assert len(outputs.cameras) == len(dm.train_dataset) == 6
    assert outputs.scene_box.aabb.tolist() == [[-1, -1, -1], [1, 1, 1]]
    assert dm.train_dataparser_outputs.dataparser_scale == 1.0
    assert dm.train_dataset[0]["image"].shape == (RES, RES, 3)
    camera, batch = dm.next_eval_image(0)
    assert camera.shape == (1,) and batch["image_idx"] == 0


def test_view_names():
    assert view_name(10, 0) == "front" and view_name(10, 44) == "front"
    assert view_name(10, 90) == "side" and view_name(10, -90) == "side"
    assert view_name(10, 180) == "back" and view_name(10, -170) == "back"
    assert view_name(70, 0) == "overhead" and view_name(-70, 0) == "front"


# ----------------------------------------------------------------- pipeline
def test_step_moves_the_field_with_view_prompts(pipeline):
    _, losses, metrics = pipeline.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    grads = field_grads(pipeline)
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    assert torch.isfinite(metrics["guidance_grad_norm"])
    used = [p for p in pipeline.prior._embedding_cache if p]
    assert used and all(p.startswith(RED + ", ") and p.endswith(" view") for p in used)
    assert {"guidance", "interlevel_loss", "distortion_loss", "orientation_loss", "opacity_loss"} <= set(
        losses
    )


@pytest.mark.parametrize("method", ["sds", "sdi"])
def test_a_prior_that_takes_cameras_gets_each_views_c2w(prior_set, monkeypatch, method):
    """Every prior call of a step (SDI's inversion too) carries the rendered views' cameras, encoded by
    camera_condition, with the prompt of each view; one prior call per view prompt and network step."""
    pipe = t2d_config(prior_set, method=method, datamanager=cameras(num_views=4)).setup(
        device="cpu", test_mode="val"
    )
    pipe.start_edit(0, 10)
    prior, drawn, seen = pipe.prior, [], []
    sample_views, predict_noise = pipe.datamanager.sample_views, prior.predict_noise

    def record_views(*args, **kwargs):
        drawn.append(sample_views(*args, **kwargs))
        return drawn[-1]

    def record_conditions(x_t, t, conditions, guidance_scale=None):
        seen.extend(conditions)
        return predict_noise(x_t, t, [c.prompt for c in conditions], guidance_scale)

    monkeypatch.setattr(pipe.datamanager, "sample_views", record_views)
    monkeypatch.setattr(prior, "predict_noise", record_conditions)
    monkeypatch.setattr(prior, "takes_camera", True)
    pipe.get_train_loss_dict(step=2)
    (views,) = drawn
    prompts = pipe.prompts_of(views, RED)
    expected = camera_condition(views.cameras.camera_to_worlds)
    assert expected.shape == (4, 12)
    calls_per_prompt = 1 + (2 if method == "sdi" else 0)  # SDI: 2 inversion steps, then the ε̂ at t
    assert len(seen) == calls_per_prompt * len(set(prompts))
    for condition in seen:
        assert isinstance(condition, Condition)
        index = [i for i, p in enumerate(prompts) if p == condition.prompt]
        torch.testing.assert_close(condition.camera, expected[index], rtol=0, atol=0)
    torch.testing.assert_close(
        expected[0].reshape(3, 4), views.cameras.camera_to_worlds[0, :3, :4].float(), rtol=0, atol=0
    )


def test_a_prior_without_cameras_gets_the_prompt_alone(pipeline, monkeypatch):
    seen = []
    predict_noise = pipeline.prior.predict_noise

    def record(x_t, t, conditions, guidance_scale=None):
        seen.extend(conditions)
        return predict_noise(x_t, t, conditions, guidance_scale)

    monkeypatch.setattr(pipeline.prior, "predict_noise", record)
    pipeline.get_train_loss_dict(step=0)
    assert seen and all(isinstance(c, str) for c in seen)


@pytest.fixture(scope="module")
def camera_prior_set(tmp_path_factory) -> Path:
    """The red ball of prior_set (same cameras, labels and images) with each image's camera stored."""
    folder = tmp_path_factory.mktemp("t2d_camera_prior")
    cameras = CameraSpec(layout="hemisphere", num_views=40, radius=RADIUS, fov=FOV, width=RES, height=RES)
    spec = SceneSpec(colour="red", pattern="stripes", stripes=3)
    return write_view_prior_set(folder, spec, cameras, {RED: {}}, cameras=True, camera_sigma=10.0)


@pytest.mark.parametrize("method", ["sds", "sdi"])
def test_a_camera_conditioned_prior_changes_the_step(
    prior_set, camera_prior_set, method, deterministic_kernels
):
    """A step with the camera-conditioned exact prior gets the rendered views' cameras and a gradient that
    differs from the plain prior's on the same images; the plain prior's step is reproducible (so the
    difference is the camera's)."""

    def step(folder: Path, record: list | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        pipe = t2d_config(folder, method=method).setup(device="cpu", test_mode="val")
        pipe.start_edit(0, 10)
        if record is not None:
            predict_noise = pipe.prior.predict_noise
            pipe.prior.predict_noise = lambda x, t, c, g=None: (record.extend(c), predict_noise(x, t, c, g))[
                1
            ]
            sample_views = pipe.datamanager.sample_views
            pipe.datamanager.sample_views = lambda *a, **k: (
                record.append(sample_views(*a, **k)),
                record[-1],
            )[1]
        _, losses, _ = pipe.get_train_loss_dict(step=1)
        sum(losses.values()).backward()
        return field_grads(pipe)

    plain, again, seen = step(prior_set), step(prior_set), []
    conditioned = step(camera_prior_set, seen)
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert any(not torch.allclose(plain[k], conditioned[k]) for k in plain)
    views, conditions = seen[0], seen[1:]
    assert conditions and all(isinstance(c, Condition) for c in conditions)
    sent = torch.cat([c.camera for c in conditions]).unique(dim=0)
    torch.testing.assert_close(sent, camera_condition(views.cameras.camera_to_worlds).unique(dim=0))


def test_sdi_step(prior_set):
    pipe = t2d_config(prior_set, method="sdi").setup(device="cpu", test_mode="val")
    pipe.start_edit(0, 10)
    _, losses, metrics = pipe.get_train_loss_dict(step=3)
    sum(losses.values()).backward()
    assert torch.isfinite(metrics["guidance_grad_norm"]) and field_grads(pipe)


def test_live_prompt_and_t_range_from_the_panel(pipeline):
    pipeline.get_train_loss_dict(step=0)
    panel = pipeline.Distillation
    panel.prompt.value = BLUE  # as typed in the viewer's Distillation panel
    panel.t_min.value, panel.t_max.value = 0.30, 0.31
    pipeline.get_train_loss_dict(step=1)
    assert any(p.startswith(BLUE) for p in pipeline.prior._embedding_cache)
    assert all(290 <= t <= 310 for t in eval(panel.t.value))
    assert BLUE in panel.views.value


def test_viewer_t_range_leaves_the_run_config_alone(pipeline):
    pipeline.Distillation.t_min.value, pipeline.Distillation.t_max.value = 0.30, 0.31
    pipeline.get_train_loss_dict(step=0)
    live, given = pipeline.guidance.config.timesteps, pipeline.config.guidance.timesteps
    assert (live.min_fraction, live.max_fraction) == (0.30, 0.31)
    assert (given.min_fraction, given.max_fraction) == (0.02, 0.98)


def test_a_prompt_being_typed_keeps_the_current_one(pipeline):
    pipeline.Distillation.prompt.value = BLUE[:5]  # the viewer sends every keystroke
    with pytest.warns(RuntimeWarning, match="keeping the prompt"):
        pipeline.get_train_loss_dict(step=0)  # the exact prior knows no such prompt: no crash
    assert all(p.startswith(RED + ", ") for p in pipeline.Distillation.views.value.split("; "))
    pipeline.Distillation.prompt.value = BLUE  # typing finished
    pipeline.get_train_loss_dict(step=1)
    assert all(p.startswith(BLUE + ", ") for p in pipeline.Distillation.views.value.split("; "))


def test_two_pass_render_gives_the_single_pass_gradient(prior_set):
    grads, reference = [], None
    for chunk in (1 << 20, 100):  # one pass with autograd, then render + chunked backpropagation
        pipe = t2d_config(prior_set, chunk_size=chunk).setup(device="cpu", test_mode="val")
        if reference is None:
            reference = {k: v.clone() for k, v in pipe.model.state_dict().items()}
        pipe.model.load_state_dict(reference)
        pipe.model.eval()  # deterministic sampling, so both passes see the same samples
        pipe.start_edit(0, 10)
        _, losses, _ = pipe.get_train_loss_dict(step=3)
        sum(losses.values()).backward()
        grads.append(field_grads(pipe))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6)


def test_nan_guidance_skips_the_step(pipeline, monkeypatch):
    def nan_guidance(self, prior, x0, prompt, **kwargs):
        grad = torch.full_like(x0, float("nan"))
        return GuidanceOutput(grad=grad, loss=(x0 * grad).sum(), t=torch.tensor([500] * len(x0)))

    monkeypatch.setattr(GuidanceConfig, "__call__", nan_guidance)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _, losses, _ = pipeline.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    assert all(torch.isfinite(g).all() and not g.any() for g in field_grads(pipeline).values())


def test_prior_is_not_in_the_checkpoint_and_not_loaded_for_export(pipeline, tmp_path):
    keys = pipeline.state_dict().keys()
    assert not any("points" in k or "prior" in k for k in keys)
    assert "_model.blob_strength" in keys  # a faded blob stays faded in exports and resumed runs
    export = t2d_config(tmp_path / "no-such-prior").setup(device="cpu", test_mode="test")
    with pytest.raises(DistillError, match="only loaded for training"):
        export.prior  # noqa: B018


# -------------------------------------------------------------------- model
def test_shading_modes_and_backgrounds(pipeline):
    model = pipeline.model
    model.eval()
    views = pipeline.datamanager.sample_views(None, torch.Generator().manual_seed(1), num_views=1)
    rays = views.rays().flatten()
    n, light = len(rays), torch.tensor([0.0, 0.0, 1.0])
    from nerfstudio_distill.models.text_to_3d import ALBEDO, shading_metadata

    def train_rgb(mode, background=None):
        rays.metadata["shading"] = shading_metadata(n, mode, light, background)
        return model(rays)["train_rgb"].detach()

    out = model(rays)
    albedo = train_rgb(ALBEDO)
    torch.testing.assert_close(albedo, out["rgb"].detach())  # albedo over the model's own background
    assert not torch.allclose(train_rgb(LAMBERTIAN), albedo)
    textureless = train_rgb(TEXTURELESS, torch.tensor([0.0, 1.0, 0.0]))
    acc = out["accumulation"].detach()
    # textureless is grey (r = g = b) on the object; the green background shows where it is empty
    empty = acc[:, 0] < 0.01
    assert empty.any() and torch.allclose(textureless[empty], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    rgba = model.get_rgba_image(out)
    torch.testing.assert_close(rgba[..., 3:], acc.clamp(0, 1))  # exports keep only the object


def test_regularisers_are_applied_once(pipeline):
    outputs, losses, _ = pipeline.get_train_loss_dict(step=0)
    acc = outputs["accumulation"]
    cfg = pipeline.model.config
    expected = cfg.opacity_loss_mult * (acc**2 + 0.01).sqrt().mean()
    torch.testing.assert_close(losses["opacity_loss"], expected)
    expected = cfg.orientation_loss_mult * outputs["rendered_orientation_loss"].mean()
    torch.testing.assert_close(losses["orientation_loss"], expected)
    assert sum("opacity" in k for k in losses) == 1 and sum("orientation" in k for k in losses) == 1


def test_blob_fades_with_the_callback(pipeline):
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    model = pipeline.model
    centre = torch.zeros(1, 3)
    assert float(model.blob(centre)) == pytest.approx(model.config.blob_density)
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(None, None, pipeline, None))
    for cb in callbacks:
        cb.run_callback_at_location(
            model.config.blob_taper[1], TrainingCallbackLocation.BEFORE_TRAIN_ITERATION
        )
    assert float(model.blob_strength) == 0 and float(model.blob(centre)) == 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"radius": (0.0, 3.0)}, ["radius must be > 0"]),
        ({"radius": (-1.0, -1.0)}, ["radius must be > 0"]),
        ({"radius": (4.0, 3.0)}, ["backwards", "--pipeline.datamanager.radius 3 4"]),
        ({"fov": (0.0, 40.0)}, ["inside (0, 180)"]),
        ({"fov": (40.0, 180.0)}, ["inside (0, 180)"]),
        ({"elevation": (60.0, -10.0)}, ["backwards", "--pipeline.datamanager.elevation -10 60"]),
        ({"azimuth": (90.0, -90.0)}, ["backwards", "--pipeline.datamanager.azimuth -90 90"]),
        ({"resolutions": (64, 128), "resolution_milestones": ()}, ["resolution-milestones"]),
        ({"data": Path("scene")}, ["drop --data"]),
    ],
    ids=[
        "radius-0",
        "radius-negative",
        "radius-backwards",
        "fov-0",
        "fov-180",
        "elevation",
        "azimuth",
        "milestones",
        "data",
    ],
)
def test_bad_cameras_are_one_line(changes, needles):
    with pytest.raises(DistillError) as err:
        check_camera_config(cameras(**changes))
    one_line(err, *needles)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_missing_prompt_is_one_line(prior_set, prompt):
    with pytest.raises(DistillError) as err:
        check_text_to_3d(t2d_config(prior_set, prompt=prompt))
    one_line(err, "--pipeline.prompt")


def test_edit_guidance_is_refused(prior_set):
    with pytest.raises(DistillError) as err:
        check_text_to_3d(t2d_config(prior_set, guidance=GuidanceConfig(method="pds")))
    one_line(err, "use sds or sdi")


def test_resolution_the_exact_prior_cannot_take(prior_set):
    config = t2d_config(prior_set, datamanager=cameras(resolutions=(24,)))
    with pytest.raises(DistillError) as err:
        config.setup(device="cpu", test_mode="val")
    one_line(err, "16x16", "--pipeline.datamanager.resolutions 16")


def test_prompt_the_exact_prior_does_not_know(prior_set):
    with pytest.raises(DistillError) as err:
        t2d_config(prior_set, prompt="a green cube").setup(device="cpu", test_mode="val")
    one_line(err, "'a green cube, front view'")


class _LatentPrior(Prior):
    """Stands in for Stable Diffusion (no weights needed to check sizes)."""

    def encode(self, images):
        return images

    def _embed(self, prompt):
        return torch.zeros(1)

    def _eps(self, x_t, t, conds):
        return torch.zeros_like(x_t)


def test_resolution_stable_diffusion_cannot_take(prior_set):
    from nerfstudio_distill.priors.base import scaled_linear_betas

    prior = _LatentPrior(scaled_linear_betas(), 7.5)
    check_prior_takes(prior, t2d_config(prior_set, prior_resolution=512), [None])  # fine
    with pytest.raises(DistillError) as err:
        check_prior_takes(
            prior,
            t2d_config(prior_set, prior_resolution=None, datamanager=cameras(resolutions=(60,))),
            [None],
        )
    one_line(err, "divisible by 8", "--pipeline.prior-resolution 512")


# ----------------------------------------------------------------------- CLI
# ns-train and ns-export (their own parsing and main) in this process; tests/test_edit_cli.py runs one
# ns-train as a real process.
TINY = [
    "--pipeline.model.hidden-dim", "16",
    "--pipeline.model.hidden-dim-color", "16",
    "--pipeline.model.num-levels", "4",
    "--pipeline.model.log2-hashmap-size", "12",
    "--pipeline.model.num-nerf-samples-per-ray", "16",
    "--pipeline.model.num-proposal-samples-per-ray", "16", "8",
]  # fmt: skip


def ns_train(
    method: str, out: Path, prior: Path, *flags: str, steps: int = 2, prompt: str | None = RED
) -> list[str]:
    return [
        "ns-train", method, *CPU_NERFACTO, *TINY,
        "--max-num-iterations", str(steps), "--output-dir", str(out), "--timestamp", "run",
        *(["--pipeline.prompt", prompt] if prompt is not None else []),
        "--pipeline.prior.kind", "exact", "--pipeline.prior.exact.folder", str(prior),
        "--pipeline.prior-resolution", "None",
        "--pipeline.datamanager.resolutions", str(RES),
        "--pipeline.datamanager.radius", str(RADIUS), str(RADIUS),
        "--pipeline.datamanager.fov", str(FOV), str(FOV),
        "--pipeline.datamanager.elevation", "6", "70",
        "--pipeline.datamanager.num-eval-views", "8",
        "--pipeline.model.shading-start", "0",
        *flags,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sds-nerfacto", "sdi-nerfacto"])
def test_train_resume_and_export(prior_set, tmp_path, method, capsys):
    out = tmp_path / "out"
    run_here(ns_train_main, ns_train(method, out, prior_set, "--steps-per-save", "2"))
    run = out / "unnamed" / method / "run"
    (ckpt,) = (run / "nerfstudio_models").glob("step-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["pipeline"]
    assert not any("prior" in k or "points" in k for k in state)  # the prior's images are not inside
    if method == "sdi-nerfacto":
        return  # one export round-trip is enough; sdi differs only in guidance
    # a resume runs the steps left of the planned total (raised here from 2 to 6: steps 2 to 5)
    resume = ns_train(
        method, tmp_path / "resumed", prior_set, "--load-dir", str(run / "nerfstudio_models"), steps=6
    )
    capsys.readouterr()
    run_here(ns_train_main, resume)
    assert "4 of the 6 planned steps are left" in capsys.readouterr().out
    (last,) = (tmp_path / "resumed").rglob("step-*.ckpt")
    assert last.name == "step-000000005.ckpt"  # continued from step 2, not from 0
    for exporter, extra, produced in [
        ("pointcloud", ["--num-points", "256", "--normal-method", "open3d"], "point_cloud.ply"),
        ("tsdf", ["--resolution", "32", "--batch-size", "4", "--texture-method", "tsdf"], "tsdf_mesh.ply"),
        (
            "poisson",
            ["--num-points", "2000", "--normal-method", "model_output", "--texture-method", "point_cloud"],
            "poisson_mesh.ply",
        ),
    ]:
        target = tmp_path / exporter
        run_here(ns_export_main, ns_export(exporter, run, target, *extra))
        assert (target / produced).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--pipeline.prompt", ""], ["--pipeline.prompt"]),
        (None, ["needs a prompt", "--pipeline.prompt"]),
        (["--pipeline.datamanager.radius", "0", "3"], ["radius must be > 0"]),
        (["--pipeline.datamanager.fov", "40", "180"], ["inside (0, 180)"]),
        (["--pipeline.datamanager.elevation", "70", "6"], ["backwards", "elevation 6 70"]),
        (["--pipeline.datamanager.resolutions", "24"], ["--pipeline.datamanager.resolutions 16"]),
    ],
    ids=["empty-prompt", "missing-prompt", "radius", "fov", "elevation-backwards", "resolution"],
)
def test_bad_input_is_one_line_on_the_cli(prior_set, tmp_path, flags, needles):
    out = tmp_path / "out"
    args = ns_train("sds-nerfacto", out, prior_set, *(flags or []), prompt=RED if flags else None)
    assert_error_line(ns_train_here(args), *needles)
    assert not list(out.rglob("*.ckpt"))


def test_sds_nerfacto_needs_no_data():
    from method_configs.sds_nerfacto import sds_nerfacto

    config = sds_nerfacto.config
    assert config.pipeline.datamanager.data is None and not config.require_load_dir
    assert config.pipeline.guidance.timesteps.anneal != "constant"  # generfacto never anneals t
    assert max(config.pipeline.datamanager.resolutions) > 64 and config.pipeline.datamanager.num_views > 1
    assert config.pipeline.datamanager.elevation[0] < 0  # below the horizon too
    assert math.isclose(config.pipeline.model.opacity_loss_mult, 1e-3)


@pytest.mark.slow
def test_load_dir_of_another_method_is_one_line(prior_set, base_run, tmp_path):
    out = tmp_path / "out"
    args = ns_train("sds-nerfacto", out, prior_set, "--load-dir", str(base_run))
    assert_error_line(ns_train_here(args), "is a nerfacto run", "drop --load-dir")
    assert not out.exists() or not list(out.rglob("*.ckpt"))


# ------------------------------------------------------------- scored, small
@pytest.mark.slow
def test_small_scored_run_improves_on_the_initial_blob():
    """benchmarks/text_to_3d_quality.py at 16 px (200 prior views, 300 steps): both methods must beat
    the untrained field (its density blob alone) by a margin, and SDI must not fall behind SDS."""
    from benchmarks.text_to_3d_quality import Settings, run

    small = Settings(resolution=16, num_prior_views=200, num_test_views=8, steps=300)
    results = run(small)
    untrained = results["untrained"]
    print(results)  # shown with -rP and on failure
    assert untrained["psnr"] < 13  # measured 12.28: the blob alone
    for method in ("sds", "sdi"):
        assert results[method]["psnr"] > untrained["psnr"] + 1.2  # measured +2.0 (sds), +2.5 (sdi)
        assert results[method]["mask_iou"] > 0.6  # measured 0.77 (sds), 0.84 (sdi)
    assert results["sdi"]["psnr"] > results["sds"]["psnr"] - 0.3  # measured 14.78 vs 14.31


@pytest.mark.slow
def test_small_scored_run_with_the_camera_prior():
    """The same 16 px run for SDS with --prior camera near its nearest-camera limit (κ 0.9°, a tenth of the
    200-view set's spacing): the views agree on one ball, so it must beat the untrained field by more than
    the view-prompt prior does (measured +3.86 dB against +2.03 with view prompts alone; about 30 s)."""
    from benchmarks.text_to_3d_quality import Settings, run

    small = Settings(
        resolution=16, num_prior_views=200, num_test_views=8, steps=300, prior="camera", camera_sigma=0.9
    )
    results = run(small, methods=("sds",))
    print(results)  # shown with -rP and on failure
    assert results["sds"]["psnr"] > results["untrained"]["psnr"] + 3.0  # measured 16.14 vs 12.28
