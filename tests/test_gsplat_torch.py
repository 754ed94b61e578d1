"""The pure-torch rasterizer that splatfacto uses without CUDA (nerfstudio_distill.compat.gsplat_torch).

Projection and SH are checked against hand-derived values and gsplat's own torch reference
(``gsplat/cuda/_torch_impl.py``); compositing against gsplat's kernel written plainly as loops here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
from gsplat.strategy import DefaultStrategy

from nerfstudio_distill import compat
from nerfstudio_distill.compat import gsplat_torch
from nerfstudio_distill.compat.gsplat_torch import (
    CPURasterizationError,
    composite,
    project,
    quat_scale_to_covar,
    rasterization,
    spherical_harmonics,
)
from tests.conftest import offline_env

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, splatfacto uses gsplat's kernels")

W, H = 16, 12
K = torch.tensor([[20.0, 0.0, 8.0], [0.0, 22.0, 6.0], [0.0, 0.0, 1.0]])
"""A pinhole camera, fx=20 fy=22 cx=8 cy=6, for a 16x12 image."""


def on_pixel(px: float, py: float, z: float) -> list[float]:
    """The camera-space point at depth z that projects to (px, py) with :data:`K` (identity view)."""
    return [(px - 8.0) / 20.0 * z, (py - 6.0) / 22.0 * z, z]


def random_gaussians(n: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g, dtype=dtype) * torch.tensor([1.6, 1.2, 1.0], dtype=dtype)
    means = means + torch.tensor([-0.8, -0.6, 1.5], dtype=dtype)
    return {
        "means": means,
        "quats": torch.randn(n, 4, generator=g, dtype=dtype),
        "scales": torch.rand(n, 3, generator=g, dtype=dtype) * 0.08 + 0.02,
        "opacities": torch.rand(n, generator=g, dtype=dtype) * 0.8 + 0.1,
        "colors": torch.rand(n, 3, generator=g, dtype=dtype),
    }


def plain_composite(means2d, conics, opacities, colors, depths, radii, width, height, tile, background):
    """gsplat's rasterize_to_pixels_fwd kernel for one camera, as loops over pixels and Gaussians."""
    order = sorted((i for i in range(len(radii)) if radii[i] > 0), key=lambda i: float(depths[i]))
    out = np.zeros((height, width, colors.shape[-1]))
    alphas = np.zeros((height, width, 1))
    for py in range(height):
        for px in range(width):
            trans, acc = 1.0, np.zeros(colors.shape[-1])
            for i in order:
                cx, cy, r = means2d[i][0] / tile, means2d[i][1] / tile, radii[i] / tile
                if not (
                    math.floor(cx - r) <= px // tile < math.ceil(cx + r)
                    and math.floor(cy - r) <= py // tile < math.ceil(cy + r)
                ):
                    continue  # Gaussian i is not listed in this pixel's tile
                dx, dy = means2d[i][0] - (px + 0.5), means2d[i][1] - (py + 0.5)
                a, b, c = conics[i]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(0.999, opacities[i] * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if trans * (1 - alpha) <= 1e-4:
                    break
                acc += colors[i] * alpha * trans
                trans *= 1 - alpha
            out[py, px] = acc + trans * background
            alphas[py, px] = 1 - trans
    return out, alphas


# --- projection ---------------------------------------------------------------------------------------


def test_covariance_from_quaternion_and_scales():
    quarter_turn_z = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]])  # wxyz
    covar = quat_scale_to_covar(2.0 * quarter_turn_z, torch.tensor([[0.1, 0.2, 0.3]]))  # unnormalised q
    torch.testing.assert_close(covar[0], torch.diag(torch.tensor([0.04, 0.01, 0.09])))  # x and y swap
    quats, scales = torch.randn(50, 4), torch.rand(50, 3)
    reference, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    torch.testing.assert_close(quat_scale_to_covar(quats, scales), reference)


def test_projection_of_an_isotropic_gaussian_by_hand():
    s, (x, y, z) = 0.1, (0.2, -0.1, 2.0)
    proj = project(
        torch.tensor([[x, y, z]]), s * s * torch.eye(3)[None], torch.eye(4)[None], K[None], W, H, eps2d=0.3
    )
    torch.testing.assert_close(proj.means2d[0, 0], torch.tensor([20 * x / z + 8, 22 * y / z + 6]))
    torch.testing.assert_close(proj.depths[0, 0], torch.tensor(z))
    # J = [[fx/z, 0, -fx x/z²], [0, fy/z, -fy y/z²]]; Σ2d = s² J Jᵀ + 0.3 I; conic = Σ2d⁻¹
    j = np.array([[20 / z, 0, -20 * x / z**2], [0, 22 / z, -22 * y / z**2]])
    cov2d = s * s * j @ j.T + 0.3 * np.eye(2)
    inv = np.linalg.inv(cov2d)
    torch.testing.assert_close(proj.conics[0, 0], torch.tensor([inv[0, 0], inv[0, 1], inv[1, 1]]).float())
    half_trace, det = 0.5 * np.trace(cov2d), np.linalg.det(cov2d)
    radius = math.ceil(3 * math.sqrt(half_trace + math.sqrt(max(0.01, half_trace**2 - det))))
    assert proj.radii[0, 0] == radius
    assert proj.compensations is None


def test_projection_through_a_camera_pose():
    angle = 0.3  # camera turned about y, then moved
    rot = torch.tensor(
        [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
    )
    viewmat = torch.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = rot, torch.tensor([0.1, -0.2, 2.5])
    mean = torch.tensor([0.3, 0.2, -0.1])
    cam = rot @ mean + viewmat[:3, 3]
    proj = project(mean[None], 0.01 * torch.eye(3)[None], viewmat[None], K[None], W, H)
    torch.testing.assert_close(proj.means2d[0, 0], (K @ cam)[:2] / cam[2])
    torch.testing.assert_close(proj.depths[0, 0], cam[2])


def test_culling_near_plane_and_outside_the_image():
    means = torch.tensor([[0.0, 0.0, 0.005], [0.0, 0.0, -1.0], [50.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    proj = project(means, 1e-4 * torch.eye(3).expand(4, 3, 3), torch.eye(4)[None], K[None], W, H)
    assert proj.radii.tolist() == [[0, 0, 0, proj.radii[0, 3].item()]] and proj.radii[0, 3] > 0
    assert torch.isfinite(proj.means2d).all() and torch.isfinite(proj.conics).all()


def test_projection_matches_gsplat_torch_reference():
    torch.manual_seed(1)
    n, c = 300, 3
    means, quats, scales = torch.randn(n, 3), torch.randn(n, 4), torch.rand(n, 3) * 0.3
    viewmats = torch.eye(4).repeat(c, 1, 1)
    viewmats[:, :3, :3] = torch.linalg.qr(torch.randn(c, 3, 3)).Q
    viewmats[:, 2, 3] = 3.0
    Ks = K.repeat(c, 1, 1)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    ref = _fully_fused_projection(means, covars, viewmats, Ks, W, H, calc_compensations=True)
    ours = project(means, covars, viewmats, Ks, W, H, compensations=True)
    assert torch.equal(ours.radii, ref[0])
    valid = ref[0] > 0
    assert 50 < valid.sum() < n * c  # some Gaussians culled, many kept
    for mine, theirs in zip(
        (ours.means2d, ours.depths, ours.conics, ours.compensations), ref[1:], strict=True
    ):
        torch.testing.assert_close(mine[valid], theirs[valid], rtol=1e-5, atol=1e-5)


# --- spherical harmonics ------------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_spherical_harmonics_match_gsplat_torch_reference(degree):
    torch.manual_seed(degree)
    dirs, coeffs = torch.randn(100, 3), torch.randn(100, 25, 3)  # more bands than the degree uses
    torch.testing.assert_close(
        spherical_harmonics(degree, dirs, coeffs), _spherical_harmonics(degree, dirs, coeffs)
    )


def test_sh_degree_zero_is_the_dc_colour_everywhere():
    coeffs = torch.randn(5, 16, 3)
    colour = spherical_harmonics(0, torch.randn(5, 3), coeffs)
    torch.testing.assert_close(colour, 0.2820947917738781 * coeffs[:, 0])


def test_sh_colours_in_rasterization_are_gsplat_s_plus_half_clamped():
    g = random_gaussians(6, seed=3)
    coeffs = torch.randn(6, 4, 3)
    viewmat = torch.eye(4)
    viewmat[:3, 3] = torch.tensor([0.1, 0.0, 0.2])
    kw = dict(packed=True, tile_size=4)
    rgb_sh, alpha, _ = rasterization(
        g["means"], g["quats"], g["scales"], g["opacities"], coeffs, viewmat[None], K[None], W, H,
        sh_degree=1, **kw,
    )  # fmt: skip
    campos = torch.inverse(viewmat)[:3, 3]
    expected = torch.clamp_min(_spherical_harmonics(1, g["means"] - campos, coeffs) + 0.5, 0.0)
    rgb, alpha2, _ = rasterization(
        g["means"], g["quats"], g["scales"], g["opacities"], expected, viewmat[None], K[None], W, H, **kw
    )
    torch.testing.assert_close(rgb_sh, rgb)
    torch.testing.assert_close(alpha, alpha2)


# --- compositing --------------------------------------------------------------------------------------


def render_one(means, opacities, colors, scales=None, **kw):
    n = len(means)
    return rasterization(
        torch.tensor(means), torch.tensor([[1.0, 0, 0, 0]] * n), torch.full((n, 3), 0.05) if scales is None else scales,
        torch.tensor(opacities), torch.tensor(colors), torch.eye(4)[None], K[None], W, H, packed=False, **kw,
    )  # fmt: skip


def test_an_opaque_gaussian_on_a_pixel_gives_its_colour_there():
    render, alpha, _ = render_one([on_pixel(5.5, 3.5, 2.0)], [1.0], [[0.2, 0.6, 0.9]])
    torch.testing.assert_close(alpha[0, 3, 5, 0], torch.tensor(0.999))  # gsplat's clamp
    torch.testing.assert_close(render[0, 3, 5], 0.999 * torch.tensor([0.2, 0.6, 0.9]))
    assert alpha[0, 11, 15, 0] == 0 and (render[0, 11, 15] == 0).all()  # far away: nothing


def test_two_gaussians_composite_front_to_back_whatever_their_order():
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    # blue (behind, depth 3) is listed first; red (front, depth 2) must still come first
    render, alpha, _ = render_one(
        [on_pixel(8.5, 6.5, 3.0), on_pixel(8.5, 6.5, 2.0)], [0.5, 0.6], [blue, red], render_mode="RGB+ED"
    )
    t_after_red = 1 - 0.6
    torch.testing.assert_close(
        render[0, 6, 8, :3], 0.6 * torch.tensor(red) + t_after_red * 0.5 * torch.tensor(blue)
    )
    torch.testing.assert_close(alpha[0, 6, 8, 0], torch.tensor(1 - t_after_red * 0.5))
    expected_depth = (0.6 * 2.0 + t_after_red * 0.5 * 3.0) / (1 - t_after_red * 0.5)
    torch.testing.assert_close(render[0, 6, 8, 3], torch.tensor(expected_depth))


def test_a_pixel_stops_before_its_transmittance_reaches_1e4():
    # after the first Gaussian T = 0.001; the second would bring it to 1e-6: excluded, and so is the third
    means = [on_pixel(4.5, 4.5, z) for z in (2.0, 2.5, 3.0)]
    render, alpha, _ = render_one(means, [1.0, 1.0, 1.0], [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    torch.testing.assert_close(render[0, 4, 4], torch.tensor([0.999, 0.0, 0.0]))
    torch.testing.assert_close(alpha[0, 4, 4, 0], torch.tensor(0.999))


def test_backgrounds_fill_what_the_gaussians_leave():
    bg = torch.tensor([[0.3, 0.5, 0.7]])
    render, alpha, _ = render_one([on_pixel(5.5, 3.5, 2.0)], [0.5], [[1.0, 0, 0]], backgrounds=bg)
    torch.testing.assert_close(render[0, 3, 5], 0.5 * torch.tensor([1.0, 0, 0]) + 0.5 * bg[0])
    torch.testing.assert_close(render[0, 11, 15], bg[0])
    depth, _, _ = render_one(
        [on_pixel(5.5, 3.5, 2.0)], [0.5], [[1.0, 0, 0]], backgrounds=bg, render_mode="RGB+D"
    )
    torch.testing.assert_close(depth[0, 3, 5, 3], torch.tensor(0.5 * 2.0))  # depth's background is 0


def test_a_gaussian_reaches_only_the_tiles_its_3_sigma_box_touches():
    # σ ≈ 5.4 px in x, radius 17 px, centre x = 7: tiles of 8 px cover x in [0, 24) only
    k = torch.tensor([[20.0, 0.0, 16.0], [0.0, 20.0, 16.0], [0.0, 0.0, 1.0]])
    mean = torch.tensor([[(7.0 - 16.0) / 20.0 * 2.0, 0.0, 2.0]])
    render, alpha, info = rasterization(
        mean, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.5), torch.tensor([0.99]),
        torch.ones(1, 3), torch.eye(4)[None], k[None], 32, 32, packed=False, tile_size=8,
    )  # fmt: skip
    assert info["radii"][0, 0] == 17
    a = info["conics"][0, 0, 0].item()
    alpha_by_formula = 0.99 * math.exp(-0.5 * a * (24.5 - 7.0) ** 2)  # at pixel x = 24, on the centre row
    assert alpha_by_formula > 1 / 255  # gsplat still leaves it out: its tile is not listed
    assert alpha[0, 16, 23, 0] > 0 and alpha[0, 16, 24, 0] == 0


@pytest.mark.parametrize("tile_size", [4, 16])
def test_rasterization_equals_gsplat_s_kernel_written_as_loops(tile_size, monkeypatch):
    monkeypatch.setattr(gsplat_torch, "PAIRS_PER_CHUNK", 64)  # many chunks, as a big image would use
    g = random_gaussians(12, seed=tile_size)
    g["means"][0] = torch.tensor([5.0, 0.0, 2.0])  # culled: outside the image
    bg = torch.tensor([[0.2, 0.1, 0.4]])
    render, alpha, info = rasterization(
        g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], torch.eye(4)[None], K[None], W, H,
        packed=False, tile_size=tile_size, backgrounds=bg,
    )  # fmt: skip
    assert info["radii"][0, 0] == 0 and (info["radii"][0, 1:] > 0).all()
    expected, expected_alpha = plain_composite(
        info["means2d"][0].detach().double().numpy(), info["conics"][0].double().numpy(),
        info["opacities"][0].detach().double().numpy(), g["colors"].double().numpy(),
        info["depths"][0].detach().double().numpy(), info["radii"][0].numpy(), W, H, tile_size, bg[0].numpy(),
    )  # fmt: skip
    np.testing.assert_allclose(render[0].detach().numpy(), expected, atol=2e-5)
    np.testing.assert_allclose(alpha[0].detach().numpy(), expected_alpha, atol=2e-5)


def test_packed_and_unpacked_render_the_same_with_several_cameras():
    g = random_gaussians(20, seed=5)
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[1, 0, 3] = 0.3
    args = (
        g["means"],
        g["quats"],
        g["scales"],
        g["opacities"],
        g["colors"],
        viewmats,
        K.repeat(2, 1, 1),
        W,
        H,
    )
    r1, a1, i1 = rasterization(*args, packed=False, render_mode="RGB+ED", rasterize_mode="antialiased")
    r2, a2, i2 = rasterization(*args, packed=True, render_mode="RGB+ED", rasterize_mode="antialiased")
    torch.testing.assert_close(r1, r2)
    torch.testing.assert_close(a1, a2)
    assert i2["means2d"].shape == (len(i2["gaussian_ids"]), 2) and i1["means2d"].shape == (2, 20, 2)
    assert not torch.equal(r1[0], r1[1])  # the second camera sees another image
    assert (i1["opacities"] < g["opacities"]).all()  # antialiased: compensation < 1


def test_unsupported_options_are_one_line_errors():
    g = random_gaussians(3)
    args = (
        g["means"],
        g["quats"],
        g["scales"],
        g["opacities"],
        g["colors"],
        torch.eye(4)[None],
        K[None],
        W,
        H,
    )
    for kwargs, needle in [
        ({"camera_model": "fisheye"}, "camera_model='fisheye'"),
        ({"distributed": True}, "distributed=True"),
        ({"sparse_grad": True, "packed": True}, "sparse_grad=True"),
    ]:
        with pytest.raises(CPURasterizationError) as err:
            rasterization(*args, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value) and "CUDA" in str(err.value)


# --- gradients and densification ---------------------------------------------------------------------


def test_gradcheck_through_projection_sh_and_compositing():
    g = random_gaussians(4, seed=7, dtype=torch.float64)
    coeffs = torch.randn(4, 4, 3, dtype=torch.float64) * 0.3
    bg = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)

    def render(means, quats, scales, opacities, coeffs):
        out, alpha, _ = rasterization(
            means, quats, scales, opacities, coeffs, torch.eye(4, dtype=torch.float64)[None],
            K.double()[None], 8, 6, sh_degree=1, packed=False, tile_size=4, backgrounds=bg, render_mode="RGB+ED",
        )  # fmt: skip
        return out, alpha

    inputs = [g["means"] * 0.5, g["quats"], g["scales"] * 2, g["opacities"], coeffs]
    assert torch.autograd.gradcheck(render, [t.requires_grad_() for t in inputs], eps=1e-6, atol=1e-5)


def test_absgrad_is_the_sum_over_pixels_of_absolute_gradients():
    g = random_gaussians(6, seed=11)
    proj = project(
        g["means"], quat_scale_to_covar(g["quats"], g["scales"]), torch.eye(4)[None], K[None], W, H
    )
    ids = torch.nonzero(proj.radii[0] > 0).squeeze(-1)
    m = len(ids)
    means2d = proj.means2d[0, ids].detach().requires_grad_()
    args = (
        proj.conics[0, ids],
        g["opacities"][ids],
        g["colors"][ids],
        proj.depths[0, ids],
        proj.radii[0, ids],
    )
    weights = torch.rand(1, H, W, 3)

    buffer = torch.zeros(m, 2)
    render, _ = composite(
        means2d, *args, torch.zeros(m, dtype=torch.long), 1, W, H, 4, absgrad=(buffer, torch.arange(m))
    )
    (render * weights).sum().backward()

    render, _ = composite(means2d, *args, torch.zeros(m, dtype=torch.long), 1, W, H, 4)
    expected = torch.zeros(m, 2)
    for py in range(H):
        for px in range(W):
            (grad,) = torch.autograd.grad(
                (render[0, py, px] * weights[0, py, px]).sum(), means2d, retain_graph=True
            )
            expected += grad.abs()
    torch.testing.assert_close(buffer, expected)
    assert (buffer >= means2d.grad.abs() - 1e-6).all() and (buffer > means2d.grad.abs() + 1e-4).any()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("absgrad", [False, True])
def test_gradients_reach_every_parameter_and_the_densification_statistics(packed, absgrad):
    g = random_gaussians(30, seed=13)
    params = {
        "means": g["means"],
        "quats": g["quats"],
        "scales": torch.log(g["scales"]),
        "opacities": torch.logit(g["opacities"]),
        "features_dc": torch.randn(30, 3) * 0.2,
        "features_rest": torch.zeros(30, 15, 3),
    }
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    strategy = DefaultStrategy(absgrad=absgrad, refine_start_iter=10**6)
    state = strategy.initialize_state()
    render, alpha, info = rasterization(
        params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]),
        torch.cat([params["features_dc"][:, None], params["features_rest"]], dim=1), torch.eye(4)[None], K[None],
        W, H, sh_degree=3, packed=packed, absgrad=absgrad,
    )  # fmt: skip
    strategy.step_pre_backward(params, {}, state, 0, info)  # retain_grad on info["means2d"]
    ((render - 0.5) ** 2).sum().add(alpha.sum()).backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0 or name == "features_rest", name  # SH degree 3: rest too
    assert params["features_rest"].grad.abs().sum() > 0
    grad2d = info["means2d"].absgrad if absgrad else info["means2d"].grad
    assert grad2d.shape == ((len(info["gaussian_ids"]), 2) if packed else (1, 30, 2))
    strategy.step_post_backward(params, {}, state, 1, info, packed=packed)  # step 0 would reset opacities
    visible = torch.zeros(30, dtype=torch.bool)
    visible[info["gaussian_ids"] if packed else info["radii"][0] > 0] = True
    assert torch.equal(state["count"] > 0, visible) and (state["grad2d"][visible] > 0).all()


def test_nothing_visible_still_gives_a_graph_and_zero_gradients():
    g = random_gaussians(3)
    means = (g["means"] * torch.tensor([1.0, 1.0, -1.0])).requires_grad_()  # all behind the camera
    render, alpha, info = rasterization(
        means,
        g["quats"],
        g["scales"],
        g["opacities"],
        g["colors"],
        torch.eye(4)[None],
        K[None],
        W,
        H,
        packed=False,
    )
    info["means2d"].retain_grad()
    assert (alpha == 0).all() and (info["radii"] == 0).all()
    (render.sum() + alpha.sum()).backward()
    assert torch.equal(means.grad, torch.zeros_like(means)) and info["means2d"].grad.shape == (1, 3, 2)


def test_chunking_does_not_change_renders_or_gradients(monkeypatch):
    g = random_gaussians(25, seed=17)

    def run():
        leaves = [t.clone().requires_grad_() for t in (g["means"], g["scales"], g["opacities"], g["colors"])]
        render, alpha, _ = rasterization(
            leaves[0],
            g["quats"],
            leaves[1],
            leaves[2],
            leaves[3],
            torch.eye(4)[None],
            K[None],
            W,
            H,
            tile_size=4,
        )
        (render.square().sum() + alpha.sum()).backward()
        return [render, alpha] + [t.grad for t in leaves]

    whole = run()
    monkeypatch.setattr(gsplat_torch, "PAIRS_PER_CHUNK", 1)  # one tile per chunk
    for a, b in zip(whole, run(), strict=True):
        torch.testing.assert_close(a, b)


# --- installation -------------------------------------------------------------------------------------


@cpu_only
def test_without_cuda_install_swaps_splatfacto_s_rasterizer():
    from nerfstudio.models import splatfacto

    # conftest imported method_configs, which installs the compat layer
    assert splatfacto.rasterization is rasterization
    assert not hasattr(splatfacto.get_viewmat, "_torchdynamo_orig_callable")  # plain, not torch.compile'd
    for name in ("get_outputs", "populate_modules"):
        method = vars(splatfacto.SplatfactoModel)[name]
        assert method._cuda_calls_stay_on_device
    compat.install()  # idempotent: not wrapped twice
    method = vars(splatfacto.SplatfactoModel)["get_outputs"]
    assert not getattr(method.__wrapped__, "_cuda_calls_stay_on_device", False)


def test_with_cuda_install_leaves_gsplat_and_splatfacto_alone(monkeypatch):
    import gsplat.rendering
    from nerfstudio.models import splatfacto

    model = splatfacto.SplatfactoModel
    upstream = {name: vars(model)[name].__wrapped__ for name in ("get_outputs", "populate_modules")}
    compiled = object()  # stands for the torch.compile'd get_viewmat
    monkeypatch.setattr(splatfacto, "rasterization", gsplat.rendering.rasterization)
    monkeypatch.setattr(splatfacto, "get_viewmat", compiled)
    for name, method in upstream.items():
        monkeypatch.setattr(model, name, method)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    compat.install()
    assert splatfacto.rasterization is gsplat.rendering.rasterization
    assert splatfacto.get_viewmat is compiled
    for name, method in upstream.items():
        assert vars(model)[name] is method


@cpu_only
def test_cuda_calls_stay_on_device_only_inside_the_mode():
    x = torch.ones(2)
    with gsplat_torch._CudaCallsStayOnDevice():
        assert x.cuda() is x
    with pytest.raises((RuntimeError, AssertionError)):
        x.cuda()


# --- ns-train splatfacto on CPU ----------------------------------------------------------------------


def ply_vertex_count(path: Path) -> int:
    header = path.read_bytes().split(b"end_header", 1)[0].decode()
    return int(re.search(r"element vertex (\d+)", header).group(1))


@pytest.mark.slow
@cpu_only
def test_ns_train_splatfacto_on_cpu_learns_densifies_and_exports(tiny_scene, tmp_path, monkeypatch, capsys):
    """A real `ns-train splatfacto` (in this process) on the tiny scene, then `ns-export gaussian-splat`."""
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts.exporter import Commands
    from nerfstudio.scripts.train import main
    from nerfstudio.utils import writer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(writer, "EVENT_WRITERS", [])
    args = [
        "splatfacto", "--machine.device-type", "cpu", "--vis", "tensorboard", "--max-num-iterations", "50",
        "--output-dir", str(tmp_path / "out"), "--timestamp", "run", "--logging.steps-per-log", "10",
        "--pipeline.model.random-init", "True", "--pipeline.model.num-random", "600",
        "--pipeline.model.random-scale", "1.0", "--pipeline.model.background-color", "white",
        "--pipeline.model.num-downscales", "0", "--pipeline.model.sh-degree", "1",
        "--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "10",
        "nerfstudio-data", "--data", str(tiny_scene),
    ]  # fmt: skip
    main(tyro.cli(AnnotatedBaseConfigUnion, args=args))
    for w in writer.EVENT_WRITERS:
        if hasattr(w, "tb_writer"):
            w.tb_writer.flush()
    (run,) = (tmp_path / "out").glob("*/splatfacto/run")
    events = EventAccumulator(str(run))
    events.Reload()
    loss = [e.value for e in events.Scalars("Train Loss")]
    psnr = [e.value for e in events.Scalars("Train Metrics Dict/psnr")]
    count = [e.value for e in events.Scalars("Train Metrics Dict/gaussian_count")]
    assert loss[-1] < 0.8 * loss[0] and psnr[-1] > psnr[0] + 2.0, (loss, psnr)
    grown = [
        int(a) + int(b)
        for a, b in re.findall(r"(\d+) GSs duplicated, (\d+) GSs split", capsys.readouterr().out)
    ]
    assert sum(grown) > 0 and count[-1] != count[0], (
        grown,
        count,
    )  # densified from info (2D gradients, radii)

    tyro.cli(Commands, args=["gaussian-splat", "--load-config", str(run / "config.yml"),
                             "--output-dir", str(tmp_path / "export")]).main()  # fmt: skip
    (ckpt,) = (run / "nerfstudio_models").glob("step-*.ckpt")
    state = torch.load(ckpt, map_location="cpu")["pipeline"]
    opacity = state["_model.gauss_params.opacities"].squeeze(-1)
    kept = torch.isfinite(state["_model.gauss_params.means"]).all(-1) & (
        opacity >= -5.5373
    )  # ns-export's filter
    assert ply_vertex_count(tmp_path / "export" / "splat.ply") == int(kept.sum()) > 100


@cpu_only
def test_splatfacto_from_a_point_cloud_renders_on_cpu(tmp_path, monkeypatch):
    """populate_modules (seed colours: ``.cuda()``) and get_outputs (intrinsics: ``.cuda()``) run on CPU."""
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.models.splatfacto import SplatfactoModelConfig

    for key, value in offline_env(tmp_path).items():  # LPIPS cannot download: one warning, no crash
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    xyz, rgb = torch.rand(64, 3) - 0.5, torch.randint(0, 256, (64, 3)).float()
    model = SplatfactoModelConfig(sh_degree=1).setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1, metadata={},
        seed_points=(xyz, rgb),
    )  # fmt: skip
    assert model.num_points == 64 and model.features_dc.device.type == "cpu"
    c2w = torch.eye(4)[None, :3]
    c2w[0, 2, 3] = 2.0  # nerfstudio cameras look down -z: 2 units back from the points
    camera = Cameras(camera_to_worlds=c2w, fx=20.0, fy=20.0, cx=8.0, cy=6.0, width=16, height=12)
    model.eval()
    outputs = model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape == (12, 16, 3) and outputs["depth"].shape == (12, 16, 1)
    assert outputs["accumulation"].max() > 0.1 and torch.isfinite(outputs["rgb"]).all()
