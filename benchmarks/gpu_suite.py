"""One prepared GPU check: guidance step cost, a pds-edit's speed and memory, and the multi-GPU speed-up.

Run it through ``benchmarks/gpu_suite.sh`` (offline environment, hard time limit of 8 minutes) on a CUDA
machine; it prints a short table and, as its last line, one JSON object with the keys:

- ``guidance_step``: per method (sds, sdi, dds, pds) the step in ms against its floor (the bare batched
  UNet evaluation of the same branches plus the VAE encoder's forward and backward), their ratio, and peak
  GB, at SD-1.5 size (random weights built from SD-1.5's configs, fp16, 512 px), measured by
  ``benchmarks/guidance_step.py``'s code;
- ``pds_edit``: a pds-edit (the ``ns-train pds-edit`` method's pipeline, optimizers and mixed precision) of
  ``--edit-steps`` steps on a synthetic scene of ``--views`` 512 x 512 views (``nerfstudio_distill.data.scene``)
  with that prior, from a random field: s/step, split into render (the first, gradient-free pass),
  prior (encode, guidance, the VAE's backward), backward (the chunked re-render with autograd) and other
  (optimizer, callbacks), and the peak GB (weights included);
- ``pds_splatfacto``: the same for a pds-splatfacto edit (the ``ns-train pds-splatfacto`` method's pipeline
  and optimizers, full precision as splatfacto) of the same scene and prior, from ``--gaussians`` random
  Gaussians (all SH degrees from step 3 on): s/step split into render (the whole-view rasterisation),
  prior, backward and other, and the peak GB;
- ``ddp``: with 2+ GPUs, the same edit in N processes (NCCL, this plugin's gradient averaging), its s/step
  and the speed-up in views per second over one GPU; otherwise why not;
- ``goals``: PDS edit step at least 3x faster than the published PDS code (about 0.7 s/step on an A100:
  0.233 s/step) and peak memory at most 8 GB, on GPU at SD-1.5 size and 512 px; the guidance step within
  1.05x of its floor (x evaluations for SDI), a CPU goal (``benchmarks/guidance_step.py`` measures it there).

Nothing is downloaded: every network is built from a config with random weights (HF_HUB_OFFLINE=1, web
requests go to a closed port). ``--dry-run`` builds everything at tiny sizes on the CPU (2 gloo processes
for ``ddp``) and prints the same keys, so the script is checked before any GPU time is spent.

    bash benchmarks/gpu_suite.sh              # CUDA machine, at most 8 minutes
    bash benchmarks/gpu_suite.sh --dry-run    # CPU, tiny sizes, about a minute
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or torch.hub: never download (as tests/conftest.py's offline_env).
# Web requests go to a closed local port, so any attempt (nerfacto's LPIPS asks torchvision for AlexNet)
# fails at once, whatever proxy the machine has.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
for _name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ[_name] = "http://127.0.0.1:9"
for _name in ("no_proxy", "NO_PROXY"):
    os.environ[_name] = ""

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from importlib.metadata import entry_points  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # guidance_step (this folder), tests.tiny_sd (the repository)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import guidance_step  # noqa: E402

PUBLISHED_PDS_S_PER_STEP = 0.7
"""The published PDS code's edit step on an A100 (seconds), the reference of the speed goal."""
SPEED_GOAL = PUBLISHED_PDS_S_PER_STEP / 3
PEAK_GOAL_GB = 8.0
GUIDANCE_TOLERANCE = guidance_step.TOLERANCE
METHODS = guidance_step.METHODS
TARGET, SOURCE = guidance_step.PROMPT, guidance_step.PROMPT_SRC


@dataclasses.dataclass
class Sizes:
    """What one run builds: SD-1.5 on a GPU, or tiny on the CPU (--dry-run)."""

    prior: str  # benchmarks/guidance_step.py's --size
    resolution: int  # px of the views and of the prior's input
    views: int
    dtype: str
    repeats: int
    warmup: int
    inversion_steps: int
    edit_steps: int
    edit_warmup: int
    chunk_size: int
    tiny_field: bool
    ddp_steps: int
    gaussians: int


def sizes(args: argparse.Namespace) -> Sizes:
    if args.dry_run:
        return Sizes("tiny", 64, 4, "fp32", 2, 1, 2, args.edit_steps or 3, 1, 1024, True, 2, 500)
    return Sizes(
        "sd15",
        512,
        args.views,
        "fp16",
        10,
        2,
        10,
        args.edit_steps or 100,
        3,
        1 << 14,
        False,
        20,
        args.gaussians,
    )


def refuse_downloads():
    """While it is active, torchvision's weight downloads (nerfacto's LPIPS asks for AlexNet) fail at once
    with a network error, without even trying; the plugin's compat layer then leaves LPIPS out with one
    warning."""
    import urllib.error

    from torchvision.models import _api

    def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError(f"gpu_suite downloads nothing ({url})")

    return mock.patch.object(_api, "load_state_dict_from_url", refuse)


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds spent in named sections (CUDA-synchronised at each edge)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


class PeakMemory:
    """Peak memory of a stretch of work, in GB: CUDA ``max_memory_allocated`` (weights included), or the
    process's peak RSS on the CPU (see benchmarks/guidance_step.py)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif os.access("/proc/self/clear_refs", os.W_OK):
            guidance_step._malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return guidance_step._proc_kb("VmHWM") / 2**20


# ------------------------------------------------------------------------------------ guidance step
def guidance_section(prior: Any, s: Sizes, device: torch.device, seed: int) -> dict[str, Any]:
    """benchmarks/guidance_step.py's measurement of every method, on ``prior`` (B = 1)."""
    args = argparse.Namespace(
        warmup=s.warmup, repeats=s.repeats, clock="wall", inversion_steps=s.inversion_steps
    )
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 3, s.resolution, s.resolution)
    images, sources = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    prior.embed([TARGET, SOURCE, ""])
    out = {}
    for method in METHODS:
        r = guidance_step.measure(prior, method, images, sources, args, device)
        out[method] = {
            "step_ms": r["ms"],
            "floor_ms": r["floor_ms"],
            "ratio": r["ratio"],
            "goal": r["goal"],
            "evals": r["evals"],
            "peak_gb": r["peak_mb"] / 1024,
            "floor_peak_gb": r["floor_peak_mb"] / 1024,
        }
    return out


# ---------------------------------------------------------------------------------------- pds-edit
def make_scene(folder: Path, s: Sizes) -> Path:
    from nerfstudio_distill.data.scene import CameraSpec, SceneSpec, generate_scene

    scene = folder / "ball"
    camera = CameraSpec(num_views=s.views, width=s.resolution, height=s.resolution)
    generate_scene(scene, SceneSpec(colour="red", pattern="stripes", stripes=3), camera)
    return scene


def edit_config(scene: Path, s: Sizes):
    """``ns-train pds-edit``'s trainer config on ``scene``, Stable Diffusion at ``s.resolution``."""
    from method_configs.guided_edits import pds_edit

    config = copy.deepcopy(pds_edit.config)
    pipeline = config.pipeline
    pipeline.datamanager.data = scene
    pipeline.datamanager.dataparser.data = scene
    pipeline.target_prompt, pipeline.source_prompt = TARGET, SOURCE
    pipeline.prior_resolution, pipeline.chunk_size = s.resolution, s.chunk_size
    if s.tiny_field:
        pipeline.model = dataclasses.replace(
            pipeline.model,
            implementation="torch",
            hidden_dim=16,
            hidden_dim_color=16,
            num_levels=4,
            log2_hashmap_size=12,
            num_nerf_samples_per_ray=16,
            num_proposal_samples_per_ray=(16, 8),
        )
    return config


def build_edit(config, prior: Any, device: torch.device, world_size: int = 1, local_rank: int = 0):
    """The pds-edit pipeline (with ``prior`` instead of a loaded checkpoint), its optimizers, grad scaler
    and training callbacks, as nerfstudio's Trainer sets them up."""
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes
    from nerfstudio.engine.optimizers import Optimizers

    from nerfstudio_distill.priors.config import PriorConfig

    mixed = config.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=mixed)
    with mock.patch.object(PriorConfig, "setup", lambda self, device=None: prior):
        pipeline = config.pipeline.setup(
            device=str(device),
            test_mode="val",
            world_size=world_size,
            local_rank=local_rank,
            grad_scaler=scaler,
        )
    optimizers = Optimizers(copy.deepcopy(config.optimizers), pipeline.get_param_groups())
    attributes = TrainingCallbackAttributes(
        optimizers=optimizers, grad_scaler=scaler, pipeline=pipeline, trainer=None
    )
    callbacks = pipeline.get_training_callbacks(attributes)
    return pipeline, optimizers, scaler, callbacks, mixed


def train_edit(
    config, prior: Any, device: torch.device, steps: int, warmup: int, deadline: float | None, **ranks: int
) -> dict[str, Any]:
    """``warmup`` untimed steps, then up to ``steps`` timed ones (fewer if ``deadline``, a
    ``time.perf_counter()`` value, passes), each as nerfstudio's ``Trainer.train_iteration`` does it.
    ``ranks``: ``world_size`` and ``local_rank`` of a process in a process group."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from nerfstudio_distill.pipelines import common
    from nerfstudio_distill.pipelines.edit import EditPipeline

    pipeline, optimizers, scaler, callbacks, mixed = build_edit(config, prior, device, **ranks)
    pipeline.start_edit(0, warmup + steps)
    watch = Stopwatch(device)
    loss_dict = watch.wrap("loss_dict", pipeline.get_train_loss_dict)
    skipped = 0

    def iteration(step: int) -> None:
        nonlocal skipped
        pipeline.train()
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        optimizers.zero_grad_all()
        pipeline.skip_reason = None
        with torch.autocast(device_type=device.type, enabled=mixed):
            _, losses, _ = loss_dict(step)
            loss = functools.reduce(torch.add, losses.values())
        watch.wrap("trainer_backward", lambda: scaler.scale(loss).backward())()  # one-pass steps' backward
        optimizers.optimizer_scaler_step_all(scaler)
        scaler.update()
        optimizers.scheduler_step_all(step)
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        skipped += pipeline.skip_reason is not None

    render = mock.patch.object(common, "render_in_chunks", watch.wrap("render", common.render_in_chunks))
    chunked = watch.wrap("chunk_backward", common.backward_in_chunks)
    # Gaussian splats: the whole-view render with autograd (its backward is the trainer's)
    splats = mock.patch.object(
        EditPipeline, "_render_camera", watch.wrap("render", EditPipeline._render_camera)
    )
    with render, splats, mock.patch.object(common, "backward_in_chunks", chunked):
        for step in range(warmup):
            iteration(step)
        watch.seconds.clear()
        skipped = 0
        memory = PeakMemory(device)
        sync(device)
        start, done = time.perf_counter(), 0
        for step in range(warmup, warmup + steps):
            iteration(step)
            done += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
        sync(device)
        total = time.perf_counter() - start
    sec = {name: seconds / done for name, seconds in watch.seconds.items()}
    split = {
        "render_s": sec.get("render", 0.0),
        "prior_s": sec.get("loss_dict", 0.0) - sec.get("render", 0.0) - sec.get("chunk_backward", 0.0),
        "backward_s": sec.get("chunk_backward", 0.0) + sec.get("trainer_backward", 0.0),
    }
    split["other_s"] = total / done - sum(split.values())
    return {
        "steps": done,
        "s_per_step": total / done,
        **split,
        "peak_gb": memory.gb(),
        "skipped_steps": skipped,
    }


def edit_section(prior: Any, s: Sizes, device: torch.device, work: Path, deadline: float) -> dict[str, Any]:
    scene = make_scene(work, s)
    result = train_edit(edit_config(scene, s), prior, device, s.edit_steps, s.edit_warmup, deadline)
    return {
        "method": "pds-edit",
        "resolution": s.resolution,
        "views": s.views,
        "planned_steps": s.edit_steps,
        "chunk_size": s.chunk_size,
        "field": "tiny" if s.tiny_field else "pds-edit default (nerfacto)",
        **result,
    }


# -------------------------------------------------------------------------------------- splatfacto
def splat_config(scene: Path, s: Sizes):
    """``ns-train pds-splatfacto``'s trainer config on ``scene``, Stable Diffusion at ``s.resolution``, from
    ``s.gaussians`` random Gaussians in the scene's unit cube (an edit loads a base's instead)."""
    from method_configs.guided_edits import pds_splatfacto

    config = copy.deepcopy(pds_splatfacto.config)
    pipeline = config.pipeline
    pipeline.datamanager.data = scene
    pipeline.datamanager.dataparser.data = scene
    pipeline.target_prompt, pipeline.source_prompt = TARGET, SOURCE
    pipeline.prior_resolution = s.resolution
    pipeline.model = dataclasses.replace(
        pipeline.model, num_random=s.gaussians, random_scale=1.0, sh_degree_interval=1
    )
    return config


def splatfacto_section(
    prior: Any, s: Sizes, device: torch.device, work: Path, deadline: float
) -> dict[str, Any]:
    names = {e.name for e in entry_points(group="nerfstudio.method_configs")}
    if "pds-splatfacto" not in names:
        return {"status": "not available", "reason": "no pds-splatfacto method is registered"}
    scene = make_scene(work, s)
    result = train_edit(splat_config(scene, s), prior, device, s.edit_steps, s.edit_warmup, deadline)
    return {
        "status": "measured",
        "method": "pds-splatfacto",
        "resolution": s.resolution,
        "views": s.views,
        "planned_steps": s.edit_steps,
        "gaussians": s.gaussians,
        **result,
    }


# --------------------------------------------------------------------------------------------- DDP
DDP_STARTUP_S = 90.0
"""Seconds a DDP measurement is allowed for starting its processes and building their priors."""


def ddp_section(
    s: Sizes, device: torch.device, args: argparse.Namespace, one: dict[str, Any], left_s: float
) -> dict[str, Any]:
    """The edit in N processes (NCCL on N GPUs; gloo on 2 CPU processes in a dry run) against ``one``, the
    single-process edit's result; as many steps (up to ``s.ddp_steps``) as ``left_s`` seconds allow."""
    import torch.multiprocessing as mp

    if args.no_ddp:
        return {"status": "skipped (--no-ddp)"}
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 2:
            return {"status": "not available", "reason": f"{gpus} GPU visible; the speed-up needs 2 or more"}
        processes, backend = gpus, "nccl"
    else:
        processes, backend = 2, "gloo"
    steps = s.ddp_steps
    if not args.dry_run:
        steps = min(steps, int((left_s - DDP_STARTUP_S) / (1.5 * one["s_per_step"])) - s.edit_warmup)
        if steps < 2:
            return {"status": "skipped", "reason": f"{left_s:.0f} s of the budget left, too few for 2 steps"}
    s = dataclasses.replace(s, ddp_steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scene = make_scene(folder, s)
        url = f"file://{folder / 'rendezvous'}"
        mp.spawn(
            _ddp_worker,
            args=(processes, backend, url, scene, s, args.seed, folder),
            nprocs=processes,
            join=True,
        )
        multi = json.loads((folder / "rank0.json").read_text())
    speedup = processes * one["s_per_step"] / multi["s_per_step"]
    return {
        "status": "measured",
        "backend": backend,
        "processes": processes,
        "steps": multi["steps"],
        "s_per_step_1": one["s_per_step"],
        "s_per_step_n": multi["s_per_step"],
        "views_per_s_1": 1 / one["s_per_step"],
        "views_per_s_n": processes / multi["s_per_step"],
        "speedup": speedup,
        "ideal": processes,
        "peak_gb_rank0": multi["peak_gb"],
    }


def _ddp_worker(
    rank: int, world_size: int, backend: str, url: str, scene: Path, s: Sizes, seed: int, folder: Path
) -> None:
    """One rank of :func:`ddp_section`: the same edit, its gradients averaged over the ranks."""
    import torch.distributed as dist

    import method_configs  # noqa: F401  (the compat layer, as nerfstudio loading the plugin installs it)

    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=url, world_size=world_size, rank=rank)
    try:
        torch.manual_seed(seed + rank)
        prior = build_prior(s, device, seed)
        config = edit_config(scene, s)
        with refuse_downloads():
            result = train_edit(
                config,
                prior,
                device,
                s.ddp_steps,
                s.edit_warmup,
                None,
                world_size=world_size,
                local_rank=rank,
            )
        if rank == 0:
            (folder / "rank0.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- goals
def goals(report: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """The goals, each with what was measured and whether it is met (None: does not apply to this run)."""
    edit = report["pds_edit"]
    guidance = report["guidance_step"]
    return {
        "pds_edit_s_per_step": {
            "goal": SPEED_GOAL,
            "measured": edit["s_per_step"],
            "met": edit["s_per_step"] <= SPEED_GOAL if gpu else None,
            "rule": f"<= {PUBLISHED_PDS_S_PER_STEP} s / 3 (published PDS code on an A100), GPU, SD-1.5, 512 px",
        },
        "pds_edit_peak_gb": {
            "goal": PEAK_GOAL_GB,
            "measured": edit["peak_gb"],
            "met": edit["peak_gb"] <= PEAK_GOAL_GB if gpu else None,
            "rule": "peak GPU memory <= 8 GB, weights included",
        },
        "guidance_step_vs_floor": {
            "goal": GUIDANCE_TOLERANCE,
            "measured": {m: r["ratio"] / r["evals"] for m, r in guidance.items()},
            "met": None,
            "rule": "step / floor <= 1.05 x evaluations: a CPU goal (benchmarks/guidance_step.py measures it on "
            "CPU); reported here for information",
        },
    }


# -------------------------------------------------------------------------------------------- main
def build_prior(s: Sizes, device: torch.device, seed: int):
    return guidance_step.build_sd(s.prior, device, s.dtype, seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script")
    parser.add_argument("--no-ddp", action="store_true", help="skip the multi-process measurement")
    parser.add_argument("--edit-steps", type=int, default=None, help="timed pds-edit steps (default 100)")
    parser.add_argument("--views", type=int, default=8, help="views of the synthetic scene")
    parser.add_argument(
        "--gaussians", type=int, default=100_000, help="random Gaussians of the pds-splatfacto edit"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds for the whole run: the edit stops early and the DDP run takes fewer steps to fit",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, s: Sizes, device: torch.device, started: float) -> dict[str, Any]:
    """Every section of the report but the goals and settings."""
    torch.manual_seed(args.seed)
    prior = build_prior(s, device, args.seed)
    report: dict[str, Any] = {"dry_run": args.dry_run}
    report["guidance_step"] = progress(
        "guidance_step", guidance_section(prior, s, device, args.seed), started
    )
    with tempfile.TemporaryDirectory() as tmp:
        # the edits get what is left of the budget (nerfacto's first, then the splats'), less a reserve for
        # the DDP measurement
        multi = torch.cuda.device_count() > 1
        deadline = started + args.budget * (0.45 if multi else 0.65)
        report["pds_edit"] = progress(
            "pds_edit", edit_section(prior, s, device, Path(tmp) / "nerfacto", deadline), started
        )
        deadline = started + args.budget * (0.6 if multi else 0.9)
        report["pds_splatfacto"] = progress(
            "pds_splatfacto", splatfacto_section(prior, s, device, Path(tmp) / "splats", deadline), started
        )
    del prior
    if device.type == "cuda":
        torch.cuda.empty_cache()  # rank 0 of the DDP run shares this GPU
    left = args.budget - (time.perf_counter() - started)
    report["ddp"] = progress("ddp", ddp_section(s, device, args, report["pds_edit"], left), started)
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the suite, print the table and then the JSON line; return the report."""
    started = time.perf_counter()
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: the GPU suite needs CUDA: run it on a GPU machine, or pass --dry-run")
    import method_configs  # noqa: F401  (the compat layer: offline LPIPS, checkpoints)

    s = sizes(args)
    device = torch.device("cpu" if args.dry_run else "cuda")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as benchmarks/guidance_step.py on CPU
    try:
        with refuse_downloads():
            report = run(args, s, device, started)
    finally:
        torch.set_num_threads(threads)
    report["goals"] = goals(report, gpu=not args.dry_run)
    report["settings"] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count(),
        "prior": f"{s.prior} (random weights from configs)",
        "dtype": s.dtype,
        "resolution": s.resolution,
        "torch": torch.__version__,
        "elapsed_s": time.perf_counter() - started,
    }
    print_table(report)
    print(json.dumps(report))
    return report


def progress(name: str, result: dict[str, Any], started: float) -> dict[str, Any]:
    """Print ``result`` at once (stderr), so a run cut short by the time limit still shows what it measured."""
    print(
        f"[gpu_suite {time.perf_counter() - started:.0f} s] {name}: {json.dumps(result)}",
        file=sys.stderr,
        flush=True,
    )
    return result


def _met(value: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[value]


def print_table(report: dict[str, Any]) -> None:
    st = report["settings"]
    dry = " (DRY RUN: tiny sizes on CPU, not goal figures)" if report["dry_run"] else ""
    print(f"gpu_suite on {st['device_name']}, {st['prior']}, {st['dtype']}, {st['resolution']} px{dry}")
    print(f"{'method':<8}{'step ms':>10}{'floor ms':>10}{'ratio':>8}{'goal':>7}{'peak GB':>9}")
    for name, r in report["guidance_step"].items():
        print(
            f"{name:<8}{r['step_ms']:>10.1f}{r['floor_ms']:>10.1f}{r['ratio']:>8.3f}{r['goal']:>7.2f}"
            f"{r['peak_gb']:>9.2f}"
        )
    e = report["pds_edit"]
    print(
        f"pds-edit: {e['steps']} steps, {e['s_per_step']:.3f} s/step (render {e['render_s']:.3f}, prior "
        f"{e['prior_s']:.3f}, backward {e['backward_s']:.3f}, other {e['other_s']:.3f}), peak {e['peak_gb']:.2f} GB"
    )
    g = report["pds_splatfacto"]
    if g["status"] == "measured":
        print(
            f"pds-splatfacto: {g['steps']} steps, {g['gaussians']} Gaussians, {g['s_per_step']:.3f} s/step (render "
            f"{g['render_s']:.3f}, prior {g['prior_s']:.3f}, backward {g['backward_s']:.3f}, other "
            f"{g['other_s']:.3f}), peak {g['peak_gb']:.2f} GB"
        )
    else:
        print(f"pds-splatfacto: {g['status']} ({g['reason']})")
    d = report["ddp"]
    if d["status"] == "measured":
        print(
            f"ddp: {d['processes']} x {d['backend']}: {d['s_per_step_n']:.3f} s/step against {d['s_per_step_1']:.3f} "
            f"on one: speed-up {d['speedup']:.2f} (ideal {d['ideal']})"
        )
    else:
        print(f"ddp: {d['status']}" + (f" ({d['reason']})" if "reason" in d else ""))
    for name, g in report["goals"].items():
        print(f"goal {name}: {_met(g['met'])} ({g['rule']})")


if __name__ == "__main__":
    main()
