"""The demo's input handling (the whole demo is `make demo`; its stages are tested in test_edit_cli)."""

from __future__ import annotations

import pytest

from nerfstudio_distill.scripts.demo import MARKER, DemoError, parse_prompt, prepare_output


@pytest.mark.parametrize(
    "prompt, changes",
    [
        ("a blue striped ball", {"colour": "blue", "pattern": "stripes"}),
        ("A Green checkered ball", {"colour": "green", "pattern": "checker"}),
        ("a yellow ball", {"colour": "yellow"}),
    ],
)
def test_prompt_maps_to_scene_attributes(prompt, changes):
    assert parse_prompt(prompt) == changes


@pytest.mark.parametrize("prompt", ["a ball", "a mauve ball", "a red and blue ball"])
def test_prompt_outside_the_vocabulary_is_one_line(prompt):
    with pytest.raises(DemoError) as err:
        parse_prompt(prompt)
    assert "\n" not in str(err.value) and "--prompt" in str(err.value)


def test_output_folder_of_someone_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="--output-dir"):
        prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_folder_of_an_earlier_demo_is_replaced(tmp_path):
    (tmp_path / MARKER).write_text("{}")
    (tmp_path / "old.txt").write_text("old")
    prepare_output(tmp_path)
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())
