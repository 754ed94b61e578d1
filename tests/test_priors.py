"""Tests of nerfstudio_distill.priors: the exact Gaussian-mixture prior and a tiny offline Stable Diffusion"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_distill.priors import (
    CFG,
    Branch,
    Condition,
    ExactPrior,
    Prior,
    PriorInputError,
    PriorLoadError,
    StableDiffusionPrior,
    StableDiffusionPriorConfig,
    import_diffusers,
    v_to_eps,
)
from nerfstudio_distill.priors.base import camera_condition, scaled_linear_betas
from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd


def assert_one_line(error: pytest.ExceptionInfo, *fix: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in fix:
        assert part in message, message


# ---------------------------------------------------------------------------------------------- exact prior
def brute_force(points, labels, sigma, acp, x, t, prompt):
    """ε̂ and E[x0|x_t] for ONE x_t by a plain loop over the components (float64, plain exp)."""
    a = float(acp[t])
    v = a * sigma**2 + 1 - a
    comps = [p.double() for p, label in zip(points, labels, strict=True) if prompt in ("", label)]
    dens = [math.exp(-float(((x.double() - math.sqrt(a) * mu) ** 2).sum()) / (2 * v)) for mu in comps]
    m = sum(d * mu for d, mu in zip(dens, comps, strict=True)) / sum(dens)
    eps = math.sqrt(1 - a) * (x.double() - math.sqrt(a) * m) / v
    x0 = m + sigma**2 * math.sqrt(a) / v * (x.double() - math.sqrt(a) * m)
    return eps, x0


def toy_2d():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(7, 2, generator=g)
    labels = ["left", "right", "left", "up", "right", "left", "up"]
    return points, labels


def toy_images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 3, 4, 4, generator=g), ["red", "blue", "red", "red", "blue"]


@pytest.mark.parametrize("data", [toy_2d, toy_images])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("prompt", ["", "red_or_left"])
def test_exact_matches_brute_force(data, sigma, prompt):
    points, labels = data()
    prompt = labels[0] if prompt else ""
    prior = ExactPrior(points, labels, sigma=sigma)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([100, 400, 700, 999])
    x = torch.randn(len(t), *points.shape[1:], generator=g)
    eps = prior._eps(x, t, prior.embed([prompt] * len(t)))
    x0 = prior.posterior_mean(x, t, prompt)
    for i in range(len(t)):
        ref_eps, ref_x0 = brute_force(
            points, labels, sigma, prior.alphas_cumprod.double(), x[i], int(t[i]), prompt
        )
        torch.testing.assert_close(eps[i].double(), ref_eps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0[i].double(), ref_x0, rtol=1e-5, atol=1e-5)
    # Tweedie consistency of the two read-outs: x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂.
    a = prior.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1))
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, rtol=1e-4, atol=1e-4)


def test_exact_float32_agrees():
    points, labels = toy_2d()
    x, t = torch.randn(3, 2), torch.tensor([50, 300, 900])
    p64, p32 = ExactPrior(points, labels, 0.1), ExactPrior(points, labels, 0.1, dtype=torch.float32)
    torch.testing.assert_close(p32._eps(x, t, p32.embed([""] * 3)), p64._eps(x, t, p64.embed([""] * 3)))


def test_exact_extreme_is_finite():
    """1 − ᾱ ≈ 1e-3 and points 200 apart: every density underflows to 0 without log-sum-exp."""
    points = torch.tensor([[-100.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    prior = ExactPrior(points, ["a", "b", "a"])
    x = torch.tensor([[-99.0, 1.0], [1000.0, -1000.0], [60.0, 0.0]])
    t = torch.zeros(3, dtype=torch.long)
    eps = prior._eps(x, t, prior.embed([""] * 3))
    x0 = prior.posterior_mean(x, t)
    assert torch.isfinite(eps).all() and torch.isfinite(x0).all()
    torch.testing.assert_close(x0, points[[0, 1, 1]])  # the nearest point wins outright
    x0_a = prior.posterior_mean(x[2:], t[:1], "a")  # nearest among the "a" components
    torch.testing.assert_close(x0_a, points[[2]])


def test_exact_cfg_one_call(monkeypatch):
    points, labels = toy_2d()
    prior = ExactPrior(points, labels, sigma=0.2)
    calls = []
    inner = prior._eps
    monkeypatch.setattr(prior, "_eps", lambda x, t, conds: (calls.append(x.shape[0]), inner(x, t, conds))[1])
    x = torch.randn(2, 3, 2)  # G=2 groups, B=3
    t = torch.tensor([20, 500, 980])
    scale = 4.0
    out = prior.predict_noise(x, t, ["left", "up"], guidance_scale=scale)
    assert calls == [2 * 2 * 3]
    acp = prior.alphas_cumprod.double()
    for g, prompt in enumerate(["left", "up"]):
        for b in range(3):
            cond, _ = brute_force(points, labels, 0.2, acp, x[g, b], int(t[b]), prompt)
            uncond, _ = brute_force(points, labels, 0.2, acp, x[g, b], int(t[b]), "")
            torch.testing.assert_close(
                out[g, b].double(), uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5
            )
    calls.clear()
    prior.predict_noise(x, t[:1], ["left", "up"], guidance_scale=1.0)  # no CFG: G·B rows, one call
    assert calls == [2 * 3]


# ------------------------------------------------------------------------------- conditions and CFG branches
class ImagePrior(Prior):
    """ε̂ = tanh(x_t + c_y) + 0.5 · image + 0.1 · camera · (1 + t/T): text, image and camera each change ε̂."""

    takes_image = True
    takes_camera = True

    def __init__(self) -> None:
        super().__init__(scaled_linear_betas(), guidance_scale=2.0)

    def encode(self, images):
        return images

    def _embed(self, prompt):
        return torch.tensor(sum(map(ord, prompt)) % 17 / 10.0)

    def _eps(self, x_t, t, conds, images=None, cameras=None):
        out = torch.tanh(x_t.double() + torch.stack(list(conds)).double().reshape(-1, 1, 1, 1))
        if images is not None:
            out = out + 0.5 * torch.stack([torch.zeros(x_t.shape[1:]) if i is None else i for i in images])
        if cameras is not None:
            cam = torch.stack([torch.zeros(2) if c is None else c for c in cameras]).sum(1)
            out = out + 0.1 * (cam * (1 + t / 1000)).reshape(-1, 1, 1, 1)
        return out.float()


def one_branch(prior, x, t, condition):
    """ε̂ of ONE condition and no guidance (scale 1), for writing CFG formulas out by hand."""
    return prior.predict_noise(x[None], t, [condition], 1.0)[0]


def count_eps(prior, monkeypatch):
    calls = []
    inner = prior._eps
    monkeypatch.setattr(prior, "_eps", lambda *a, **k: (calls.append(a[0].shape[0]), inner(*a, **k))[1])
    return calls


def test_instruct_cfg_matches_the_three_branch_formula(monkeypatch):
    """InstructPix2Pix's CFG (Brooks et al. 2023, Eq. 3), written out from single-branch calls; one call."""
    prior = ImagePrior()
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    conditions = [Condition("cat", image[0]), Condition("dog", image[1][:1])]  # per element / one for all
    calls = count_eps(prior, monkeypatch)
    out = prior.predict_noise(x, t, conditions, CFG.instruct(text_scale=7.5, image_scale=1.5))
    assert calls == [3 * 2 * 3]
    for k, c in enumerate(conditions):
        both = one_branch(prior, x[k], t, c)
        image_only = one_branch(prior, x[k], t, Condition("", c.image))
        neither = one_branch(prior, x[k], t, Condition(""))
        expected = neither + 1.5 * (image_only - neither) + 7.5 * (both - image_only)
        torch.testing.assert_close(out[k], expected)


def test_text_cfg_drops_every_condition(monkeypatch):
    """Two-branch text CFG: the unconditional branch drops text, image and camera; one call of 2·G·B."""
    prior = ImagePrior()
    g = torch.Generator().manual_seed(1)
    x, image, camera = torch.randn(1, 2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4), torch.randn(2, 2)
    t = torch.tensor([300])
    c = Condition("cat", image, camera)
    calls = count_eps(prior, monkeypatch)
    out = prior.predict_noise(x, t, [c], 4.0)
    assert calls == [2 * 1 * 2]
    cond, uncond = one_branch(prior, x[0], t, c), one_branch(prior, x[0], t, Condition(""))
    torch.testing.assert_close(out[0], uncond + 4.0 * (cond - uncond))
    by_hand = CFG((Branch(text=False, image=False, camera=False), Branch(scale=4.0)))
    assert torch.equal(prior.predict_noise(x, t, [c], by_hand), out)


def test_cfg_object_equals_the_scale(monkeypatch):
    """CFG.text(s) and a bare scale are the same call; strings are text-only conditions."""
    points, labels = toy_2d()
    prior = ExactPrior(points, labels, sigma=0.2)
    x, t = torch.randn(2, 3, 2), torch.tensor([20, 500, 980])
    calls = count_eps(prior, monkeypatch)
    for scale in (1.0, 4.0):
        expected = prior.predict_noise(x, t, ["left", "up"], scale)
        assert torch.equal(prior.predict_noise(x, t, [Condition("left"), "up"], CFG.text(scale)), expected)
    assert calls == [2 * 3, 2 * 3, 2 * 2 * 3, 2 * 2 * 3]


@pytest.mark.parametrize("kind", ["image", "camera"])
def test_text_priors_refuse_image_and_camera(kind):
    points, labels = toy_2d()
    prior = ExactPrior(points, labels)
    condition = Condition("left", **{kind: torch.zeros(1, 2)})
    with pytest.raises(PriorInputError) as e:
        prior.predict_noise(torch.randn(1, 3, 2), torch.tensor([100]), [condition], 3.0)
    assert_one_line(e, f"ExactPrior takes no {kind} condition", f"drop {kind}=")


def test_condition_batch_must_match():
    prior = ImagePrior()
    with pytest.raises(PriorInputError) as e:
        prior.predict_noise(
            torch.randn(1, 3, 2, 4, 4), torch.tensor([100]), [Condition("a", torch.zeros(2, 2, 4, 4))]
        )
    assert_one_line(e, "one image per batch element (3 x ...)")


def test_exact_errors():
    points, labels = toy_images()
    prior = ExactPrior(points, labels)
    with pytest.raises(PriorInputError) as e:
        prior.embed(["green"])
    assert_one_line(e, "'red'", "'blue'")
    with pytest.raises(PriorInputError) as e:
        prior.encode(torch.rand(1, 3, 8, 8))
    assert_one_line(e, "size=(4, 4)")
    with pytest.raises(PriorInputError) as e:
        prior.encode(torch.rand(1, 3, 4, 4) + 1)
    assert_one_line(e, "clamp")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(torch.randn(3, 2), ["a"] * 3).encode(torch.rand(4, 3))
    assert_one_line(e, "B x 2")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(torch.randn(3, 2), ["a", "b"])
    assert_one_line(e, "one label per point")


def test_exact_encode_identity():
    prior = ExactPrior(*toy_images())
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = prior.encode(images)
    assert torch.equal(out, images)
    out.sum().backward()
    assert images.grad is not None
    points = torch.randn(5, 2)  # non-image data (even with values outside [0, 1]) passes through
    assert torch.equal(ExactPrior(torch.randn(3, 2), ["a"] * 3).encode(points), points)


def test_exact_from_folders(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for folder, n in [("red", 2), ("blue", 1)]:
        (tmp_path / folder).mkdir()
        for i in range(n):
            rgba = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
            Image.fromarray(rgba, "RGBA").save(tmp_path / folder / f"{i}.png")
            arrays[(folder, i)] = rgba[..., :3]
    prior = ExactPrior.from_folders(
        {"a red ball": tmp_path / "red", "a blue ball": tmp_path / "blue"}, sigma=0.1
    )
    assert prior.points.shape == (3, 3, 6, 5) and prior.labels == ["a red ball", "a red ball", "a blue ball"]
    expected = torch.from_numpy(arrays[("red", 1)]).permute(2, 0, 1).double() / 255
    torch.testing.assert_close(prior.points[1], expected)
    with pytest.raises(PriorInputError) as e:
        ExactPrior.from_folders({"x": tmp_path / "missing"})
    assert_one_line(e, "no *.png")


# ------------------------------------------------------------------------- exact prior with image condition
def conditioned_set():
    """Edit pairs in 2D: "after" points μ_i with their "before" images c_i (4-vectors), two instructions."""
    g = torch.Generator().manual_seed(3)
    before = torch.randn(6, 4, generator=g)
    after = torch.randn(6, 4, generator=g)
    labels = ["turn", "turn", "turn", "keep", "keep", "keep"]
    return after, before, labels


def brute_force_conditioned(points, conditions, labels, sigma, tau, acp, x, t, prompt, c):
    """ε̂ of ONE x_t under the pair mixture Σ_i N(x0; μ_i, σ²) N(c; c_i, τ²), c None: the plain mixture."""
    a = float(acp[t])
    v = a * sigma**2 + 1 - a
    num, den = 0.0, 0.0
    for mu, ci, label in zip(points.double(), conditions.double(), labels, strict=True):
        if prompt not in ("", label):
            continue
        d = math.exp(-float(((x.double() - math.sqrt(a) * mu) ** 2).sum()) / (2 * v))
        if c is not None:
            d *= math.exp(-float(((c.double() - ci) ** 2).sum()) / (2 * tau**2))
        num, den = num + d * mu, den + d
    m = num / den
    return math.sqrt(1 - a) * (x.double() - math.sqrt(a) * m) / v


@pytest.mark.parametrize("prompt", ["", "turn"])
@pytest.mark.parametrize("with_image", [False, True])
def test_exact_image_condition_matches_brute_force(prompt, with_image):
    points, conditions, labels = conditioned_set()
    tau = 1.5
    prior = ExactPrior(points, labels, sigma=0.2, conditions=conditions, condition_sigma=tau)
    assert prior.takes_image
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([50, 400, 900])
    x = torch.randn(3, 4, generator=g)
    c = conditions[1] + 0.5 * torch.randn(4, generator=g)  # near the second pair's "before"
    images = [c.float()] * 3 if with_image else None
    eps = prior._eps(x, t, prior.embed([prompt] * 3), images=images)
    for i in range(3):
        ref = brute_force_conditioned(
            points,
            conditions,
            labels,
            0.2,
            tau,
            prior.alphas_cumprod.double(),
            x[i],
            int(t[i]),
            prompt,
            c if with_image else None,
        )
        torch.testing.assert_close(eps[i].double(), ref, rtol=1e-5, atol=1e-5)


def test_exact_image_condition_picks_the_pair_of_its_before_image():
    """With c = c_i and a small τ, E[x0 | x_t, y, c] is μ_i at every noise level: the exact instruct edit."""
    points, conditions, labels = conditioned_set()
    prior = ExactPrior(points, labels, conditions=conditions, condition_sigma=0.05)
    x = torch.randn(2, 4)
    for i in (0, 2):  # two "turn" pairs
        x0 = prior.posterior_mean(
            x, torch.tensor([999]), Condition("turn", image=conditions[i : i + 1].float())
        )
        torch.testing.assert_close(x0, points[i].float().expand(2, 4))
    # the empty instruction on the same image: the pairs of both instructions with that "before" (one here)
    x0 = prior.posterior_mean(x, torch.tensor([999]), Condition("", image=conditions[3:4].float()))
    torch.testing.assert_close(x0, points[3].float().expand(2, 4))


def test_exact_image_condition_is_three_branch_cfg_in_one_call(monkeypatch):
    points, conditions, labels = conditioned_set()
    prior = ExactPrior(points, labels, conditions=conditions, condition_sigma=1.0, image_guidance_scale=2.0)
    assert prior.cfg(3.0) == CFG.instruct(3.0, 2.0) and prior.cfg(1.0) == CFG.instruct(1.0, 2.0)
    calls = []
    inner = prior._eps
    monkeypatch.setattr(prior, "_eps", lambda *a, **k: (calls.append(a[0].shape[0]), inner(*a, **k))[1])
    x, t = torch.randn(1, 2, 4), torch.tensor([300, 700])
    c = conditions[:2].float()
    out = prior.predict_noise(x, t, [Condition("turn", image=c)], guidance_scale=3.0)
    assert calls == [3 * 2]
    e_00 = inner(x[0], t, prior.embed(["", ""]))
    e_0c = inner(x[0], t, prior.embed(["", ""]), images=list(c))
    e_tc = inner(x[0], t, prior.embed(["turn", "turn"]), images=list(c))
    torch.testing.assert_close(out[0], e_00 + 2.0 * (e_0c - e_00) + 3.0 * (e_tc - e_0c))


def test_exact_image_condition_errors_are_one_line(tmp_path):
    points, conditions, labels = conditioned_set()
    with pytest.raises(PriorInputError) as e:
        ExactPrior(points, labels, conditions=conditions[:, :3])
    assert_one_line(e, "one condition image per component")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(points, labels, conditions=conditions, condition_sigma=0.0)
    assert_one_line(e, "condition_sigma")
    prior = ExactPrior(points, labels, conditions=conditions)
    with pytest.raises(PriorInputError) as e:
        prior.predict_noise(
            torch.randn(1, 1, 4), torch.tensor([5]), [Condition("turn", image=torch.randn(1, 3))]
        )
    assert_one_line(e, "(3,)", "(4,)", "encode_condition")
    plain = ExactPrior(points, labels)
    assert not plain.takes_image
    with pytest.raises(PriorInputError) as e:
        plain.predict_noise(
            torch.randn(1, 1, 4), torch.tensor([5]), [Condition("turn", image=torch.randn(1, 4))]
        )
    assert_one_line(e, "takes no image condition")
    with pytest.raises(PriorInputError) as e:
        plain.encode_condition(torch.rand(1, 4))
    assert_one_line(e, "takes no image condition")


def test_exact_from_folders_with_condition_images(tmp_path):
    rng = np.random.default_rng(1)
    for folder in ("after", "before"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png"
            )
    prior = ExactPrior.from_folders(
        {"turn": tmp_path / "after"}, {"turn": tmp_path / "before"}, condition_sigma=0.2
    )
    assert prior.takes_image and prior.conditions.shape == prior.points.shape == (2, 3, 4, 5)
    expected = torch.from_numpy(np.array(Image.open(tmp_path / "before" / "1.png"))).permute(2, 0, 1).double()
    torch.testing.assert_close(prior.conditions[1], expected / 255)
    image = torch.rand(1, 3, 4, 5)
    assert torch.equal(prior.encode_condition(image), image)
    (tmp_path / "before" / "1.png").unlink()
    with pytest.raises(PriorLoadError) as e:
        ExactPrior.from_folders({"turn": tmp_path / "after"}, {"turn": tmp_path / "before"})
    assert_one_line(e, "1.png not found", "condition image")
    with pytest.raises(PriorInputError) as e:
        ExactPrior.from_folders({"turn": tmp_path / "after"}, {"other": tmp_path / "before"})
    assert_one_line(e, "every prompt a condition folder")


# ------------------------------------------------------------------------ camera-conditioned exact prior
def cameras_from(directions, radius: float = 4.0) -> torch.Tensor:
    """camera_condition of cameras at ``radius`` along each direction (the rotation plays no part)."""
    d = torch.as_tensor(directions, dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64).repeat(len(d), 1, 1)
    c2w[:, :3, 3] = radius * d / d.norm(dim=1, keepdim=True)
    return camera_condition(c2w).double()


def camera_set():
    """Six 2D points, each seen from its own camera on the equator (every 60°), two labels."""
    g = torch.Generator().manual_seed(5)
    points = torch.randn(6, 2, generator=g)
    angles = torch.deg2rad(torch.arange(6) * 60.0)
    directions = torch.stack([angles.cos(), angles.sin(), torch.zeros(6)], 1)
    labels = ["front", "front", "side", "side", "side", "front"]
    return points, cameras_from(directions), labels


def brute_force_camera(points, cameras, labels, kappa_deg, acp, x, t, prompt, camera):
    """ε̂ of ONE x_t under Σ_i N(x_t; √ᾱ μ_i, v) exp(−d(c, c_i)²/2κ²), d by acos of the unit positions;
    camera None: the plain mixture."""
    a = float(acp[t])
    v = 1 - a
    num, den = 0.0, 0.0
    for mu, ci, label in zip(points.double(), cameras.double(), labels, strict=True):
        if prompt not in ("", label):
            continue
        weight = math.exp(-float(((x.double() - math.sqrt(a) * mu) ** 2).sum()) / (2 * v))
        if camera is not None:
            p, q = camera.double().reshape(3, 4)[:, 3], ci.reshape(3, 4)[:, 3]
            cos = float(p @ q / (p.norm() * q.norm()))
            angle = math.acos(max(-1.0, min(1.0, cos)))
            weight *= math.exp(-(angle**2) / (2 * math.radians(kappa_deg) ** 2))
        num, den = num + weight * mu, den + weight
    return math.sqrt(1 - a) * (x.double() - math.sqrt(a) * num / den) / v


@pytest.mark.parametrize("prompt", ["", "side"])
@pytest.mark.parametrize("with_camera", [False, True])
def test_exact_camera_condition_matches_brute_force(prompt, with_camera):
    points, cameras, labels = camera_set()
    prior = ExactPrior(points, labels, cameras=cameras, camera_sigma=40.0)
    assert prior.takes_camera
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(3, 2, generator=g), torch.tensor([100, 600, 950])
    views = cameras_from(torch.randn(3, 3, generator=g), radius=3.0).float()  # anywhere, other radius
    condition = Condition(prompt, camera=views if with_camera else None)
    eps = prior.predict_noise(x[None], t, [condition], guidance_scale=1.0)[0]
    for i in range(3):
        ref = brute_force_camera(
            points,
            cameras,
            labels,
            40.0,
            prior.alphas_cumprod.double(),
            x[i],
            int(t[i]),
            prompt,
            views[i] if with_camera else None,
        )
        torch.testing.assert_close(eps[i].double(), ref, rtol=1e-5, atol=1e-5)
    if with_camera:  # the camera changes ε̂ (else this test could not tell)
        plain = prior.predict_noise(x[None], t, [prompt], guidance_scale=1.0)[0]
        assert (eps - plain).abs().max() > 1e-3


def test_exact_camera_condition_limits():
    """κ → ∞: the plain exact prior; κ → 0: the image of the nearest camera alone, at any noise level."""
    points, cameras, labels = camera_set()
    x, t = torch.randn(4, 2, generator=torch.Generator().manual_seed(7)), torch.tensor([50, 300, 700, 999])
    view = cameras_from([[math.cos(0.3), math.sin(0.3), 0.2]]).float()  # nearest: camera 0 (at 0°)
    plain = ExactPrior(points, labels).predict_noise(x[None], t, [""], 1.0)[0]
    wide = ExactPrior(points, labels, cameras=cameras, camera_sigma=1e7)
    torch.testing.assert_close(wide.predict_noise(x[None], t, [Condition("", camera=view)], 1.0)[0], plain)
    narrow = ExactPrior(points, labels, cameras=cameras, camera_sigma=0.5)
    x0 = narrow.posterior_mean(x, t, Condition("", camera=view))
    torch.testing.assert_close(x0, points[0].float().expand(4, 2))
    near_camera_3 = cameras_from([[math.cos(math.radians(185)), math.sin(math.radians(185)), -0.1]])
    x0 = narrow.posterior_mean(x, t, Condition("side", camera=near_camera_3.float()))
    torch.testing.assert_close(x0, points[3].float().expand(4, 2))


def test_exact_camera_condition_text_cfg_drops_the_camera_in_one_call(monkeypatch):
    points, cameras, labels = camera_set()
    prior = ExactPrior(points, labels, cameras=cameras, camera_sigma=30.0)
    calls, inner = [], prior._eps
    monkeypatch.setattr(prior, "_eps", lambda *a, **k: (calls.append(a[0].shape[0]), inner(*a, **k))[1])
    x, t = torch.randn(1, 2, 2), torch.tensor([300, 700])
    view = cameras_from([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).float()
    out = prior.predict_noise(x, t, [Condition("side", camera=view)], guidance_scale=3.0)
    assert calls == [2 * 2]
    uncond = inner(x[0], t, prior.embed(["", ""]))
    cond = inner(x[0], t, prior.embed(["side", "side"]), cameras=list(view))
    torch.testing.assert_close(out[0], uncond + 3.0 * (cond - uncond))


def test_exact_camera_spacing_is_the_default_bandwidth():
    angles = torch.deg2rad(torch.arange(36) * 10.0)
    directions = torch.stack([angles.cos(), angles.sin(), torch.zeros(36)], 1)
    cameras = cameras_from(directions).repeat(2, 1)  # two variants per camera: duplicates do not count
    prior = ExactPrior(torch.randn(72, 2), ["a"] * 72, cameras=cameras)
    assert prior.camera_sigma == pytest.approx(10.0, rel=1e-6)


def test_exact_camera_condition_errors_are_one_line():
    points, cameras, labels = camera_set()
    for kappa in (0.0, -5.0, math.nan, math.inf):
        with pytest.raises(PriorInputError) as e:
            ExactPrior(points, labels, cameras=cameras, camera_sigma=kappa)
        assert_one_line(e, f"camera_sigma is {kappa}", "degrees > 0")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(points, labels, cameras=cameras[:5])
    assert_one_line(e, "(5, 12) for 6 components", "camera_condition(c2w)")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(points, labels, cameras=cameras_from([[1.0, 0, 0]]).repeat(6, 1))
    assert_one_line(e, "one direction", "pass camera_sigma")
    with pytest.raises(PriorInputError) as e:
        ExactPrior(points, labels, cameras=torch.zeros(6, 12), camera_sigma=10.0)
    assert_one_line(e, "world origin")
    prior = ExactPrior(points, labels, cameras=cameras, camera_sigma=10.0)
    with pytest.raises(PriorInputError) as e:
        prior.predict_noise(
            torch.randn(1, 1, 2), torch.tensor([5]), [Condition("side", camera=torch.zeros(1, 16))]
        )
    assert_one_line(e, "(16,)", "camera_condition(c2w)")


def test_exact_config_reads_a_set_with_cameras(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "set_00").mkdir()
    names = [f"set_00/{i}.png" for i in range(3)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).save(tmp_path / name)
    cams = cameras_from([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    index = {"prompts": {"a ball": "set_00"}, "cameras": "cameras.json"}
    (tmp_path / "exact_prior.json").write_text(json.dumps(index))
    (tmp_path / "cameras.json").write_text(
        json.dumps({n: c.tolist() for n, c in zip(names, cams, strict=True)})
    )
    config = PriorConfig(kind="exact", exact=ExactPriorConfig(folder=tmp_path))
    config.check()
    prior = config.setup()
    assert config.exact.takes_camera and prior.takes_camera and prior.camera_sigma == pytest.approx(90.0)
    torch.testing.assert_close(prior.camera_directions, torch.eye(3, dtype=torch.float64))
    assert ExactPriorConfig(folder=tmp_path, camera_sigma=7.0).setup().camera_sigma == 7.0
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(PriorLoadError) as e:
            PriorConfig(kind="exact", exact=ExactPriorConfig(folder=tmp_path, camera_sigma=bad)).check()
        assert_one_line(e, "--pipeline.prior.exact.camera-sigma", "degrees > 0")
    (tmp_path / "exact_prior.json").write_text(json.dumps({**index, "camera_sigma": -3}))
    with pytest.raises(PriorLoadError) as e:
        config.check()
    assert_one_line(e, '"camera_sigma" in', "degrees > 0")
    (tmp_path / "exact_prior.json").write_text(json.dumps(index))
    (tmp_path / "cameras.json").write_text(
        json.dumps({n: c.tolist() for n, c in zip(names[:2], cams, strict=False)})
    )
    with pytest.raises(PriorLoadError) as e:
        config.check()
    assert_one_line(e, "holds 2 cameras but the set has 3 images")
    (tmp_path / "cameras.json").write_text(
        json.dumps({n: c.tolist()[:9] for n, c in zip(names, cams, strict=True)})
    )
    with pytest.raises(PriorLoadError) as e:
        config.check()
    assert_one_line(e, "is not a cameras file", "12-number")
    renamed = {n.replace(".png", "x.png"): c.tolist() for n, c in zip(names, cams, strict=True)}
    (tmp_path / "cameras.json").write_text(json.dumps(renamed))
    with pytest.raises(PriorLoadError) as e:
        config.setup()
    assert_one_line(e, "0.png has no camera", "cameras.json")
    (tmp_path / "cameras.json").unlink()
    with pytest.raises(PriorLoadError) as e:
        config.check()
    assert_one_line(e, "cameras.json not found", "cameras=True")


# ----------------------------------------------------------------------------------------- stable diffusion
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sd_v(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


@pytest.fixture
def sd(tiny_sd):
    return StableDiffusionPriorConfig(model=str(tiny_sd), device="cpu", dtype="auto").setup()


def count_calls(module):
    calls = []
    module.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True
    )
    return calls


def test_sd_loads_frozen(sd):
    assert sd.dtype == torch.float32 and sd.prediction_type == "epsilon" and sd.steps_offset == 1
    assert sd.vae_scale_factor == 2 and sd.num_train_timesteps == 1000
    for net in (sd.unet, sd.vae, sd.text_encoder):
        assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_sd_encode_decode(sd):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    latents = sd.encode(images)
    assert latents.shape == (2, 4, LATENT_SIZE, LATENT_SIZE) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert sd.decode(latents).shape == images.shape


def test_sd_one_unet_call_and_no_weight_grads(sd):
    unet_calls = count_calls(sd.unet)
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, requires_grad=True)
    latents = sd.encode(images)
    t = torch.tensor([10, 500, 990])
    a = sd.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noise = torch.randn(2, *latents.shape)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise  # G=2 groups, B=3
    eps = sd.predict_noise(x_t, t, ["a red ball", "a blue cube"], guidance_scale=7.5)
    assert unet_calls == [2 * 2 * 3]
    assert eps.shape == x_t.shape and not eps.requires_grad
    loss = ((eps - noise).detach() * x_t).sum()  # SDS-style surrogate
    loss.backward()
    assert images.grad is not None
    for net in (sd.unet, sd.vae, sd.text_encoder):
        assert all(p.grad is None for p in net.parameters())


def test_sd_embedding_cache(sd):
    text_calls = count_calls(sd.text_encoder)
    x_t, t = torch.randn(1, 2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([300])
    first = sd.predict_noise(x_t, t, ["a photo of a dog"], guidance_scale=5.0)
    assert text_calls == [1, 1]  # the prompt and "" once each
    second = sd.predict_noise(x_t, t, ["a photo of a dog"], guidance_scale=5.0)
    assert text_calls == [1, 1]
    torch.testing.assert_close(first, second)
    assert sd.embed(["a photo of a dog"])[0].shape == (1, 77, 32)


def test_v_to_eps_formula():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    acp = torch.tensor([0.999, 0.7, 0.2, 0.005])
    a = acp.reshape(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho 2022
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(v_to_eps(v, x_t, acp), eps)


def test_sd_v_prediction(tiny_sd_v):
    sd = StableDiffusionPrior(model=str(tiny_sd_v), device="cpu")
    assert sd.prediction_type == "v_prediction"
    x_t, t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([5, 800])
    conds = sd.embed(["a cat", "a dog"])
    with torch.no_grad():
        raw = sd.unet(x_t, t, encoder_hidden_states=torch.cat(conds)).sample
        eps = sd._eps(x_t, t, conds)
    a = sd.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps, a.sqrt() * raw + (1 - a).sqrt() * x_t)


@pytest.mark.parametrize(
    "shape, scale, fix",
    [
        ((1, 3, IMAGE_SIZE, IMAGE_SIZE), 2.0, "clamp"),
        ((3, IMAGE_SIZE, IMAGE_SIZE), 1.0, "images[None]"),
        ((1, 4, IMAGE_SIZE, IMAGE_SIZE), 1.0, "images[:, :3]"),
        ((1, 3, 15, 17), 1.0, "resize to 16x16"),
    ],
)
def test_sd_bad_images(sd, shape, scale, fix):
    with pytest.raises(PriorInputError) as e:
        sd.encode(torch.rand(shape) * scale)
    assert_one_line(e, fix)


@pytest.mark.parametrize("t", [-1, 1000])
def test_sd_bad_timestep(sd, t):
    with pytest.raises(PriorInputError) as e:
        sd.predict_noise(torch.randn(1, 1, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([t]), ["a"])
    assert_one_line(e, "[0, 999]")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")
def test_sd_unknown_model_offline(monkeypatch, tiny_sd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorLoadError) as e:
        StableDiffusionPrior(model="nobody/no-such-sd-model-for-tests", device="cpu")
    assert_one_line(e, "--pipeline.prior.stable-diffusion.model", "HF_HUB_OFFLINE=1")


def test_sd_missing_local_folder(tmp_path):
    with pytest.raises(PriorLoadError) as e:
        StableDiffusionPrior(model=str(tmp_path / "no_such_folder"), device="cpu")
    assert_one_line(e, "does not exist", "--pipeline.prior.stable-diffusion.model")


def test_import_diffusers_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(PriorLoadError) as e:
        import_diffusers()
    assert_one_line(e, "pip install 'diffusers>=0.30' transformers")


def test_package_import_is_lazy():
    code = "import sys, nerfstudio_distill.priors; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "diffusers" not in out and "transformers" not in out


def test_sd_options(tiny_sd, sd):
    other = StableDiffusionPrior(model=str(tiny_sd), device="cpu", channels_last=True, latent_mode="sample")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    z_mean, z_a, z_b = sd.encode(images), other.encode(images), other.encode(images)
    assert z_a.shape == z_mean.shape and not torch.equal(z_a, z_b)  # sampled latents differ per call
    x_t, t = torch.randn(1, 2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([100, 600])
    torch.testing.assert_close(
        other.predict_noise(x_t, t, ["a cat"]), sd.predict_noise(x_t, t, ["a cat"]), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(PriorInputError) as e:
        StableDiffusionPrior(model=str(tiny_sd), dtype="fp64")
    assert_one_line(e, "'fp32'")


def test_sd_from_components(tiny_sd, sd):
    """In-memory networks give the same prior as loading the folder (same weights, same outputs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {
        name: cls.from_pretrained(tiny_sd, subfolder=name)
        for name, cls in [
            ("unet", UNet2DConditionModel),
            ("vae", AutoencoderKL),
            ("text_encoder", CLIPTextModel),
            ("tokenizer", CLIPTokenizer),
            ("scheduler", DDIMScheduler),
        ]
    }
    built = StableDiffusionPrior.from_components(**parts, device="cpu", guidance_scale=3.0)
    assert isinstance(built, StableDiffusionPrior) and built.guidance_scale == 3.0
    assert built.vae_scale_factor == sd.vae_scale_factor and built.steps_offset == sd.steps_offset
    torch.testing.assert_close(built.alphas_cumprod, sd.alphas_cumprod)
    for net in (built.unet, built.vae, built.text_encoder):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(built.encode(images), sd.encode(images))
    x_t, t = torch.randn(1, 2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([100, 600])
    torch.testing.assert_close(
        built.predict_noise(x_t, t, ["a cat"], 3.0), sd.predict_noise(x_t, t, ["a cat"], 3.0)
    )
    with pytest.raises(PriorInputError) as e:
        StableDiffusionPrior.from_components(**parts, dtype="fp64")
    assert_one_line(e, "'fp32'")


def test_config_fields_documented():
    import ast
    import inspect

    from nerfstudio_distill.priors import stable_diffusion

    tree = ast.parse(inspect.getsource(stable_diffusion))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionPriorConfig"]
    body = cls.body
    fields = [i for i, n in enumerate(body) if isinstance(n, ast.AnnAssign)]
    assert len(fields) == len(dataclasses.fields(StableDiffusionPriorConfig))
    for i in fields:
        doc = body[i + 1] if i + 1 < len(body) else None
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), ast.unparse(body[i])
