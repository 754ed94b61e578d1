"""pds-edit through nerfstudio's real CLIs: base nerfacto -> edit -> resume -> ns-export, and bad input.

The runs call ``ns-train`` and ``ns-export`` (their own parsing and main) in this process; one bad input
runs as a real process, to check what a user sees: the last stderr line and the exit status."""

from __future__ import annotations

import pytest

from tests.conftest import (
    FEW_SAMPLES,
    assert_error_line,
    edit_flags,
    ns_export,
    ns_export_main,
    ns_train,
    ns_train_here,
    ns_train_main,
    offline_env,
    run_cli,
    run_here,
)


@pytest.mark.slow
def test_edit_resume_and_export(tiny_scene, base_run, prior_folder, tmp_path, capsys):
    out = tmp_path / "out"
    flags = edit_flags(prior_folder, "--load-dir", str(base_run), *FEW_SAMPLES)
    run_here(ns_train_main, ns_train("pds-edit", out, tiny_scene, *flags, "--steps-per-save", "2"))
    assert "optimizers and schedulers start fresh" in capsys.readouterr().out
    run = out / tiny_scene.name / "pds-edit" / "run"
    first = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))
    base_size = next(base_run.glob("step-*.ckpt")).stat().st_size
    assert first and first[-1].stat().st_size < 1.05 * base_size  # no prior weights inside

    # a run resumes from its own checkpoint: everything restored, the step counter continues, and it runs
    # the steps left of the planned total (here the total is raised from 2 to 4: 2 more steps)
    flags = edit_flags(prior_folder, "--load-dir", str(run / "nerfstudio_models"), *FEW_SAMPLES)
    run_here(ns_train_main, ns_train("pds-edit", out, tiny_scene, *flags, steps=4, timestamp="resumed"))
    stdout = capsys.readouterr().out
    assert "optimizers and schedulers start fresh" not in stdout
    assert "2 of the 4 planned steps are left" in stdout
    (last,) = (out / tiny_scene.name / "pds-edit" / "resumed" / "nerfstudio_models").glob("step-*.ckpt")
    assert last.name > first[-1].name

    for exporter, extra, produced in [
        ("pointcloud", ["--num-points", "256", "--normal-method", "open3d"], "point_cloud.ply"),
        ("tsdf", ["--resolution", "32", "--batch-size", "2", "--texture-method", "tsdf"], "tsdf_mesh.ply"),
    ]:
        target = tmp_path / exporter
        run_here(ns_export_main, ns_export(exporter, run, target, *extra))
        assert (target / produced).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, needles",
    [
        ([], ["pass --load-dir"]),
        (["--load-dir", "/no/such/dir"], ["does not exist"]),
        (["--load-dir", "{base}", "--pipeline.target-prompt", ""], ["--pipeline.target-prompt"]),
        (["--load-dir", "{base}", "--pipeline.prior.exact.folder", "/no/such/prior"], ["exact_prior.json"]),
        (["--load-dir", "{base}", "--pipeline.model.hidden-dim", "32"], ["does not match", "same --data"]),
    ],
    ids=["no-load-dir", "missing-load-dir", "empty-target", "missing-prior", "other-model"],
)
def test_bad_input_is_one_line(tiny_scene, base_run, prior_folder, tmp_path, flags, needles):
    flags = [f.replace("{base}", str(base_run)) for f in flags]
    out = tmp_path / "out"
    code = ns_train_here(ns_train("pds-edit", out, tiny_scene, *edit_flags(prior_folder), *flags))
    assert_error_line(code, *needles)
    assert not list(out.rglob("*.ckpt"))


@pytest.mark.slow
def test_bad_input_in_a_process_is_its_last_stderr_line(tiny_scene, base_run, prior_folder, tmp_path):
    """A real `ns-train` process, offline (HF_HUB_OFFLINE=1, no network): a Stable Diffusion model it cannot
    load is one `error: ...` line, the last one on stderr, and a non-zero exit."""
    out = tmp_path / "out"
    flags = ["--load-dir", str(base_run), "--pipeline.prior.kind", "stable-diffusion"]
    flags += ["--pipeline.prior.stable-diffusion.model", "nobody/no-such-model"]
    args = ns_train("pds-edit", out, tiny_scene, *edit_flags(prior_folder), *flags)
    proc = run_cli(args, offline_env(tmp_path), tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert_error_line(last, "HF_HUB_OFFLINE", "--pipeline.prior.stable-diffusion.model")
    assert not list(out.rglob("*.ckpt"))


@pytest.mark.slow
def test_poisson_export_of_an_edit_whose_base_predicts_normals(tiny_scene, prior_folder, tmp_path):
    """ns-export poisson needs normals: a base trained with --pipeline.model.predict-normals True, and the
    edit with the same field settings, export a Poisson mesh."""
    out = tmp_path / "out"
    normals = ["--pipeline.model.predict-normals", "True"]
    run_here(ns_train_main, ns_train("nerfacto", out, tiny_scene, *normals))
    base = out / tiny_scene.name / "nerfacto" / "run" / "nerfstudio_models"
    flags = [*normals, "--load-dir", str(base), *edit_flags(prior_folder), *FEW_SAMPLES]
    run_here(ns_train_main, ns_train("pds-edit", out, tiny_scene, *flags))
    run = out / tiny_scene.name / "pds-edit" / "run"
    extra = ["--num-points", "2000", "--normal-method", "model_output", "--texture-method", "point_cloud"]
    run_here(ns_export_main, ns_export("poisson", run, tmp_path / "mesh", *extra))
    assert (tmp_path / "mesh" / "poisson_mesh.ply").stat().st_size > 0
