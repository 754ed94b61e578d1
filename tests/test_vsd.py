"""VSD (ProlificDreamer) on the tiny random Stable Diffusion: the gradient against the formula computed by
hand with the UNet with and without adapters, the one batched call, the LoRA's training loss, its state in
the guidance module (and so the checkpoint), the text-to-3D step, and ns-train vsd-nerfacto -> resume ->
ns-export (slow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nerfstudio_distill.guidance import GuidanceConfig, vsd
from nerfstudio_distill.guidance.common import TimestepSchedule, add_noise, weight
from nerfstudio_distill.priors import StableDiffusionPrior
from nerfstudio_distill.priors.base import Condition, PriorInputError, classifier_free_guidance
from nerfstudio_distill.priors.camera_lora import VSD_ADAPTER
from nerfstudio_distill.priors.lora import LoraSpec, add_lora, lora_scale
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd

PROMPT = "a red ball"
B = 2


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def randomise(params, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def vsd_prior(folder: Path, trained: bool = True, personalised: bool = False):
    """The tiny SD with VSD's camera LoRA (random non-zero weights when ``trained``); ``personalised`` first
    adds a random second adapter, as a prior loaded with --pipeline.prior.stable-diffusion.lora has."""
    prior = StableDiffusionPrior(model=str(folder), device="cpu", dtype="fp32")
    if personalised:
        randomise(add_lora(prior.unet, LoraSpec(rank=2), "distill", seed=3), seed=4)
    lora = prior.add_camera_lora(LoraSpec(rank=4))
    if trained:
        randomise(lora.parameters(), seed=1)
    return prior, lora


def fixed_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    noise = torch.randn(B, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    cameras = torch.randn(B, 12, generator=g)
    return x0, noise, cameras, torch.tensor([250, 700])


def unet_by_hand(prior, lora, x, t, prompt: str, camera=None):
    """ε by a plain UNet call: without a camera the VSD adapter at strength 0 (the pretrained model); with
    one the adapter on and the camera embedding as the UNet's class embedding."""
    text = prior.text_embeddings([prompt]).expand(len(x), -1, -1)
    with torch.no_grad():
        if camera is None:
            with lora_scale(prior.unet, 0.0, VSD_ADAPTER):
                return prior.unet(x, t, encoder_hidden_states=text).sample
        prior.unet.class_embedding = lora.embedding
        try:
            return prior.unet(x, t, encoder_hidden_states=text, class_labels=camera).sample
        finally:
            prior.unet.class_embedding = None


def count_unet_calls(prior) -> list[int]:
    rows: list[int] = []
    prior.unet.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(len(args[0])), with_kwargs=True
    )
    return rows


@pytest.mark.parametrize(
    "lora_guidance_scale, personalised, calls",
    [(1.0, False, [3 * B]), (2.0, False, [4 * B]), (1.0, True, [B, 2 * B])],
    ids=["one-call", "lora-cfg", "personalised-two-calls"],
)
def test_gradient_equals_the_formula(tiny_sd, lora_guidance_scale, personalised, calls):
    """grad = w(t)(ε̂_pretrain^CFG − ε̂_φ) with both ε̂ computed by separate plain UNet calls; the guidance's
    no-grad evaluation is ONE UNet call of 3B rows (4B with the LoRA's own CFG), or two calls when a
    personalisation adapter sits beside VSD's (peft selects one adapter per row), then one training call."""
    prior, lora = vsd_prior(tiny_sd, personalised=personalised)
    x0, noise, cameras, t = fixed_inputs()
    rows = count_unet_calls(prior)
    out = vsd(
        prior, x0.clone().requires_grad_(), Condition(PROMPT, camera=cameras), t=t, noise=noise,
        guidance_scale=7.5, lora_guidance_scale=lora_guidance_scale, drop_camera=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert rows == [*calls, B]  # the evaluation(s), then the LoRA's training call

    x_t = add_noise(prior.alphas_cumprod, x0, noise, t).float()
    eps_pre = classifier_free_guidance(
        unet_by_hand(prior, lora, x_t, t, ""), unet_by_hand(prior, lora, x_t, t, PROMPT), 7.5
    )
    eps_phi = unet_by_hand(prior, lora, x_t, t, PROMPT, cameras)
    if lora_guidance_scale != 1:
        eps_null = unet_by_hand(prior, lora, x_t, t, PROMPT, torch.zeros_like(cameras))
        eps_phi = classifier_free_guidance(eps_null, eps_phi, lora_guidance_scale)
    w = weight("sds", prior.alphas_cumprod, t).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.eps, eps_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.eps_lora, eps_phi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.grad, w * (eps_pre - eps_phi), atol=1e-5, rtol=1e-5)
    assert (eps_pre - eps_phi).abs().max() > 1e-2  # the two branches really differ here


def test_gradient_equals_the_formula_for_a_v_prediction_prior(tmp_path):
    """With a v-prediction model both ε̂ are the UNet's v turned into ε (ε = √ᾱ v + √(1−ᾱ) x_t), and the LoRA
    trains on the v target (test_diffusion_loss_is_personalisations)."""
    from nerfstudio_distill.priors.stable_diffusion import v_to_eps

    prior, lora = vsd_prior(build_tiny_sd(tmp_path, "v_prediction"))
    x0, noise, cameras, t = fixed_inputs()
    out = vsd(
        prior, x0, Condition(PROMPT, camera=cameras), t=t, noise=noise, guidance_scale=7.5, drop_camera=False
    )
    x_t = add_noise(prior.alphas_cumprod, x0, noise, t).float()
    a = prior.alphas_cumprod[t]

    def eps(prompt, camera=None):
        return v_to_eps(unet_by_hand(prior, lora, x_t, t, prompt, camera), x_t, a)

    expected = classifier_free_guidance(eps(""), eps(PROMPT), 7.5) - eps(PROMPT, cameras)
    w = weight("sds", prior.alphas_cumprod, t).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, w * expected, atol=1e-5, rtol=1e-5)


def test_rows_without_a_camera_are_the_unet_as_loaded(tiny_sd):
    """With a trained camera LoRA attached, a call without cameras (every other method's) predicts what the
    plain prior does; a fresh LoRA (B = 0, zero last embedding layer) predicts the pretrained model."""
    prior, lora = vsd_prior(tiny_sd)
    plain = StableDiffusionPrior(model=str(tiny_sd), device="cpu", dtype="fp32")
    x0, noise, cameras, t = fixed_inputs()
    x = torch.stack([x0, noise])
    torch.testing.assert_close(
        prior.predict_noise(x, t, [PROMPT, ""]), plain.predict_noise(x, t, [PROMPT, ""]), atol=1e-6, rtol=0
    )
    fresh, _ = vsd_prior(tiny_sd, trained=False)
    with_camera = fresh.predict_noise(x0[None], t, [Condition(PROMPT, camera=cameras)], 1.0)
    torch.testing.assert_close(
        with_camera, plain.predict_noise(x0[None], t, [PROMPT], 1.0), atol=1e-6, rtol=0
    )
    assert not torch.allclose(
        prior.predict_noise(x0[None], t, [Condition(PROMPT, camera=cameras)], 1.0), with_camera, atol=1e-3
    )


def test_lora_loss_is_the_diffusion_loss_and_trains_only_the_lora(tiny_sd):
    """train_loss = mean ‖ε̂_φ(x_τ; y, τ, c) − ε'‖² on the detached x0 (by hand); its gradient reaches the
    adapters and the camera embedding, never x0 or a UNet weight; drop_camera uses the null camera."""
    prior, lora = vsd_prior(tiny_sd)
    x0, noise, cameras, t = fixed_inputs()
    x0 = x0.requires_grad_()
    tau = torch.tensor([10, 900])
    for drop in (False, True):
        out = vsd(
            prior,
            x0,
            Condition(PROMPT, camera=cameras),
            t=t,
            noise=noise,
            lora_t=tau,
            lora_noise=noise * 0.5,
            drop_camera=drop,
        )
        cam = torch.zeros_like(cameras) if drop else cameras
        x_tau = add_noise(prior.alphas_cumprod, x0.detach(), noise * 0.5, tau).float()
        pred = unet_by_hand(prior, lora, x_tau, tau, PROMPT, cam)
        torch.testing.assert_close(
            out.train_loss.detach(), (pred - noise * 0.5).pow(2).mean(), atol=1e-6, rtol=1e-5
        )
    out.train_loss.backward()
    assert x0.grad is None
    assert all(p.grad is not None for p in lora.parameters())
    assert all(p.grad is None for n, p in prior.unet.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_personalisations(tmp_path, prediction_type):
    """The prior's diffusion_loss (VSD's) equals ns-distill-personalize's, itself tested against diffusers'
    training loss, for rows without a camera (eps and v targets)."""
    from nerfstudio_distill.scripts.personalize import diffusion_loss

    prior = StableDiffusionPrior(
        model=str(build_tiny_sd(tmp_path, prediction_type)), device="cpu", dtype="fp32"
    )
    x0, noise, _, t = fixed_inputs()
    embeddings = prior.text_embeddings([PROMPT] * B)
    torch.testing.assert_close(
        prior.diffusion_loss(x0, t, noise, PROMPT), diffusion_loss(prior, x0, embeddings, t, noise)
    )


def test_lora_loss_falls_on_a_fixed_image_set(tiny_sd):
    """Training the LoRA with VSD's train_loss (Adam, 40 steps) lowers its diffusion loss on a fixed set of
    images, cameras, timesteps and noises."""
    prior, lora = vsd_prior(tiny_sd, trained=False)
    g = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    with torch.no_grad():
        latents = prior.encode(images)
    cameras = torch.randn(4, 12, generator=g)
    fixed_t = torch.linspace(50, 950, 8).long()
    fixed_noise = torch.randn(8, *latents.shape, generator=g)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(
                sum(
                    prior.diffusion_loss(
                        latents, fixed_t[i].expand(4), fixed_noise[i], Condition(PROMPT, camera=cameras)
                    ).mean()
                    for i in range(8)
                )
                / 8
            )

    before = fixed_loss()
    optimizer = torch.optim.Adam(lora.parameters(), lr=3e-3)
    for step in range(40):
        optimizer.zero_grad()
        out = vsd(
            prior, latents, Condition(PROMPT, camera=cameras), generator=torch.Generator().manual_seed(step)
        )
        out.train_loss.backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)


def test_guidance_module_holds_the_adapters_and_they_round_trip(tiny_sd):
    """GuidanceConfig(method="vsd").setup(prior): its state dict is the adapters and the camera embedding
    only (what a checkpoint gets); loaded into the guidance of another prior it gives the same predictions,
    which differ from a fresh LoRA's; without a prior (ns-export) it holds nothing."""
    config = GuidanceConfig(method="vsd")
    prior = StableDiffusionPrior(model=str(tiny_sd), device="cpu", dtype="fp32")
    guidance = config.setup(prior)
    params = [p for p in guidance.parameters() if p.requires_grad]
    randomise(params, seed=2)
    state = guidance.state_dict()
    assert all(k.startswith(("lora.adapters.", "lora.embedding.")) for k in state), list(state)[:5]
    adapted = [n for n, _ in prior.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert sum(k.startswith("lora.adapters.") for k in state) == 2 * len(adapted)
    lora_numel = sum(v.numel() for v in state.values())
    unet_numel = sum(p.numel() for n, p in prior.unet.named_parameters() if ".lora_" not in n)
    assert lora_numel < unet_numel / 5 and len(params) == len(state)
    assert config.setup(None).state_dict() == {}

    x0, _, cameras, t = fixed_inputs()
    other = StableDiffusionPrior(model=str(tiny_sd), device="cpu", dtype="fp32")
    loaded = config.setup(other)
    condition = [Condition(PROMPT, camera=cameras)]
    fresh = other.predict_noise(x0[None], t, condition, 1.0)
    loaded.load_state_dict(state)
    torch.testing.assert_close(
        other.predict_noise(x0[None], t, condition, 1.0), prior.predict_noise(x0[None], t, condition, 1.0)
    )
    assert not torch.allclose(fresh, prior.predict_noise(x0[None], t, condition, 1.0), atol=1e-3)


def test_guidance_module_collects_the_lora_loss_of_a_step(tiny_sd):
    """The module keeps each call's LoRA loss; pop_losses gives their batch-weighted mean once."""
    prior = StableDiffusionPrior(model=str(tiny_sd), device="cpu", dtype="fp32")
    guidance = GuidanceConfig(method="vsd").setup(prior)
    x0, _, cameras, _ = fixed_inputs()
    a = guidance(
        prior, x0[:1], Condition(PROMPT, camera=cameras[:1]), generator=torch.Generator().manual_seed(0)
    )
    b = guidance(prior, x0, Condition(PROMPT, camera=cameras), generator=torch.Generator().manual_seed(1))
    losses = guidance.pop_losses()
    torch.testing.assert_close(losses["vsd_lora"], (a.train_loss + 2 * b.train_loss) / 3)
    assert guidance.pop_losses() == {} and GuidanceConfig(method="sds").setup(prior).pop_losses() == {}
    with pytest.raises(PriorInputError, match="camera_condition"):
        guidance(prior, x0, PROMPT)


def test_options_are_checked():
    from nerfstudio_distill.errors import DistillError

    for changes, needle in [
        (dict(lora_rank=0), "lora-rank"),
        (dict(camera_dropout=1.5), "camera-dropout"),
        (dict(lora_guidance_scale=float("nan")), "lora-guidance-scale"),
        (dict(timesteps=TimestepSchedule(anneal="step", step_at=2.0)), "step-at"),
    ]:
        with pytest.raises(DistillError, match=needle):
            dataclasses.replace(GuidanceConfig(method="vsd"), **changes).check()
    from nerfstudio_distill.priors import ExactPrior

    with pytest.raises(DistillError, match="prior.kind stable-diffusion") as err:
        GuidanceConfig(method="vsd").setup(ExactPrior(torch.rand(2, 3, 4, 4), ["a", "b"]))
    assert "\n" not in str(err.value)
    step = TimestepSchedule(anneal="step", final_max_fraction=0.5, step_at=0.5)
    assert step.max_fraction_at(0.49) == 0.98 and step.max_fraction_at(0.5) == 0.5


def test_ns_distill_2d_refuses_vsd_in_one_line(tmp_path):
    from nerfstudio_distill.scripts import distill_2d

    args = distill_2d.Distill2DArgs(
        image=tmp_path / "x.png", target_prompt=PROMPT, guidance=GuidanceConfig(method="vsd")
    )
    with pytest.raises(distill_2d.Distill2DError, match="ns-train vsd-nerfacto") as err:
        distill_2d.check_args(args)
    assert "\n" not in str(err.value)


def test_vsd_nerfacto_defaults_are_prolificdreamers():
    from method_configs.vsd_nerfacto import vsd_nerfacto

    config = vsd_nerfacto.config
    g = config.pipeline.guidance
    assert (g.method, g.guidance_scale, g.lora_rank, g.lora_guidance_scale, g.camera_dropout) == (
        "vsd",
        7.5,
        4,
        1.0,
        0.1,
    )
    assert (g.timesteps.min_fraction, g.timesteps.max_fraction, g.timesteps.final_max_fraction) == (
        0.02,
        0.98,
        0.5,
    )
    assert g.timesteps.anneal == "step" and g.weighting == "sds"
    opt = config.optimizers["guidance"]["optimizer"]
    assert opt._target is torch.optim.AdamW and opt.lr == 1e-4 and opt.betas == (0.9, 0.99)


# ------------------------------------------------------------------------------------ the pipeline
def vsd_pipeline(tiny_sd: Path, **changes):
    from nerfstudio_distill.pipelines.text_to_3d import TextTo3DPipelineConfig
    from nerfstudio_distill.priors.config import PriorConfig
    from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPriorConfig
    from tests.test_text_to_3d import cameras, tiny_model

    config = TextTo3DPipelineConfig(
        datamanager=cameras(resolutions=(IMAGE_SIZE,)),
        model=tiny_model(),
        prompt=PROMPT,
        guidance=GuidanceConfig(method="vsd", guidance_scale=7.5),
        prior=PriorConfig(
            kind="stable-diffusion",
            stable_diffusion=StableDiffusionPriorConfig(model=str(tiny_sd), dtype="fp32"),
        ),
        prior_resolution=None,
        **changes,
    )
    pipe = config.setup(device="cpu", test_mode="val", grad_scaler=None)
    pipe.start_edit(0, 10)
    return pipe


@pytest.mark.parametrize("chunk_size", [16384, 100], ids=["one-pass", "two-pass"])
def test_text_to_3d_step_trains_the_field_and_the_lora(tiny_sd, chunk_size):
    """A vsd step of the text-to-3D pipeline: the views' cameras reach the LoRA rows, the losses hold the
    LoRA's ("vsd_lora"), and one backward gives gradients to the field and to every LoRA parameter (in the
    optimizer's "guidance" group); the pipeline's state dict holds the adapters and no prior weight."""
    from nerfstudio_distill.priors.base import camera_condition

    pipe = vsd_pipeline(tiny_sd, chunk_size=chunk_size)
    seen, views = [], []
    predict_noise, sample_views = pipe.prior.predict_noise, pipe.datamanager.sample_views
    pipe.prior.predict_noise = lambda x, t, c, g=None: (seen.extend(c), predict_noise(x, t, c, g))[1]
    pipe.datamanager.sample_views = lambda *a, **k: (views.append(sample_views(*a, **k)), views[-1])[1]
    _, losses, _ = pipe.get_train_loss_dict(step=1)
    assert set(losses) >= {"guidance", "vsd_lora"} and losses["vsd_lora"].requires_grad
    sum(losses.values()).backward()
    lora = pipe.guidance.lora
    assert pipe.get_param_groups()["guidance"] == list(lora.parameters())
    # at the start only the parts after a zero can move: B of each adapter, the embedding's last layer
    moved = [n for n, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert "embedding.linear_2.weight" in moved and any(n.endswith("lora_B__weight") for n in moved)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.model.parameters())
    sent = torch.cat(
        [
            c.camera
            for c in seen
            if isinstance(c, Condition) and c.camera is not None and c.camera.abs().sum() > 0
        ]
    )
    torch.testing.assert_close(
        sent.unique(dim=0), camera_condition(views[0].cameras.camera_to_worlds).unique(dim=0)
    )
    state = pipe.state_dict()
    assert any(k.startswith("guidance.lora.adapters.") for k in state)
    assert not any(k.startswith("guidance.") and not k.startswith("guidance.lora.") for k in state)
    assert not any("unet" in k or "vae" in k or "text_encoder" in k for k in state)


# ----------------------------------------------------------------------------------------- CLI
def ns_train_vsd(out: Path, tiny_sd: Path, *flags: str, steps: int = 2) -> list[str]:
    from tests.conftest import CPU_NERFACTO
    from tests.test_text_to_3d import FOV, RADIUS, TINY

    return [
        "ns-train", "vsd-nerfacto", *CPU_NERFACTO, *TINY,
        "--max-num-iterations", str(steps), "--output-dir", str(out), "--timestamp", "run",
        "--pipeline.prompt", PROMPT,
        "--pipeline.prior.kind", "stable-diffusion",
        "--pipeline.prior.stable-diffusion.model", str(tiny_sd),
        "--pipeline.prior.stable-diffusion.dtype", "fp32",
        "--pipeline.prior-resolution", "None",
        "--pipeline.datamanager.resolutions", str(IMAGE_SIZE),
        "--pipeline.datamanager.radius", str(RADIUS), str(RADIUS),
        "--pipeline.datamanager.fov", str(FOV), str(FOV),
        "--pipeline.datamanager.elevation", "6", "70",
        "--pipeline.datamanager.num-eval-views", "4",
        "--pipeline.model.shading-start", "0",
        "--steps-per-save", "2",
        *flags,
    ]  # fmt: skip


@pytest.mark.slow
def test_vsd_nerfacto_trains_resumes_and_exports(tiny_sd, tmp_path, capsys):
    """ns-train vsd-nerfacto (tiny SD) for 2 steps: the checkpoint holds the LoRA (adapters and camera
    embedding, changed from their fresh values by the steps) and its optimizer state, and no prior weight;
    --load-dir resumes with those adapters (the trainer's own loading, compared with the checkpoint) to step
    5; ns-export pointcloud works on the run."""
    import yaml

    from tests.conftest import ns_export, ns_export_main, ns_train_main, run_here

    out = tmp_path / "out"
    run_here(ns_train_main, ns_train_vsd(out, tiny_sd))
    run = out / "unnamed" / "vsd-nerfacto" / "run"
    (ckpt,) = (run / "nerfstudio_models").glob("step-*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = saved["pipeline"]
    lora = {k: v for k, v in state.items() if k.startswith("guidance.")}
    assert lora and all(k.startswith(("guidance.lora.adapters.", "guidance.lora.embedding.")) for k in lora)
    assert not any("unet" in k or "vae" in k or "text_encoder" in k or "_prior" in k for k in state)
    assert lora["guidance.lora.embedding.linear_2.weight"].abs().sum() > 0  # trained from its zero start
    assert "guidance" in saved["optimizers"]

    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.load_dir = run / "nerfstudio_models"
    config.max_num_iterations = 6
    config.output_dir = tmp_path / "resumed"

    def resume(_) -> None:  # ns-train's main, with a look at the loaded adapters before training
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        loaded = trainer.pipeline.guidance.state_dict()
        assert all(torch.equal(loaded[k[len("guidance.") :]], v) for k, v in lora.items())
        trainer.train()

    capsys.readouterr()
    run_here(resume, [])
    assert "4 of the 6 planned steps are left" in capsys.readouterr().out
    assert (
        tmp_path
        / "resumed"
        / "unnamed"
        / "vsd-nerfacto"
        / "run"
        / "nerfstudio_models"
        / "step-000000005.ckpt"
    ).exists()

    target = tmp_path / "pointcloud"
    run_here(
        ns_export_main,
        ns_export("pointcloud", run, target, "--num-points", "256", "--normal-method", "open3d"),
    )
    assert (target / "point_cloud.ply").stat().st_size > 0
