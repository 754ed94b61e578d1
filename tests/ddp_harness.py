"""Several CPU processes with gloo, as nerfstudio's launcher runs several GPUs with NCCL.

nerfstudio's ``_distributed_worker`` asserts CUDA, so ``ns-train --machine.num-devices 2`` cannot run on a
machine without GPUs. :func:`spawn` starts the processes the same way (``torch.multiprocessing.spawn``,
one process group, ``comms.LOCAL_PROCESS_GROUP``) with gloo, and :func:`train_worker` is nerfstudio's
``train_loop`` (seed with ``--machine.seed`` + rank, ``config.setup(local_rank, world_size)``, ``setup``,
``train``) that also saves what each rank ended with, for tests/test_distributed.py to compare.

Functions run in spawned processes must be importable (``tests.ddp_harness``); a script that calls
:func:`spawn` needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import TINY_FIELD_SETTINGS, TINY_SPLAT_SETTINGS


def spawn(worker: Callable[..., None], world_size: int, folder: Path, *args: Any) -> None:
    """Run ``worker(rank, world_size, folder, *args)`` in ``world_size`` processes joined in a gloo group
    (rendezvous through a file in ``folder``); raises if any of them fails."""
    folder.mkdir(parents=True, exist_ok=True)
    url = f"file://{folder / 'rendezvous'}"
    mp.spawn(_join_group, args=(world_size, url, worker, folder, args), nprocs=world_size, join=True)


def _join_group(rank: int, world_size: int, url: str, worker: Callable, folder: Path, args: tuple) -> None:
    """nerfstudio's ``_distributed_worker`` with gloo and without its CUDA asserts."""
    from nerfstudio.utils import comms

    dist.init_process_group("gloo", init_method=url, world_size=world_size, rank=rank)
    comms.LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
    try:
        worker(rank, world_size, folder, *args)
        comms.synchronize()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- training
def train_worker(rank: int, world_size: int, folder: Path, configs: list) -> None:
    """nerfstudio's ``train_loop`` for each of ``configs`` in turn; saves the field's state, each step's
    guidance t (None without guidance) and, for an edit, the training images and the original photos (by
    view) to ``folder/<i>-rank<rank>.pt``."""
    from nerfstudio.scripts.train import _set_random_seed

    import method_configs  # noqa: F401  (the compat layer, as nerfstudio loading the plugin installs it)

    for i, config in enumerate(configs):
        _set_random_seed(config.machine.seed + rank)
        trainer = config.setup(local_rank=rank, world_size=world_size)
        trainer.setup()
        ts = record_t(trainer)
        trainer.train()
        state = {k: v.detach().clone() for k, v in trainer.pipeline.model.state_dict().items()}
        result = {"state": state, "t": ts}
        data = trainer.pipeline.datamanager
        if hasattr(data, "train_image_dataloader") and hasattr(data, "source_images"):  # a nerfacto edit
            batch = data.train_image_dataloader.cached_collated_batch
            views = range(data.num_train_views)
            result["images"] = torch.stack([batch["image"][data._position[v]][..., :3] for v in views])
            result["photos"] = data.source_images
        torch.save(result, folder / f"{i}-rank{rank}.pt")


def record_t(trainer) -> list[float | None]:
    """The guidance t of every step ``trainer`` trains (filled as it trains; None for a step without)."""
    ts: list[float | None] = []
    iteration = trainer.train_iteration

    def recorded(step: int):
        loss, loss_dict, metrics = iteration(step)
        ts.append(float(metrics["guidance_t"]) if "guidance_t" in metrics else None)
        return loss, loss_dict, metrics

    trainer.train_iteration = recorded
    return ts


def tiny_edit(
    scene: Path,
    prior_folder: Path,
    out: Path,
    *,
    steps: int,
    timestamp: str,
    chunk_size: int = 1 << 14,
    method: str = "pds-edit",
    seed: int = 0,
):
    """``ns-train pds-edit`` (or ``in2n-edit``: one update per step, 2 DDIM steps; or ``pds-splatfacto``: 300
    random Gaussians of SH degree 1) with tests/conftest.py's CPU flags and tiny field, from a random field
    (no --load-dir), the exact prior of ``prior_folder``, and the given chunk size (below 2304 = 48 x 48
    rays: the two-pass backward)."""
    from method_configs.guided_edits import pds_edit, pds_splatfacto
    from method_configs.in2n_edit import in2n_edit
    from nerfstudio_distill.priors.config import ExactPriorConfig, PriorConfig

    methods = {"pds-edit": pds_edit, "in2n-edit": in2n_edit, "pds-splatfacto": pds_splatfacto}
    config = copy.deepcopy(methods[method].config)
    config.machine.device_type = "cpu"
    config.machine.seed = seed
    config.vis = "tensorboard"
    config.require_load_dir = False
    config.max_num_iterations = steps
    config.output_dir, config.timestamp = out, timestamp
    config.steps_per_save = config.steps_per_eval_batch = config.steps_per_eval_image = 10**6
    config.data = scene
    config.pipeline.datamanager.data = scene
    tiny = TINY_SPLAT_SETTINGS if method == "pds-splatfacto" else TINY_FIELD_SETTINGS
    config.pipeline.model = dataclasses.replace(config.pipeline.model, **tiny)
    config.pipeline = dataclasses.replace(
        config.pipeline,
        target_prompt="a blue striped ball",
        source_prompt="a red striped ball",
        prior=PriorConfig(kind="exact", exact=ExactPriorConfig(folder=prior_folder)),
        prior_resolution=None,
        chunk_size=chunk_size,
    )
    if method == "in2n-edit":
        config.pipeline.refine_every, config.pipeline.refine_denoise_steps = 1, 2
        config.pipeline.datamanager.train_num_rays_per_batch = 256
    return config


def tiny_text_to_3d(sd_folder: Path, out: Path, *, steps: int, timestamp: str, seed: int = 0):
    """``ns-train sds-nerfacto`` on CPU with a tiny field, 16 px views and the tiny random Stable Diffusion
    checkpoint in ``sd_folder`` (tests/tiny_sd.py) at 32 px."""
    from method_configs.sds_nerfacto import sds_nerfacto
    from nerfstudio_distill.priors.config import PriorConfig
    from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPriorConfig

    config = copy.deepcopy(sds_nerfacto.config)
    config.machine.device_type = "cpu"
    config.machine.seed = seed
    config.vis = "tensorboard"
    config.max_num_iterations = steps
    config.output_dir, config.timestamp = out, timestamp
    config.steps_per_save = config.steps_per_eval_batch = config.steps_per_eval_image = 10**6
    config.steps_per_eval_all_images = 10**6
    config.pipeline.datamanager = dataclasses.replace(config.pipeline.datamanager, resolutions=(16,))
    config.pipeline.model = dataclasses.replace(config.pipeline.model, **TINY_FIELD_SETTINGS)
    sd = StableDiffusionPriorConfig(model=str(sd_folder), device="cpu", dtype="fp32", local_files_only=True)
    config.pipeline = dataclasses.replace(
        config.pipeline, prompt="a ball", prior=PriorConfig(stable_diffusion=sd), prior_resolution=32
    )
    return config


# ------------------------------------------------------------------ DDP, and where nerfstudio misses it
class TwoHeads(torch.nn.Module):
    """A module with a parameter that a forward does not use (as nerfacto's proposal networks on steps
    that do not update them)."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, both: bool = False) -> torch.Tensor:
        return self.used(x) + self.unused(x) if both else self.used(x)


def ddp_worker(rank: int, world_size: int, folder: Path) -> None:
    """A tiny module in torch's DistributedDataParallel (find_unused_parameters, as nerfstudio wraps its
    model), each rank with its own input. Saves the gradients of a backward through the DDP wrapper
    ("wrapped"), through the unwrapped module (what a loss computed through nerfstudio's ``pipeline.model``
    gets: "unwrapped"), and through the unwrapped module followed by ``distributed.average_gradients``
    ("averaged"); the "partly" ones with a head that only rank 1 uses."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nerfstudio_distill.pipelines import distributed

    torch.manual_seed(0)  # the same initial weights on every rank
    module = TwoHeads()
    ddp = DDP(module, find_unused_parameters=True)
    x = torch.full((4, 3), float(rank + 1))  # each rank's own "view"
    runs = [("wrapped", ddp, False), ("unwrapped", module, False), ("averaged", module, False)]
    runs += [("partly wrapped", ddp, rank == 1), ("partly averaged", module, rank == 1)]
    grads = {}
    for name, run, both in runs:
        module.zero_grad(set_to_none=True)
        run(x, both=both).square().sum().backward()
        if name.endswith("averaged"):
            distributed.average_gradients(list(module.parameters()))
        grads[name] = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
    torch.save(grads, folder / f"rank{rank}.pt")
