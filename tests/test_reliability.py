"""Bad input and faults: each is one `error: ...` line naming the fix, a non-zero exit, nothing overwritten;
no run is lost (Ctrl-C, resume, reused timestamps); training never ends "successfully" with a diverged
field; and the same seed gives the same run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_distill.guidance.config import GuidanceConfig
from tests.conftest import (
    FEW_SAMPLES,
    assert_error_line,
    edit_flags,
    ns_train,
    ns_train_here,
    ns_train_main,
    offline_env,
    run_clis_together,
    run_here,
    start_cli,
)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def faulty(tiny_scene, base_run, prior_folder, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the base run and the prior set, one per fault."""
    root = tmp_path_factory.mktemp("faulty")
    truncated = root / "truncated" / "run"
    shutil.copytree(base_run.parent, truncated)
    (ckpt,) = (truncated / "nerfstudio_models").glob("step-*.ckpt")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    empty_prior = root / "empty_prior"
    shutil.copytree(prior_folder, empty_prior)
    for png in (empty_prior / "set_01").glob("*.png"):
        png.unlink()
    bad_index = root / "bad_index"
    bad_index.mkdir()
    (bad_index / "exact_prior.json").write_text("[1, 2]")
    negative_sigma = root / "negative_sigma"
    shutil.copytree(prior_folder, negative_sigma)
    index = json.loads((negative_sigma / "exact_prior.json").read_text())
    (negative_sigma / "exact_prior.json").write_text(json.dumps({**index, "sigma": -1}))
    bad_config = root / "bad_config" / "run"
    shutil.copytree(base_run.parent, bad_config)
    (bad_config / "config.yml").write_text("method_name: [unclosed\n")
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    return {
        "negative_sigma": negative_sigma,
        "bad_config": bad_config / "nerfstudio_models",
        "a_file": a_file,
        "ckpt": next(base_run.glob("step-*.ckpt")),
        "truncated": truncated / "nerfstudio_models",
        "empty_prior": empty_prior,
        "bad_index": bad_index,
    }


BAD_EDITS = [
    ("ckpt-file-as-load-dir", ["--load-dir", "{ckpt}"], ["is a file", "pass the folder that holds it"]),
    ("missing-load-step", ["--load-step", "123"], ["--load-step 123", "holds steps"]),
    ("truncated-checkpoint", ["--load-dir", "{truncated}"], ["cannot be read", "truncated"]),
    ("unknown-target", ["--pipeline.target-prompt", "a green ball"], ["--pipeline.target-prompt", "knows"]),
    ("unknown-source", ["--pipeline.source-prompt", "a cube"], ["--pipeline.source-prompt", "knows"]),
    ("empty-prior-folder", ["--pipeline.prior.exact.folder", "{empty_prior}"], ["holds no *.png"]),
    ("bad-prior-index", ["--pipeline.prior.exact.folder", "{bad_index}"], ["not an exact-prior index"]),
    ("prior-resolution-512", ["--pipeline.prior-resolution", "512"], ["--pipeline.prior-resolution None"]),
    ("render-scale-5", ["--pipeline.render-scale", "5"], ["--pipeline.render-scale 1,", "48x48"]),
    ("render-scale-0", ["--pipeline.render-scale", "0"], ["--pipeline.render-scale", "> 0"]),
    ("render-scale-negative", ["--pipeline.render-scale", "-1"], ["--pipeline.render-scale"]),
    ("render-scale-nan", ["--pipeline.render-scale", "nan"], ["--pipeline.render-scale", "finite"]),
    ("crop-size-0", ["--pipeline.crop-size", "0"], ["--pipeline.crop-size"]),
    ("crop-size-mismatch", ["--pipeline.crop-size", "16"], ["--pipeline.crop-size None"]),
    ("chunk-size-0", ["--pipeline.chunk-size", "0"], ["--pipeline.chunk-size"]),
    ("prior-resolution-0", ["--pipeline.prior-resolution", "0"], ["--pipeline.prior-resolution"]),
    ("refine-every-0", ["--pipeline.refine-steps", "1", "--pipeline.refine-every", "0"], ["--pipeline.refine-every"]),
    ("refine-steps-negative", ["--pipeline.refine-steps", "-1"], ["--pipeline.refine-steps"]),
    ("refine-steps-whole-run", ["--pipeline.refine-steps", "2"], ["--pipeline.refine-steps 2", "--max-num-iterations"]),
    ("refine-strength-0", ["--pipeline.refine-strength", "0"], ["--pipeline.refine-strength"]),
    ("refine-strength-2", ["--pipeline.refine-strength", "2"], ["--pipeline.refine-strength"]),
    ("refine-denoise-0", ["--pipeline.refine-denoise-steps", "0"], ["--pipeline.refine-denoise-steps"]),
    ("cfg-nan", ["--pipeline.guidance.guidance-scale", "nan"], ["--pipeline.guidance.guidance-scale", "finite"]),
    ("cfg-inf", ["--pipeline.guidance.guidance-scale", "inf"], ["--pipeline.guidance.guidance-scale"]),
    ("psi-negative", ["--pipeline.guidance.psi-scale", "-1"], ["--pipeline.guidance.psi-scale", "0 or more"]),
    ("chi-nan", ["--pipeline.guidance.chi-scale", "nan"], ["--pipeline.guidance.chi-scale"]),
    ("grid-steps-1", ["--pipeline.guidance.num-grid-steps", "1"], ["--pipeline.guidance.num-grid-steps"]),
    ("grad-clip-0", ["--pipeline.guidance.grad-clip", "0"], ["--pipeline.guidance.grad-clip"]),
    ("guidance-weight-nan", ["--pipeline.guidance-weight", "nan"], ["--pipeline.guidance-weight"]),
    ("opacity-tolerance-0", ["--pipeline.opacity-tolerance", "0"], ["--pipeline.opacity-tolerance", "> 0", "None"]),
    ("opacity-tolerance-nan", ["--pipeline.opacity-tolerance", "nan"], ["--pipeline.opacity-tolerance"]),
    ("max-bad-steps-0", ["--max-bad-steps", "0"], ["--max-bad-steps"]),
    ("zero-iterations", ["--max-num-iterations", "0"], ["--max-num-iterations"]),
    ("missing-data", ["--data", "/no/such/scene"], ["--data /no/such/scene", "transforms.json"]),
    ("output-dir-is-a-file", ["--output-dir", "{a_file}"], ["is a file", "--output-dir"]),
    ("negative-seed", ["--machine.seed", "-1"], ["--machine.seed -1"]),
    ("zero-rays", ["--pipeline.datamanager.train-num-rays-per-batch", "0"], ["train-num-rays-per-batch 0"]),
    ("malformed-base-config", ["--load-dir", "{bad_config}"], ["cannot be read as a run config"]),
    ("unknown-prior-device", ["--pipeline.prior.exact.device", "banana"], ["--pipeline.prior.exact.device 'banana'"]),
    ("backwards-timesteps", ["--pipeline.guidance.timesteps.min-fraction", "0.9",
                             "--pipeline.guidance.timesteps.max-fraction", "0.1"],
     ["--pipeline.guidance.timesteps.min-fraction 0.9", "max-fraction 0.1"]),
    ("anneal-end-outside", ["--pipeline.guidance.timesteps.anneal", "linear",
                            "--pipeline.guidance.timesteps.final-max-fraction", "1.5"], ["final-max-fraction 1.5"]),
    ("negative-loss-weight", ["--pipeline.model.interlevel-loss-mult", "-1"], ["--pipeline.model.interlevel-loss-mult"]),
    ("negative-prior-sigma", ["--pipeline.prior.exact.folder", "{negative_sigma}"], ['"sigma" in', "exact_prior.json"]),
    ("sdi-in-an-edit", ["--pipeline.guidance.method", "sdi"], ["not an edit method"]),
]  # fmt: skip


@pytest.mark.parametrize("flags, needles", [case[1:] for case in BAD_EDITS], ids=[c[0] for c in BAD_EDITS])
def test_bad_edit_input_is_one_line_and_writes_nothing(
    tiny_scene, base_run, prior_folder, faulty, tmp_path, flags, needles
):
    flags = [f.format(**{k: str(v) for k, v in faulty.items()}) for f in flags]
    out = tmp_path / "out"
    args = ns_train(
        "pds-edit", out, tiny_scene, *edit_flags(prior_folder, "--load-dir", str(base_run)), *flags
    )
    assert_error_line(ns_train_here(args), *needles)
    assert files_under(out) == [] and faulty["a_file"].read_text() == "not a folder"


def test_reused_timestamp_never_touches_the_finished_run(tiny_scene, base_run, prior_folder, tmp_path):
    """#8: a rerun into a folder that holds a run is refused before config.yml is written."""
    out = tmp_path / "out"
    run = out / tiny_scene.name / "pds-edit" / "run"
    (run / "nerfstudio_models").mkdir(parents=True)
    torch.save({"step": 5, "pipeline": {}}, run / "nerfstudio_models" / "step-000000005.ckpt")
    (run / "config.yml").write_text("the finished run's config\n")
    before = {p: p.read_bytes() for p in files_under(out)}
    for extra in ([], ["--pipeline.target-prompt", "a green ball"]):  # a rerun that works, and one that fails
        args = ns_train(
            "pds-edit", out, tiny_scene, *edit_flags(prior_folder, "--load-dir", str(base_run)), *extra
        )
        code = ns_train_here(args)
        assert_error_line(
            code, "already holds a run", "--timestamp", f"--load-dir {run / 'nerfstudio_models'}"
        )
        assert {p: p.read_bytes() for p in files_under(out)} == before


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--pipeline.chunk-size", "0"], "--pipeline.chunk-size"),
        (["--pipeline.model.opacity-loss-mult", "nan"], "--pipeline.model.opacity-loss-mult"),
        (["--pipeline.model.orientation-loss-mult", "-1"], "--pipeline.model.orientation-loss-mult"),
        (["--pipeline.model.blob-density", "nan"], "--pipeline.model.blob-density"),
        (["--pipeline.model.blob-taper", "1000", "0"], "--pipeline.model.blob-taper 1000 0"),
        (["--pipeline.guidance.timesteps.final-max-fraction", "-0.2"], "final-max-fraction -0.2"),
    ],
    ids=[
        "chunk-size",
        "opacity-nan",
        "orientation-negative",
        "blob-density-nan",
        "blob-taper-backwards",
        "anneal-end",
    ],
)
def test_text_to_3d_bad_numbers_are_one_line(tmp_path, flags, needle):
    args = ["ns-train", "sds-nerfacto", "--machine.device-type", "cpu", "--output-dir", str(tmp_path / "out")]
    args += ["--pipeline.prompt", "a ball", *flags]
    assert_error_line(ns_train_here(args), needle)
    assert files_under(tmp_path / "out") == []


def test_a_resume_that_fails_late_keeps_the_runs_config(tiny_scene, base_run, prior_folder, faulty, tmp_path):
    """#15 sweep D1: resuming a run in its own folder with a prior that breaks only when loaded (a PNG cut
    short) stops with one line, and the run's config.yml is the one it had."""
    out = tmp_path / "out"
    run = out / tiny_scene.name / "pds-edit" / "run"
    shutil.copytree(base_run.parent, run)
    config = (run / "config.yml").read_bytes()
    broken = tmp_path / "broken_prior"
    shutil.copytree(prior_folder, broken)
    png = sorted((broken / "set_01").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:100])
    flags = edit_flags(prior_folder, "--load-dir", str(run / "nerfstudio_models"))
    flags += ["--pipeline.prior.exact.folder", str(broken)]
    code = ns_train_here(ns_train("pds-edit", out, tiny_scene, *flags))
    assert_error_line(code, str(png))
    assert (run / "config.yml").read_bytes() == config
    assert sorted(p.name for p in (run / "nerfstudio_models").iterdir()) == [base_run_ckpt(base_run)]


def base_run_ckpt(base_run: Path) -> str:
    return next(base_run.glob("step-*.ckpt")).name


def test_negative_cfg_warns():
    with pytest.warns(UserWarning, match="negative CFG"):
        GuidanceConfig(guidance_scale=-2.0).check()


# --------------------------------------------------------------------- helpers of the checks
def test_prior_size_is_a_multiple_of_the_vae_factor():
    """A 4:3 real scene at prior_resolution 512 reaches SD at 512 x 680, not 512 x 683 (which SD refuses)."""
    from nerfstudio_distill.pipelines.common import prior_size, to_prior

    assert prior_size(480, 640, 512, multiple=8) == (512, 680)
    assert prior_size(48, 48, None) == (48, 48)
    assert prior_size(50, 75, None, multiple=8) == (48, 72)
    assert to_prior(torch.rand(480, 640, 3), 512, multiple=8).shape == (1, 3, 512, 680)


def test_sixteen_bit_png_reads_at_its_grey_level(tmp_path):
    """#10: a 16-bit grey PNG at half scale reads as 0.5, not as saturated white."""
    from nerfstudio_distill.data.images import read_rgb
    from nerfstudio_distill.scripts.distill_2d import load_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.allclose(read_rgb(path), 0.5, atol=1e-3)
    assert torch.allclose(load_image(path), torch.full((1, 3, 8, 8), 0.5), atol=1e-3)


def test_empty_stable_diffusion_folder_gets_no_hub_hint(tmp_path):
    """#11: a local folder is not a hub id; the error says what the folder must hold."""
    pytest.importorskip("diffusers")
    from nerfstudio_distill.errors import PriorLoadError
    from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPrior

    (tmp_path / "sd").mkdir()
    with pytest.raises(PriorLoadError) as err:
        StableDiffusionPrior(model=str(tmp_path / "sd"), device="cpu")
    message = str(err.value)
    assert "\n" not in message and "hf download" not in message
    assert "model_index.json" in message and "--pipeline.prior.stable-diffusion.model" in message


def test_ray_sampling_workers_are_seeded_from_the_main_process():
    from nerfstudio.data.datamanagers import parallel_datamanager

    from nerfstudio_distill.compat.seeding import SeededDataProcessor, worker_seed

    assert parallel_datamanager.DataProcessor is SeededDataProcessor
    assert worker_seed(42, 0) == worker_seed(42, 0) != worker_seed(42, 1) != worker_seed(43, 1)


# ------------------------------------------------------- runs (in this process, or a subprocess where
# the process itself is checked: a signal, or two fresh interpreters giving the same run)
def edit_run(out: Path, scene: Path, name: str) -> Path:
    return out / scene.name / name


def checkpoint_state(models: Path) -> tuple[int, dict]:
    (path,) = sorted(models.glob("step-*.ckpt"))[-1:]
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["step"], state


@pytest.mark.slow
def test_base_folder_without_config_starts_fresh_optimizers(
    tiny_scene, base_run, prior_folder, tmp_path, capsys
):
    """#1: a bare checkpoint folder is a base: fresh optimizers, the learning rate asked for."""
    bare = tmp_path / "bare"
    shutil.copytree(base_run, bare)
    out = tmp_path / "out"
    flags = edit_flags(prior_folder, "--load-dir", str(bare), "--optimizers.fields.optimizer.lr", "0.002")
    run_here(ns_train_main, ns_train("pds-edit", out, tiny_scene, *flags, *FEW_SAMPLES))
    assert "optimizers and schedulers start fresh" in capsys.readouterr().out
    _, state = checkpoint_state(edit_run(out, tiny_scene, "pds-edit") / "run" / "nerfstudio_models")
    (group,) = state["optimizers"]["fields"]["param_groups"]
    assert group["initial_lr"] == pytest.approx(0.002)  # not the default 3e-3


@pytest.mark.slow
def test_diverging_run_stops_nonzero_and_saves_no_nan_field(tiny_scene, base_run, prior_folder, tmp_path):
    """#5: with a learning rate of 1e10 the run stops non-zero, saying why; no checkpoint holds NaN."""
    out = tmp_path / "out"
    flags = edit_flags(prior_folder, "--load-dir", str(base_run), "--steps-per-save", "1", *FEW_SAMPLES)
    flags += [
        "--optimizers.fields.optimizer.lr",
        "1e10",
        "--optimizers.proposal-networks.optimizer.lr",
        "1e10",
    ]
    code = ns_train_here(ns_train("pds-edit", out, tiny_scene, *flags, steps=20))
    assert_error_line(code, "training diverged", "--optimizers.fields.optimizer.lr")  # exit status 1
    for ckpt in (edit_run(out, tiny_scene, "pds-edit") / "run" / "nerfstudio_models").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["pipeline"]
        assert all(
            torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()
        )


@pytest.mark.slow
def test_interrupt_saves_and_resume_finishes_the_planned_run(
    tiny_scene, base_run, prior_folder, tmp_path, capsys
):
    """#7: Ctrl-C saves a checkpoint and exits non-zero with how to resume (a real process and signal); the
    resume ends at the planned last step (not `max_num_iterations` more), and resuming a finished run says
    how to train longer."""
    env, out = offline_env(tmp_path), tmp_path / "out"
    steps, base_step = 30, checkpoint_state(base_run)[0]
    flags = edit_flags(prior_folder, "--load-dir", str(base_run), *FEW_SAMPLES)
    args = ns_train("pds-edit", out, tiny_scene, *flags, "--steps-per-save", "1", steps=steps)
    proc = start_cli(args, env, tmp_path)
    run = edit_run(out, tiny_scene, "pds-edit") / "run"
    deadline = time.time() + 300
    while not list(run.glob("nerfstudio_models/*.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # training has saved its first step
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert_error_line(last, "SIGINT at step", f"--load-dir {run / 'nerfstudio_models'}")
    stopped, _ = checkpoint_state(run / "nerfstudio_models")
    planned_last = base_step + steps  # the edit's steps are base_step + 1 ... base_step + steps
    assert base_step < stopped < planned_last

    flags = edit_flags(prior_folder, "--load-dir", str(run / "nerfstudio_models"), *FEW_SAMPLES)
    resume = ns_train("pds-edit", out, tiny_scene, *flags, steps=steps)
    run_here(ns_train_main, resume)
    assert f"{planned_last - stopped} of the {steps} planned steps are left" in capsys.readouterr().out
    assert checkpoint_state(run / "nerfstudio_models")[0] == planned_last

    assert_error_line(ns_train_here(resume), "already ends the planned", "--max-num-iterations")


@pytest.mark.slow
def test_same_seed_same_run(tiny_scene, base_run, prior_folder, tmp_path):
    """Reproducibility: two base nerfacto runs (NERFSTUDIO_DISTILL_DETERMINISTIC=1) and two edits of one
    base (by default), with the same seed, end bitwise equal; another seed does not. Each run is its own
    process (as a user's reruns are: fresh RNGs, hash seeds and data workers); all five run side by side."""
    deterministic = offline_env(tmp_path, NERFSTUDIO_DISTILL_DETERMINISTIC="1")
    seeds = {"a": 0, "b": 0, "c": 1}
    commands = [
        (ns_train("nerfacto", tmp_path / k, tiny_scene, "--machine.seed", str(v), steps=8), deterministic)
        for k, v in seeds.items()
    ]
    flags = edit_flags(prior_folder, "--load-dir", str(base_run), *FEW_SAMPLES)
    edits = ("e1", "e2")
    commands += [
        (ns_train("pds-edit", tmp_path / name, tiny_scene, *flags, steps=6), offline_env(tmp_path))
        for name in edits
    ]
    for proc in run_clis_together(commands, tmp_path):
        assert proc.returncode == 0, proc.stderr[-3000:]

    models = {k: tmp_path / k / tiny_scene.name / "nerfacto" / "run" / "nerfstudio_models" for k in seeds}
    base = {k: checkpoint_state(v)[1]["pipeline"] for k, v in models.items()}
    assert all(torch.equal(base["a"][k], base["b"][k]) for k in base["a"])
    assert not all(
        torch.equal(base["a"][k], base["c"][k]) for k in base["a"] if base["a"][k].is_floating_point()
    )
    edited = [
        checkpoint_state(tmp_path / name / tiny_scene.name / "pds-edit" / "run" / "nerfstudio_models")[1]
        for name in edits
    ]
    assert all(torch.equal(edited[0]["pipeline"][k], edited[1]["pipeline"][k]) for k in edited[0]["pipeline"])
