"""The InstructPix2Pix prior on a tiny random IP2P checkpoint: equal to diffusers' pipeline, one UNet call,
one-line errors, and its guidance in the methods."""

from __future__ import annotations

import pytest
import torch

from nerfstudio_distill.guidance.dds import dds
from nerfstudio_distill.guidance.pds import pds
from nerfstudio_distill.guidance.sds import sds
from nerfstudio_distill.priors import (
    CFG,
    Condition,
    InstructPix2PixPrior,
    InstructPix2PixPriorConfig,
    PriorConfig,
    PriorInputError,
    PriorLoadError,
    StableDiffusionPrior,
)
from tests.test_priors import assert_one_line, count_calls
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd

PROMPT = "turn the ball red"


@pytest.fixture(scope="module")
def ip2p(tiny_ip2p):
    return InstructPix2PixPrior(model=str(tiny_ip2p), device="cpu", dtype="fp32", local_files_only=True)


def image(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_noise_prediction_equals_diffusers_pipeline(tiny_ip2p, ip2p):
    """One step of diffusers' StableDiffusionInstructPix2PixPipeline: its UNet input (x_t and its image
    latents) and its CFG (text+image, image, neither; Brooks et al. 2023 Eq. 3), written out here from the
    UNet's own outputs, against the prior's one predict_noise call on the same x_t, image, prompt and t."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_ip2p, safety_checker=None)
    seen = []
    pipe.unet.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((args[0], args[1], out[0])), with_kwargs=True
    )
    src = image()
    pipe(
        PROMPT,
        image=src,
        num_inference_steps=2,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    unet_input, t, out = seen[0]
    noise_text, noise_image, noise_uncond = out.chunk(3)  # the pipeline's batch order
    expected = noise_uncond + 7.5 * (noise_text - noise_image) + 1.5 * (noise_image - noise_uncond)

    c_image = ip2p.encode_condition(src)
    x_t = unet_input[:1, :4]
    torch.testing.assert_close(unet_input[:, 4:], torch.cat([c_image, c_image, torch.zeros_like(c_image)]))
    t = torch.as_tensor(t).long().reshape(1)
    condition = Condition(PROMPT, image=c_image)
    eps = ip2p.predict_noise(x_t[None], t, [condition], CFG.instruct(text_scale=7.5, image_scale=1.5))
    torch.testing.assert_close(eps[0], expected, rtol=1e-5, atol=1e-5)
    # a bare scale is the text scale, with the config's image scale (1.5)
    torch.testing.assert_close(ip2p.predict_noise(x_t[None], t, [condition], 7.5), eps)


def test_image_latents_are_the_unscaled_vae_mode(ip2p):
    src = image(1, batch=2)
    c_image = ip2p.encode_condition(src)
    with torch.no_grad():
        mode = ip2p.vae.encode(src * 2 - 1).latent_dist.mode()
    assert c_image.shape == (2, 4, LATENT_SIZE, LATENT_SIZE) and not c_image.requires_grad
    torch.testing.assert_close(c_image, mode)
    torch.testing.assert_close(ip2p.encode(src), mode * ip2p.vae.config.scaling_factor)


def test_one_unet_call_with_the_image_on_the_channels(ip2p):
    calls = count_calls(ip2p.unet)
    inputs = []
    hook = ip2p.unet.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    try:
        c_image = ip2p.encode_condition(image(2, batch=3))
        x_t = torch.randn(2, 3, 4, LATENT_SIZE, LATENT_SIZE)  # G=2 groups, B=3
        t = torch.tensor([10, 500, 990])
        conditions = [Condition(PROMPT, c_image), Condition("", c_image[:1])]
        eps = ip2p.predict_noise(x_t, t, conditions)
    finally:
        hook.remove()
    assert calls == [3 * 2 * 3] and eps.shape == x_t.shape
    assert inputs[0].shape[1] == 8
    rows = inputs[0][:, 4:].unflatten(0, (3, 2, 3))  # branches (last first), groups, batch
    torch.testing.assert_close(rows[0, 0], c_image)  # text + image
    torch.testing.assert_close(rows[1, 1], c_image[:1].expand(3, -1, -1, -1))  # image only
    assert not rows[2].any()  # neither: zero image latents


def test_both_scales_one_is_the_conditional_branch(tiny_ip2p, ip2p):
    prior = InstructPix2PixPrior(ip2p.config, image_guidance_scale=1.0)
    calls = count_calls(prior.unet)
    assert prior.cfg(1.0) == CFG.conditional()
    x_t, t = torch.randn(1, 1, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([300])
    prior.predict_noise(x_t, t, [Condition(PROMPT, ip2p.encode_condition(image()))], 1.0)
    assert calls == [1]


def test_wrong_size_image_condition_is_one_line(ip2p):
    c_image = ip2p.encode_condition(torch.rand(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
    with pytest.raises(PriorInputError) as e:
        ip2p.predict_noise(
            torch.randn(1, 1, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([100]), [Condition(PROMPT, c_image)]
        )
    assert_one_line(e, "(4, 16, 16)", "(4, 8, 8)", "encode_condition")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_missing_model_offline_is_one_line():
    with pytest.raises(PriorLoadError) as e:
        InstructPix2PixPrior(model="nobody/no-such-ip2p-model-for-tests", device="cpu", local_files_only=True)
    assert_one_line(e, "--pipeline.prior.instruct-pix2pix.model", "HF_HUB_OFFLINE=1")


def test_wrong_kind_of_checkpoint_is_one_line(tmp_path, tiny_ip2p):
    sd_folder = build_tiny_sd(tmp_path / "sd")
    with pytest.raises(PriorLoadError) as e:
        InstructPix2PixPrior(model=str(sd_folder), device="cpu")
    assert_one_line(e, "takes 4 input channels", "--pipeline.prior.kind stable-diffusion")
    with pytest.raises(PriorLoadError) as e:
        StableDiffusionPrior(model=str(tiny_ip2p), device="cpu")
    assert_one_line(e, "takes 8 input channels", "--pipeline.prior.kind instruct-pix2pix")


def test_text_priors_have_no_image_condition(tmp_path):
    sd = StableDiffusionPrior(model=str(build_tiny_sd(tmp_path / "sd")), device="cpu")
    with pytest.raises(PriorInputError) as e:
        sd.encode_condition(image())
    assert_one_line(e, "instruct-pix2pix")


def test_prior_config_builds_it(tiny_ip2p):
    config = PriorConfig(
        kind="instruct-pix2pix",
        instruct_pix2pix=InstructPix2PixPriorConfig(model=str(tiny_ip2p), guidance_scale=5.0),
    )
    assert config.default_guidance_scale == 5.0 and config.takes_image and not config.native_resolution
    prior = config.setup(device="cpu")
    assert isinstance(prior, InstructPix2PixPrior) and prior.takes_image and prior.device.type == "cpu"
    assert prior.cfg(5.0) == CFG.instruct(5.0, 1.5)
    assert InstructPix2PixPriorConfig().model == "timbrooks/instruct-pix2pix"


def test_config_fields_documented():
    import ast
    import inspect

    from nerfstudio_distill.priors import instruct_pix2pix

    tree = ast.parse(inspect.getsource(instruct_pix2pix))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InstructPix2PixPriorConfig"]
    fields = [i for i, n in enumerate(cls.body) if isinstance(n, ast.AnnAssign)]
    assert fields
    for i in fields:
        doc = cls.body[i + 1]
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), ast.unparse(cls.body[i])


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("method", ["sds", "dds", "pds", "pds-balanced"])
def test_guidance_makes_one_three_branch_call(ip2p, method):
    """SDS, DDS and PDS with an image condition: one UNet call of 3 branches (PDS balanced: 1) per step."""
    calls = count_calls(ip2p.unet)
    src = image(3)
    c_image = ip2p.encode_condition(src)
    x0 = ip2p.encode(image(4)).requires_grad_(True)
    x0_src = ip2p.encode(src)
    target, source = Condition(PROMPT, c_image), Condition("", c_image)
    if method == "sds":
        out, groups, branches = sds(ip2p, x0, target, t=500), 1, 3
    elif method == "dds":
        out, groups, branches = dds(ip2p, x0, x0_src, target, source, t=500), 2, 3
    else:
        rule = "balanced" if method == "pds-balanced" else "reference"
        t = ip2p.timestep_grid(500)[250]
        out, groups, branches = pds(ip2p, x0, x0_src, target, source, t=t, rule=rule), 2, 3
        branches = 1 if rule == "balanced" else branches
    assert calls == [branches * groups] and torch.isfinite(out.grad).all()
    out.loss.backward()
    assert x0.grad is not None


def test_pds_balanced_is_the_text_scale_times_the_conditional_difference(ip2p):
    """PDS "balanced" with InstructPix2Pix: the edit term is s_T (ε̂(x_t; text, image) − ε̂(x̃_t; "", image)),
    from the conditional branch that keeps the image; the image scale is not used."""
    src = image(5)
    c_image = ip2p.encode_condition(src)
    x0, x0_src = ip2p.encode(image(6)), ip2p.encode(src)
    target, source = Condition(PROMPT, c_image), Condition("", c_image)
    t, noise = ip2p.timestep_grid(500)[300:301], torch.randn_like(x0)
    out = pds(ip2p, x0, x0_src, target, source, t=t, noise=noise, rule="balanced", guidance_scale=4.0)
    a = ip2p.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x_src = a.sqrt() * x0_src + (1 - a).sqrt() * noise
    eps_tgt = ip2p.predict_noise(x_t[None], t, [target], CFG.conditional())[0]
    eps_src = ip2p.predict_noise(x_src[None], t, [source], CFG.conditional())[0]
    torch.testing.assert_close(out.eps, eps_tgt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.eps_src, eps_src, rtol=1e-5, atol=1e-5)
    edit = 4.0 * (eps_tgt - eps_src)
    identity = x0 - x0_src
    changed = identity - ((1 - a) / a).sqrt() * (eps_tgt - eps_src)  # x̂0 − x̂0_src (DDIM Eq. 9)
    coef = (identity * changed).sum() / changed.pow(2).sum()
    expected = out.psi * (identity - coef * changed) + out.chi * edit
    torch.testing.assert_close(out.grad, expected.float(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ edit pipeline
def ip2p_edit(tiny_scene, tiny_ip2p, method: str = "pds", rule: str = "balanced", **changes):
    from nerfstudio_distill.guidance.config import GuidanceConfig
    from tests.test_edit import edit_config

    prior = PriorConfig(
        kind="instruct-pix2pix",
        instruct_pix2pix=InstructPix2PixPriorConfig(model=str(tiny_ip2p), device="cpu", dtype="fp32"),
    )
    config = edit_config(
        tiny_scene,
        None,
        guidance=GuidanceConfig(method=method, pds_rule=rule),
        prior=prior,
        prior_resolution=IMAGE_SIZE,
        source_prompt="",
        target_prompt=PROMPT,
        **changes,
    )
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    return pipe


@pytest.mark.parametrize("method, rule", [("pds", "balanced"), ("pds", "reference"), ("sds", "balanced")])
def test_edit_step_conditions_on_the_source_view(tiny_scene, tiny_ip2p, method, rule):
    """One edit step with InstructPix2Pix: the UNet sees [x_t, source view latents] (zeros in the branch
    that drops the image; PDS balanced runs the conditional branch alone), the target prompt as the
    instruction and "" as the source's, and the field gets gradients."""
    pipe = ip2p_edit(tiny_scene, tiny_ip2p, method, rule)
    seen = []
    pipe.prior.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0], kwargs["encoder_hidden_states"])), with_kwargs=True
    )
    _, losses, _ = pipe.get_train_loss_dict(step=0)
    sum(losses.values()).backward()
    grads = [p.grad for p in pipe.model.field.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)

    ((index, condition),) = pipe._source_latents.keys() - {(i, False) for i in range(12)}
    assert condition
    source = pipe.datamanager.source_image(index).float()
    expected = pipe.prior.encode_condition(pipe._to_prior(source))
    assert expected.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    ((unet_input, text),) = seen
    groups, branches = (2 if method == "pds" else 1), (1 if method == "pds" and rule == "balanced" else 3)
    assert unet_input.shape == (branches * groups, 8, LATENT_SIZE, LATENT_SIZE)
    images = unet_input[:, 4:].unflatten(0, (branches, groups))  # branches (text+image first), groups
    kept = min(branches, 2)
    torch.testing.assert_close(images[:kept], expected.expand(kept, groups, -1, -1, -1))
    assert branches == 1 or not images[2].any()
    target, empty = pipe.prior.embed([PROMPT, ""])
    torch.testing.assert_close(text[0], target[0])
    if method == "pds":
        torch.testing.assert_close(text[1], empty[0])  # the source branch: the empty instruction


def test_source_prompt_is_unused_with_instruct_pix2pix():
    from nerfstudio_distill.pipelines.edit import EditPipelineConfig, check_prompts

    config = EditPipelineConfig(
        target_prompt=PROMPT, source_prompt="a ball", prior=PriorConfig(kind="instruct-pix2pix")
    )
    with pytest.warns(UserWarning, match="source-prompt is unused"):
        check_prompts(config)


def test_refinement_edits_conditioned_on_the_source_view(tiny_scene, tiny_ip2p):
    """The refinement stage's SDEdit with InstructPix2Pix is conditioned on the view's original image too."""
    pipe = ip2p_edit(tiny_scene, tiny_ip2p, refine_steps=4, refine_every=2, refine_denoise_steps=1)
    seen = []
    pipe.prior.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    _, losses, _ = pipe.get_train_loss_dict(step=6)  # the first refinement step (of 10)
    assert "rgb_loss" in losses
    expected = pipe.prior.encode_condition(pipe._to_prior(pipe.datamanager.source_image(0).float()))
    (unet_input,) = seen
    torch.testing.assert_close(unet_input[:2, 4:], expected.expand(2, -1, -1, -1))
    assert not unet_input[2, 4:].any()


def test_distill_2d_previews_an_edit_conditioned_on_the_input_image(tmp_path, tiny_ip2p, monkeypatch):
    """ns-distill-2d with InstructPix2Pix, as the edit pipeline: the UNet sees [x_t, the input image's
    condition latents] (zeros in the branch that drops the image), the instruction in the target group and
    "" in dds's source group; the source prompt is unused (warned); the outputs are written."""
    import json
    import sys

    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from nerfstudio_distill.scripts import distill_2d

    path = tmp_path / "input.png"
    pixels = (image(3)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    out = tmp_path / "out"
    args = ["--image", str(path), "--target-prompt", PROMPT, "--source-prompt", "a ball", "--device", "cpu"]
    args += ["--prior.kind", "instruct-pix2pix", "--prior.instruct-pix2pix.model", str(tiny_ip2p)]
    args += ["--prior.instruct-pix2pix.dtype", "fp32", "--resolution", str(IMAGE_SIZE), "--steps", "2"]
    args += ["--guidance.method", "dds", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", ["ns-distill-2d", *args])
    seen, forward = [], UNet2DConditionModel.forward

    def record(unet, sample, *args, **kwargs):
        seen.append((sample, kwargs["encoder_hidden_states"]))
        return forward(unet, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", record)
    with pytest.warns(UserWarning, match="--source-prompt is unused with --prior.kind instruct-pix2pix"):
        distill_2d.entrypoint()
    monkeypatch.undo()

    assert sorted(p.name for p in out.iterdir()) == sorted(distill_2d.OUTPUT_FILES)
    report = json.loads((out / "distill_2d.json").read_text())
    assert report["settings"]["prior"].keys() == {"kind", "instruct_pix2pix"}  # only the prior in use
    assert report["settings"]["prior"]["instruct_pix2pix"]["model"] == str(tiny_ip2p)
    assert np.isfinite(report["readouts"]["grad_norm"])
    prior = InstructPix2PixPrior(model=str(tiny_ip2p), device="cpu", dtype="fp32", local_files_only=True)
    x = distill_2d.prior_input(distill_2d.load_image(path), prior, IMAGE_SIZE)
    expected = prior.encode_condition(x)
    assert expected.shape == (1, 4, LATENT_SIZE, LATENT_SIZE)
    target, empty = prior.embed([PROMPT, ""])
    assert len(seen) == 2  # one UNet call per step
    for unet_input, text in seen:
        assert unet_input.shape == (3 * 2, 8, LATENT_SIZE, LATENT_SIZE)  # 3 branches x (target, source)
        images = unet_input[:, 4:].unflatten(0, (3, 2))  # branches (text+image first), groups
        torch.testing.assert_close(images[:2], expected.expand(2, 2, -1, -1, -1))
        assert not images[2].any()
        torch.testing.assert_close(text[0], target[0])  # the instruction
        torch.testing.assert_close(text[1], empty[0])  # the source branch: the empty instruction
