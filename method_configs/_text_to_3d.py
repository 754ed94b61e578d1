"""The configuration shared by sds-nerfacto and sdi-nerfacto (they differ only in guidance)."""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_distill.data.random_cameras import RandomCamerasConfig
from nerfstudio_distill.guidance.config import GuidanceConfig
from nerfstudio_distill.models.text_to_3d import TextTo3DModelConfig
from nerfstudio_distill.pipelines.text_to_3d import TextTo3DPipelineConfig
from nerfstudio_distill.pipelines.trainer import DistillTrainerConfig


def _adam(lr: float, lr_final: float, max_steps: int) -> dict:
    return {
        "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=max_steps),
    }


def text_to_3d_method(name: str, guidance: GuidanceConfig, description: str) -> MethodSpecification:
    """A text-to-3D method: random cameras, nerfacto with shading augmentation, Stable Diffusion guidance.

    Against nerfstudio's generfacto: renders grow from 64 to 128 px and two views share a step; t is
    annealed; the opacity penalty is applied once; cameras go below the horizon; `ns-export` works.
    """
    steps = 10000
    config = DistillTrainerConfig(
        method_name=name,
        require_load_dir=False,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=1000,
        max_num_iterations=steps,
        mixed_precision=True,
        pipeline=TextTo3DPipelineConfig(
            datamanager=RandomCamerasConfig(
                radius=(3.0, 3.5),
                elevation=(-10.0, 60.0),
                azimuth=(-180.0, 180.0),
                azimuth_warmup=1000,
                fov=(40.0, 70.0),
                resolutions=(64, 128),
                resolution_milestones=(5000,),
                num_views=2,
            ),
            model=TextTo3DModelConfig(
                eval_num_rays_per_chunk=1 << 15,
                max_res=512,
                log2_hashmap_size=19,
                interlevel_loss_mult=1.0,
                distortion_loss_mult=0.002,
                orientation_loss_mult=0.01,
                pred_normal_loss_mult=0.001,
                opacity_loss_mult=1e-3,
                proposal_warmup=2000,
                proposal_weights_anneal_max_num_iters=2000,
            ),
            guidance=guidance,
        ),
        optimizers={
            "proposal_networks": _adam(1e-2, 1e-3, steps),
            "fields": _adam(1e-2, 1e-3, steps),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
    return MethodSpecification(config=config, description=description)
