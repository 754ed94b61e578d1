"""nerfstudio's Trainer, with what editing a trained scene (and a safe run) needs.

Before nerfstudio writes anything (``config.yml`` is its first write, in :meth:`save_config`):
- ``--load-dir`` is checked: missing, a file instead of its folder, no or unreadable checkpoint, a
  ``--load-step`` it does not hold, a run of another method or of another dataset;
- the run folder is checked: one that already holds checkpoints is never written into, except to resume
  that very run;
- the pipeline checks its own options (prompts, sizes, numbers) where it defines ``check``.
Each problem stops the process with one ``error: ...`` line that names the fix and a non-zero exit.

While training:
- A *base* checkpoint (a plain ``nerfacto`` run; ``splatfacto`` for the Gaussian-splat edits, as the
  pipeline config's ``base_method`` says) restores only the model weights and its step: its optimizer
  moments, learning rates and schedulers belong to another run (restoring them blew up the camera
  learning rate in instruct-nerf2nerf #60). A checkpoint of the *same* method resumes that run
  completely, and runs only the steps left of the planned ``--max-num-iterations``. Loading may replace
  the model's parameters (splatfacto resizes its Gaussians to the checkpoint's number), so the optimizers
  are then rebuilt on the loaded parameters (and, to resume, given the checkpoint's states again).
- A step the pipeline skips (non-finite render, guidance gradient, loss or gradients) is counted;
  ``max_bad_steps`` in a row, or any non-finite parameter, stop the run with a non-zero exit, before a
  non-finite field can reach a checkpoint.
- Ctrl-C (SIGINT) or SIGTERM saves a checkpoint after the current step and exits non-zero with one line
  that says how to resume.
- CPU runs use torch's deterministic kernels, so the same seed gives the same result.

On N GPUs (``--machine.num-devices N``, nerfstudio's launcher: N processes): each process uses its own GPU
(``torch.cuda.set_device``), only rank 0 writes ``config.yml`` (and, as in nerfstudio, checkpoints and the
viewer), and after every step the ranks agree on a stop signal, so a Ctrl-C or SIGTERM that reaches them
at different steps still stops all after the same step. The pipelines average the gradients
(:mod:`nerfstudio_distill.pipelines.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import comms

from nerfstudio_distill.compat.seeding import deterministic as use_deterministic_kernels
from nerfstudio_distill.errors import DistillError, exit_message, one_line
from nerfstudio_distill.pipelines import distributed

DEFAULT_BASE_METHOD = "nerfacto"
"""The method whose checkpoints an edit starts from, for a pipeline config without ``base_method``."""

RESUME_KEY = "edit_start_step"
"""A pipeline state-dict key only an edit run's checkpoint holds: tells a resume from a base start."""


@dataclass
class DistillTrainerConfig(TrainerConfig):
    """TrainerConfig of the distillation methods."""

    _target: type = field(default_factory=lambda: DistillTrainer)
    require_load_dir: bool = False
    """Editing methods start from a trained scene and refuse to run without --load-dir."""
    deterministic: bool | None = None
    """Use torch's deterministic kernels, so a run with the same --machine.seed gives the same field
    (on CPU: bitwise, about 2 % slower). None: on for CPU runs, off on CUDA (where they cost speed)."""
    max_bad_steps: int = 5
    """Stop (non-zero exit) after this many skipped steps in a row: a non-finite render, guidance gradient,
    loss or gradient. Single skips are harmless; a streak means training has diverged."""

    def save_config(self) -> None:
        """ns-train's first write. Here it only checks everything that can be checked before building: the
        config is written by :meth:`DistillTrainer.setup` once the pipeline is built, so a command that
        fails, also late (an unreadable image, a prior that does not load), writes no config.yml and never
        replaces the one of a run it resumes."""
        try:
            check_run(self)
        except DistillError as err:
            raise SystemExit(exit_message(err)) from None
        self.get_base_dir().mkdir(parents=True, exist_ok=True)  # the viewer writes there during setup


@dataclass
class LoadPlan:
    """What ``--load-dir`` holds and how to use it."""

    path: Path
    """The checkpoint file to load."""
    resume: bool
    """True: a run of this method (restore everything); False: a base (weights and step only)."""
    source: str
    """What the checkpoint belongs to, for messages (e.g. "nerfacto")."""


def checkpoint_steps(load_dir: Path) -> list[int]:
    names = [n for n in os.listdir(load_dir) if n.startswith("step-") and n.endswith(".ckpt")]
    return sorted(int(n[len("step-") : -len(".ckpt")]) for n in names if n[5:-5].isdigit())


def _data_path(config: TrainerConfig) -> Path | None:
    data = config.data or getattr(config.pipeline.datamanager, "data", None)
    data = data or getattr(getattr(config.pipeline.datamanager, "dataparser", None), "data", None)
    return Path(data).resolve() if data is not None else None


def read_checkpoint(path: Path, others: list[int]) -> dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (nothing is read until used); one line if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True)
        if not isinstance(state, dict) or "pipeline" not in state or "step" not in state:
            raise ValueError("no 'pipeline' and 'step' entries")
    except Exception as e:
        alternatives = f"pass --load-step with one of {others}" if others else "retrain the run"
        raise DistillError(
            f"{path} cannot be read ({one_line(e, 100)}): it is truncated or not a nerfstudio checkpoint; "
            f"delete it and {alternatives}"
        ) from None
    return state


def check_load_dir(config: DistillTrainerConfig) -> LoadPlan | None:
    """Validate ``--load-dir``/``--load-step``; return what to load (None: nothing)."""
    name = config.method_name
    base_method = getattr(config.pipeline, "base_method", DEFAULT_BASE_METHOD)
    if config.load_dir is None:
        if config.require_load_dir:
            raise DistillError(
                f"{name} edits a trained scene: pass --load-dir "
                f"outputs/<scene>/{base_method}/<timestamp>/nerfstudio_models"
            )
        return None
    load_dir = Path(config.load_dir)
    if load_dir.is_file():
        step = load_dir.name[len("step-") : -len(".ckpt")] if load_dir.name.startswith("step-") else ""
        hint = f" --load-step {int(step)}" if step.isdigit() else ""
        raise DistillError(
            f"--load-dir {load_dir} is a file: pass the folder that holds it, --load-dir {load_dir.parent}{hint}"
        )
    if not load_dir.is_dir():
        raise DistillError(
            f"--load-dir {load_dir} does not exist: pass the nerfstudio_models folder of a run"
        )
    steps = checkpoint_steps(load_dir)
    if not steps:
        raise DistillError(
            f"--load-dir {load_dir} holds no step-*.ckpt: pass the nerfstudio_models folder of a finished run"
        )
    step = steps[-1] if config.load_step is None else config.load_step
    if step not in steps:
        raise DistillError(
            f"--load-step {step}: {load_dir} has no step-{step:09d}.ckpt; it holds steps "
            f"{', '.join(map(str, steps[-10:]))}: pass one of them, or drop --load-step for the latest"
        )
    path = load_dir / f"step-{step:09d}.ckpt"
    state = read_checkpoint(path, [s for s in steps if s != step])
    run_config = load_dir.parent / "config.yml"
    if not run_config.is_file():
        # A bare checkpoint folder: an edit's own checkpoints hold RESUME_KEY, a base's do not.
        if config.require_load_dir and RESUME_KEY not in state["pipeline"]:
            return LoadPlan(path, resume=False, source="base")
        return LoadPlan(path, resume=True, source=name)
    try:
        base = yaml.load(run_config.read_text(), Loader=yaml.Loader)
        method = str(base.method_name)
    except Exception as e:
        raise DistillError(
            f"{run_config} cannot be read as a run config ({one_line(e, 100)}): restore it, or pass the "
            "nerfstudio_models folder of another run"
        ) from None
    if not config.require_load_dir and method != name:
        raise DistillError(
            f"--load-dir {load_dir} is a {method} run: {name} only resumes its own runs "
            "(drop --load-dir to start a new one)"
        )
    # a nerfacto edit may also start from another nerfacto edit's run (same model); a splat edit only
    # from splatfacto, or its own run to resume
    chained = base_method == DEFAULT_BASE_METHOD and method.endswith("-edit")
    if method not in (base_method, name) and not chained:
        raise DistillError(
            f"--load-dir {load_dir} is a {method} run: {name} starts from a {base_method} run "
            f"(train one with ns-train {base_method}), or resumes its own"
        )
    check_same_dataset(config, base, load_dir)
    return LoadPlan(path, resume=method == name, source=method)


def check_same_dataset(config: DistillTrainerConfig, base: TrainerConfig, load_dir: Path) -> None:
    """The base run's dataset must be ours: same cameras, whatever the folder is called now.

    nerfstudio saves the dataparser's transform and scale (computed from every training camera) beside
    each run; ours must match them. So a moved or copied dataset is accepted, another one refused.
    """
    saved = load_dir.parent / "dataparser_transforms.json"
    ours = _data_path(config)
    dataparser = getattr(config.pipeline.datamanager, "dataparser", None)
    if not saved.is_file() or ours is None or dataparser is None:
        return  # nothing to compare with; the state-dict check at load still guards the model
    outputs = dataparser_outputs(config)
    theirs = json.loads(saved.read_text())
    same = outputs is not None and torch.allclose(
        outputs.dataparser_transform.float(), torch.tensor(theirs["transform"]).float(), atol=1e-4
    )
    same = same and abs(float(outputs.dataparser_scale) - float(theirs["scale"])) <= 1e-4 * float(
        theirs["scale"]
    )
    if not same:
        raise DistillError(
            f"--load-dir {load_dir} was trained on other cameras than --data {ours} (its "
            f"dataparser_transforms.json differs): pass the dataset of the base run ({_data_path(base)})"
        )


def dataparser_outputs(config: TrainerConfig):
    """The training split's DataparserOutputs of ``--data`` (None for datamanagers without a dataparser)."""
    dataparser = getattr(config.pipeline.datamanager, "dataparser", None)
    data = _data_path(config)
    if dataparser is None or data is None:
        return None
    try:
        return dataclasses.replace(dataparser, data=data).setup().get_dataparser_outputs("train")
    except Exception as e:
        raise DistillError(
            f"--data {data} cannot be read as a dataset ({one_line(e, 120)}): pass a folder with "
            "transforms.json (as ns-process-data or ns-distill-scene write it)"
        ) from None


def check_output_folder(config: TrainerConfig) -> None:
    """Never write into a run folder that holds checkpoints, except to resume that very run; and the run
    folder must be creatable (no file in its way)."""
    run_dir = config.get_base_dir()
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise DistillError(
                    f"{folder} is a file, so the run folder {run_dir} cannot be made: pass another --output-dir"
                )
            break
    models = config.get_checkpoint_dir()
    if not models.is_dir() or not checkpoint_steps(models):
        return
    if config.load_dir is not None and Path(config.load_dir).resolve() == models.resolve():
        return
    raise DistillError(
        f"{config.get_base_dir()} already holds a run: pass another --timestamp (or none), or resume "
        f"that run with --load-dir {models}"
    )


def check_machine(config: TrainerConfig) -> None:
    """``--machine.num-devices N`` (N > 1) runs nerfstudio's launcher, which needs N visible GPUs."""
    devices = config.machine.num_devices
    if devices <= 1:
        return
    available = torch.cuda.device_count()
    if available == 0:
        raise DistillError(
            f"--machine.num-devices {devices} starts one process per GPU, and no GPU is visible: pass "
            "--machine.num-devices 1"
        )
    if devices > available:
        raise DistillError(
            f"--machine.num-devices {devices}: only {available} GPU(s) are visible: pass --machine.num-devices "
            f"{available} or fewer"
        )


def check_run(config: DistillTrainerConfig) -> LoadPlan | None:
    """Every check that can run before anything is built or written; returns the load plan."""
    check_machine(config)
    if config.max_bad_steps < 1:
        raise DistillError(f"--max-bad-steps {config.max_bad_steps}: pass 1 or more")
    if config.max_num_iterations < 1:
        raise DistillError(f"--max-num-iterations {config.max_num_iterations}: pass 1 or more")
    if not 0 <= config.machine.seed < 2**32:
        raise DistillError(f"--machine.seed {config.machine.seed}: pass a seed from 0 to 2**32 - 1")
    rays = getattr(config.pipeline.datamanager, "train_num_rays_per_batch", 1)
    if rays < 1:
        raise DistillError(f"--pipeline.datamanager.train-num-rays-per-batch {rays}: pass 1 or more")
    plan = check_load_dir(config)
    check_output_folder(config)
    check = getattr(config.pipeline, "check", None)
    if check is not None:
        check(config)
    return plan


class DistillTrainer(Trainer):
    """See the module docstring."""

    config: DistillTrainerConfig

    def __init__(self, config: DistillTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        try:
            self.plan = check_run(config)
        except DistillError as err:
            raise SystemExit(exit_message(err)) from None
        if config.deterministic or (config.deterministic is None and config.machine.device_type == "cpu"):
            use_deterministic_kernels()
        if world_size > 1 and config.machine.device_type == "cuda":
            torch.cuda.set_device(local_rank)  # nerfstudio leaves every rank on cuda:0 (NCCL, tcnn)
        super().__init__(config, local_rank, world_size)
        self._bad_steps: list[tuple[int, str]] = []
        self._signal: int | None = None
        self._handlers = {}
        try:  # from here on, Ctrl-C / SIGTERM stop the run cleanly (see _on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: nerfstudio's own behaviour
            pass

    def setup(self, test_mode="val") -> None:
        try:
            super().setup(test_mode)
        except DistillError as err:
            raise SystemExit(exit_message(err)) from None
        except OSError as err:  # an image of --data or of the prior set that is missing or cut short
            raise SystemExit(
                f"error: a file could not be read while building the run ({one_line(err, 150)}): check the "
                "path it names (an image of --data or of the prior's folder?)"
            ) from None
        if self._signal is not None:
            raise SystemExit(
                f"error: {signal.Signals(self._signal).name} before training started; nothing was saved"
            )
        planned = self.config.max_num_iterations
        start = getattr(self.pipeline, "start_edit", None)
        if start is not None:
            start(self._start_step, planned)
        left = planned
        if self.plan is not None and self.plan.resume:
            # finish the planned run: it started at the edit's first step (text to 3D: step 0)
            left = int(getattr(self.pipeline, RESUME_KEY, 0)) + planned - self._start_step
            if left <= 0:
                raise SystemExit(
                    f"error: {self.plan.path} already ends the planned {planned} steps: to train longer, pass "
                    f"a larger --max-num-iterations (the run's total, now {planned})"
                )
            print(f"Resuming at step {self._start_step}: {left} of the {planned} planned steps are left")
        if comms.is_main_process():
            TrainerConfig.save_config(self.config)  # only now: see DistillTrainerConfig.save_config
        self.config.max_num_iterations = left  # the loop's length; the schedule and config.yml keep `planned`

    def _load_checkpoint(self) -> None:
        if self.plan is None:
            return
        if self.plan.resume:
            try:
                super()._load_checkpoint()
                if self._rebuild_optimizers():  # the states went to the replaced parameters: load them again
                    state = torch.load(self.plan.path, map_location="cpu", mmap=True)
                    self.optimizers.load_optimizers(state["optimizers"])
                    if "schedulers" in state and self.config.load_scheduler:
                        self.optimizers.load_schedulers(state["schedulers"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise DistillError(f"could not resume from {self.plan.path}: {one_line(e, 150)}") from None
            return
        state = torch.load(self.plan.path, map_location="cpu")
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self._rebuild_optimizers()
        self._start_step = state["step"] + 1
        print(
            f"Loaded the {self.plan.source} weights of {self.plan.path} (optimizers and schedulers start fresh)"
        )

    def _rebuild_optimizers(self) -> bool:
        """Rebuild the optimizers (and schedulers) when loading replaced parameters they hold (splatfacto's
        ``load_state_dict`` makes new Gaussians of the checkpoint's number): nerfstudio builds them before
        loading, and would otherwise step parameters the model no longer has. Returns whether it did."""
        held = {id(p) for params in self.optimizers.parameters.values() for p in params}
        current = {id(p) for params in self.pipeline.get_param_groups().values() for p in params}
        if held == current:
            return False
        self.optimizers = self.setup_optimizers()
        return True

    # ------------------------------------------------------------------ guard
    def train(self) -> None:
        try:
            super().train()
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Finish the current step, then save and stop; a second signal stops at once."""
        self._signal = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def train_iteration(self, step: int):
        self.pipeline.skip_reason = None
        loss, loss_dict, metrics = super().train_iteration(step)
        reason = getattr(self.pipeline, "skip_reason", None)
        if reason is None and not torch.isfinite(loss).all():
            reason = "the loss is NaN/Inf"
        self._bad_steps = self._bad_steps + [(step, reason)] if reason is not None else []
        if not all(torch.isfinite(p).all() for p in self.pipeline.model.parameters()):
            self._stop(
                f"step {step} made the field's parameters NaN/Inf; nothing was saved from this step on"
            )
        if len(self._bad_steps) >= self.config.max_bad_steps:
            first, why = self._bad_steps[0]
            self._stop(f"{len(self._bad_steps)} steps in a row were skipped from step {first} on ({why})")
        if self.world_size > 1:  # a signal on any rank stops every rank after this step
            self._signal = distributed.max_over_ranks(self._signal or 0) or None
        if self._signal is not None:
            self.save_checkpoint(step)
            name = signal.Signals(self._signal).name
            self.shutdown()
            print(
                f"error: {name} at step {step}: saved {self.checkpoint_dir / f'step-{step:09d}.ckpt'}; resume with "
                f"the same flags and --load-dir {self.checkpoint_dir}",
                file=sys.stderr,
            )
            raise SystemExit(128 + self._signal)
        return loss, loss_dict, metrics

    def _stop(self, what: str) -> None:
        self.shutdown()
        saved = checkpoint_steps(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else []
        last = f"; the last checkpoint is step {saved[-1]} in {self.checkpoint_dir}" if saved else ""
        raise SystemExit(
            f"error: training diverged: {what}. Lower the learning rate (--optimizers.fields.optimizer.lr) or the "
            f"CFG scale (--pipeline.guidance.guidance-scale){last}"
        )
