"""splatfacto for editing (``pds-splatfacto``, ``dds-splatfacto``, ``sds-splatfacto``).

- A "source_rgb" output: the unedited scene, for split-screen comparison in the viewer, as
  :mod:`~nerfstudio_distill.models.edit_nerfacto` does (a frozen copy of the base, outside the module tree:
  never in checkpoints, only in the training process that loaded the base).
- Densification (gsplat's DefaultStrategy, as splatfacto configures it) runs only where the losses are
  photometric: :attr:`EditSplatfactoModel.densify_from` is the global step at which the pipeline's
  refinement stage (dataset update) starts, and the strategy counts its steps from there (1 at that
  step). Before it, during the guidance (distillation) stage, the set of Gaussians is frozen in number:
  no split, clone, prune or opacity reset, only their parameters move. Why: the strategy's thresholds
  (2D mean gradient ``densify_grad_thresh``, opacity, screen size) are calibrated for splatfacto's L1+SSIM
  photometric loss, and a guidance gradient is on another scale (it depends on the CFG scale, the
  prior's resolution and ``guidance_weight``); and PDS's identity term should keep the scene, not spawn
  Gaussians. splatfacto's own step counter would not densify anyway after a full base run (it stops
  splitting at its global step ``stop_split_at``, 15000, and a base ends at 30000). Counting from the
  refinement's start, with splatfacto's warm-up and refine intervals, lets the refinement grow and prune
  Gaussians where the edited images need them; starting at 1 skips the opacity reset splatfacto does at
  its step 0, which would clamp every opacity of the trained scene to ``2 * cull_alpha_thresh``.
- Guidance renders (:meth:`EditSplatfactoModel.guidance_outputs`) use the background the viewer shows,
  not splatfacto's random training background: the prior should judge the scene as it is seen, and a
  random colour where the Gaussians leave the view transparent is noise to it. The photometric steps of
  the refinement keep splatfacto's training behaviour.
- Renders at full resolution (no coarse-to-fine downscaling: that schedule is for training from
  scratch, and the pipeline's ``render_scale`` sets the size of guidance renders).

Parameters and checkpoints are exactly splatfacto's, so a plain ``ns-train splatfacto`` run loads as the
base, whatever its number of Gaussians (splatfacto's ``load_state_dict`` resizes them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig

SH_C0 = 0.28209479177387814
"""The degree-0 spherical-harmonic basis constant: colour = SH_C0 · DC + 0.5."""


def colour_lr(steps: int, margin: float = 2.0) -> float:
    """An Adam rate for the colours (``--optimizers.features-dc.optimizer.lr``) at which an edit of ``steps``
    steps can move a colour across its range: Adam moves a parameter by about its rate per step at most,
    and one colour channel spans 1 / SH_C0 ≈ 3.5 in DC units, so the rate must be at least 3.5 / steps;
    ``margin`` times that. splatfacto's 2.5e-3 suits edits of about 3000 steps (pds-splatfacto's default
    length); a 200-step edit needs about 0.035."""
    return margin / (SH_C0 * steps)


@dataclass
class EditSplatfactoModelConfig(SplatfactoModelConfig):
    """splatfacto whose Gaussians are frozen in number while the guidance edits them and densify in the
    refinement stage, plus a "source_rgb" output: the scene before the edit."""

    _target: type = field(default_factory=lambda: EditSplatfactoModel)
    # splatfacto's densification settings, with what they mean in an edit (same defaults)
    warmup_length: int = 500
    """Densification starts after this many steps of the refinement stage (--pipeline.refine-steps); the
    guidance stage never densifies. Lower it for a short refinement."""
    refine_every: int = 100
    """In the refinement stage: grow and prune Gaussians every this many steps (counted from the stage's
    first step). Not --pipeline.refine-every, the dataset update's interval."""
    reset_alpha_every: int = 30
    """In the refinement stage: clamp every opacity (to 2 x cull-alpha-thresh) every this many refine-every
    intervals, counted from the stage's first step (not at it)."""
    stop_split_at: int = 15000
    """No densification from this step of the refinement stage on."""


class EditSplatfactoModel(SplatfactoModel):
    """See the module docstring."""

    config: EditSplatfactoModelConfig

    densify_from: int | None = None
    """Global step from which splatfacto's densification strategy runs, counting its own steps from 1
    there (set by the edit pipeline to the first step of its refinement stage); None: never (the number of
    Gaussians stays as loaded)."""

    def populate_modules(self) -> None:
        super().populate_modules()
        self.optimizers = {}  # splatfacto's step_cb sets them before each training step; a render needs them

    def _get_downscale_factor(self) -> int:
        return 1

    def guidance_outputs(self, camera: Cameras) -> dict[str, torch.Tensor]:
        """``get_outputs(camera)`` (with autograd, in the current mode) on the viewer's background."""
        self.__dict__["_fixed_background"] = True
        try:
            return self.get_outputs(camera)
        finally:
            self.__dict__["_fixed_background"] = False

    def _get_background_color(self) -> torch.Tensor:
        if self.__dict__.get("_fixed_background"):
            return self.background_color.to(self.device)
        return super()._get_background_color()

    def step_post_backward(self, step: int) -> None:
        """splatfacto's densification (grow, prune, opacity reset) only from :attr:`densify_from` on, with the
        strategy's step counted from there."""
        if self.densify_from is None or step < self.densify_from:
            return
        self.strategy.step_post_backward(
            params=self.gauss_params,
            optimizers=self.optimizers,
            state=self.strategy_state,
            step=step - self.densify_from + 1,
            info=self.info,
            packed=False,
        )

    def keep_source(self) -> None:
        """Freeze a copy of the current Gaussians as the unedited scene."""
        self.__dict__.pop("_source", None)
        # neither the optimizers nor the last render's autograd info belong to the copy
        kept = {name: self.__dict__.pop(name) for name in ("optimizers", "info") if name in self.__dict__}
        try:
            source = copy.deepcopy(self).eval().requires_grad_(False)
        finally:
            self.__dict__.update(kept)
        self.__dict__["_source"] = source

    @torch.no_grad()
    def get_outputs_for_camera(
        self, camera: Cameras, obb_box: OrientedBox | None = None
    ) -> dict[str, torch.Tensor]:
        outputs = super().get_outputs_for_camera(camera, obb_box)
        source = self.__dict__.get("_source")
        if source is not None:
            source.background_color = self.background_color  # the viewer may set it on this model
            outputs["source_rgb"] = source.get_outputs_for_camera(camera, obb_box)["rgb"]
        return outputs
