"""Editing Gaussian splats (pds-splatfacto, dds-splatfacto, sds-splatfacto): the edit pipeline with
EditSplatfactoModel, in process; then (slow) through nerfstudio's real CLIs: ns-train splatfacto -> ns-train
pds-splatfacto -> resume -> ns-export gaussian-splat, and bad --load-dir bases."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers

from method_configs._edit import GUIDANCE_EDITS, REPRESENTATIONS
from method_configs.guided_edits import METHODS, pds_splatfacto
from nerfstudio_distill.guidance.config import method_names
from nerfstudio_distill.pipelines.edit import check_state_matches
from nerfstudio_distill.pipelines.trainer import DistillError, check_load_dir
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from tests.conftest import (
    TINY_SPLAT_SETTINGS,
    assert_error_line,
    ns_export,
    ns_export_main,
    ns_train_here,
    ns_train_main,
    run_here,
)
from tests.test_edit import SOURCE, TARGET, fake_run, one_line

"""A few hundred Gaussians of SH degree 1 (the base's are loaded over them in the CLI runs)."""


def splat_config(scene: Path, prior_folder: Path, **changes):
    """pds-splatfacto's pipeline config on ``scene`` with the exact prior (as ns-train builds it)."""
    config = copy.deepcopy(pds_splatfacto.config.pipeline)
    config.datamanager.dataparser.data = scene
    config.model = dataclasses.replace(config.model, **TINY_SPLAT_SETTINGS)
    config.target_prompt, config.source_prompt = TARGET, SOURCE
    config.prior = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior_folder))
    config.prior_resolution = None
    return dataclasses.replace(config, **changes)


@pytest.fixture
def pipeline(tiny_scene, prior_folder):
    pipe = splat_config(tiny_scene, prior_folder).setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    return pipe


# ----------------------------------------------------------------------- methods
def test_every_guidance_edit_exists_for_every_representation():
    """One table makes the methods: representation x edit guidance; each registered in pyproject.toml."""
    from tests.test_registry import DECLARED

    assert set(GUIDANCE_EDITS) == set(method_names(edits=True))
    names = {f"{g}-{rep.suffix}" for rep in REPRESENTATIONS.values() for g in method_names(edits=True)}
    assert set(METHODS) == names and {"pds-splatfacto", "dds-splatfacto", "sds-splatfacto"} <= names
    assert all(DECLARED[name] == f"method_configs.guided_edits:{name.replace('-', '_')}" for name in names)
    for name, spec in METHODS.items():
        splats = name.endswith("-splatfacto")
        assert spec.config.pipeline.base_method == ("splatfacto" if splats else "nerfacto")
        assert spec.config.pipeline.guidance.method == name.split("-")[0]


# ------------------------------------------------------------------------- steps
def test_step_moves_the_gaussians_not_the_cameras(tiny_scene, prior_folder):
    config = splat_config(tiny_scene, prior_folder)
    config.model.camera_optimizer = CameraOptimizerConfig(mode="SO3xR3")  # a base that refined its poses
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    count = pipe.model.num_points
    _, losses, metrics = pipe.get_train_loss_dict(step=0)
    assert set(losses) == {"guidance"}  # no regulariser for splats
    sum(losses.values()).backward()
    for name in ("means", "scales", "quats", "features_dc", "opacities"):
        grad = pipe.model.gauss_params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert pipe.model.camera_optimizer.pose_adjustment.grad is None
    assert torch.isfinite(metrics["guidance_grad_norm"]) and metrics["psi"] > 0
    assert pipe.model.num_points == count


def test_a_crop_is_a_slice_of_the_whole_render(pipeline):
    camera = pipeline.datamanager.view_camera(3, 0.5)
    whole = pipeline._render_camera(camera, None)["rgb"]
    assert whole.shape == (24, 24, 3)
    cut = pipeline._render_camera(camera, (5, 7, 10, 12))["rgb"]
    torch.testing.assert_close(cut, whole[5:15, 7:19])


def test_guidance_renders_use_the_viewers_background(pipeline):
    """splatfacto's training renders draw a random background; the guidance sees the viewer's."""
    with torch.no_grad():
        pipeline.model.gauss_params["opacities"].fill_(-20.0)  # nothing visible: only background
    camera = pipeline.datamanager.view_camera(0, 0.25)
    for _ in range(2):
        rgb = pipeline._render_camera(camera, None)["rgb"]
        torch.testing.assert_close(rgb, pipeline.model.background_color.expand_as(rgb))


def test_viewer_outputs_show_the_source_next_to_the_edit(pipeline):
    camera = pipeline.datamanager.train_dataset.cameras[0:1]
    pipeline.model.eval()  # as the viewer renders
    before = pipeline.model.get_outputs_for_camera(camera)
    with torch.no_grad():  # stands in for edit steps
        pipeline.model.gauss_params["features_dc"].add_(0.5)
    after = pipeline.model.get_outputs_for_camera(camera)
    torch.testing.assert_close(after["source_rgb"], before["rgb"])
    assert not torch.allclose(after["rgb"], before["rgb"])
    assert not any("_source" in k for k in pipeline.state_dict())


def test_nan_render_skips_the_step(pipeline):
    with torch.no_grad():
        pipeline.model.gauss_params["features_dc"][:] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _, losses, _ = pipeline.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in pipeline.model.parameters())


# ---------------------------------------------------------------------- loading
def test_a_base_with_another_number_of_gaussians_loads(pipeline):
    """splatfacto's checkpoints hold however many Gaussians training left; the shape check allows that
    number to differ (and the model resizes), but nothing else."""
    state = {f"_model.{k}": v.clone() for k, v in pipeline.model.state_dict().items()}
    for name in pipeline.model.gauss_params:
        key = f"_model.gauss_params.{name}"
        state[key] = torch.cat([state[key], state[key][:50]])
    state["edit_start_step"] = torch.tensor(-1)
    pipeline.load_state_dict(state)
    assert pipeline.model.num_points == 350
    torch.testing.assert_close(pipeline.model.means, state["_model.gauss_params.means"])

    other_sh = dict(state)
    other_sh["_model.gauss_params.features_rest"] = torch.zeros(350, 8, 3)  # SH degree 2, not 1
    with pytest.raises(DistillError) as err:
        pipeline.load_state_dict(other_sh)
    one_line(err, "gauss_params.features_rest is [350, 8, 3] in the checkpoint but [350, 3, 3] here")


def test_only_the_gaussian_count_may_differ():
    have = {"gauss_params.means": torch.zeros(10, 3), "other": torch.zeros(4)}
    more = {"gauss_params.means": torch.zeros(20, 3), "other": torch.zeros(4)}
    check_state_matches(have, more, resizable=("gauss_params.means",))
    with pytest.raises(DistillError):
        check_state_matches(have, more)  # not resizable
    wider = {"gauss_params.means": torch.zeros(20, 4), "other": torch.zeros(4)}
    with pytest.raises(DistillError):
        check_state_matches(have, wider, resizable=("gauss_params.means",))


def splat_trainer_config(load_dir, data: Path, method: str = "pds-splatfacto"):
    config = copy.deepcopy(METHODS[method].config)
    config.load_dir, config.data = load_dir, data
    config.pipeline.datamanager.dataparser.data = data
    return config


@pytest.mark.parametrize(
    "base, needles",
    [
        ("nerfacto", ["is a nerfacto run", "pds-splatfacto starts from a splatfacto run"]),
        ("dds-splatfacto", ["is a dds-splatfacto run", "starts from a splatfacto run"]),
        ("pds-edit", ["is a pds-edit run"]),
    ],
)
def test_a_splat_edit_refuses_other_bases_in_one_line(tmp_path, tiny_scene, base, needles):
    with pytest.raises(DistillError) as err:
        check_load_dir(splat_trainer_config(fake_run(tmp_path, base, tiny_scene), tiny_scene))
    one_line(err, *needles)


def test_a_splat_edit_starts_from_splatfacto_or_resumes_itself(tmp_path, tiny_scene):
    plan = check_load_dir(splat_trainer_config(fake_run(tmp_path, "splatfacto", tiny_scene), tiny_scene))
    assert plan.source == "splatfacto" and not plan.resume
    plan = check_load_dir(splat_trainer_config(fake_run(tmp_path, "pds-splatfacto", tiny_scene), tiny_scene))
    assert plan.resume
    with pytest.raises(DistillError) as err:
        check_load_dir(splat_trainer_config(None, tiny_scene))
    one_line(err, "outputs/<scene>/splatfacto/<timestamp>/nerfstudio_models")


def test_a_nerfacto_edit_refuses_a_splatfacto_base_in_one_line(tmp_path, tiny_scene):
    with pytest.raises(DistillError) as err:
        check_load_dir(
            splat_trainer_config(fake_run(tmp_path, "splatfacto", tiny_scene), tiny_scene, "pds-edit")
        )
    one_line(err, "is a splatfacto run", "pds-edit starts from a nerfacto run")


def test_several_gpus_refuse_only_a_densifying_splat_edit(tiny_scene, prior_folder):
    """The guidance stage keeps the Gaussians in number (ranks stay equal: tests/test_distributed.py); a
    refinement stage or dataset update would densify by each rank's own gradients: one line."""
    from nerfstudio_distill.pipelines.edit import check_edit

    config = splat_trainer_config(None, tiny_scene)
    config.pipeline = splat_config(tiny_scene, prior_folder)
    config.machine.num_devices = 2
    check_edit(config.pipeline, config)
    for changes in (dict(refine_steps=10), dict(mode="dataset-update")):
        config.pipeline = splat_config(tiny_scene, prior_folder, **changes)
        with pytest.raises(DistillError) as err:
            check_edit(config.pipeline, config)
        one_line(err, "--machine.num-devices 2", "--pipeline.refine-steps 0", "--machine.num-devices 1")


# ---------------------------------------------------------------- densification
def train(pipe, config, steps: range) -> list[int]:
    """nerfstudio's training loop around the pipeline (callbacks, optimizers); the Gaussian count after
    each step."""
    optimizers = Optimizers(copy.deepcopy(config.optimizers), pipe.get_param_groups())
    attributes = TrainingCallbackAttributes(
        optimizers=optimizers, grad_scaler=None, pipeline=pipe, trainer=None
    )
    callbacks = pipe.get_training_callbacks(attributes)
    counts = []
    for step in steps:
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        optimizers.zero_grad_all()
        _, losses, _ = pipe.get_train_loss_dict(step=step)
        sum(losses.values()).backward()
        optimizers.optimizer_step_all()
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        counts.append(pipe.model.num_points)
    return counts


def test_gaussians_densify_only_in_the_refinement_stage(tiny_scene, prior_folder, capsys):
    """With a densification schedule that would split from the first steps on (warm-up 1, every 2 steps,
    a tiny gradient threshold), the guidance stage keeps the number of Gaussians; the refinement stage
    (dataset update) runs splatfacto's strategy counted from its own start, and the number changes."""
    config = splat_config(tiny_scene, prior_folder, refine_steps=20, refine_every=5, refine_denoise_steps=1)
    config.model = dataclasses.replace(
        config.model, warmup_length=1, refine_every=2, reset_alpha_every=100, densify_grad_thresh=1e-7
    )
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    start = 100  # the base's last step + 1: the edit's steps are global
    pipe.start_edit(start, 40)
    assert pipe.model.densify_from == start + 20
    loaded = pipe.model.num_points
    counts = train(pipe, pds_splatfacto.config, range(start, start + 40))
    assert counts[:20] == [loaded] * 20, counts  # guidance stage: frozen in number
    assert len(set(counts[20:])) > 1 and counts[-1] != loaded, counts
    # splatfacto's strategy grows only from num_train_data + refine_every steps past a reset (its step 0):
    # from its step 14 here, the refinement's 14th step (the strategy counts from 1 at the first)
    assert counts[20:33] == [loaded] * 13 and counts[33] != loaded, counts
    grown = re.findall(r"Step (\d+): (\d+) GSs duplicated, (\d+) GSs split", capsys.readouterr().out)
    assert grown and int(grown[0][0]) == 14, grown
    # the dataset update trained on edited images; the originals stay for the guidance's source branch
    images = torch.stack([data["image"][..., :3] for data in pipe.datamanager.cached_train])
    assert not torch.allclose(images, pipe.datamanager.source_images)
    original = pipe.datamanager.train_dataset[0]["image"][..., :3]
    torch.testing.assert_close(pipe.datamanager.source_image(0), original)


# ---------------------------------------------------------------- through the CLI
SPLAT_FLAGS = [
    "--machine.device-type", "cpu", "--vis", "tensorboard",
    "--pipeline.model.random-init", "True", "--pipeline.model.num-random", "300",
    "--pipeline.model.random-scale", "1.0", "--pipeline.model.sh-degree", "1",
]  # fmt: skip


def splat_train(method: str, out: Path, scene: Path, *flags: str, steps: int = 2, timestamp: str = "run"):
    return [
        "ns-train", method, *SPLAT_FLAGS, "--max-num-iterations", str(steps), "--output-dir", str(out),
        "--timestamp", timestamp, "--data", str(scene), *flags,
    ]  # fmt: skip


def splat_edit_flags(prior_folder: Path, base: Path, *extra: str) -> list[str]:
    return [
        "--load-dir", str(base),
        "--pipeline.target-prompt", TARGET, "--pipeline.source-prompt", SOURCE,
        "--pipeline.prior.kind", "exact", "--pipeline.prior.exact.folder", str(prior_folder),
        "--pipeline.prior-resolution", "None", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def splat_base(tiny_scene, tmp_path_factory) -> Path:
    """A plain `ns-train splatfacto` run of the tiny scene (in this process), densifying once so its
    Gaussian count is not the 300 it starts from; its nerfstudio_models folder."""
    out = tmp_path_factory.mktemp("splat_base")
    densify = ["--pipeline.model.warmup-length", "5", "--pipeline.model.refine-every", "5"]
    densify += ["--pipeline.model.num-downscales", "0", "--logging.steps-per-log", "100"]
    run_here(ns_train_main, splat_train("splatfacto", out, tiny_scene, *densify, steps=30))
    return out / tiny_scene.name / "splatfacto" / "run" / "nerfstudio_models"


def gaussians(load_dir: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = sorted(load_dir.glob("step-*.ckpt"))[-1:]
    state = torch.load(ckpt, map_location="cpu")["pipeline"]
    return {k.split(".")[-1]: v for k, v in state.items() if k.startswith("_model.gauss_params.")}


def ply_vertex_count(path: Path) -> int:
    header = path.read_bytes().split(b"end_header", 1)[0].decode()
    return int(re.search(r"element vertex (\d+)", header).group(1))


@pytest.mark.slow
def test_pds_splatfacto_edits_resumes_and_exports(tiny_scene, splat_base, prior_folder, tmp_path, capsys):
    base = gaussians(splat_base)
    assert len(base["means"]) != 300  # the base densified: the edit loads another count than it starts with
    out = tmp_path / "out"
    flags = splat_edit_flags(prior_folder, splat_base, "--steps-per-save", "2")
    run_here(ns_train_main, splat_train("pds-splatfacto", out, tiny_scene, *flags, steps=2))
    assert "optimizers and schedulers start fresh" in capsys.readouterr().out
    run = out / tiny_scene.name / "pds-splatfacto" / "run"
    edited = gaussians(run / "nerfstudio_models")
    assert edited["means"].shape == base["means"].shape  # the guidance stage adds and removes none
    for name in ("means", "features_dc", "opacities"):  # the optimizers stepped the loaded Gaussians
        assert not torch.equal(edited[name], base[name]), name

    # resume: 2 more steps of a 4-step plan, from the run's own checkpoint (optimizer states included)
    flags = splat_edit_flags(prior_folder, run / "nerfstudio_models")
    run_here(
        ns_train_main, splat_train("pds-splatfacto", out, tiny_scene, *flags, steps=4, timestamp="resumed")
    )
    assert "2 of the 4 planned steps are left" in capsys.readouterr().out
    resumed = gaussians(out / tiny_scene.name / "pds-splatfacto" / "resumed" / "nerfstudio_models")
    assert not torch.equal(resumed["means"], edited["means"])

    run_here(ns_export_main, ns_export("gaussian-splat", run, tmp_path / "export"))
    kept = torch.isfinite(edited["means"]).all(-1) & (edited["opacities"].squeeze(-1) >= -5.5373)
    assert ply_vertex_count(tmp_path / "export" / "splat.ply") == int(kept.sum()) > 0


@pytest.mark.slow
def test_bad_bases_are_one_line_through_ns_train(tiny_scene, splat_base, base_run, prior_folder, tmp_path):
    out = tmp_path / "out"
    code = ns_train_here(
        splat_train("pds-splatfacto", out, tiny_scene, *splat_edit_flags(prior_folder, base_run))
    )
    assert_error_line(code, "is a nerfacto run", "starts from a splatfacto run")
    flags = splat_edit_flags(prior_folder, splat_base, "--pipeline.model.sh-degree", "2")
    code = ns_train_here(splat_train("pds-splatfacto", out, tiny_scene, *flags))
    assert_error_line(code, "does not match", "features_rest")
    code = ns_train_here(
        ["ns-train", "pds-edit", "--machine.device-type", "cpu", "--vis", "tensorboard", "--output-dir", str(out),
         "--data", str(tiny_scene), *splat_edit_flags(prior_folder, splat_base)]
    )  # fmt: skip
    assert_error_line(code, "is a splatfacto run", "starts from a nerfacto run")
    assert not list(out.rglob("*.ckpt"))


def test_colour_lr_lets_an_edit_of_that_length_cross_the_colour_range():
    """Adam at colour_lr(N) on SH DC coefficients turns red into blue within N steps; splatfacto's own rate
    (2.5e-3) does not for a 200-step edit."""
    from nerfstudio_distill.models.edit_splatfacto import SH_C0, colour_lr

    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])

    def final_colour(lr: float, steps: int) -> torch.Tensor:
        dc = ((red - 0.5) / SH_C0).clone().requires_grad_(True)
        adam = torch.optim.Adam([dc], lr=lr, eps=1e-15)
        for _ in range(steps):
            adam.zero_grad()
            (SH_C0 * dc + 0.5 - blue).square().sum().backward()
            adam.step()
        return (SH_C0 * dc + 0.5).detach().clamp(0, 1)

    assert (final_colour(colour_lr(200), 200) - blue).abs().max() < 0.1
    assert (final_colour(2.5e-3, 200) - red).abs().max() < 0.2  # barely moved
