"""The 2D toy of ``benchmarks/toy2d.py`` reproduces the PDS paper's comparative analysis.

The paper's behaviours are checked with plain gradient descent (``optimizer="gd"``),
200 points and 500 steps (near convergence: the displacements are within 0.04 of the 400-point,
3000-step run). Bounds sit well away from the measured values (in comments), so a swapped
method, a sign error in ψ or χ, or a broken CFG fails them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.toy2d import Settings, main, run
from nerfstudio_distill.guidance.config import GuidanceConfig

SMALL = {"num_points": 200, "steps": 500, "optimizer": "gd"}


@pytest.fixture(scope="module")
def reference() -> dict:
    """CFG 7.5, the published PDS gradient (reference ψ/χ and its χ(t) weighting)."""
    return run(Settings(**SMALL, pds_rule="reference", pds_weighting="chi"))


def test_sds_collapses_to_a_point(reference: dict) -> None:
    sds = reference["sds"]
    assert sds["spread_ratio"] < 0.4  # measured 0.19
    assert reference["dds"]["spread_ratio"] > 0.8 and reference["pds"]["spread_ratio"] > 0.8  # 1.22, 0.99


def test_dds_strays_too_far(reference: dict) -> None:
    dds, pds = reference["dds"], reference["pds"]
    assert dds["displacement_over_ot"] > 1.5  # measured 1.77
    assert dds["displacement_over_ot"] > pds["displacement_over_ot"] + 0.5  # 1.77 vs 0.84
    assert dds["in_target"] < 0.1  # measured 0.00


def test_pds_shifts_minimally_into_the_target(reference: dict) -> None:
    pds = reference["pds"]
    assert 0.7 < pds["displacement_over_ot"] < 1.1  # measured 0.84: it undershoots a little
    assert pds["in_target"] > 0.75  # measured 0.89
    assert pds["ot_error"] < 2.5  # measured 1.80 σ from each point's own OT image
    assert 0.85 < pds["spread_ratio"] < 1.15  # measured 0.99


def test_pds_with_smaller_psi_meets_the_goal() -> None:
    """The issue's goal (≤ 1.25× OT, ≥ 95 % in target) needs ψ scaled down at CFG 7.5."""
    pds = run(Settings(**SMALL, psi_scale=0.7, pds_rule="reference", pds_weighting="chi"))["pds"]
    assert 0.85 < pds["displacement_over_ot"] < 1.15  # measured 0.94 (0.97 at 3000 steps)
    assert pds["in_target"] >= 0.95  # measured 0.99 (0.98 at 3000 steps)
    assert pds["ot_error"] < 1.2  # measured 0.72 σ


def test_without_cfg_dds_is_exact_ot_and_pds_undershoots() -> None:
    """At CFG 1 DDS is the exact mean shift (equal-covariance Gaussians) and ψ holds PDS back."""
    result = run(Settings(**SMALL, cfg=1.0, pds_rule="reference", pds_weighting="chi"))
    assert result["dds"]["ot_error"] < 0.1  # measured 0.00
    assert result["pds"]["displacement_over_ot"] < 0.6  # measured 0.34


@pytest.mark.parametrize("cfg", [1.0, 7.5, 100.0])
def test_default_pds_meets_the_goal_at_every_cfg(cfg: float) -> None:
    """#16: pds-edit's defaults (the "balanced" rule, ψ × 1, uniform weighting) reach the goal (≤ 1.25× OT,
    ≥ 95 % in the target) with no tuning, at CFG 1 (pds-edit's default with the exact prior), at 7.5 (with
    Stable Diffusion) and at 100 (the published PDS setting), under Adam as the edits run."""
    s = Settings(num_points=200, steps=1500, cfg=cfg)
    assert (s.pds_rule, s.psi_scale, s.optimizer) == ("balanced", 1.0, "adam")
    assert s.pds_weighting == GuidanceConfig().spec.defaults["weighting"] == "uniform"  # pds-edit's
    pds = run(s)["pds"]
    assert 0.85 < pds["displacement_over_ot"] <= 1.25  # measured 1.00 at every CFG
    assert pds["in_target"] >= 0.95  # measured 0.99 at every CFG
    assert 0.9 < pds["spread_ratio"] < 1.1  # measured 1.00: no collapse


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ValueError, match="use 'gd' or 'adam'"):
        run(Settings(num_points=4, steps=1, optimizer="sgd"))


def test_cli_json_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figure = tmp_path / "toy.png"
    main(["--steps", "20", "--num-points", "30", "--json", "--figure", str(figure)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"sds", "dds", "pds", "settings"}
    assert set(result["pds"]) >= {"spread_ratio", "displacement_over_ot", "in_target"}
    assert figure.stat().st_size > 1000
