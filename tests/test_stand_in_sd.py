"""benchmarks/stand_in_sd.py (a small Stable Diffusion trained on an exact-prior set) and the text-to-3D
benchmark's ``--prior sd`` path, which trains VSD's LoRA beside the field."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.stand_in_sd import STAND_IN_FILE, train_stand_in
from benchmarks.text_to_3d_quality import Settings, run, train, write_view_prior_set
from nerfstudio_distill.data.scene import CameraSpec, SceneSpec
from nerfstudio_distill.priors.base import Condition
from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPrior

RES = 16


@pytest.fixture(scope="module")
def prior_set(tmp_path_factory) -> Path:
    """The text-to-3D benchmark's view-prompt set of its striped ball, 24 views at 16 px."""
    folder = tmp_path_factory.mktemp("stand_in_set")
    s = Settings(resolution=RES)
    cameras = CameraSpec(
        layout="hemisphere", num_views=24, radius=s.radius, fov=s.fov, width=RES, height=RES, seed=0
    )
    spec = SceneSpec(shape=s.shape, colour=s.colour, pattern=s.pattern)
    return write_view_prior_set(folder, spec, cameras, {s.prompt: {}})


@pytest.fixture(scope="module")
def stand_in(prior_set, tmp_path_factory) -> Path:
    return train_stand_in(
        prior_set,
        tmp_path_factory.mktemp("stand_in") / "sd",
        unet_steps=40,
        vae_steps=40,
        batch=8,
        log=lambda _: None,
    )


def test_stand_in_learns_the_set_and_loads_as_stable_diffusion(stand_in):
    report = json.loads((stand_in / STAND_IN_FILE).read_text())["report"]
    assert report["vae_loss"] < 0.5 * report["vae_loss_first"]
    assert report["unet_loss"] < report["unet_loss_first"]
    for key in ("stand_in_psnr_t0.2", "exact_psnr_t0.2", "vae_psnr"):
        assert math.isfinite(report[key])
    prior = StableDiffusionPrior(model=str(stand_in), device="cpu", dtype="fp32", local_files_only=True)
    images = torch.rand(2, 3, RES, RES)
    latents = prior.encode(images)
    assert latents.shape == (2, 4, RES // 2, RES // 2)
    eps = prior.predict_noise(latents[None], torch.tensor([100, 500]), [Condition("a red striped ball")], 7.5)
    assert eps.shape == (1, *latents.shape) and torch.isfinite(eps).all()


def test_a_finished_stand_in_is_reused(prior_set, stand_in):
    lines: list[str] = []
    record = (stand_in / STAND_IN_FILE).read_text()
    same = train_stand_in(prior_set, stand_in, unet_steps=40, vae_steps=40, batch=8, log=lines.append)
    assert same == stand_in and lines == [] and (stand_in / STAND_IN_FILE).read_text() == record


def test_vsd_through_the_benchmark_trains_its_lora_at_its_own_learning_rate(prior_set, stand_in):
    """The benchmark's train() with --prior sd: the field's groups take the benchmark's lr, VSD's LoRA keeps
    vsd-nerfacto's (AdamW, 1e-4), and the LoRA's adapters leave their zero start."""
    s = Settings(resolution=RES, steps=3, prior="sd", cfg=7.5)
    pipe, _ = train(s, "vsd", stand_in)
    lora = dict(pipe.guidance.named_parameters())
    assert lora and any("lora_B" in name for name in lora)
    moved = [p.abs().max().item() for name, p in lora.items() if "lora_B" in name]
    assert min(moved) > 0  # B starts at zero: every adapter trained
    assert max(moved) < 1e-3  # 3 Adam steps move a weight about 3 lr: 3e-4 at 1e-4, 3e-2 at the field's 1e-2
    sds_pipe, _ = train(replace(s, steps=0), "sds", stand_in)
    assert not list(sds_pipe.guidance.parameters())


def test_vsd_needs_the_network_prior():
    with pytest.raises(ValueError, match="--prior sd"):
        run(Settings(resolution=RES, steps=0), methods=("vsd",))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--methods", "vsd"], "pass --prior sd"),
        (["--prior", "sd", "--sd-model", "/no/such"], "is not a folder"),
    ],
)
def test_bad_benchmark_flags_are_one_line(args, needle, tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "text_to_3d_quality.py"
    done = subprocess.run(
        [sys.executable, str(script), *args, "--workdir", str(tmp_path / "w")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert needle in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()  # nothing written
