"""nerfstudio's Trainer, with what editing a trained scene needs.

- ``--load-dir`` is required and checked before anything trains: missing, empty, a run of another
  method or of another scene each stop with one line that names the fix.
- A *base* checkpoint (a plain ``nerfacto`` run) restores only the model weights and its step:
  its optimizer moments, learning rates and schedulers belong to another run (restoring them blew
  up the camera learning rate in instruct-nerf2nerf #60).
- A checkpoint of the *same* method resumes that run completely (optimizers, schedulers, step).
- Our configuration errors end the process with one ``error: ...`` line instead of a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from nerfstudio.engine.trainer import Trainer, TrainerConfig

from nerfstudio_distill.priors.stable_diffusion import PriorLoadError


class DistillError(ValueError):
    """A user-facing configuration error: one line that names the fix."""


BASE_METHODS = ("nerfacto",)
"""Methods whose checkpoints an edit can start from (besides the edit methods themselves)."""


@dataclass
class DistillTrainerConfig(TrainerConfig):
    """TrainerConfig of the distillation methods."""

    _target: type = field(default_factory=lambda: DistillTrainer)
    require_load_dir: bool = False
    """Editing methods start from a trained scene and refuse to run without --load-dir."""


def _checkpoint_steps(load_dir: Path) -> list[int]:
    names = [n for n in os.listdir(load_dir) if n.startswith("step-") and n.endswith(".ckpt")]
    return sorted(int(n[len("step-") : -len(".ckpt")]) for n in names)


def _data_path(config: TrainerConfig) -> Path | None:
    data = config.data or getattr(config.pipeline.datamanager, "data", None)
    data = data or getattr(getattr(config.pipeline.datamanager, "dataparser", None), "data", None)
    return Path(data).resolve() if data is not None else None


def check_load_dir(config: DistillTrainerConfig) -> str | None:
    """Validate ``--load-dir``; return the method name of the run it belongs to (None if unknown)."""
    name = config.method_name
    if config.load_dir is None:
        if config.require_load_dir:
            raise DistillError(
                f"{name} edits a trained scene: pass --load-dir outputs/<scene>/nerfacto/<timestamp>/nerfstudio_models"
            )
        return None
    load_dir = Path(config.load_dir)
    if not load_dir.is_dir():
        raise DistillError(
            f"--load-dir {load_dir} does not exist: pass the nerfstudio_models folder of a run"
        )
    if not _checkpoint_steps(load_dir):
        raise DistillError(
            f"--load-dir {load_dir} holds no step-*.ckpt: pass the nerfstudio_models folder of a finished run"
        )
    run_config = load_dir.parent / "config.yml"
    if not run_config.is_file():
        return None  # a bare checkpoint folder: the state-dict check still guards the model
    base = yaml.load(run_config.read_text(), Loader=yaml.Loader)
    if not config.require_load_dir and base.method_name != name:
        raise DistillError(
            f"--load-dir {load_dir} is a {base.method_name} run: {name} only resumes its own runs "
            "(drop --load-dir to start a new one)"
        )
    if base.method_name not in (*BASE_METHODS, name) and not str(base.method_name).endswith("-edit"):
        raise DistillError(
            f"--load-dir {load_dir} is a {base.method_name} run: {name} starts from a nerfacto run "
            "(train one with ns-train nerfacto)"
        )
    ours, theirs = _data_path(config), _data_path(base)
    if ours is not None and theirs is not None and ours != theirs:
        raise DistillError(
            f"--load-dir {load_dir} was trained on {theirs}, not on --data {ours}: pass the same --data"
        )
    return base.method_name


class DistillTrainer(Trainer):
    """See the module docstring."""

    config: DistillTrainerConfig

    def __init__(self, config: DistillTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        try:
            self.base_method = check_load_dir(config)
        except DistillError as err:
            raise SystemExit(f"error: {err}") from None
        super().__init__(config, local_rank, world_size)

    def setup(self, test_mode="val") -> None:
        try:
            super().setup(test_mode)
        except (DistillError, PriorLoadError) as err:
            raise SystemExit(f"error: {err}") from None
        start = getattr(self.pipeline, "start_edit", None)
        if start is not None:
            start(self._start_step, self.config.max_num_iterations)

    def _load_checkpoint(self) -> None:
        resuming = self.base_method is None or self.base_method == self.config.method_name
        if self.config.load_dir is None or resuming:
            super()._load_checkpoint()
            return
        step = (
            _checkpoint_steps(self.config.load_dir)[-1]
            if self.config.load_step is None
            else self.config.load_step
        )
        path = Path(self.config.load_dir) / f"step-{step:09d}.ckpt"
        state = torch.load(path, map_location="cpu")
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self._start_step = state["step"] + 1
        print(f"Loaded the {self.base_method} weights of {path} (optimizers and schedulers start fresh)")
