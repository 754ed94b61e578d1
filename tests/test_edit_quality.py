"""``benchmarks/edit_quality.py`` end to end, small: a scored pds-edit through nerfstudio's real CLIs.

16 views at 32 px, a 200-step base and a 100-step PDS edit at pds-edit's defaults (the "balanced"
rule, ψ × 1, the exact prior's CFG 1, field lr 3e-3), about 3-9 minutes on 2 busy CPU cores.
The bounds sit away from the values measured at these settings (in comments), so a broken edit (no
colour change, lost stripes, a damaged geometry, a misaligned evaluation) fails them. Runs are now
bitwise reproducible on CPU; the margins still allow for other CPUs' float rounding.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.edit_quality import SCENES, Settings, identity_check, make_data, parse, run

SMALL = Settings(resolution=32, base_steps=200, steps=100, methods=("pds",))


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    result = run(SMALL, tmp_path_factory.mktemp("edit_quality"), log=lambda message: None)
    print(json.dumps(result))  # shown with -rP, and with the report of a failure
    return result


@pytest.mark.slow
def test_identity_is_measurable_by_construction(result: dict) -> None:
    check = result["identity_check"]
    assert check["ideal_is_nearest"] == "16/16"
    assert check["margin"] > 1.05  # measured 1.078


@pytest.mark.slow
def test_base_reconstructs_the_source(result: dict) -> None:
    base = result["base"]
    assert base["psnr_to_source"] > 20  # measured 24.7
    assert base["depth_error"] < 0.15  # measured 0.084 (of the object size)
    assert base["target_accuracy"] < 0.05  # a red ball: nothing blue yet


@pytest.mark.slow
def test_pds_changes_the_colour_and_keeps_stripes_and_shape(result: dict) -> None:
    """Continuous measures only, with wide margins. The runs are not bitwise reproducible on CPU (the base
    differs between runs: 24.4-25.9 dB to the source), and target accuracy is a threshold on the colour
    (a body 45 % of the way to blue scores 0, 55 % scores 0.9): it swung from 0.99 to 0.02 between runs
    of this very test."""
    base, pds = result["base"], result["pds"]
    assert pds["colour_progress"] > base["colour_progress"] + 0.15  # measured 0.55, 0.66 vs 0.01-0.04
    assert pds["stripe_accuracy"] > 0.9  # the stripes stay white; measured 0.99
    # measured 0.025 and 0.06 (DDS/SDS damage it by 40 %+, and so did PDS at lr 1e-2: 55 %)
    assert pds["depth_change"] < 0.2
    # its geometry against the generator's: an edit that wrecks the shape moves it away from the truth
    assert pds["depth_error"] < base["depth_error"] + 0.1
    assert pds["psnr_to_ideal"] > base["psnr_to_ideal"] + 1.5  # measured +3.1, +6.0 and +8.0 dB


@pytest.mark.parametrize("scene", list(SCENES))
def test_every_scene_measures_identity_by_construction(scene: str, tmp_path) -> None:
    """Each benchmark scene's ideal edit is the target image nearest to the source in every view, at the
    benchmark's own size (the orb's first, grey checker failed this: grey lies between orange and green)."""
    s = Settings(scene=scene)
    scene_dir, prior, _ = make_data(s, tmp_path)
    check = identity_check(scene_dir, prior, SCENES[scene].prompts[1])
    assert check["ideal_is_nearest"] == f"{s.views}/{s.views}"
    assert (
        check["margin"] > 1.03
    )  # measured 1.088 (ball), 1.047 (box), 1.137 (orb), 1.113 (crate), 1.228 (bead)


def test_unknown_scene_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--scene", "cube"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--scene" in error and all(name in error for name in SCENES)
