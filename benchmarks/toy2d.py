"""2D toy comparison of SDS, DDS and PDS (the comparative analysis of Koo et al., CVPR 2024, Sec. 5).

Source and target are mixtures of two isotropic Gaussians (std σ) in 2D; the target is the source
shifted by ``shift`` along x, so the optimal-transport (OT) edit moves every point by exactly
(shift, 0) and keeps its identity. ``ExactPrior`` gives the closed-form ε̂ of both mixtures. Points
drawn from the source are optimised with Adam, as the 3D edits are (``--optimizer gd``: plain gradient
descent, x0 ← x0 − lr · grad, this toy's optimiser before), where grad is
what ``nerfstudio_distill.guidance.{sds,dds,pds}`` returns (``encode`` is the identity); DDS and PDS
use the original points as x0_src, SDS only sees the target prompt. All methods share the prior, the
CFG scale, the t distribution (the 500-step grid in [2 %, 98 %]), the noise stream and the step budget.

Metrics (x = final points, x_src = initial points, i over points):
- ``spread_ratio``: RMS distance of the points to their centroid, final / initial (≈ 0: collapse
  to a single point; 1: the OT map).
- ``displacement_over_ot``: ‖mean_i (x_i − x_src,i)‖ / shift (1 = the OT displacement).
- ``path_over_ot``: mean_i ‖x_i − x_src,i‖ / shift (per-point distance travelled, 1 for OT).
- ``ot_error``: mean_i ‖x_i − (x_src,i + shift·e_x)‖ / σ (distance to the point's own OT image).
- ``in_target``: fraction of points within 3σ of a target component mean (a radius that holds
  1 − e^{−4.5} ≈ 98.9 % of a component's mass in 2D).

Run ``python benchmarks/toy2d.py`` (table + figure) or ``--json`` (last line is one JSON object).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nerfstudio_distill.guidance import dds, pds, sds
from nerfstudio_distill.guidance.config import METHODS as METHODS_TABLE
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.priors.exact import ExactPrior

METHODS = ("sds", "dds", "pds")
SRC, TGT = "a source blob", "a target blob"


@dataclass
class Settings:
    """Everything that defines one run (shared by all three methods)."""

    steps: int = 3000
    """Gradient steps per method."""
    num_points: int = 400
    """Points drawn from the source mixture (one batch)."""
    cfg: float = 7.5
    """Classifier-free guidance scale of every method."""
    psi_scale: float = 1.0
    """PDS factor on ψ(t), the identity-preservation term (1 = the reference coefficients)."""
    pds_rule: str = GuidanceConfig().pds_rule
    """PDS rule: "reference" (published) or "balanced" (conditional edit term, orthogonal identity term);
    default: pds-edit's."""
    pds_weighting: str = METHODS_TABLE["pds"].defaults["weighting"]
    """PDS w(t) on its edit term; default: pds-edit's ("uniform"; "chi" is the published χ(t))."""
    lr: float = 0.05
    """Peak step size (of Adam, or of plain gradient descent)."""
    lr_schedule: str = "cosine"
    """``"constant"`` or ``"cosine"`` (decay to 0, so the stochastic iterates settle)."""
    optimizer: str = "adam"
    """``"adam"``: Adam as the 3D edits run it (nerfstudio's eps 1e-15), whose step follows the gradient's
    measured scale; ``"gd"``: plain gradient descent, x0 ← x0 − lr · grad, whose stable step depends on
    the gradient's scale (at CFG 100, PDS with uniform weighting needs lr ≤ 0.005)."""
    t_min: float = 0.02
    """Lowest t as a fraction of T (t lies on the 500-step grid)."""
    t_max: float = 0.98
    """Highest t as a fraction of T."""
    sigma: float = 0.35
    """Std of every mixture component."""
    shift: float = 4.0
    """Target = source + (shift, 0)."""
    seed: int = 0
    """Seed of the points, timesteps and noise."""


def source_means() -> Float[Tensor, "2 2"]:
    """Means of the two source components."""
    return torch.tensor([[-2.0, 0.0], [-2.0, 1.5]])


def target_means(s: Settings) -> Float[Tensor, "2 2"]:
    """Means of the two target components (the source shifted along x)."""
    return source_means() + torch.tensor([s.shift, 0.0])


def make_problem(s: Settings) -> tuple[ExactPrior, Float[Tensor, "N 2"]]:
    """The labelled 4-component prior and points drawn from the source mixture."""
    means = torch.cat([source_means(), target_means(s)])
    prior = ExactPrior(means, [SRC, SRC, TGT, TGT], sigma=s.sigma, guidance_scale=s.cfg)
    gen = torch.Generator().manual_seed(s.seed)
    comp = torch.randint(0, 2, (s.num_points,), generator=gen)
    points = source_means()[comp] + s.sigma * torch.randn(s.num_points, 2, generator=gen)
    return prior, points.double()


OPTIMIZERS = {
    "gd": torch.optim.SGD,  # plain gradient descent: x0 <- x0 - lr * grad
    "adam": functools.partial(torch.optim.Adam, eps=1e-15),  # nerfstudio's eps
}
"""``Settings.optimizer`` -> the torch optimiser."""


def sample_t(prior: ExactPrior, s: Settings, n: int, gen: torch.Generator) -> Int[Tensor, " N"]:
    """t per point on the 500-step DDIM grid between t_min and t_max (past the grid's first point)."""
    grid = prior.timestep_grid(500)
    lo, hi = max(1, int(s.t_min * 500)), max(2, int(s.t_max * 500))
    return grid[torch.randint(lo, hi, (n,), generator=gen)]


def step_size(s: Settings, step: int) -> float:
    """Learning rate at ``step`` (constant, or cosine decay from ``lr`` to 0)."""
    if s.lr_schedule == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * step / s.steps))
    if s.lr_schedule == "constant":
        return s.lr
    raise ValueError(f"unknown lr_schedule {s.lr_schedule!r}: use 'constant' or 'cosine'")


def gradient(
    method: str,
    prior: ExactPrior,
    x: Float[Tensor, "N 2"],
    x_src: Float[Tensor, "N 2"],
    t: Int[Tensor, " N"],
    noise: Float[Tensor, "N 2"],
    s: Settings,
) -> Float[Tensor, "N 2"]:
    """One guidance gradient from the library (SDS and DDS with their papers' weightings, PDS with pds-edit's)."""
    if method == "sds":
        return sds(prior, x, TGT, t=t, noise=noise, guidance_scale=s.cfg).grad
    if method == "dds":
        return dds(prior, x, x_src, TGT, SRC, t=t, noise=noise, guidance_scale=s.cfg).grad
    if method == "pds":
        return pds(
            prior,
            x,
            x_src,
            TGT,
            SRC,
            t=t,
            noise=noise,
            guidance_scale=s.cfg,
            psi_scale=s.psi_scale,
            rule=s.pds_rule,
            weighting=s.pds_weighting,
        ).grad
    raise ValueError(f"unknown method {method!r}: use one of {METHODS}")


def optimise(
    method: str, prior: ExactPrior, x_src: Float[Tensor, "N 2"], s: Settings, keep_every: int = 0
) -> Float[Tensor, "K N 2"]:
    """Adam or plain gradient descent (``s.optimizer``) from the source points. Returns the iterates
    every ``keep_every`` steps after x_src (0: only the final points); the last one is always the final
    points.

    The t / noise stream is seeded identically for every method (common random numbers).
    """
    if s.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {s.optimizer!r}: use 'gd' or 'adam'")
    gen = torch.Generator().manual_seed(s.seed + 1)
    x = torch.nn.Parameter(x_src.clone())
    optimizer = OPTIMIZERS[s.optimizer]([x], lr=s.lr)
    kept = [x_src] if keep_every else []
    for step in range(1, s.steps + 1):
        t = sample_t(prior, s, len(x), gen)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x.grad = gradient(method, prior, x.detach(), x_src, t, noise, s)
        optimizer.param_groups[0]["lr"] = step_size(s, step - 1)
        optimizer.step()
        if (keep_every and step % keep_every == 0) or step == s.steps:
            kept.append(x.detach().clone())
    return torch.stack(kept)


def spread(x: Float[Tensor, "N 2"]) -> float:
    """RMS distance of the points to their centroid."""
    return float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())


def metrics(x: Float[Tensor, "N 2"], x_src: Float[Tensor, "N 2"], s: Settings) -> dict[str, float]:
    """The module docstring's metrics for final points ``x``."""
    shift = torch.tensor([s.shift, 0.0], dtype=x.dtype)
    d = x - x_src
    nearest = torch.cdist(x, target_means(s).to(x.dtype)).min(1).values
    return {
        "spread_ratio": spread(x) / spread(x_src),
        "displacement_over_ot": float(d.mean(0).norm()) / s.shift,
        "path_over_ot": float(d.norm(dim=1).mean()) / s.shift,
        "ot_error": float((d - shift).norm(dim=1).mean()) / s.sigma,
        "in_target": float((nearest <= 3 * s.sigma).double().mean()),
    }


def simulate(s: Settings, keep_every: int = 0) -> dict:
    """Run the three methods: ``{"x_src": N x 2, method: K x N x 2 iterates (see optimise)}``.

    Runs single-threaded: the ops are tiny and a contended thread pool makes them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prior, x_src = make_problem(s)
        out = {"x_src": x_src} | {m: optimise(m, prior, x_src, s, keep_every) for m in METHODS}
    finally:
        torch.set_num_threads(threads)
    return out


def summarise(sim: dict, s: Settings) -> dict:
    """Metrics per method (of the last iterate) and the settings."""
    return {m: metrics(sim[m][-1], sim["x_src"], s) for m in METHODS} | {"settings": asdict(s)}


def run(s: Settings) -> dict:
    """Metrics of SDS, DDS and PDS under settings ``s``, plus the settings themselves."""
    return summarise(simulate(s), s)


def plot(sim: dict, s: Settings, path: Path) -> None:
    """Three panels: target 1σ/2σ/3σ contours, source points, faint trajectories, final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = torch.linspace(-4, 9, 261), torch.linspace(-2, 3.5, 111)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    dist2 = torch.stack([((grid - m[:, None, None]) ** 2).sum(0) for m in target_means(s)]).min(0).values
    result = summarise(sim, s)
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.4), sharex=True, sharey=True)
    x_src, shown = sim["x_src"], slice(0, None, max(1, s.num_points // 40))
    for ax, method in zip(axes, METHODS, strict=True):
        traj, r = sim[method], result[method]
        ax.contour(xs, ys, dist2.sqrt() / s.sigma, levels=[1, 2, 3], colors="tab:green", linewidths=0.7)
        ax.scatter(*x_src.T, s=2, c="0.6", label="source")
        ax.plot(traj[:, shown, 0], traj[:, shown, 1], c="tab:blue", lw=0.4, alpha=0.25)
        ax.scatter(*traj[-1].T, s=2, c="tab:red", label="final", zorder=3)
        ax.set_title(
            f"{method.upper()}: spread ×{r['spread_ratio']:.2f}, shift {r['displacement_over_ot']:.2f}× OT, "
            f"{100 * r['in_target']:.0f}% in target",
            fontsize=9,
        )
        ax.set_aspect("equal")
    axes[0].plot([], [], c="tab:green", lw=0.7, label="target 1-3σ")
    axes[0].legend(loc="upper right", fontsize=6, markerscale=3)
    axes[0].set_ylabel(f"CFG {s.cfg:g}, ψ×{s.psi_scale:g}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(result: dict) -> str:
    """Markdown table of the metrics."""
    keys = list(result["sds"])
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in METHODS:
        lines.append(f"| {m.upper()} | " + " | ".join(f"{result[m][k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Command line → settings (every Settings field is a flag) and the output options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--figure", default="docs/toy2d.png", help="PNG path ('' = none)")
    args = parser.parse_args(argv)
    fields = {k: getattr(args, k) for k in asdict(Settings())}
    return Settings(**fields), args


def main(argv: list[str] | None = None) -> dict:
    """Simulate, print the table (or JSON), save the figure."""
    s, args = parse(argv)
    start = time.perf_counter()
    sim = simulate(s, keep_every=max(1, s.steps // 100))
    result = summarise(sim, s)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.figure:
        plot(sim, s, Path(args.figure))
    print(
        json.dumps(result) if args.json else f"{table(result)}\n{result['seconds']} s, settings {asdict(s)}"
    )
    return result


if __name__ == "__main__":
    main()
