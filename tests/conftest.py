"""Shared fixtures: tiny synthetic scenes and helpers to run nerfstudio's real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import method_configs  # noqa: F401  (installs the compat layer, as nerfstudio loading the plugin does)

BIN = Path(sys.executable).parent
"""The virtual environment's bin folder, where ns-train/ns-export live."""


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a subprocess that cannot download anything.

    Web requests go to a closed local port, so a download fails at once with a network
    error, as on an air-gapped cluster; TORCH_HOME is empty, so nothing is cached.
    """
    env = dict(os.environ)
    closed = "http://127.0.0.1:9"
    env.update(
        http_proxy=closed,
        https_proxy=closed,
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        no_proxy="",
        NO_PROXY="",
        TORCH_HOME=str(tmp_path / "torch_home"),
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run a console script of this venv and return the finished process (text output)."""
    exe = BIN / args[0]
    return subprocess.run(
        [str(exe), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a console script of this venv (stdout and stderr piped, text) and return the running process."""
    return subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_clis_together(
    commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float = 900
) -> list[subprocess.CompletedProcess]:
    """Run console scripts of this venv side by side, each ``(args, env)``: their interpreter starts and
    imports overlap on the cores. Returns the finished processes (text output) in the order given."""
    procs = [start_cli(args, env, cwd) for args, env in commands]
    done = []
    try:
        for proc, (args, _) in zip(procs, commands, strict=True):
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


# Flags that make nerfacto-based training cheap enough for CPU tests.
CPU_NERFACTO = [
    "--machine.device-type",
    "cpu",
    "--pipeline.model.implementation",
    "torch",
    "--vis",
    "tensorboard",
]


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """A 12-view 48x48 red striped sphere, as `ns-distill-scene` writes it."""
    from nerfstudio_distill.data.scene import CameraSpec, SceneSpec, generate_scene

    folder = tmp_path_factory.mktemp("scene") / "ball"
    generate_scene(
        folder,
        SceneSpec(colour="red", pattern="stripes", stripes=3),
        CameraSpec(num_views=12, width=48, height=48),
    )
    return folder


TINY_FIELD_SETTINGS = dict(
    implementation="torch",
    hidden_dim=16,
    hidden_dim_color=16,
    num_levels=4,
    log2_hashmap_size=12,
    num_nerf_samples_per_ray=16,
    num_proposal_samples_per_ray=(16, 8),
)
"""A tiny nerfacto field with few samples per ray, as model-config fields (tests building configs in Python)."""

TINY_SPLAT_SETTINGS = dict(random_init=True, num_random=300, random_scale=1.0, sh_degree=1)
"""A few random Gaussians of SH degree 1, as splatfacto model-config fields."""

TINY_FIELD = [
    "--pipeline.model.hidden-dim", "16",
    "--pipeline.model.hidden-dim-color", "16",
    "--pipeline.model.num-levels", "4",
    "--pipeline.model.log2-hashmap-size", "12",
]  # fmt: skip


def ns_train(
    method: str, out: Path, scene: Path, *flags: str, steps: int = 2, timestamp: str = "run"
) -> list[str]:
    return [
        "ns-train", method, *CPU_NERFACTO, *TINY_FIELD,
        "--max-num-iterations", str(steps), "--output-dir", str(out), "--timestamp", timestamp,
        "--pipeline.datamanager.train-num-rays-per-batch", "256", "--data", str(scene), *flags,
    ]  # fmt: skip


FEW_SAMPLES = ["--pipeline.model.num-proposal-samples-per-ray", "16", "8"]
FEW_SAMPLES += ["--pipeline.model.num-nerf-samples-per-ray", "8"]
"""Fewer samples per ray than nerfacto's defaults (no parameter changes, so a base still loads and an edit
still matches it): a whole-view render, and so an edit step or an export, is an order of magnitude cheaper
on CPU."""


def ns_export(exporter: str, run: Path, output_dir: Path, *extra: str) -> list[str]:
    """``ns-export <exporter>`` of the run folder ``run`` (holding config.yml) into ``output_dir``."""
    return [
        "ns-export",
        exporter,
        "--load-config",
        str(run / "config.yml"),
        "--output-dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="session")
def base_run(tiny_scene, tmp_path_factory) -> Path:
    """A plain `ns-train nerfacto` run of the tiny scene (its nerfstudio_models folder)."""
    tmp = tmp_path_factory.mktemp("base")
    proc = run_cli(ns_train("nerfacto", tmp / "out", tiny_scene), offline_env(tmp), tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "out" / tiny_scene.name / "nerfacto" / "run"
    (run / "ns-train.stderr").write_text(proc.stderr)  # for tests of what training printed
    return run / "nerfstudio_models"


@pytest.fixture(scope="session")
def prior_folder(tiny_scene, tmp_path_factory) -> Path:
    """Exact-prior image set of the tiny scene: its red striped ball and a blue one."""
    from nerfstudio_distill.data.prior_sets import write_exact_prior_set

    out = tmp_path_factory.mktemp("prior") / "set"
    prompts = {"a red striped ball": [{}], "a blue striped ball": [{"colour": "blue"}]}
    return write_exact_prior_set(tiny_scene, out, prompts)


@pytest.fixture(scope="session")
def tiny_ip2p(tmp_path_factory) -> Path:
    """A tiny random InstructPix2Pix checkpoint (tests/tiny_sd.py), built once for the session."""
    from tests.tiny_sd import build_tiny_ip2p

    return build_tiny_ip2p(tmp_path_factory.mktemp("tiny_ip2p"))


def edit_flags(prior_folder: Path, *extra: str) -> list[str]:
    return [
        "--pipeline.target-prompt", "a blue striped ball",
        "--pipeline.source-prompt", "a red striped ball",
        "--pipeline.prior.kind", "exact",
        "--pipeline.prior.exact.folder", str(prior_folder),
        "--pipeline.prior-resolution", "None",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def deterministic_kernels():
    """torch's deterministic kernels for one test (as ns-train uses them on CPU), restored afterwards: with
    several threads the hash grid's backward otherwise adds in a thread-dependent order."""
    import torch

    from nerfstudio_distill.compat.seeding import deterministic

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    deterministic(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# ------------------------------------------------------------ the real CLIs, in this process
def run_here(cli, args: list[str]) -> None:
    """A console command run to completion in this process (no interpreter start, ~10 s less each):
    ``cli`` gets the argument list. nerfstudio's global writers, torch's deterministic mode and the
    SIGINT/SIGTERM handlers (which ns-train replaces) are restored afterwards, also when it fails."""
    import signal

    import torch
    from nerfstudio.utils import writer

    writers = list(writer.EVENT_WRITERS)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli(args)
    finally:
        writer.EVENT_WRITERS[:] = writers
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def ns_train_main(args: list[str]) -> None:
    """``ns-train``'s own parsing (tyro over every registered method) and ``main``."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts.train import main

    assert args[0] == "ns-train"
    main(tyro.cli(AnnotatedBaseConfigUnion, args=args[1:]))


def ns_export_main(args: list[str]) -> None:
    """``ns-export``'s own parsing (tyro over its exporters) and the exporter's ``main``."""
    import tyro
    from nerfstudio.scripts.exporter import Commands

    assert args[0] == "ns-export"
    tyro.cli(Commands, args=args[1:]).main()


def ns_train_here(args: list[str]) -> str | int | None:
    """An ``ns-train`` that must stop (see :func:`run_here`); returns its exit code or message, what the
    process would print as its last stderr line (e.g. ``error: ...``) and exit with."""
    with pytest.raises(SystemExit) as stop:
        run_here(ns_train_main, args)
    return stop.value.code


def assert_error_line(code, *needles: str) -> str:
    """``code`` is one ``error: ...`` line holding every needle."""
    assert isinstance(code, str), code
    assert code.startswith("error: ") and "\n" not in code, code
    for needle in needles:
        assert needle in code, code
    return code
