"""The demo's input handling, the commands of each --representation, and (slow) the splat demo end to end
(the nerfacto demo is `make demo`; its stages are tested in test_edit_cli)."""

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


@pytest.mark.parametrize(
    "representation, base, edit, export, exported",
    [
        ("nerfacto", "nerfacto", "pds-edit", "tsdf", "mesh/tsdf_mesh.ply"),
        ("splatfacto", "splatfacto", "pds-splatfacto", "gaussian-splat", "splat/splat.ply"),
    ],
)
def test_each_representation_runs_its_commands_and_names_its_files(
    representation, base, edit, export, exported, tmp_path, monkeypatch, capsys
):
    """The stages' commands (not run) and the summary of ``--representation``: its base, edit and export,
    the edit loading the base with the same model flags, and the summary and ns-viewer line naming them."""
    from nerfstudio_distill.scripts import demo, pictures

    commands = []
    monkeypatch.setattr(demo, "run", lambda command, log: commands.append(command))
    fake = {"strip": tmp_path / "strip.png", "gif": tmp_path / "turntable.gif"}
    monkeypatch.setattr(pictures, "before_after", lambda base_config, edit_config, *a, **k: fake)
    out = tmp_path / "demo"
    outputs = demo.main(demo.DemoArgs(representation=representation, output_dir=out))

    train_base, train_edit, export_edit = commands
    runs = out / "runs" / "ball"
    model = list(demo.REPRESENTATIONS[representation].model)
    for command in (train_base, train_edit):
        flags = command[2:]
        assert any(flags[i : i + len(model)] == model for i in range(len(flags)))
    assert train_base[:2] == ["ns-train", base] and train_edit[:2] == ["ns-train", edit]
    assert train_edit[train_edit.index("--load-dir") + 1] == str(runs / base / "base" / "nerfstudio_models")
    assert export_edit[:2] == ["ns-export", export]
    assert export_edit[export_edit.index("--load-config") + 1] == str(runs / edit / "edit" / "config.yml")
    assert export_edit[export_edit.index("--output-dir") + 1] == str((out / exported).parent)
    assert outputs["edited run"] == runs / edit / "edit" and out / exported in outputs.values()
    printed = capsys.readouterr().out
    assert str(out / exported) in printed
    assert printed.rstrip().endswith(f"ns-viewer --load-config {runs / edit / 'edit' / 'config.yml'}")


@pytest.mark.slow
def test_splat_demo_end_to_end(tmp_path):
    """`make demo ARGS='--representation splatfacto'` with few steps: real ns-train splatfacto,
    pds-splatfacto, ns-export gaussian-splat, and the before/after pictures rendered from the splat runs."""
    from PIL import Image

    from nerfstudio_distill.scripts.demo import DemoArgs, main

    args = DemoArgs(representation="splatfacto", output_dir=tmp_path / "demo", base_steps=20, edit_steps=3)
    outputs = main(args)
    assert outputs["splat"].read_bytes().startswith(b"ply")
    with Image.open(outputs["before/after"]) as strip:
        assert strip.size == (4 * 64 * 2, 2 * 64 * 2)  # four views, base over edit, shown at 2x
    assert (outputs["edited run"] / "nerfstudio_models" / "step-000000022.ckpt").exists()
