"""The edit methods, from two tables: scene representations (:data:`REPRESENTATIONS`: nerfacto, Gaussian
splats) x guidance methods (the guidance table's edit methods, with :data:`GUIDANCE_EDITS`' settings).
``ns-train <guidance>-<suffix>``: pds-edit, dds-edit, sds-edit (nerfacto) and pds-splatfacto,
dds-splatfacto, sds-splatfacto (splats) differ only in these two entries; :func:`guided_edits` builds them
all (method_configs/guided_edits.py registers them). in2n-edit is the nerfacto edit pipeline in its
dataset-update mode, with Instruct-NeRF2NeRF's defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import DataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.models.base_model import ModelConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_distill.data.edit_datamanager import EditDataManagerConfig, EditFullImageDataManagerConfig
from nerfstudio_distill.guidance.config import GuidanceConfig, method_names
from nerfstudio_distill.models.edit_nerfacto import EditNerfactoModelConfig
from nerfstudio_distill.models.edit_splatfacto import EditSplatfactoModelConfig
from nerfstudio_distill.pipelines.edit import EditPipelineConfig
from nerfstudio_distill.pipelines.trainer import DistillTrainerConfig


def _adam(lr: float, lr_final: float | None = None, max_steps: int = 30000, **schedule: Any) -> dict:
    """An Adam group of ``lr``, decaying exponentially to ``lr_final`` (None: constant)."""
    scheduler = None
    if lr_final is not None:
        scheduler = ExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=max_steps, **schedule)
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


@dataclass(frozen=True)
class Representation:
    """What an edit of one scene representation needs besides the guidance: its base method, model,
    datamanager, optimizers and trainer settings."""

    base: str
    """The nerfstudio method whose runs it edits (also the edit pipeline's ``base_method``)."""
    suffix: str
    """Method names are ``<guidance>-<suffix>``."""
    model: Callable[[], ModelConfig]
    datamanager: Callable[[int], DataManagerConfig]
    """Given the rays of a photometric batch (nerfacto's refinement/dataset update)."""
    optimizers: Callable[[float | None], dict]
    """Given the field's learning rate (None: the representation's default)."""
    trainer: dict[str, Any]
    """Further DistillTrainerConfig fields."""


def _nerfacto_optimizers(field_lr: float | None) -> dict:
    # 3e-3, not nerfacto's 1e-2: an edit restarts Adam on a converged field, and at 1e-2 PDS wrecked the
    # 32 px benchmark scene (55 % depth change, tests/test_edit_quality.py) and moved the ball's depth by
    # 2.6 % on one seed; at 3e-3 both kept their shape (README, edit benchmark).
    return {
        "proposal_networks": _adam(1e-2, 1e-4, 200000),
        "fields": _adam(field_lr or 3e-3, 1e-4, 200000),
        "camera_opt": _adam(1e-3, 1e-4, 5000),  # present so base checkpoints match; poses are frozen
    }


def _splatfacto_optimizers(field_lr: float | None) -> dict:
    # splatfacto's own groups and rates (nerfstudio 1.1.5 method_configs["splatfacto"]); field_lr: the means'
    return {
        "means": _adam(field_lr or 1.6e-4, 1.6e-6),
        "features_dc": _adam(0.0025),
        "features_rest": _adam(0.0025 / 20),
        "opacities": _adam(0.05),
        "scales": _adam(0.005),
        "quats": _adam(0.001),
        "camera_opt": _adam(1e-4, 5e-7, warmup_steps=1000, lr_pre_warmup=0),  # only if the base had one
        "bilateral_grid": _adam(2e-3, 1e-4, warmup_steps=1000, lr_pre_warmup=0),  # likewise
    }


REPRESENTATIONS: dict[str, Representation] = {
    "nerfacto": Representation(
        base="nerfacto",
        suffix="edit",
        model=lambda: EditNerfactoModelConfig(
            eval_num_rays_per_chunk=1 << 15,
            average_init_density=0.01,
            camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"),
        ),
        datamanager=lambda rays: EditDataManagerConfig(
            dataparser=NerfstudioDataParserConfig(),
            train_num_rays_per_batch=rays,
            eval_num_rays_per_batch=4096,
        ),
        optimizers=_nerfacto_optimizers,
        trainer=dict(
            steps_per_eval_batch=500, mixed_precision=True, viewer=ViewerConfig(num_rays_per_chunk=1 << 15)
        ),
    ),
    "splatfacto": Representation(
        base="splatfacto",
        suffix="splatfacto",
        # the base's Gaussians replace the initial ones on load: start from few (splatfacto's 50 000 random
        # ones cost a k-nearest-neighbour search for nothing)
        model=lambda: EditSplatfactoModelConfig(random_init=True, num_random=1000),
        datamanager=lambda rays: EditFullImageDataManagerConfig(dataparser=NerfstudioDataParserConfig()),
        optimizers=_splatfacto_optimizers,
        # as splatfacto: no eval batches (whole images are evaluated), full precision
        trainer=dict(steps_per_eval_batch=0, steps_per_eval_image=100, mixed_precision=False),
    ),
}
"""The scene representations an edit method can be built for, by base method."""

GUIDANCE_EDITS: dict[str, tuple[GuidanceConfig, str, dict[str, Any]]] = {
    # PDS: no opacity anchor. Its identity term holds the scene to its photos, and on the box benchmark's
    # unsettled (600-step) bases the anchor cost it 3.9-4.2 dB; DDS and SDS, with nothing else holding the
    # scene, keep the pipeline's 0.1, which stopped them punching holes into the ball's unsettled (300-step)
    # bases (README, edit benchmark; on settled bases no method moved a depth by more than 1.2 %).
    "pds": (
        GuidanceConfig(method="pds"),
        "Posterior Distillation Sampling (keeps identity)",
        {"opacity_tolerance": None},
    ),
    "dds": (
        GuidanceConfig(method="dds"),
        "Delta Denoising Score (editing baseline)",
        {},
    ),
    "sds": (GuidanceConfig(method="sds"), "Score Distillation Sampling (baseline; ignores the source)", {}),
}
"""Settings, description and further pipeline settings of each guidance method that edits (the guidance
table's ``edits``; a test keeps the two equal)."""


def edit_method(
    name: str,
    guidance: GuidanceConfig,
    description: str,
    *,
    representation: str = "nerfacto",
    max_num_iterations: int = 3000,
    rays_per_batch: int = 4096,
    field_lr: float | None = None,
    **pipeline: Any,
) -> MethodSpecification:
    """An edit method whose model equals ``ns-train <representation>``'s, so its checkpoints load as the base.

    Args:
        name: the method name (``ns-train <name>``).
        guidance: the guidance settings (distill mode: which gradient; both modes: the CFG scale).
        description: the line ``ns-train --help`` shows.
        representation: a key of :data:`REPRESENTATIONS` (the base method).
        max_num_iterations: steps of an edit.
        rays_per_batch: rays of nerfstudio's photometric batch (nerfacto's refinement stage / dataset update).
        field_lr: initial Adam learning rate of the field (nerfacto: 3e-3) or of the Gaussians' means
            (splatfacto: its 1.6e-4); None: the representation's.
        pipeline: further :class:`EditPipelineConfig` fields (mode, prior, refine_* settings).
    """
    rep = REPRESENTATIONS[representation]
    config = DistillTrainerConfig(
        method_name=name,
        require_load_dir=True,
        steps_per_save=250,
        max_num_iterations=max_num_iterations,
        pipeline=EditPipelineConfig(
            datamanager=rep.datamanager(rays_per_batch),
            model=rep.model(),
            guidance=guidance,
            **pipeline,
        ),
        optimizers=rep.optimizers(field_lr),
        vis="viewer",
        **rep.trainer,
    )
    return MethodSpecification(config=config, description=description)


def guided_edits() -> dict[str, MethodSpecification]:
    """Every guidance edit: one method per representation and edit guidance method, by name."""
    methods = {}
    for representation, rep in REPRESENTATIONS.items():
        scene = "Gaussian-splat (splatfacto)" if representation == "splatfacto" else "nerfacto"
        for guidance in method_names(edits=True):
            settings, what, pipeline = GUIDANCE_EDITS[guidance]
            name = f"{guidance}-{rep.suffix}"
            description = f"Edit a trained {scene} scene with {what}."
            methods[name] = edit_method(
                name, settings, description, representation=representation, **pipeline
            )
    return methods
