"""benchmarks/gpu_suite.sh's dry run: everything built at tiny sizes on the CPU, the same JSON keys as on a
GPU, nothing downloaded. Structure only: no timing thresholds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"dry_run", "guidance_step", "pds_edit", "pds_splatfacto", "ddp", "goals", "settings"}
EDIT_KEYS = {"steps", "s_per_step", "render_s", "prior_s", "backward_s", "other_s", "peak_gb"}


def check_report(report: dict) -> None:
    assert set(report) == KEYS and report["dry_run"] is True
    assert list(report["guidance_step"]) == ["sds", "sdi", "dds", "pds"]
    for name, r in report["guidance_step"].items():
        for key in ("step_ms", "floor_ms", "ratio", "peak_gb"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
    edit = report["pds_edit"]
    assert EDIT_KEYS <= set(edit) and edit["steps"] == 3 and edit["skipped_steps"] == 0
    assert all(math.isfinite(edit[k]) for k in EDIT_KEYS)
    assert edit["render_s"] > 0 and edit["prior_s"] > 0 and edit["backward_s"] > 0
    splats = report["pds_splatfacto"]
    assert splats["status"] == "measured" and splats["method"] == "pds-splatfacto"
    assert EDIT_KEYS <= set(splats) and splats["steps"] == 3 and splats["skipped_steps"] == 0
    assert all(math.isfinite(splats[k]) for k in EDIT_KEYS) and splats["gaussians"] == 500
    assert splats["render_s"] > 0 and splats["prior_s"] > 0 and splats["backward_s"] > 0
    assert set(report["goals"]) == {"pds_edit_s_per_step", "pds_edit_peak_gb", "guidance_step_vs_floor"}
    assert all(goal["met"] is None for goal in report["goals"].values())  # a dry run judges no goal


def test_dry_run_builds_everything_and_prints_the_report(capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    # the suite switches the process offline: the other tests get their environment back
    with mock.patch.dict(os.environ), mock.patch.dict(sys.modules, {"gpu_suite": suite}):
        spec.loader.exec_module(suite)
        report = suite.main(["--dry-run", "--no-ddp"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(report))  # the last line is the whole report
    check_report(report)
    assert report["ddp"] == {"status": "skipped (--no-ddp)"}
    table = "\n".join(out[:-1])
    assert "DRY RUN" in table and all(
        m in table for m in ("sds", "sdi", "dds", "pds", "pds-edit", "pds-splatfacto")
    )


@pytest.mark.slow
def test_the_script_dry_run_with_two_processes(tmp_path):
    """The shell script as a GPU machine runs it, with its DDP measurement on 2 gloo CPU processes."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    check_report(report)
    ddp = report["ddp"]
    assert ddp["status"] == "measured" and ddp["backend"] == "gloo" and ddp["processes"] == 2
    assert ddp["steps"] == 2 and math.isfinite(ddp["speedup"]) and ddp["speedup"] > 0
    assert "Downloading" not in proc.stderr + proc.stdout  # nothing is even tried
