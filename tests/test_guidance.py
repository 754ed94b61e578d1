"""Guidance maths (SDS, SDI, DDS, PDS) against textbook formulas written out plainly here.

Two priors: the closed-form :class:`ExactPrior` (a labelled Gaussian mixture) and a tiny nonlinear
``TanhPrior`` defined below. Latents are float64 so the only float32 in play is the prior's ε̂.
"""

from __future__ import annotations

from inspect import signature
from typing import get_args

import pytest
import torch

from nerfstudio_distill.errors import DistillError
from nerfstudio_distill.guidance import (
    WEIGHTINGS,
    TimestepSchedule,
    dds,
    pds,
    sdi,
    sds,
    weight,
)
from nerfstudio_distill.guidance.config import METHODS, GuidanceConfig, MethodName, method_names
from nerfstudio_distill.priors.base import Prior, PriorInputError, scaled_linear_betas
from nerfstudio_distill.priors.exact import ExactPrior

SHAPE = (2, 4, 4)
SCALE = 3.0  # CFG scale used by the tests


class TanhPrior(Prior):
    """ε̂ = tanh(W x) · (1 + t/T) + c_y: nonlinear, channel-mixing, t- and prompt-dependent."""

    def __init__(self) -> None:
        super().__init__(scaled_linear_betas(), guidance_scale=2.0)
        self.register_buffer("w", torch.randn(SHAPE[0], SHAPE[0], generator=torch.Generator().manual_seed(1)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def _embed(self, prompt: str) -> torch.Tensor:
        return torch.tensor(sum(map(ord, prompt)) % 17 / 10.0)

    def _eps(self, x_t, t, conds):
        c = torch.stack(list(conds)).double().reshape(-1, 1, 1, 1)
        mixed = torch.einsum("ij,njhw->nihw", self.w.double(), x_t.double())
        return (torch.tanh(mixed) * (1 + t.double().reshape(-1, 1, 1, 1) / 1000) + c).float()


def make_prior(kind: str) -> Prior:
    if kind == "exact":
        points = 0.5 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
        prior = ExactPrior(points, ["cat", "cat", "dog", "dog"], sigma=0.2, guidance_scale=SCALE)
    else:
        prior = TanhPrior()
    prior.calls = 0
    inner = prior._eps

    def counting(*args):
        prior.calls += 1
        return inner(*args)

    prior._eps = counting  # instance attribute shadows the method: counts network calls
    return prior


@pytest.fixture(params=["exact", "tanh"])
def prior(request) -> Prior:
    return make_prior(request.param)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def latents(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return randn(batch, *SHAPE, seed=seed).mul(0.5).requires_grad_(True)


def col(v: torch.Tensor) -> torch.Tensor:
    """Per-element scalar to B x 1 x 1 x 1."""
    return v.reshape(-1, 1, 1, 1)


def cfg(prior: Prior, x: torch.Tensor, t: torch.Tensor, prompt: str, scale: float) -> torch.Tensor:
    """ε̂_u + s (ε̂_c − ε̂_u) from two separate unguided calls (Ho & Salimans 2022)."""
    cond = prior.predict_noise(x[None], t, [prompt], 1.0)[0]
    uncond = prior.predict_noise(x[None], t, [""], 1.0)[0]
    return uncond + scale * (cond - uncond)


def noised(prior: Prior, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ab = prior.alphas_cumprod.double()[t]
    return col(ab.sqrt()) * x0 + col((1 - ab).sqrt()) * eps


T_BATCH = torch.tensor([50, 400, 900])
CLOSE = dict(atol=1e-6, rtol=1e-6)  # ε̂ from separate calls may differ in float32 rounding


# ----------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_sds_matches_dreamfusion_formula(prior, weighting):
    x0, eps = latents(), randn(3, *SHAPE, seed=1)
    out = sds(prior, x0, "cat", t=T_BATCH, noise=eps, guidance_scale=SCALE, weighting=weighting)
    ab = prior.alphas_cumprod.double()[T_BATCH]
    w = {"sds": 1 - ab, "uniform": torch.ones_like(ab), "fantasia": ab.sqrt() * (1 - ab)}
    w["sqrt"] = w["fantasia"]
    x_t = noised(prior, x0.detach(), eps, T_BATCH)
    expected = col(w[weighting]) * (cfg(prior, x_t, T_BATCH, "cat", SCALE) - eps)
    torch.testing.assert_close(out.grad, expected, **CLOSE)
    assert out.grad.shape == x0.shape and not out.grad.requires_grad
    assert torch.equal(out.t, T_BATCH) and torch.equal(out.noise, eps)


def test_dds_matches_delta_formula(prior):
    x0, x0_src, eps = latents(0), latents(5).detach(), randn(3, *SHAPE, seed=1)
    out = dds(prior, x0, x0_src, "cat", "dog", t=T_BATCH, noise=eps, guidance_scale=SCALE)
    eps_tgt = cfg(prior, noised(prior, x0.detach(), eps, T_BATCH), T_BATCH, "cat", SCALE)
    eps_src = cfg(prior, noised(prior, x0_src, eps, T_BATCH), T_BATCH, "dog", SCALE)
    # uniform weighting by default
    torch.testing.assert_close(out.grad, (eps_tgt - eps_src).double(), **CLOSE)


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_sdi_matches_plain_ddim_inversion_loop(prior, eta):
    x0, n, t = latents(), 4, torch.tensor([37, 500, 913])  # per-element t, not multiples of n
    zs = randn(n, 3, *SHAPE, seed=7)
    out = sdi(
        prior,
        x0,
        "cat",
        t=t,
        guidance_scale=SCALE,
        num_inversion_steps=n,
        inversion_eta=eta,
        inversion_noises=zs,
    )
    ab = prior.alphas_cumprod.double()
    x = x0.detach().clone()
    a_cur = torch.ones(3, dtype=torch.float64)  # the clean start has ᾱ = 1
    for k in range(n):
        s, s_next = k * t // n, (k + 1) * t // n
        e = cfg(prior, x, s, "cat", -7.5)
        a_next = ab[s_next]
        x0_hat = (x - col((1 - a_cur).sqrt()) * e) / col(a_cur.sqrt())
        x = col(a_next.sqrt()) * x0_hat + col((1 - a_next).sqrt()) * e
        sigma = ((1 - a_cur) / (1 - a_next) * (1 - a_next / a_cur)).sqrt()
        x = x + eta * col(sigma) * zs[k]
        a_cur = a_next
    eps_inv = (x - col(ab[t].sqrt()) * x0.detach()) / col((1 - ab[t]).sqrt())
    expected = col(1 - ab[t]) * (cfg(prior, x, t, "cat", SCALE) - eps_inv)
    torch.testing.assert_close(out.x_t, x, **CLOSE)
    torch.testing.assert_close(out.noise, eps_inv, **CLOSE)
    torch.testing.assert_close(out.grad, expected, **CLOSE)


def posterior_z(prior, x0, eps, eps_prime, eps_hat, t, t_prev, ab=None):
    """PDS reference path: z = (x_t' − μ(x_t, x̂0)) / σ_t with DDPM's posterior mean and one-step β_t."""
    ab = prior.alphas_cumprod.double() if ab is None else ab
    betas = prior.betas.double()
    a_t, a_p, beta = col(ab[t]), col(ab[t_prev]), col(betas[t])
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    x_prev = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps_prime
    x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    c0 = a_p.sqrt() * beta / (1 - a_t)
    c1 = (1 - beta).sqrt() * (1 - a_p) / (1 - a_t)
    mu = c0 * x0_hat + c1 * x_t
    sigma = ((1 - a_p) / (1 - a_t) * beta).sqrt()
    return (x_prev - mu) / sigma


def test_pds_reference_equals_posterior_latent_difference(prior):
    grid = prior.timestep_grid(500)
    idx = torch.tensor([10, 200, 489])
    t, t_prev = grid[idx], grid[idx - 1]
    x0, x0_src = latents(0), latents(5).detach()
    eps, eps_prime = randn(3, *SHAPE, seed=1), randn(3, *SHAPE, seed=2)  # both shared by tgt and src
    out = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, guidance_scale=SCALE)
    assert torch.equal(out.t_prev, t_prev) and (out.psi > 0.001).all()  # the identity term is really there
    eps_tgt = cfg(prior, noised(prior, x0.detach(), eps, t), t, "cat", SCALE)
    eps_src = cfg(prior, noised(prior, x0_src, eps, t), t, "dog", SCALE)
    z_tgt = posterior_z(prior, x0.detach(), eps, eps_prime, eps_tgt, t, t_prev)
    z_src = posterior_z(prior, x0_src, eps, eps_prime, eps_src, t, t_prev)
    torch.testing.assert_close(out.grad, z_tgt - z_src, atol=1e-6, rtol=0)


def test_pds_consecutive_has_exactly_zero_psi(prior):
    t = torch.tensor([5, 300, 998])
    x0, x0_src = latents(0), latents(5).detach()
    eps, eps_prime = randn(3, *SHAPE, seed=1), randn(3, *SHAPE, seed=2)
    out = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, guidance_scale=SCALE, schedule="consecutive")
    assert torch.equal(out.t_prev, t - 1)
    assert torch.equal(out.psi, torch.zeros(3, dtype=torch.float64))
    ab, betas = prior.alphas_cumprod.double(), prior.betas.double()
    a_t, a_p, beta = ab[t], ab[t - 1], betas[t]
    chi = (
        a_p.sqrt()
        * beta
        / (1 - a_t)
        * (1 - a_t).sqrt()
        / (a_t.sqrt() * ((1 - a_p) / (1 - a_t) * beta).sqrt())
    )
    torch.testing.assert_close(out.chi, chi, atol=0, rtol=1e-12)
    torch.testing.assert_close(out.grad, col(chi) * (out.eps - out.eps_src), atol=1e-12, rtol=0)
    # The posterior-latent path with t' = t − 1 has no x0 term once ᾱ is exactly Π(1 − β): the float32-stored
    # ᾱ and β disagree by rounding, which leaves a spurious ψ ~ 1e-5 there; ψ = 0 is the exact value.
    ab_exact = torch.cumprod(1 - betas, 0)
    a_t, a_p = ab_exact[t], ab_exact[t - 1]
    chi_exact = (
        a_p.sqrt()
        * beta
        / (1 - a_t)
        * (1 - a_t).sqrt()
        / (a_t.sqrt() * ((1 - a_p) / (1 - a_t) * beta).sqrt())
    )
    z_tgt = posterior_z(prior, x0.detach(), eps, eps_prime, out.eps, t, t - 1, ab_exact)
    z_src = posterior_z(prior, x0_src, eps, eps_prime, out.eps_src, t, t - 1, ab_exact)
    torch.testing.assert_close(z_tgt - z_src, col(chi_exact) * (out.eps - out.eps_src), atol=1e-9, rtol=0)
    torch.testing.assert_close(out.chi, chi_exact, atol=0, rtol=1e-4)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_pds_weighting_gives_the_edit_term_w_and_keeps_psi_over_chi(prior, weighting):
    """weighting=w scales the published gradient by w(t)/χ(t): the edit term then weighs w(t) (as DDS with
    that weighting, when ψ = 0) and ψ/χ is unchanged per t; "chi" is the published gradient itself."""
    t = prior.timestep_grid(500)[torch.tensor([30, 250, 400])]
    x0, x0_src, eps = latents(0), latents(5).detach(), randn(3, *SHAPE, seed=1)
    kw = dict(t=t, noise=eps, guidance_scale=SCALE)
    published = pds(prior, x0, x0_src, "cat", "dog", **kw)
    assert torch.equal(pds(prior, x0, x0_src, "cat", "dog", weighting="chi", **kw).grad, published.grad)
    out = pds(prior, x0, x0_src, "cat", "dog", weighting=weighting, **kw)
    w = weight(weighting, prior.alphas_cumprod, t)
    torch.testing.assert_close(out.chi, w, atol=0, rtol=1e-12)
    torch.testing.assert_close(out.psi / out.chi, published.psi / published.chi, atol=0, rtol=1e-12)
    torch.testing.assert_close(out.grad, col(w / published.chi) * published.grad, atol=1e-12, rtol=1e-9)
    edit_only = pds(prior, x0, x0_src, "cat", "dog", weighting=weighting, psi_scale=0.0, **kw)
    as_dds = dds(prior, x0, x0_src, "cat", "dog", weighting=weighting, **kw)
    torch.testing.assert_close(edit_only.grad, as_dds.grad, **CLOSE)
    with pytest.raises(ValueError, match="unknown weighting"):
        pds(prior, x0, x0_src, "cat", "dog", weighting="dreamfusion", **kw)


def test_psi_scale_scales_only_the_identity_term(prior):
    t = prior.timestep_grid(500)[torch.tensor([30, 250, 400])]
    x0, x0_src, eps = latents(0), latents(5).detach(), randn(3, *SHAPE, seed=1)
    base = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps)
    scaled = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, psi_scale=2.5)
    assert torch.equal(scaled.chi, base.chi)
    torch.testing.assert_close(scaled.psi, 2.5 * base.psi, atol=0, rtol=1e-15)
    identity = col(base.psi) * (x0.detach() - x0_src)
    torch.testing.assert_close(scaled.grad - base.grad, 1.5 * identity, atol=1e-12, rtol=0)
    chi_scaled = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, chi_scale=0.0)
    torch.testing.assert_close(chi_scaled.grad, identity, atol=1e-12, rtol=0)


def test_pds_balanced_is_the_conditional_edit_plus_the_orthogonal_identity(prior):
    """rule="balanced": s · (ε̂(x_t, tgt) − ε̂(x_t^src, src)) without CFG, and ψ (x0 − x0_src) without its part
    along Δx̂0 = x̂0(x_t, tgt) − x̂0(x_t^src, src) (DDIM Eq. 9), written out here from separate unguided
    calls; one network call of batch 2."""
    t = prior.timestep_grid(500)[torch.tensor([30, 250, 400])]
    x0, x0_src, eps = latents(0), latents(5).detach(), randn(3, *SHAPE, seed=1)
    prior.calls = 0
    out = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, guidance_scale=SCALE, rule="balanced")
    assert prior.calls == 1
    x_t, x_t_src = noised(prior, x0.detach(), eps, t), noised(prior, x0_src, eps, t)
    eps_tgt = prior.predict_noise(x_t[None], t, ["cat"], 1.0)[0]
    eps_src = prior.predict_noise(x_t_src[None], t, ["dog"], 1.0)[0]
    edit = SCALE * (eps_tgt - eps_src)
    a = col(prior.alphas_cumprod.double()[t])
    x0_hat = (x_t - (1 - a).sqrt() * eps_tgt) / a.sqrt()
    x0_hat_src = (x_t_src - (1 - a).sqrt() * eps_src) / a.sqrt()
    d, c = (x0.detach() - x0_src).flatten(1), (x0_hat - x0_hat_src).flatten(1)
    identity = (d - (d * c).sum(1, keepdim=True) / c.pow(2).sum(1, keepdim=True) * c).reshape(x0.shape)
    torch.testing.assert_close(out.grad, col(out.psi) * identity + col(out.chi) * edit, atol=1e-6, rtol=1e-6)
    # the identity term is orthogonal to what the prompts change, per sample
    cosines = torch.nn.functional.cosine_similarity(identity.flatten(1), c, dim=1)
    assert cosines.abs().max() < 1e-6
    reference = pds(prior, x0, x0_src, "cat", "dog", t=t, noise=eps, guidance_scale=SCALE)
    assert not torch.allclose(reference.grad, out.grad)


def test_pds_draws_t_on_the_grid_and_uses_the_previous_point(prior):
    grid = prior.timestep_grid(500)
    out = pds(prior, latents(), latents(5).detach(), "cat", "dog", generator=torch.Generator().manual_seed(3))
    idx = torch.searchsorted(grid, out.t)
    assert torch.equal(grid[idx], out.t) and (idx >= 10).all() and (idx < 490).all()
    assert torch.equal(out.t_prev, grid[idx - 1])


# ---------------------------------------------------------------------------- surrogate, cost
def run_all(prior, x0, **kw):
    src = latents(5).detach()
    return {
        "sds": lambda: sds(prior, x0, "cat", t=T_BATCH, **kw),
        "sdi": lambda: sdi(prior, x0, "cat", t=T_BATCH, num_inversion_steps=3),
        "dds": lambda: dds(prior, x0, src, "cat", "dog", t=T_BATCH, **kw),
        "pds": lambda: pds(prior, x0, src, "cat", "dog", **kw),
    }


@pytest.mark.parametrize("method", ["sds", "sdi", "dds", "pds"])
def test_surrogate_loss_backpropagates_exactly_grad(prior, method):
    x0 = latents()
    out = run_all(prior, x0)[method]()
    (g,) = torch.autograd.grad(out.loss, x0)
    assert torch.equal(g, out.grad)
    assert out.loss.ndim == 0 and torch.equal(out.grad_norm, out.grad.norm())


@pytest.mark.parametrize("method,calls", [("sds", 1), ("dds", 1), ("pds", 1), ("sdi", 4)])
def test_one_network_call_per_step(prior, method, calls):
    out = run_all(prior, latents())[method]
    prior.calls = 0
    out()
    assert prior.calls == calls


OPTIONS = dict(
    weighting="fantasia",
    grad_clip=0.5,
    psi_scale=0.7,
    chi_scale=1.3,
    pds_rule="reference",
    pds_schedule="reference",
    num_grid_steps=50,
    num_inversion_steps=2,
    inversion_guidance_scale=-2.0,
    inversion_eta=0.1,
)


def call_by_hand(prior, method, x0, src, t, generator):
    """Each method's function with GuidanceConfig(**OPTIONS)'s values written out by hand."""
    common = dict(t=t, guidance_scale=SCALE, generator=generator)
    if method == "sds":
        return sds(prior, x0, "cat", weighting="fantasia", grad_clip=0.5, **common)
    if method == "sdi":
        return sdi(
            prior, x0, "cat", weighting="fantasia", grad_clip=0.5, inversion_guidance_scale=-2.0,
            num_inversion_steps=2, inversion_eta=0.1, **common,
        )  # fmt: skip
    if method == "dds":
        return dds(prior, x0, src, "cat", "dog", weighting="fantasia", **common)
    return pds(
        prior, x0, src, "cat", "dog", schedule="reference", num_grid_steps=50, psi_scale=0.7, chi_scale=1.3,
        rule="reference", weighting="fantasia", **common,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["sds", "sdi", "dds", "pds"])
def test_config_calls_its_method_with_its_options(prior, method):
    """GuidanceConfig dispatches through its method table to the same call as written by hand."""
    config = GuidanceConfig(method=method, guidance_scale=SCALE, **OPTIONS)
    x0, src = latents(), latents(5).detach()
    out = config(prior, x0, "cat", x0_src=src, prompt_src="dog", progress=0.3, generator=gen(7))
    rng = gen(7)
    t = config.sample_t(prior, x0.shape[0], 0.3, rng)
    expected = call_by_hand(prior, method, x0, src, t, rng)
    assert torch.equal(out.t, expected.t) and torch.equal(out.grad, expected.grad)


@pytest.mark.parametrize("method", ["sds", "sdi", "dds", "pds"])
def test_config_without_weighting_uses_the_method_default(prior, method):
    """weighting=None: each method's published w(t) (the function's own default), except PDS, which takes
    DDS's uniform weighting from the method table instead of its published χ(t)."""
    x0, src = latents(), latents(5).detach()
    config = GuidanceConfig(method=method, guidance_scale=SCALE)
    assert config.weighting is None
    out = config(prior, x0, "cat", x0_src=src, prompt_src="dog", progress=0.3, generator=gen(7))
    rng = gen(7)
    t = config.sample_t(prior, x0.shape[0], 0.3, rng)
    args = (x0, "cat") if method in ("sds", "sdi") else (x0, src, "cat", "dog")
    ours = {"rule": config.pds_rule, "weighting": "uniform"} if method == "pds" else {}
    expected = METHODS[method].run(prior, *args, t=t, guidance_scale=SCALE, generator=rng, **ours)
    assert torch.equal(out.grad, expected.grad)
    if method == "pds":  # not the published χ(t)
        rng = gen(7)
        config.sample_t(prior, x0.shape[0], 0.3, rng)
        published = pds(prior, *args, t=t, guidance_scale=SCALE, generator=rng, rule=config.pds_rule)
        assert not torch.allclose(out.grad, published.grad)
    defaults = {m: signature(METHODS[m].run).parameters["weighting"].default for m in METHODS}
    assert defaults == dict(sds="sds", sdi="sds", dds="uniform", pds=None, vsd="sds")  # pds: None = "chi"


def test_pds_own_weighting_only_with_pds():
    GuidanceConfig(method="pds", weighting="chi").check()
    with pytest.raises(DistillError) as err:
        GuidanceConfig(method="dds", weighting="chi").check()
    assert "--pipeline.guidance.weighting" in one_line(err) and "sds, uniform" in str(err.value)


def test_method_table_matches_the_cli_choices():
    assert list(get_args(MethodName)) == list(METHODS)
    assert method_names(edits=True) == ["sds", "dds", "pds"]
    assert method_names(needs_source=False) == ["sds", "sdi", "vsd"]
    with pytest.raises(DistillError) as err:
        GuidanceConfig(method="xyz").check()
    assert "use one of sds, sdi, dds, pds, vsd" in one_line(err)


@pytest.mark.parametrize("n", [1, 10])
def test_sdi_costs_inversion_steps_plus_one(prior, n):
    prior.calls = 0
    sdi(prior, latents(), "cat", t=T_BATCH, num_inversion_steps=n)
    assert prior.calls == n + 1


def test_sds_is_reproducible(prior):
    x0, eps = latents(), randn(3, *SHAPE, seed=1)
    a = sds(prior, x0, "cat", t=T_BATCH, noise=eps)
    b = sds(prior, x0, "cat", t=T_BATCH, noise=eps)
    assert torch.equal(a.grad, b.grad)
    c = sds(prior, x0, "cat", generator=torch.Generator().manual_seed(4))
    d = sds(prior, x0, "cat", generator=torch.Generator().manual_seed(4))
    e = sds(prior, x0, "cat", generator=torch.Generator().manual_seed(5))
    assert torch.equal(c.grad, d.grad) and torch.equal(c.t, d.t)
    assert not torch.equal(c.grad, e.grad)


def test_grad_clip_by_value_and_norm(prior):
    x0, eps = latents(), randn(3, *SHAPE, seed=1)
    free = sds(prior, x0, "cat", t=T_BATCH, noise=eps, weighting="uniform")
    limit = 0.5 * float(free.grad.abs().max())
    by_value = sds(prior, x0, "cat", t=T_BATCH, noise=eps, weighting="uniform", grad_clip=limit)
    assert float(by_value.grad.abs().max()) <= limit
    assert torch.equal(by_value.grad, free.grad.clamp(-limit, limit))
    norms = free.grad.flatten(1).norm(dim=1)
    cap = float(norms.min()) / 2
    by_norm = sds(
        prior, x0, "cat", t=T_BATCH, noise=eps, weighting="uniform", grad_clip=cap, grad_clip_mode="norm"
    )
    torch.testing.assert_close(
        by_norm.grad.flatten(1).norm(dim=1), torch.full((3,), cap, dtype=torch.float64)
    )


# --------------------------------------------------------------------------------- schedules
def test_timestep_schedule_annealing():
    prog = [0.0, 0.25, 0.5, 1.0]
    const = TimestepSchedule()
    assert {const.bounds(p) for p in prog} == {(20, 980)}
    lin = TimestepSchedule(anneal="linear", final_max_fraction=0.5)
    sq = TimestepSchedule(anneal="sqrt", final_max_fraction=0.5)
    for sched in (lin, sq):
        highs = [sched.bounds(p)[1] for p in prog]
        assert highs[0] == 980 and highs[-1] == 500
        assert all(a > b for a, b in zip(highs, highs[1:], strict=False))
    assert sq.bounds(0.25)[1] < lin.bounds(0.25)[1]  # sqrt drops faster early
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([lin.sample(256, 1.0, g) for _ in range(4)])
    assert draws.dtype == torch.long and int(draws.min()) >= 20 and int(draws.max()) <= 500


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_fraction=0.6, max_fraction=0.4),
        dict(max_fraction=1.2),
        dict(min_fraction=-0.1),
        dict(anneal="linear", final_max_fraction=0.99),
        dict(anneal="cosine"),
    ],
)
def test_timestep_schedule_rejects_bad_ranges(kwargs):
    with pytest.raises(ValueError) as err:
        TimestepSchedule(**kwargs).check()
    assert "\n" not in str(err.value) and "use" in str(err.value) or "pick" in str(err.value)
    assert "--pipeline.guidance.timesteps." in str(err.value)


def test_unknown_weighting_lists_valid_names():
    with pytest.raises(ValueError) as err:
        weight("dreamfusion", torch.linspace(0.99, 0.01, 1000), torch.tensor([3]))
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in WEIGHTINGS)


# -------------------------------------------------------------------------------- bad input
def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and ":" in msg
    return msg


def test_timestep_outside_schedule_raises_one_line(prior):
    with pytest.raises(PriorInputError) as err:
        sds(prior, latents(), "cat", t=1000)
    assert "[0, 999]" in one_line(err)


@pytest.mark.parametrize("method", ["sds", "sdi", "dds", "pds"])
def test_empty_target_prompt_raises_one_line(prior, method):
    x0, src = latents(), latents(5).detach()
    calls = {
        "sds": lambda: sds(prior, x0, ""),
        "sdi": lambda: sdi(prior, x0, " "),
        "dds": lambda: dds(prior, x0, src, "", "dog"),
        "pds": lambda: pds(prior, x0, src, "", "dog"),
    }
    with pytest.raises(PriorInputError) as err:
        calls[method]()
    assert "unconditional" in one_line(err)


def test_pds_timestep_off_the_grid_raises_one_line(prior):
    x0, src = latents(), latents(5).detach()
    for bad in (torch.tensor([2, 3, 4]), prior.timestep_grid(500)[:1]):  # off-grid, and grid[0] (no previous)
        with pytest.raises(PriorInputError) as err:
            pds(prior, x0, src, "cat", "dog", t=bad)
        assert "timestep_grid(500)" in one_line(err)
