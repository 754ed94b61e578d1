"""The edit pipeline (pds-edit, dds-edit, sds-edit): in-process checks and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

from nerfstudio_distill.data.edit_datamanager import EditDataManagerConfig
from nerfstudio_distill.data.prior_sets import write_exact_prior_set
from nerfstudio_distill.guidance.common import GuidanceOutput
from nerfstudio_distill.guidance.config import Guidance, GuidanceConfig
from nerfstudio_distill.pipelines.common import render_in_chunks
from nerfstudio_distill.pipelines.edit import EditPipelineConfig, check_prompts, check_state_matches
from nerfstudio_distill.pipelines.trainer import DistillError, DistillTrainerConfig, check_load_dir
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from tests.conftest import TINY_FIELD_SETTINGS

SOURCE, TARGET = "a red striped ball", "a blue striped ball"


def one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.fixture(scope="module")
def prior_set(tiny_scene, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prior") / "set"
    return write_exact_prior_set(tiny_scene, out, {SOURCE: [{}], TARGET: [{"colour": "blue"}]})


def tiny_model():
    from nerfstudio_distill.models.edit_nerfacto import EditNerfactoModelConfig

    return EditNerfactoModelConfig(
        **TINY_FIELD_SETTINGS,
        eval_num_rays_per_chunk=4096,
    )


def edit_config(scene: Path, prior_folder: Path, method: str = "pds", **changes) -> EditPipelineConfig:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from nerfstudio_distill.data.edit_datamanager import EditDataManagerConfig

    config = EditPipelineConfig(
        datamanager=EditDataManagerConfig(dataparser=NerfstudioDataParserConfig(data=scene)),
        model=tiny_model(),
        target_prompt=TARGET,
        source_prompt=SOURCE,
        guidance=GuidanceConfig(method=method),
        prior=PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior_folder)),
        prior_resolution=None,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture
def pipeline(tiny_scene, prior_set):
    config = edit_config(tiny_scene, prior_set)
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    return pipe


def field_grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.model.field.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------- steps
def test_step_moves_the_field_not_the_cameras(pipeline):
    _, losses, metrics = pipeline.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    grads = field_grads(pipeline)
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    assert pipeline.model.camera_optimizer.pose_adjustment.grad is None
    assert torch.isfinite(metrics["guidance_grad_norm"]) and metrics["psi"] > 0


@pytest.mark.parametrize("appearance", ["mean", "per-image"])
def test_the_edit_renders_with_the_viewers_appearance(tiny_scene, prior_set, appearance):
    """#16: with "mean", a training render of a view equals what the viewer shows (the embeddings' mean),
    whatever the view's index, and the embeddings get no gradient; "per-image" is nerfacto's behaviour."""
    config = edit_config(tiny_scene, prior_set)
    config.model.edit_appearance = appearance
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    embedding = pipe.model.field.embedding_appearance
    with torch.no_grad():
        embedding.embedding.weight.normal_()  # distinct embeddings, as after a base run
    rays = pipe.datamanager.view_rays(0)[20:22, 20:24]
    other = rays._apply_fn_to_fields(lambda x: x)
    other.camera_indices = torch.full_like(rays.camera_indices, 5)
    pipe.model.train()
    first, second = (pipe.model(r.flatten())["rgb"] for r in (rays, other))
    pipe.model.eval()
    viewer = pipe.model(rays.flatten())["rgb"]
    pipe.model.train()
    if appearance == "mean":
        assert torch.allclose(first, second) and torch.allclose(first, viewer, atol=1e-6)
        _, losses, _ = pipe.get_train_loss_dict(step=0)
        sum(losses.values()).backward()
        assert embedding.embedding.weight.grad is None
    else:
        assert not torch.allclose(first, second)


def test_prior_is_not_in_the_checkpoint(pipeline):
    keys = pipeline.state_dict().keys()
    assert not any("points" in k or "prior" in k for k in keys)
    assert "edit_start_step" in keys


def test_viewer_outputs_show_the_source_next_to_the_edit(pipeline):
    camera = pipeline.datamanager.train_dataset.cameras[0:1]
    pipeline.model.eval()  # deterministic samples, as in the viewer
    before = pipeline.model.get_outputs_for_camera(camera)
    with torch.no_grad():  # stands in for edit steps
        for p in pipeline.model.field.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = pipeline.model.get_outputs_for_camera(camera)
    torch.testing.assert_close(after["source_rgb"], before["rgb"])
    assert not torch.allclose(after["rgb"], before["rgb"])
    assert {"rgb", "depth", "source_rgb"} <= after.keys()
    assert not any(k.startswith("_model._source") for k in pipeline.state_dict())


def thin_the_density(pipe) -> None:
    """Stands in for edit steps that made the surface more transparent (after ``start_edit``)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in pipe.model.field.mlp_base.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("tolerance", [0.1, None], ids=["opacity-anchor", "no-anchor"])
def test_two_pass_render_gives_the_single_pass_gradient(tiny_scene, prior_set, tolerance):
    grads, anchors = [], []
    for chunk in (1 << 20, 500):  # one pass with autograd, then render + chunked backpropagation
        config = edit_config(tiny_scene, prior_set, chunk_size=chunk, opacity_tolerance=tolerance)
        pipe = config.setup(device="cpu", test_mode="val")
        torch.manual_seed(0)
        pipe.model.load_state_dict(reference_state(pipe))
        pipe.model.eval()  # deterministic sampling, so both passes see the same rays and samples
        pipe.start_edit(0, 10)
        for index in range(pipe.datamanager.num_train_views):  # as if the scene had been empty: it pulls
            pipe._opacity_before[(index, 1.0)] = torch.zeros_like(pipe._opacity(index, 1.0))
        _, losses, metrics = pipe.get_train_loss_dict(step=3)
        sum(losses.values()).backward()
        grads.append(field_grads(pipe))
        anchors.append(metrics.get("opacity_anchor"))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6)
    if tolerance is None:
        assert anchors == [None, None]
    else:
        assert anchors[0] > 0
        torch.testing.assert_close(anchors[1], anchors[0], rtol=1e-3, atol=1e-6)


def test_opacity_anchor_is_the_documented_loss(pipeline):
    """½·k·Σ(opacity − before)², k = the guidance gradient's mean per-pixel norm / the tolerance: its
    gradient on a pixel off by the tolerance equals that mean norm, in either direction."""
    tol = pipeline.config.opacity_tolerance
    before = pipeline._opacity(0, 1.0).float()
    anchor = pipeline._anchor(0, None, 1.0)
    grad = torch.randn(*before.shape[:2], 3)
    for offset, pull in [(tol, 1.0), (-tol, -1.0), (0.5 * tol, 0.5)]:
        opacity = (before + offset).requires_grad_(True)
        anchor(opacity, grad).backward()
        expected = pull * grad.norm(dim=-1).mean().expand_as(opacity)
        torch.testing.assert_close(opacity.grad, expected, rtol=1e-3, atol=1e-6)
    crop = pipeline._anchor(0, (2, 3, 4, 5), 1.0)  # a crop's anchor holds the crop of the whole view
    loss = crop(before[2:6, 3:8] + 0.2, grad[:4, :5])
    k = grad[:4, :5].norm(dim=-1).mean() / tol
    torch.testing.assert_close(loss, 0.5 * k * 0.2**2 * 20, rtol=1e-3, atol=1e-6)


def test_each_edit_method_has_its_opacity_anchor():
    """PDS, whose identity term holds the scene to its photos, has no anchor; DDS and SDS have one."""
    from method_configs._edit import guided_edits

    tolerance = {name: m.config.pipeline.opacity_tolerance for name, m in guided_edits().items()}
    assert tolerance == {
        "pds-edit": None, "dds-edit": 0.1, "sds-edit": 0.1,
        "pds-splatfacto": None, "dds-splatfacto": 0.1, "sds-splatfacto": 0.1,
    }  # fmt: skip
    assert EditPipelineConfig().opacity_tolerance == 0.1


def test_opacity_anchor_holds_the_opacity_the_edit_started_from(tiny_scene, prior_set):
    """The opacity reference is the scene before the edit (the viewer's source copy); a resumed edit, which
    has no such copy, holds the opacity it resumed with and leaves the viewer's source output alone."""
    pipe = edit_config(tiny_scene, prior_set).setup(device="cpu", test_mode="val")
    pipe.model.eval()
    pipe.start_edit(0, 10)
    before = pipe._opacity(0, 1.0).clone()
    thin_the_density(pipe)
    rays = pipe.datamanager.view_rays(0)
    now = render_in_chunks(pipe.model, rays, 4096, with_grad=False)["accumulation"]
    assert (now - before.float()).abs().mean() > 0.02  # the field moved, the reference did not
    torch.testing.assert_close(pipe._opacity(0, 1.0), before)

    resumed = edit_config(tiny_scene, prior_set).setup(device="cpu", test_mode="val")
    resumed.model.load_state_dict(pipe.model.state_dict())
    resumed.model.eval()
    resumed.edit_start_step.fill_(0)  # as loaded from an edit's checkpoint
    resumed.start_edit(0, 10)
    assert "_source" not in resumed.model.__dict__
    torch.testing.assert_close(resumed._opacity(0, 1.0).float(), now, atol=1e-3, rtol=0)
    assert "_source" not in resumed.model.__dict__  # no "source" split screen from the resumed weights


def test_the_edit_does_not_depend_on_the_priors_gradient_scale(tiny_scene, prior_set):
    """#16: why the field's learning rate need not be derived from the prior. A prior whose gradients are
    10x larger (here: guidance_weight 10) moves the field by the same Adam steps, the opacity anchor
    included (its pull scales with the guidance gradient); only nerfacto's sampling regularisers, which do
    not scale, differ, and they are small beside the guidance."""
    fields = []
    for weight in (1.0, 10.0):
        pipe = edit_config(tiny_scene, prior_set, guidance_weight=weight).setup(device="cpu", test_mode="val")
        pipe.model.load_state_dict(reference_state(pipe))
        pipe.model.eval()  # deterministic sampling
        pipe.start_edit(0, 10)
        params = [p for p in pipe.model.field.parameters() if p.requires_grad]
        start = torch.cat([p.detach().flatten() for p in params])
        adam = torch.optim.Adam(params, lr=3e-3, eps=1e-15)  # pds-edit's field group
        for step in range(3):
            adam.zero_grad()
            _, losses, _ = pipe.get_train_loss_dict(step=step)
            sum(losses.values()).backward()
            adam.step()
        fields.append(torch.cat([p.detach().flatten() for p in params]))
    moved = (fields[0] - start).abs().mean()
    assert moved > 1e-4  # the edit moved the field
    print(f"moved {moved:.3g}, difference {(fields[1] - fields[0]).abs().mean():.3g}")
    assert (fields[1] - fields[0]).abs().mean() < 0.05 * moved


_REFERENCE: dict = {}


def reference_state(pipe) -> dict:
    if not _REFERENCE:
        _REFERENCE.update({k: v.clone() for k, v in pipe.model.state_dict().items()})
    return _REFERENCE


def test_nan_guidance_skips_the_step(pipeline, monkeypatch):
    def nan_guidance(self, prior, x0, prompt, **kwargs):
        grad = torch.full_like(x0, float("nan"))
        return GuidanceOutput(grad=grad, loss=(x0 * grad).sum(), t=torch.tensor([500]))

    monkeypatch.setattr(GuidanceConfig, "__call__", nan_guidance)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _, losses, _ = pipeline.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    assert all(torch.isfinite(g).all() and not g.any() for g in field_grads(pipeline).values())


def test_live_target_prompt_is_used_next_step(pipeline):
    pipeline.get_train_loss_dict(step=0)
    assert TARGET in pipeline.prior._embedding_cache
    pipeline.Distillation.target_prompt.value = SOURCE  # as typed in the viewer panel
    pipeline.get_train_loss_dict(step=1)
    assert pipeline.Distillation.t.value != "-"
    assert pipeline.Distillation.prompt_in_use.value == SOURCE
    assert SOURCE in pipeline.prior._embedding_cache


def test_a_prompt_being_typed_keeps_the_current_one(pipeline):
    pipeline.Distillation.target_prompt.value = SOURCE[:5]  # the viewer sends every keystroke
    with pytest.warns(RuntimeWarning, match="keeping the prompt"):
        pipeline.get_train_loss_dict(step=0)  # the exact prior knows no such prompt: no crash
    assert pipeline.Distillation.prompt_in_use.value == TARGET
    pipeline.Distillation.target_prompt.value = SOURCE  # typing finished
    pipeline.get_train_loss_dict(step=1)
    assert pipeline.Distillation.prompt_in_use.value == SOURCE


def test_viewer_values_go_through_a_checked_copy(pipeline, recwarn):
    """Panel values replace the settings in use only if the config's checks pass; never self.config."""
    panel, settings = pipeline.Distillation, pipeline.guidance.config
    panel.psi_scale.value = -1.0  # no run can use it
    pipeline.get_train_loss_dict(step=0)
    pipeline.get_train_loss_dict(step=1)
    refused = [w for w in recwarn if "viewer values refused" in str(w.message)]
    assert len(refused) == 1 and "--pipeline.guidance.psi-scale is -1.0" in str(refused[0].message)
    assert pipeline.guidance.config is settings and settings.psi_scale == 1.0
    panel.psi_scale.value, panel.guidance_scale.value = 0.5, 3.0  # usable values: a checked copy
    pipeline.get_train_loss_dict(step=2)
    applied = pipeline.guidance.config
    assert applied is not settings and (applied.psi_scale, applied.guidance_scale) == (0.5, 3.0)
    assert (pipeline.config.guidance.psi_scale, pipeline.config.guidance.guidance_scale) == (1.0, None)


class TrainableGuidance(Guidance):
    """A guidance method with state (as VSD's LoRA would be)."""

    def __init__(self, config, prior) -> None:
        super().__init__(config, prior)
        self.w = torch.nn.Parameter(torch.zeros(3))


def test_no_cfg_scale_means_the_priors_own(tiny_scene, prior_set):
    """--pipeline.guidance.guidance-scale None (the default) runs at the prior's CFG scale: 1 for the exact
    prior, Stable Diffusion's configured 7.5; the viewer shows the scale in use; an explicit one wins."""
    pipe = edit_config(tiny_scene, prior_set).setup(device="cpu", test_mode="val", grad_scaler=None)
    assert pipe.config.guidance.guidance_scale is None  # the config is not written
    assert pipe.guidance.config.guidance_scale == 1.0 == pipe.Distillation.guidance_scale.value
    sd = PriorConfig(stable_diffusion=dataclasses.replace(PriorConfig().stable_diffusion, guidance_scale=5.0))
    assert (PriorConfig().default_guidance_scale, sd.default_guidance_scale) == (7.5, 5.0)
    config = edit_config(tiny_scene, prior_set, guidance=GuidanceConfig(guidance_scale=3.0))
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    assert pipe.guidance.config.guidance_scale == 3.0 == pipe.Distillation.guidance_scale.value


def test_guidance_parameters_join_the_param_groups_and_the_checkpoint(pipeline):
    assert "guidance" not in pipeline.get_param_groups()  # SDS/DDS/PDS have no state
    assert not any(k.startswith("guidance.") for k in pipeline.state_dict())
    pipeline.guidance = TrainableGuidance(pipeline.config.guidance, pipeline.prior)
    groups = pipeline.get_param_groups()
    assert groups["guidance"] == [pipeline.guidance.w] and "fields" in groups
    assert "guidance.w" in pipeline.state_dict()


def test_refinement_replaces_training_images(tiny_scene, prior_set):
    config = edit_config(tiny_scene, prior_set, refine_steps=4, refine_every=2, refine_denoise_steps=2)
    pipe = config.setup(device="cpu", test_mode="val")
    pipe.start_edit(0, 6)
    before = pipe.datamanager.train_image_dataloader.cached_collated_batch["image"].clone()
    _, losses, _ = pipe.get_train_loss_dict(step=2)  # first refinement step
    assert "rgb_loss" in losses  # nerfacto's photometric loss on the updated images
    after = pipe.datamanager.train_image_dataloader.cached_collated_batch["image"]
    assert not torch.equal(before, after)
    torch.testing.assert_close(pipe.datamanager.source_images, source_images_of(pipe))


def test_refinement_runs_at_the_edits_render_scale(tiny_scene, tmp_path):
    """#15 (3): with --pipeline.render-scale 0.5 and a prior set written at that scale, the refinement
    stage gives the prior renders of the same size as the edit did (it used to render full views and
    fail after the whole PDS stage); the new training images keep the full size."""
    prior = write_exact_prior_set(
        tiny_scene, tmp_path / "half", {SOURCE: [{}], TARGET: [{"colour": "blue"}]}, scale=0.5
    )
    config = edit_config(
        tiny_scene, prior, render_scale=0.5, refine_steps=2, refine_every=1, refine_denoise_steps=1
    )
    pipe = config.setup(device="cpu", test_mode="val")
    pipe.start_edit(0, 4)
    pipe.get_train_loss_dict(step=0)  # an edit step at half size
    before = pipe.datamanager.train_image_dataloader.cached_collated_batch["image"].clone()
    _, losses, _ = pipe.get_train_loss_dict(step=2)  # the first refinement step
    after = pipe.datamanager.train_image_dataloader.cached_collated_batch["image"]
    assert "rgb_loss" in losses and after.shape == before.shape and not torch.equal(before, after)


def source_images_of(pipe) -> torch.Tensor:
    return torch.stack(
        [
            pipe.datamanager.train_dataset[i]["image"][..., :3]
            for i in range(len(pipe.datamanager.train_dataset))
        ]
    )


def test_export_time_pipeline_does_not_load_the_prior(tiny_scene, tmp_path):
    config = edit_config(tiny_scene, tmp_path / "no-such-prior")  # would fail if it were loaded
    pipe = config.setup(device="cpu", test_mode="inference")
    with pytest.raises(DistillError, match="only loaded for training"):
        pipe.prior  # noqa: B018


# ------------------------------------------------------------------- bad input
def test_empty_target_prompt_is_an_error(tiny_scene, prior_set):
    with pytest.raises(DistillError) as err:
        check_prompts(edit_config(tiny_scene, prior_set, target_prompt="  "))
    one_line(err, "--pipeline.target-prompt")


def test_same_prompts_warn(tiny_scene, prior_set):
    with pytest.warns(UserWarning, match="no-op"):
        check_prompts(edit_config(tiny_scene, prior_set, source_prompt=TARGET))


def test_missing_exact_prior_folder_is_one_line(tiny_scene, tmp_path):
    from nerfstudio_distill.priors.stable_diffusion import PriorLoadError

    with pytest.raises(PriorLoadError) as err:
        edit_config(tiny_scene, tmp_path).setup(device="cpu", test_mode="val")
    one_line(err, "--pipeline.prior.exact.folder")


def test_mismatched_checkpoint_names_what_differs():
    expected = {"field.embedding_appearance.embedding.weight": torch.zeros(12, 32), "a": torch.zeros(1)}
    loaded = {"field.embedding_appearance.embedding.weight": torch.zeros(24, 32), "b": torch.zeros(1)}
    with pytest.raises(DistillError) as err:
        check_state_matches(expected, loaded)
    one_line(err, "[24, 32] in the checkpoint but [12, 32] here", "a missing", "b unexpected", "same --data")


def trainer_config(load_dir, data: Path, **changes) -> DistillTrainerConfig:
    config = DistillTrainerConfig(method_name="pds-edit", require_load_dir=True, load_dir=load_dir, data=data)
    config.pipeline.datamanager = EditDataManagerConfig(dataparser=NerfstudioDataParserConfig())
    return dataclasses.replace(config, **changes)


def fake_run(tmp_path: Path, method: str, data: Path, transform: dict | None = None) -> Path:
    """A run folder with a small checkpoint, config.yml and (optionally) dataparser_transforms.json."""
    run = tmp_path / method / "run"
    (run / "nerfstudio_models").mkdir(parents=True)
    torch.save({"step": 10, "pipeline": {}}, run / "nerfstudio_models" / "step-000000010.ckpt")
    (run / "config.yml").write_text(yaml.dump(DistillTrainerConfig(method_name=method, data=data)))
    if transform is not None:
        (run / "dataparser_transforms.json").write_text(json.dumps(transform))
    return run / "nerfstudio_models"


def dataparser_transform(scene: Path) -> dict:
    outputs = NerfstudioDataParserConfig(data=scene).setup().get_dataparser_outputs("train")
    return {"transform": outputs.dataparser_transform.tolist(), "scale": float(outputs.dataparser_scale)}


@pytest.mark.parametrize(
    "case, needle",
    [
        ("none", "pass --load-dir"),
        ("missing", "does not exist"),
        ("empty", "no step-*.ckpt"),
        ("other-method", "is a splatfacto run"),
        ("other-scene", "other cameras than --data"),
    ],
)
def test_load_dir_problems_are_one_line(tmp_path, tiny_scene, case, needle):
    shifted = {"transform": [[1.0, 0, 0, 0.5], [0, 1.0, 0, 0], [0, 0, 1.0, 0]], "scale": 0.3}
    load_dir = {
        "none": None,
        "missing": tmp_path / "nope",
        "empty": tmp_path,
        "other-method": fake_run(tmp_path, "splatfacto", tiny_scene),
        "other-scene": fake_run(tmp_path, "nerfacto", tmp_path / "another-scene", shifted),
    }[case]
    with pytest.raises(DistillError) as err:
        check_load_dir(trainer_config(load_dir, tiny_scene))
    one_line(err, needle)


def test_matching_base_run_is_accepted(tmp_path, tiny_scene):
    plan = check_load_dir(trainer_config(fake_run(tmp_path, "nerfacto", tiny_scene), tiny_scene))
    assert plan.source == "nerfacto" and not plan.resume


def test_moved_dataset_is_accepted(tmp_path, tiny_scene):
    """The base trained on a folder that has since moved: the same cameras are accepted (#12)."""
    moved = tmp_path / "moved" / "ball"
    shutil.copytree(tiny_scene, moved)
    base = fake_run(tmp_path, "nerfacto", tmp_path / "old-place", dataparser_transform(tiny_scene))
    plan = check_load_dir(trainer_config(base, moved))
    assert plan.source == "nerfacto" and not plan.resume
