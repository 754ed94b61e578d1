"""Compatibility layer, installed when nerfstudio loads this plugin's entry points.

nerfstudio imports every plugin's ``nerfstudio.method_configs`` entry point at the start
of ``ns-train``, ``ns-export``, ``ns-viewer`` and ``ns-eval`` (through
``nerfstudio.configs.method_configs``), so ``method_configs/__init__.py`` calls
:func:`install` and the fixes below apply to every method, ours and built-in:

1. :mod:`.checkpoints`: torch ≥ 2.6 loads checkpoints with ``weights_only=True``; the
   numpy scalars inside nerfstudio 1.1.5 checkpoints are allow-listed, nothing more.
2. :mod:`.lpips`: offline, nerfacto's LPIPS metric cannot download AlexNet; the metric
   becomes unavailable with one warning instead of crashing training.
3. :mod:`.seeding`: the ray-sampling worker processes of ``ParallelDataManager`` are seeded
   from ``--machine.seed``, so a CPU run with the same seed gives the same field.
4. :mod:`.gsplat_torch`: without CUDA, splatfacto renders with a pure-torch rasterizer instead of
   gsplat's CUDA kernels (with CUDA nothing changes).

All are idempotent and cheap (no heavy imports).
"""

from nerfstudio_distill.compat import checkpoints, gsplat_torch, lpips, seeding


def install() -> None:
    """Apply every compatibility fix (safe to call more than once)."""
    checkpoints.install()
    lpips.install()
    seeding.install()
    gsplat_torch.install()


__all__ = ["install", "checkpoints", "gsplat_torch", "lpips", "seeding"]
