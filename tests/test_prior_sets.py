"""Exact-prior image sets rendered from a synthetic scene."""

from __future__ import annotations

import pytest
import torch

from nerfstudio_distill.data.prior_sets import write_exact_prior_set
from nerfstudio_distill.data.scene import SceneError, load_scene, render, with_attributes
from nerfstudio_distill.errors import PriorLoadError
from nerfstudio_distill.priors.base import Condition, camera_condition
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from nerfstudio_distill.priors.exact import viewing_directions


def test_set_holds_each_variant_from_every_camera(tiny_scene, tmp_path):
    prompts = {
        "a red striped ball": [{}],
        "a blue ball": [{"colour": "blue"}, {"colour": "blue", "pattern": "none"}],
    }
    folder = write_exact_prior_set(tiny_scene, tmp_path / "set", prompts, sigma=0.1)
    prior = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder)).setup()
    spec, cameras = load_scene(tiny_scene)
    assert prior.points.shape == (3 * len(cameras), 3, cameras.height, cameras.width)
    assert prior.sigma == pytest.approx(0.1)
    blue = render(with_attributes(spec, colour="blue"), cameras[:1])["rgb"][0]
    mask = prior._embed("a blue ball")
    first_blue = prior.points[mask][0].permute(1, 2, 0).float().numpy()
    assert abs(first_blue - blue).max() < 1 / 255 + 1e-6


def test_scale_matches_a_downscaled_render(tiny_scene, tmp_path):
    folder = write_exact_prior_set(tiny_scene, tmp_path / "set", {"a red striped ball": [{}]}, scale=0.5)
    prior = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder)).setup()
    _, cameras = load_scene(tiny_scene)
    assert prior.points.shape[-2:] == (cameras.height // 2, cameras.width // 2)


@pytest.mark.parametrize(
    "prompts", [{" ": [{}]}, {"a ball": []}, {"a ball": [{"colour": "mauve"}]}, {"a blue ball ": [{}]}]
)
def test_bad_prompts_are_one_line(tiny_scene, tmp_path, prompts):
    with pytest.raises(SceneError) as err:
        write_exact_prior_set(tiny_scene, tmp_path / "set", prompts)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "set").exists()


def test_existing_folder_is_not_overwritten(tiny_scene, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SceneError, match="overwrite=True"):
        write_exact_prior_set(tiny_scene, out, {"a red striped ball": [{}]})
    assert (out / "keep.txt").read_text() == "mine"


INSTRUCTIONS = {
    "turn the ball blue": [{"colour": "blue"}, {"colour": "blue", "pattern": "none"}],
    "keep the ball": [{}, {"pattern": "none"}],
}
BEFORE = {"turn the ball blue": [{}, {"pattern": "none"}], "keep the ball": [{}, {"pattern": "none"}]}


def test_image_conditioned_set_is_an_exact_instruct_prior(tiny_scene, tmp_path):
    """Each image's condition is its "before" from the same camera; conditioned on a training view, the
    instruction's posterior mean is that view's edit (the pair whose "before" it is)."""
    folder = write_exact_prior_set(tiny_scene, tmp_path / "set", INSTRUCTIONS, conditions=BEFORE)
    config = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder, condition_sigma=0.05))
    assert config.takes_image
    config.check()
    prior = config.setup()
    assert (
        prior.takes_image and prior.condition_sigma == 0.05 and prior.conditions.shape == prior.points.shape
    )
    spec, cameras = load_scene(tiny_scene)
    source = torch.from_numpy(render(spec, cameras[1:2])["rgb"]).permute(0, 3, 1, 2).float()
    ideal = torch.from_numpy(render(with_attributes(spec, colour="blue"), cameras[1:2])["rgb"])
    x_t = torch.randn_like(source)
    x0 = prior.posterior_mean(
        x_t, torch.tensor([999]), Condition("turn the ball blue", prior.encode_condition(source))
    )
    assert (x0[0].permute(1, 2, 0) - ideal).abs().max() < 1 / 255 + 1e-6
    kept = prior.posterior_mean(
        x_t, torch.tensor([999]), Condition("keep the ball", prior.encode_condition(source))
    )
    assert (kept - source).abs().max() < 1 / 255 + 1e-6
    plain = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder.parent / "missing"))
    assert not plain.takes_image  # an unreadable set is check()'s one-line error, not a crash here


def test_condition_lists_must_match_the_variants(tiny_scene, tmp_path):
    with pytest.raises(SceneError) as err:
        write_exact_prior_set(
            tiny_scene, tmp_path / "set", INSTRUCTIONS, conditions={"turn the ball blue": [{}, {}]}
        )
    assert "\n" not in str(err.value) and "every prompt" in str(err.value)
    assert not (tmp_path / "set").exists()


def test_bad_condition_sigma_is_one_line(tiny_scene, tmp_path):
    folder = write_exact_prior_set(
        tiny_scene, tmp_path / "set", INSTRUCTIONS, conditions=BEFORE, condition_sigma=-1.0
    )
    with pytest.raises(PriorLoadError) as err:
        PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder)).check()
    assert "\n" not in str(err.value) and '"condition_sigma"' in str(err.value) and "> 0" in str(err.value)


def test_set_with_cameras_is_camera_conditioned(tiny_scene, tmp_path):
    """cameras=True stores each image's camera (the scene's c2w, camera_condition's layout); conditioned on
    a training camera with a small κ, the posterior mean is the image seen from that camera."""
    prompts = {"a red ball": [{}], "a plain ball": [{"pattern": "none"}]}
    plain = write_exact_prior_set(tiny_scene, tmp_path / "plain", prompts)
    assert not PriorConfig(kind="exact", exact=ExactPriorConfig(folder=plain)).setup().takes_camera
    folder = write_exact_prior_set(tiny_scene, tmp_path / "set", prompts, cameras=True, camera_sigma=2.0)
    config = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=folder))
    assert config.exact.takes_camera
    config.check()
    prior = config.setup()
    assert prior.takes_camera and prior.camera_sigma == 2.0
    spec, cameras = load_scene(tiny_scene)
    c2w = torch.from_numpy(cameras.c2w)
    expected = viewing_directions(camera_condition(c2w).double())
    torch.testing.assert_close(prior.camera_directions, torch.cat([expected, expected]))  # per prompt
    truth = torch.from_numpy(render(spec, cameras[2:3])["rgb"])
    x0 = prior.posterior_mean(
        torch.randn(1, 3, cameras.height, cameras.width),
        torch.tensor([999]),
        Condition("a red ball", camera=camera_condition(c2w[2:3])),
    )
    assert (x0[0].permute(1, 2, 0) - truth).abs().max() < 1 / 255 + 1e-6
