"""pds-edit through nerfstudio's real CLIs: base nerfacto -> edit -> resume -> ns-export, and bad input."""

from __future__ import annotations

import pytest

from tests.conftest import edit_flags, ns_export, ns_train, offline_env, run_cli


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last


@pytest.mark.slow
def test_edit_resume_and_export(tiny_scene, base_run, prior_folder, tmp_path):
    env, out = offline_env(tmp_path), tmp_path / "out"
    flags = edit_flags(prior_folder, "--load-dir", str(base_run))
    edit = run_cli(ns_train("pds-edit", out, tiny_scene, *flags, "--steps-per-save", "2"), env, tmp_path)
    assert edit.returncode == 0, edit.stderr[-3000:]
    assert "optimizers and schedulers start fresh" in edit.stdout
    run = out / tiny_scene.name / "pds-edit" / "run"
    first = sorted((run / "nerfstudio_models").glob("step-*.ckpt"))
    base_size = next(base_run.glob("step-*.ckpt")).stat().st_size
    assert first and first[-1].stat().st_size < 1.05 * base_size  # no prior weights inside

    # a run resumes from its own checkpoint: everything restored, the step counter continues, and it runs
    # the steps left of the planned total (here the total is raised from 2 to 4: 2 more steps)
    flags = edit_flags(prior_folder, "--load-dir", str(run / "nerfstudio_models"))
    resume = run_cli(
        ns_train("pds-edit", out, tiny_scene, *flags, steps=4, timestamp="resumed"), env, tmp_path
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "optimizers and schedulers start fresh" not in resume.stdout
    assert "2 of the 4 planned steps are left" in resume.stdout
    (last,) = (out / tiny_scene.name / "pds-edit" / "resumed" / "nerfstudio_models").glob("step-*.ckpt")
    assert last.name > first[-1].name

    for exporter, extra, produced in [
        ("pointcloud", ["--num-points", "256", "--normal-method", "open3d"], "point_cloud.ply"),
        ("tsdf", ["--resolution", "32", "--batch-size", "2", "--texture-method", "tsdf"], "tsdf_mesh.ply"),
    ]:
        target = tmp_path / exporter
        proc = run_cli(ns_export(exporter, run, target, *extra), env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (target / produced).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, needles",
    [
        ([], ["pass --load-dir"]),
        (["--load-dir", "/no/such/dir"], ["does not exist"]),
        (["--load-dir", "{base}", "--pipeline.target-prompt", ""], ["--pipeline.target-prompt"]),
        (["--load-dir", "{base}", "--pipeline.prior.exact.folder", "/no/such/prior"], ["exact_prior.json"]),
        (
            ["--load-dir", "{base}", "--pipeline.prior.kind", "stable-diffusion"]
            + ["--pipeline.prior.stable-diffusion.model", "nobody/no-such-model"],
            ["HF_HUB_OFFLINE", "--pipeline.prior.stable-diffusion.model"],
        ),
        (["--load-dir", "{base}", "--pipeline.model.hidden-dim", "32"], ["does not match", "same --data"]),
    ],
    ids=["no-load-dir", "missing-load-dir", "empty-target", "missing-prior", "unloadable-sd", "other-model"],
)
def test_bad_input_is_one_line(tiny_scene, base_run, prior_folder, tmp_path, flags, needles):
    flags = [f.replace("{base}", str(base_run)) for f in flags]
    out = tmp_path / "out"
    proc = run_cli(
        ns_train("pds-edit", out, tiny_scene, *edit_flags(prior_folder), *flags),
        offline_env(tmp_path),
        tmp_path,
    )
    assert_one_line_error(proc, *needles)
    assert not list(out.rglob("*.ckpt"))


@pytest.mark.slow
def test_poisson_export_of_an_edit_whose_base_predicts_normals(tiny_scene, prior_folder, tmp_path):
    """ns-export poisson needs normals: a base trained with --pipeline.model.predict-normals True, and the
    edit with the same field settings, export a Poisson mesh."""
    env, out = offline_env(tmp_path), tmp_path / "out"
    normals = ["--pipeline.model.predict-normals", "True"]
    proc = run_cli(ns_train("nerfacto", out, tiny_scene, *normals), env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = out / tiny_scene.name / "nerfacto" / "run" / "nerfstudio_models"
    edit = ns_train("pds-edit", out, tiny_scene, *normals, "--load-dir", str(base), *edit_flags(prior_folder))
    proc = run_cli(edit, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / tiny_scene.name / "pds-edit" / "run"
    extra = ["--num-points", "2000", "--normal-method", "model_output", "--texture-method", "point_cloud"]
    proc = run_cli(ns_export("poisson", run, tmp_path / "mesh", *extra), env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mesh" / "poisson_mesh.ply").stat().st_size > 0
