"""ns-train in2n-edit: the edit pipeline's dataset-update mode (Instruct-NeRF2NeRF) with IN2N's defaults,
and without IN2N's reported defects: the prompt flag ignored (#51), the camera learning rate blowing up
from the base checkpoint (#60), and the crash of mutable dataclass defaults on Python 3.11 (the registry
test builds every method's config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

from method_configs.in2n_edit import in2n_edit
from nerfstudio_distill.data.edit_datamanager import EditDataManagerConfig
from nerfstudio_distill.errors import DistillError
from nerfstudio_distill.pipelines import edit
from nerfstudio_distill.pipelines.edit import check_edit, check_prompts, sdedit_strength
from nerfstudio_distill.pipelines.trainer import DistillTrainerConfig
from nerfstudio_distill.priors import Condition, InstructPix2PixPriorConfig
from tests.conftest import ns_export, ns_export_main, ns_train, ns_train_main, run_here
from tests.test_edit import edit_config, one_line, tiny_model
from tests.tiny_sd import IMAGE_SIZE

PROMPT = "turn the ball red"


def in2n_pipeline(scene: Path, ip2p: Path, **changes):
    """The registered in2n-edit pipeline on the tiny scene, tiny field and tiny IP2P checkpoint."""
    config = in2n_edit.config.pipeline
    config = dataclasses.replace(
        config,
        datamanager=EditDataManagerConfig(
            dataparser=NerfstudioDataParserConfig(data=scene), train_num_rays_per_batch=256
        ),
        model=tiny_model(),
        prior=dataclasses.replace(
            config.prior,
            instruct_pix2pix=InstructPix2PixPriorConfig(model=str(ip2p), device="cpu", dtype="fp32"),
        ),
        target_prompt=PROMPT,
        prior_resolution=IMAGE_SIZE,
        **changes,
    )
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 100)
    return pipe


def train_images(pipe) -> torch.Tensor:
    """The photometric targets of the training views, in view order."""
    dm = pipe.datamanager
    batch = dm.train_image_dataloader.cached_collated_batch["image"][..., :3]
    return torch.stack([batch[dm._position[i]] for i in range(dm.num_train_views)])


def test_defaults_are_in2ns():
    """IN2N's in2n method: 10 steps per edited image, t ~ U[0.02, 0.98]·T, 20 DDIM steps, InstructPix2Pix at
    its own CFG (text 7.5, image 1.5), 16384 rays, 15000 steps, lr 1e-2; no default prompt (#51)."""
    config = in2n_edit.config
    pipe = config.pipeline
    assert (pipe.mode, pipe.refine_every, pipe.refine_strength, pipe.refine_denoise_steps) == (
        "dataset-update",
        10,
        (0.02, 0.98),
        20,
    )
    assert pipe.prior.kind == "instruct-pix2pix" and pipe.guidance.guidance_scale is None
    assert (
        pipe.prior.default_guidance_scale == 7.5 and pipe.prior.instruct_pix2pix.image_guidance_scale == 1.5
    )
    assert pipe.datamanager.train_num_rays_per_batch == 16384 and config.max_num_iterations == 15000
    assert (
        config.optimizers["fields"]["optimizer"].lr == config.optimizers["proposal_networks"]["optimizer"].lr
    )
    assert config.optimizers["fields"]["optimizer"].lr == 1e-2
    assert config.require_load_dir and "Instruct-NeRF2NeRF" in in2n_edit.description
    with pytest.raises(DistillError) as err:  # an empty target prompt is an error, not a silent default
        check_prompts(pipe)
    one_line(err, "--pipeline.target-prompt")


def test_strength_is_drawn_in_the_range_from_seed_and_step():
    draws = [sdedit_strength((0.02, 0.98), torch.Generator().manual_seed(step)) for step in range(500)]
    assert 0.02 <= min(draws) < 0.05 and 0.95 < max(draws) <= 0.98
    again = [sdedit_strength((0.02, 0.98), torch.Generator().manual_seed(step)) for step in range(500)]
    assert draws == again
    generator = torch.Generator().manual_seed(0)
    assert sdedit_strength(0.3, generator) == 0.3
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn


def test_update_edits_each_view_in_turn_from_the_original_photos(tiny_scene, tiny_ip2p, monkeypatch):
    """Step 0 replaces view 0, step 10 view 1, nothing else; the dataset starts as the original photos; each
    new image is the SDEdit of the view's render (its strength drawn from the pipeline seed and the step),
    with InstructPix2Pix conditioned on --pipeline.target-prompt and the view's original image (#51)."""
    pipe = in2n_pipeline(tiny_scene, tiny_ip2p)
    originals = pipe.datamanager.source_images.clone()
    torch.testing.assert_close(train_images(pipe), originals)
    calls, renders, conditions = [], [], []
    real_sdedit, real_render, real_predict = edit.sdedit, pipe._render_view, pipe.prior.predict_noise

    def sdedit(prior, x0, prompt, **kwargs):
        calls.append((x0, prompt, kwargs, real_sdedit(prior, x0, prompt, **kwargs)))
        return calls[-1][-1]

    def render_view(index, scale=1.0):
        renders.append(real_render(index, scale))
        return renders[-1]

    def predict_noise(x_t, t, prompts, guidance_scale=None):
        conditions.extend(prompts)
        return real_predict(x_t, t, prompts, guidance_scale)

    monkeypatch.setattr(edit, "sdedit", sdedit)
    monkeypatch.setattr(pipe, "_render_view", render_view)
    monkeypatch.setattr(pipe.prior, "predict_noise", predict_noise)

    for step, index in [(0, 0), (10, 1)]:
        before = train_images(pipe)
        _, losses, _ = pipe.get_train_loss_dict(step=step)
        assert "rgb_loss" in losses  # nerfacto's photometric loss on the updated images
        after = train_images(pipe)
        changed = [i for i in range(len(after)) if not torch.equal(after[i], before[i])]
        assert changed == [index] and len(renders) == len(calls) == index + 1  # no view rendered but it

        x0, prompt, kwargs, edited = calls[-1]
        torch.testing.assert_close(x0, pipe.prior.encode(pipe._to_prior(renders[-1])))
        image = pipe.prior.decode(edited)
        image = torch.nn.functional.interpolate(
            image, size=after.shape[1:3], mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(after[index], image[0].permute(1, 2, 0))
        assert kwargs["num_steps"] == 20 and kwargs["guidance_scale"] == 7.5
        assert kwargs["strength"] == sdedit_strength((0.02, 0.98), torch.Generator().manual_seed(step))

        source = pipe.prior.encode_condition(pipe._to_prior(originals[index].float()))
        assert isinstance(prompt, Condition) and prompt.prompt == PROMPT
        torch.testing.assert_close(prompt.image, source)
        assert len(conditions) == 20 * (index + 1)  # one predict_noise call per DDIM step
        assert all(c is prompt for c in conditions[-20:])
    torch.testing.assert_close(train_images(pipe)[2:], originals[2:])
    torch.testing.assert_close(pipe.datamanager.source_images, originals)  # the condition stays the photo


def test_text_only_prior_runs_a_plain_sdedit(tiny_scene, prior_folder, monkeypatch):
    """With the exact prior (text only) the update is an SDEdit of the render under the target prompt; a
    resumed run (first step past 0) starts from renders of its field, not from the original photos."""
    config = edit_config(tiny_scene, prior_folder, mode="dataset-update", source_prompt="", refine_every=2)
    config = dataclasses.replace(config, refine_denoise_steps=2, refine_strength=(0.1, 0.5))
    prompts, real_sdedit = [], edit.sdedit

    def sdedit(prior, x0, prompt, **kwargs):
        prompts.append(prompt)
        return real_sdedit(prior, x0, prompt, **kwargs)

    monkeypatch.setattr(edit, "sdedit", sdedit)
    pipe = config.setup(device="cpu", test_mode="val")
    pipe.start_edit(0, 10)
    originals = pipe.datamanager.source_images.clone()
    pipe.get_train_loss_dict(step=3)  # a resumed run's first step: every view becomes a render; no edit
    assert prompts == []
    assert all(not torch.equal(a, b) for a, b in zip(train_images(pipe), originals, strict=True))
    pipe.get_train_loss_dict(step=4)  # edits view 2
    assert prompts == [config.target_prompt]


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"refine_strength": (0.9, 0.1)}, ["--pipeline.refine-strength is 0.9 0.1"]),
        ({"refine_strength": (0.0, 0.5)}, ["--pipeline.refine-strength is 0 0.5"]),
        ({"refine_steps": 5}, ["--pipeline.refine-steps 5", "--pipeline.mode distill"]),
        ({"target_prompt": ""}, ["--pipeline.target-prompt"]),
    ],
    ids=["range-backwards", "range-from-0", "refine-steps", "no-target"],
)
def test_bad_options_are_one_line(tiny_scene, changes, needles):
    pipeline = dataclasses.replace(in2n_edit.config.pipeline, **{"target_prompt": PROMPT, **changes})
    trainer = DistillTrainerConfig(pipeline=pipeline, data=tiny_scene)
    with pytest.raises(DistillError) as err:
        check_edit(pipeline, trainer)
    one_line(err, *needles)


def test_the_prompt_alias_is_an_error_not_ignored(tiny_scene):
    """#51: `ns-train in2n --prompt ...` set --pipeline.model.prompt, which nothing read."""
    pipeline = dataclasses.replace(in2n_edit.config.pipeline, target_prompt=PROMPT)
    trainer = DistillTrainerConfig(pipeline=pipeline, data=tiny_scene, prompt="give him a moustache")
    with pytest.raises(DistillError) as err:
        check_edit(pipeline, trainer)
    one_line(err, "--prompt", "--pipeline.target-prompt")


# ----------------------------------------------------------------------------------- the real CLIs
@pytest.mark.slow
def test_in2n_edit_resume_and_export(tiny_scene, base_run, tiny_ip2p, tmp_path, monkeypatch):
    """ns-train in2n-edit from a nerfacto run, resumed, then ns-export pointcloud. The prior is conditioned on
    --pipeline.target-prompt (#51); the camera poses stay the base's, and the optimizers and schedulers
    count the edit's own steps (#60)."""
    from nerfstudio_distill.priors.instruct_pix2pix import InstructPix2PixPrior

    conditions, real_predict = [], InstructPix2PixPrior.predict_noise

    def predict_noise(self, x_t, t, prompts, *args, **kwargs):
        conditions.extend(prompts)
        return real_predict(self, x_t, t, prompts, *args, **kwargs)

    monkeypatch.setattr(InstructPix2PixPrior, "predict_noise", predict_noise)
    out = tmp_path / "out"
    flags = [
        "--pipeline.target-prompt", PROMPT,
        "--pipeline.prior.instruct-pix2pix.model", str(tiny_ip2p),
        "--pipeline.prior.instruct-pix2pix.dtype", "fp32",
        "--pipeline.prior-resolution", str(IMAGE_SIZE),
        "--pipeline.refine-every", "2",
        "--pipeline.refine-denoise-steps", "2",
        "--steps-per-save", "2",
        # fewer samples per ray (no weights depend on them): a whole-view render costs 20x less on CPU
        "--pipeline.model.num-nerf-samples-per-ray", "16",
        "--pipeline.model.num-proposal-samples-per-ray", "16", "8",
    ]  # fmt: skip
    run_here(ns_train_main, ns_train("in2n-edit", out, tiny_scene, *flags, "--load-dir", str(base_run)))
    assert conditions and {c.prompt for c in conditions} == {PROMPT}
    run = out / tiny_scene.name / "in2n-edit" / "run"
    (first,) = (run / "nerfstudio_models").glob("step-*.ckpt")  # only the latest is kept

    # a run resumes from its own checkpoint, with the steps left of the planned total (4: 2 more)
    resume = ["--load-dir", str(run / "nerfstudio_models")]
    run_here(
        ns_train_main, ns_train("in2n-edit", out, tiny_scene, *flags, *resume, steps=4, timestamp="resumed")
    )
    (last,) = (out / tiny_scene.name / "in2n-edit" / "resumed" / "nerfstudio_models").glob("step-*.ckpt")
    assert last.name > first.name
    base, state = (torch.load(p, map_location="cpu") for p in (next(base_run.glob("step-*.ckpt")), last))
    assert state["step"] == base["step"] + 4
    key = "_model.camera_optimizer.pose_adjustment"
    assert base["pipeline"][key].abs().sum() > 0  # the base moved its poses; the edit did not
    torch.testing.assert_close(state["pipeline"][key], base["pipeline"][key], rtol=0, atol=0)
    assert state["optimizers"]["camera_opt"]["state"] == {}  # never stepped
    for group, lr in [("camera_opt", 1e-3), ("fields", 1e-2)]:
        assert state["schedulers"][group]["last_epoch"] == 4  # the edit's steps, not the base's
        assert 0 < state["optimizers"][group]["param_groups"][0]["lr"] <= lr

    export = tmp_path / "pointcloud"
    run_here(
        ns_export_main,
        ns_export(
            "pointcloud",
            run,
            export,
            "--num-points",
            "256",
            "--num-rays-per-batch",
            "1024",
            "--normal-method",
            "open3d",
        ),
    )
    assert (export / "point_cloud.ply").stat().st_size > 0


def test_exact_instruct_pix2pix_update_writes_the_views_ideal_edit(tiny_scene, tmp_path):
    """With the exact InstructPix2Pix (edit pairs of the scene's own views) the dataset update is scoreable:
    re-noised all the way, a view's render comes back as that view's ideal edit, whatever the field
    renders, because the prior is conditioned on the view's original image."""
    from nerfstudio_distill.data.prior_sets import write_exact_prior_set
    from nerfstudio_distill.data.scene import load_scene, render, with_attributes
    from tests.test_edit import edit_config

    pairs = write_exact_prior_set(
        tiny_scene,
        tmp_path / "pairs",
        {"make it blue": [{"colour": "blue"}], "leave it": [{}]},
        conditions={"make it blue": [{}], "leave it": [{}]},
    )
    config = edit_config(
        tiny_scene,
        pairs,
        target_prompt="make it blue",
        source_prompt="",
        mode="dataset-update",
        refine_strength=1.0,
    )
    check_edit(config, DistillTrainerConfig(pipeline=config, max_num_iterations=10))
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    assert pipe.prior.takes_image
    pipe.start_edit(0, 10)
    index = 3
    edited = pipe._edit_view(index, step=0)
    spec, cameras = load_scene(tiny_scene)
    frame = int(Path(pipe.datamanager.train_dataset.image_filenames[index]).stem.split("_")[-1])
    ideal = torch.from_numpy(
        render(with_attributes(spec, colour="blue"), cameras[frame : frame + 1])["rgb"][0]
    )
    assert (edited - ideal.to(edited)).abs().max() < 2 / 255
