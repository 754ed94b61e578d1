"""Gaussian splatting without CUDA: a pure-torch ``rasterization`` that nerfstudio's splatfacto uses on CPU.

gsplat 1.4 (nerfstudio 1.1.5's rasterizer) runs CUDA kernels only, so ``ns-train splatfacto``, its
eval and the viewer fail on a machine without an NVIDIA GPU. :func:`install` (run by
:func:`nerfstudio_distill.compat.install` at every ``ns-train``/``ns-export``/``ns-viewer``) does
nothing when ``torch.cuda.is_available()``: gsplat is used exactly as is. Without CUDA it makes
``nerfstudio.models.splatfacto`` work on the model's device (CPU, or MPS):

- splatfacto's ``rasterization`` becomes :func:`rasterization` below;
- ``SplatfactoModel.get_outputs`` and ``populate_modules`` call ``.cuda()`` on the intrinsics (every
  render) and on the seed colours (init from a point cloud); inside those two methods ``.cuda()``
  leaves a tensor where it is (a thread-local torch function mode; the viewer's render thread is
  unaffected);
- splatfacto's ``get_viewmat`` runs uncompiled: ``torch.compile`` on CPU needs a C++ compiler and
  took 16 s at the first step for a 4x4 matrix inverse.

:func:`rasterization` has gsplat's signature and computes gsplat's forward pass (the formulas of
``gsplat/cuda/csrc``, cross-checked against ``gsplat/cuda/_torch_impl.py`` in the tests) with torch
ops that autograd differentiates:

- projection (gsplat's ``fully_fused_projection``): covariance from the normalised quaternion (wxyz)
  and scales, world to camera, the pinhole Jacobian with gsplat's clamp at 1.3x the field of view, the
  2D low-pass dilation ``eps2d`` (0.3 px² by default) and, for ``rasterize_mode="antialiased"``, the
  opacity compensation sqrt(det Σ / det(Σ + eps2d I)); radius 3σ of the dilated covariance; culled
  outside [near_plane, far_plane], at radius <= radius_clip and outside the image;
- colours: post-activation ``[(C,) N, D]`` or SH coefficients ``[(C,) N, K, 3]`` up to degree 4
  (gsplat's basis, then +0.5 clamped at 0);
- compositing per ``tile_size`` tile of the Gaussians whose 3σ box touches the tile, front to back by
  depth: α = min(0.999, o·exp(-½ dᵀ Σ'⁻¹ d)) with d from the pixel centre, skipped below 1/255, and a
  pixel stops before its transmittance falls to 1e-4; backgrounds add T·background;
- render modes "RGB", "D", "ED", "RGB+D", "RGB+ED" (expected depth = Σ w z / max(Σ w, 1e-10));
- ``packed`` True or False (the ``info`` layout DefaultStrategy reads), ``absgrad`` (sets
  ``info["means2d"].absgrad`` in backward to the sum over pixels of |∂L/∂means2d| per pixel, as gsplat's
  kernel does), ``covars`` instead of quats/scales.

``info`` has gsplat's keys except its tile lists (``isect_ids``, ``flatten_ids``, ``isect_offsets``):
camera_ids, gaussian_ids (None unless packed), radii, means2d (retain_grad works), depths, conics,
opacities, tile_width, tile_height, tiles_per_gauss, width, height, tile_size, n_cameras.

Not supported (one-line :class:`CPURasterizationError` naming the fix; splatfacto 1.1.5 passes none of
them): ``camera_model`` "ortho"/"fisheye", ``distributed=True``, ``sparse_grad=True`` with
``packed=True``. ``channel_chunk`` is accepted and unused (all channels are blended at once).
Ks get no gradient in gsplat; here they do (harmless: nerfstudio never optimises intrinsics).

Speed: dense per tile, so cost grows with pixels x Gaussians per tile; it is for tests, demos and small
scenes, not for real captures. Measured whole ``ns-train splatfacto`` steps at 48x48 px: 0.07-0.18 s
with 1000 Gaussians, 1.1 s with splatfacto's default 50 000 random ones (see the README).
Memory: each chunk of tiles (at most :data:`PAIRS_PER_CHUNK` pixel-Gaussian pairs) is recomputed in
backward (activation checkpointing), so training holds only one chunk's intermediates.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from nerfstudio_distill.errors import DistillError

ALPHA_MAX = 0.999
"""gsplat clamps each Gaussian's alpha at 0.999 (``rasterize_to_pixels_fwd.cu``)."""
ALPHA_MIN = 1.0 / 255.0
"""Alphas below 1/255 are skipped."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel is done before the Gaussian that would bring its transmittance to 1e-4 or below."""
PAIRS_PER_CHUNK = 1 << 20
"""Pixel-Gaussian pairs blended at once (and recomputed together in backward); bounds memory."""

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
SH_C0 = 0.2820947917738781


class CPURasterizationError(DistillError, NotImplementedError):
    """An option of gsplat's ``rasterization`` that the pure-torch rasterizer does not support."""


class Projection(NamedTuple):
    """Gaussians projected to each camera, as gsplat's ``fully_fused_projection`` (packed=False)."""

    radii: Int[Tensor, "C N"]
    """3σ radius in pixels; 0 where culled."""
    means2d: Float[Tensor, "C N 2"]
    """Projected centres in pixels."""
    depths: Float[Tensor, "C N"]
    """z in camera coordinates."""
    conics: Float[Tensor, "C N 3"]
    """Upper triangle (a, b, c) of the inverse of the dilated 2D covariance."""
    compensations: Float[Tensor, "C N"] | None
    """sqrt(det Σ2d / det(Σ2d + eps2d I)), only when asked for (antialiased mode)."""


def _unsupported(option: str, fix: str) -> CPURasterizationError:
    return CPURasterizationError(
        f"{option} is not supported by the CPU rasterizer (nerfstudio_distill.compat.gsplat_torch, used "
        f"because CUDA is unavailable): {fix}, or run on a CUDA GPU to use gsplat's kernels"
    )


def quat_scale_to_covar(quats: Float[Tensor, "N 4"], scales: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3 3"]:
    """Σ = R S Sᵀ Rᵀ, R from the normalised quaternion (w, x, y, z), S = diag(scales)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)  # fmt: skip
    m = rot * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def project(
    means: Float[Tensor, "N 3"],
    covars: Float[Tensor, "N 3 3"],
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    compensations: bool = False,
) -> Projection:
    """Pinhole projection of 3D Gaussians (EWA splatting), with gsplat's dilation, clamp and culling."""
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    covars_c = rot[:, None] @ covars[None] @ rot.transpose(-1, -2)[:, None]  # R Σ Rᵀ, [C, N, 3, 3]
    x, y, depths = means_c.unbind(-1)
    in_depth = (depths >= near_plane) & (depths <= far_plane)
    z = torch.where(in_depth, depths, torch.ones_like(depths))  # culled ones: finite values and gradients

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # The Jacobian is taken at the centre clamped to 1.3x the field of view, as gsplat's persp_proj.
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.clamp(x / z, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y / z, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], dim=-1).reshape(
        *z.shape, 2, 3
    )
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)  # J Σ_c Jᵀ, [C, N, 2, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    a, c = cov2d[..., 0, 0] + eps2d, cov2d[..., 1, 1] + eps2d  # low-pass dilation Σ + eps2d I
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    det = a * c - b * b
    valid = in_depth & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    comp = torch.sqrt(torch.clamp(det_orig / det_safe, min=1e-12)) if compensations else None

    with torch.no_grad():
        half_trace = 0.5 * (a + c)
        radius = torch.ceil(
            3.0 * torch.sqrt(half_trace + torch.sqrt(torch.clamp(half_trace**2 - det, min=0.01)))
        )
        valid = valid & (radius > radius_clip)  # (not in place: torch.where above saved it)
        mx, my = means2d.unbind(-1)
        valid = valid & (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        radii = torch.where(valid, radius, torch.zeros_like(radius)).int()
    return Projection(radii, means2d, depths, conics, comp)


def sh_bases(degree: int, dirs: Float[Tensor, "*b 3"]) -> Float[Tensor, "*b k"]:
    """Real SH basis up to ``degree`` (≤ 4) at unit ``dirs``, in gsplat's order and signs (Sloan, JCGT 2013)."""
    if not 0 <= degree <= 4:
        raise _unsupported(f"sh_degree={degree}", "use an SH degree from 0 to 4")
    bases = [torch.full_like(dirs[..., 0], SH_C0)]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        bases += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2 = z * z
        c1, s1 = x * x - y * y, 2 * x * y
        band2_z = 0.9461746957575601 * z2 - 0.3153915652525201
        b = -1.092548430592079 * z
        bases += [0.5462742152960395 * s1, b * y, band2_z, b * x, 0.5462742152960395 * c1]
    if degree >= 3:
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        band3_z = z * (1.865881662950577 * z2 - 1.119528997770346)
        tc = -2.285228997322329 * z2 + 0.4570457994644658
        tb = 1.445305721320277 * z
        ta = -0.5900435899266435
        bases += [ta * s2, tb * s1, tc * y, band3_z, tc * x, tb * c1, ta * c2]
    if degree >= 4:
        c3, s3 = x * c2 - y * s2, x * s2 + y * c2
        td = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tc = 3.31161143515146 * z2 - 0.47308734787878
        tb = -1.770130769779931 * z
        ta = 0.6258357354491763
        band4_z = (
            1.984313483298443 * z2 * (1.865881662950577 * z2 - 1.119528997770346)
            - 1.006230589874905 * band2_z
        )
        bases += [ta * s3, tb * s2, tc * s1, td * y, band4_z, td * x, tc * c1, tb * c2, ta * c3]
    return torch.stack(bases, dim=-1)


def spherical_harmonics(
    degree: int, dirs: Float[Tensor, "*b 3"], coeffs: Float[Tensor, "*b K 3"]
) -> Float[Tensor, "*b 3"]:
    """Colour seen from ``dirs`` (need not be unit): Σ_k Y_k(dir) coeffs_k over the first (degree+1)² bands."""
    bases = sh_bases(degree, F.normalize(dirs, dim=-1))
    return (bases[..., None] * coeffs[..., : bases.shape[-1], :]).sum(dim=-2)


def _blend_tiles(
    pixels: Float[Tensor, "B P 2"],
    means2d: Float[Tensor, "B K 2"],
    conics: Float[Tensor, "B K 3"],
    opacities: Float[Tensor, "B K"],
    colors: Float[Tensor, "B K D"],
    absgrad: tuple[Tensor, Tensor] | None = None,
) -> tuple[Float[Tensor, "B P D"], Float[Tensor, "B P"]]:
    """Front-to-back alpha compositing of each tile's K depth-sorted Gaussians at its P pixels."""
    delta = means2d[:, None] - pixels[:, :, None]  # [B, P, K, 2], as gsplat: mean - pixel centre
    if absgrad is not None and delta.requires_grad:
        buffer, rows = absgrad

        def add_abs(grad: Tensor) -> None:  # gsplat's absgrad: Σ over pixels of |∂L/∂means2d| per pixel
            buffer.index_add_(0, rows.flatten(), grad.abs().sum(1).flatten(0, 1))

        delta.register_hook(add_abs)
    dx, dy = delta.unbind(-1)
    a, b, c = conics[:, None].unbind(-1)  # [B, 1, K]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy  # ½ dᵀ Σ'⁻¹ d
    alpha = torch.clamp_max(opacities[:, None] * torch.exp(-sigma.clamp_min(0.0)), ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    trans_after = torch.cumprod(1.0 - alpha, dim=-1)  # T after each Gaussian
    trans = torch.cat([torch.ones_like(trans_after[..., :1]), trans_after[..., :-1]], dim=-1)
    weights = alpha * trans * (trans_after > TRANSMITTANCE_MIN)  # w_i = α_i T_i, until the pixel is done
    return weights @ colors, weights.sum(dim=-1)


def composite(
    means2d: Float[Tensor, "M 2"],
    conics: Float[Tensor, "M 3"],
    opacities: Float[Tensor, " M"],
    colors: Float[Tensor, "M D"],
    depths: Float[Tensor, " M"],
    radii: Int[Tensor, " M"],
    camera_ids: Int[Tensor, " M"],
    n_cameras: int,
    width: int,
    height: int,
    tile_size: int = 16,
    backgrounds: Float[Tensor, "C D"] | None = None,
    absgrad: tuple[Float[Tensor, "R 2"], Int[Tensor, " M"]] | None = None,
) -> tuple[Float[Tensor, "C H W D"], Float[Tensor, "C H W 1"]]:
    """Render M visible (camera, Gaussian) entries into ``n_cameras`` images, tile by tile.

    ``absgrad`` = (buffer, rows): backward adds entry m's absolute 2D-mean gradient to ``buffer[rows[m]]``.
    """
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles, tile_px = tiles_w * tiles_h, tile_size * tile_size
    dim = colors.shape[-1]
    with torch.no_grad():  # the tiles each entry touches, as gsplat's isect_tiles: [lo, hi) per axis
        centre, r = means2d.detach() / tile_size, radii.to(means2d.dtype)[:, None] / tile_size
        lo = torch.floor(centre - r).clamp(min=0)
        hi = torch.ceil(centre + r).clamp(min=0)
        lo = torch.minimum(lo, lo.new_tensor([tiles_w, tiles_h]))
        hi = torch.minimum(hi, hi.new_tensor([tiles_w, tiles_h]))
        tile_ids = torch.arange(n_tiles, device=means2d.device)
        tile_xy = torch.stack([tile_ids % tiles_w, tile_ids // tiles_w], dim=-1).to(means2d.dtype)
        offsets = torch.arange(tile_size, device=means2d.device, dtype=means2d.dtype)
        in_tile = torch.stack(torch.meshgrid(offsets, offsets, indexing="xy"), dim=-1).reshape(-1, 2) + 0.5
        pixels = tile_xy[:, None, :] * tile_size + in_tile[None]  # [tiles, P, 2] pixel centres (x, y)

    renders, alphas = [], []
    for cam in range(n_cameras):
        with torch.no_grad():
            entries = torch.nonzero(camera_ids == cam).squeeze(-1)
            entries = entries[torch.sort(depths[entries].detach(), stable=True).indices]  # near to far
            e_lo, e_hi = lo[entries], hi[entries]

            def touching(first: int, last: int, e_lo: Tensor = e_lo, e_hi: Tensor = e_hi) -> Tensor:
                t = tile_xy[first:last, None, :]  # -> [tiles, entries] of this camera
                return ((t >= e_lo[None]) & (t < e_hi[None])).all(dim=-1)

            step = max(1, (1 << 24) // max(1, len(entries)))
            counts = torch.cat([touching(i, i + step).sum(-1) for i in range(0, n_tiles, step)]).tolist()
        tile_rgb, tile_alpha = [], []
        first = 0
        while first < n_tiles:  # group consecutive tiles while pairs stay under PAIRS_PER_CHUNK
            last, k_max = first + 1, counts[first]
            while (
                last < n_tiles and (last + 1 - first) * tile_px * max(k_max, counts[last]) <= PAIRS_PER_CHUNK
            ):
                k_max = max(k_max, counts[last])
                last += 1
            if k_max == 0:
                tile_rgb.append(colors.new_zeros(last - first, tile_px, dim))
                tile_alpha.append(colors.new_zeros(last - first, tile_px))
            else:
                with torch.no_grad():
                    member = touching(first, last)
                    rank = torch.sort(member.to(torch.uint8), dim=-1, descending=True, stable=True).indices
                    rank = rank[:, :k_max]  # each tile's entries, near to far, then padding
                    used = member.gather(1, rank)
                    ids = entries[rank]  # [B, K]
                blend = functools.partial(
                    _blend_tiles, absgrad=None if absgrad is None else (absgrad[0], absgrad[1][ids])
                )
                args = (pixels[first:last], means2d[ids], conics[ids], opacities[ids] * used, colors[ids])
                if torch.is_grad_enabled() and any(t.requires_grad for t in args):
                    rgb, alpha = checkpoint(blend, *args, use_reentrant=False)
                else:
                    rgb, alpha = blend(*args)
                tile_rgb.append(rgb)
                tile_alpha.append(alpha)
            first = last
        rgb = torch.cat(tile_rgb).reshape(tiles_h, tiles_w, tile_size, tile_size, dim)
        alpha = torch.cat(tile_alpha).reshape(tiles_h, tiles_w, tile_size, tile_size, 1)
        size = (tiles_h * tile_size, tiles_w * tile_size)
        rgb = rgb.permute(0, 2, 1, 3, 4).reshape(*size, dim)[:height, :width]
        alpha = alpha.permute(0, 2, 1, 3, 4).reshape(*size, 1)[:height, :width]
        if backgrounds is not None:
            rgb = rgb + (1.0 - alpha) * backgrounds[cam]
        renders.append(rgb)
        alphas.append(alpha)
    return torch.stack(renders), torch.stack(alphas)


def rasterization(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"] | None,
    scales: Float[Tensor, "N 3"] | None,
    opacities: Float[Tensor, " N"],
    colors: Tensor,
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Float[Tensor, "C D"] | None = None,
    render_mode: RenderMode = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    channel_chunk: int = 32,
    distributed: bool = False,
    camera_model: Literal["pinhole", "ortho", "fisheye"] = "pinhole",
    covars: Float[Tensor, "N 3 3"] | None = None,
) -> tuple[Float[Tensor, "C H W X"], Float[Tensor, "C H W 1"], dict]:
    """gsplat 1.4's ``gsplat.rendering.rasterization`` in pure torch (see the module docstring).

    ``colors`` is ``[(C,) N, D]`` post-activation values, or ``[(C,) N, K, 3]`` SH coefficients when
    ``sh_degree`` is set. Returns the renders ``[C, H, W, X]`` (X = D, 1 or D + 1 by ``render_mode``),
    alphas ``[C, H, W, 1]`` and gsplat's ``info`` dict.
    """
    if camera_model != "pinhole":
        raise _unsupported(f"camera_model={camera_model!r}", "use a pinhole (perspective) camera")
    if distributed:
        raise _unsupported("distributed=True", "render on one device")
    if sparse_grad and packed:
        raise _unsupported("sparse_grad=True", "pass sparse_grad=False")
    if render_mode not in RENDER_MODES:
        raise _unsupported(f"render_mode={render_mode!r}", f"use one of {', '.join(RENDER_MODES)}")
    if rasterize_mode not in ("classic", "antialiased"):
        raise _unsupported(f"rasterize_mode={rasterize_mode!r}", "use 'classic' or 'antialiased'")
    n, n_cameras = means.shape[0], viewmats.shape[0]
    if covars is None:
        covars = quat_scale_to_covar(quats, scales)
    proj = project(
        means, covars, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip,
        compensations=rasterize_mode == "antialiased",
    )  # fmt: skip
    cams, gids = torch.nonzero(proj.radii > 0, as_tuple=True)
    opacities_cn = opacities.expand(n_cameras, n)
    if proj.compensations is not None:
        opacities_cn = opacities_cn * proj.compensations
    entry_opacities = opacities_cn[cams, gids]

    if sh_degree is None:
        entry_colors = colors[gids] if colors.dim() == 2 else colors[cams, gids]
    else:
        campos = torch.inverse(viewmats)[:, :3, 3]
        coeffs = colors[gids] if colors.dim() == 3 else colors[cams, gids]
        sh = spherical_harmonics(sh_degree, means[gids] - campos[cams], coeffs)
        entry_colors = torch.clamp_min(sh + 0.5, 0.0)
    entry_depths = proj.depths[cams, gids]
    if render_mode in ("RGB+D", "RGB+ED"):
        entry_colors = torch.cat([entry_colors, entry_depths[:, None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cameras, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        entry_colors = entry_depths[:, None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(n_cameras, 1)

    if packed:
        means2d = proj.means2d[cams, gids]  # [nnz, 2]: what DefaultStrategy reads with packed=True
        entry_means2d, rows = means2d, torch.arange(len(cams), device=means.device)
    else:
        means2d = proj.means2d  # [C, N, 2]
        entry_means2d, rows = means2d[cams, gids], cams * n + gids
    abs_buffer = None
    if absgrad:
        abs_buffer = means2d.new_zeros(means2d.shape).detach()
        means2d.absgrad = abs_buffer  # filled during backward
    render, alpha = composite(
        entry_means2d, proj.conics[cams, gids], entry_opacities, entry_colors, entry_depths,
        proj.radii[cams, gids], cams, n_cameras, width, height, tile_size, backgrounds,
        absgrad=None if abs_buffer is None else (abs_buffer.view(-1, 2), rows),
    )  # fmt: skip
    if len(cams) == 0:  # nothing visible: keep the outputs attached to the inputs, as gsplat's are
        attach = 0.0 * (means2d.sum() + opacities.sum() + colors.sum())
        render, alpha = render + attach, alpha + attach
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)

    with torch.no_grad():
        tiles = math.ceil(width / tile_size), math.ceil(height / tile_size)
        centre = proj.means2d.detach() / tile_size
        r = proj.radii.to(centre.dtype)[..., None] / tile_size
        span = torch.minimum(torch.ceil(centre + r).clamp(min=0), centre.new_tensor(tiles)) - torch.minimum(
            torch.floor(centre - r).clamp(min=0), centre.new_tensor(tiles)
        )
        tiles_per_gauss = (span.prod(dim=-1) * (proj.radii > 0)).int()
    info = {
        "camera_ids": cams if packed else None,
        "gaussian_ids": gids if packed else None,
        "radii": proj.radii[cams, gids] if packed else proj.radii,
        "means2d": means2d,
        "depths": entry_depths if packed else proj.depths,
        "conics": proj.conics[cams, gids] if packed else proj.conics,
        "opacities": entry_opacities if packed else opacities_cn,
        "tile_width": tiles[0],
        "tile_height": tiles[1],
        "tiles_per_gauss": tiles_per_gauss[cams, gids] if packed else tiles_per_gauss,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": n_cameras,
    }
    return render, alpha, info


class _CudaCallsStayOnDevice(TorchFunctionMode):
    """While active (in this thread only), ``tensor.cuda()`` returns the tensor unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def _cuda_calls_stay_on_device(method):
    if getattr(method, "_cuda_calls_stay_on_device", False):
        return method

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _CudaCallsStayOnDevice():
            return method(*args, **kwargs)

    wrapper._cuda_calls_stay_on_device = True
    return wrapper


def install() -> None:
    """Without CUDA, make splatfacto render with :func:`rasterization` (see the module docstring)."""
    if torch.cuda.is_available():
        return
    try:
        from nerfstudio.models import splatfacto
    except ImportError:  # gsplat or another splatfacto dependency missing: nothing to fix
        return
    splatfacto.rasterization = rasterization
    splatfacto.get_viewmat = getattr(
        splatfacto.get_viewmat, "_torchdynamo_orig_callable", splatfacto.get_viewmat
    )
    model = splatfacto.SplatfactoModel
    for name in ("populate_modules", "get_outputs"):
        setattr(model, name, _cuda_calls_stay_on_device(vars(model)[name]))
