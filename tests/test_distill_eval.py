"""ns-distill-eval: the CLIP metrics against hand-computed cosines, a tiny random CLIP end to end, bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nerfstudio_distill.scripts import distill_eval
from nerfstudio_distill.scripts.distill_eval import (
    EvalError,
    clip_directional_similarity,
    clip_score,
    evaluate,
    load_clip,
)
from tests.conftest import BIN

SOURCE, TARGET = "a red ball", "a blue ball"


def build_tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (32-wide, 2 layers, 32 px images, 16-d projections) and its CLIPProcessor, saved
    with save_pretrained: loads like "openai/clip-vit-base-patch32", offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.tiny_sd import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(layers, vocab_size=1000, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id)
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def views(seed: int, n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ maths
def test_clip_score_is_the_cosine_with_the_text():
    images = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]])
    text = torch.tensor([3.0, 0.0, 0.0])
    torch.testing.assert_close(clip_score(images, text), torch.tensor([1.0, 1 / math.sqrt(2), -1.0]))


def test_directional_similarity_by_hand():
    source_image = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    # normalised edited embeddings: (0, 1, 0), (0, 0, 1), (0, -1, 0); the first is 5x longer
    edited_image = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    source_text, target_text = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0])
    # image deltas (-1, 1, 0), (-1, 0, 1), (-1, -1, 0); text delta (-1, 0, 1): cosines 1/2, 1, 1/2
    expected = torch.tensor([0.5, 1.0, 0.5])
    got = clip_directional_similarity(source_image, edited_image, source_text, target_text)
    torch.testing.assert_close(got, expected)
    # the same edit in the opposite direction, and an edit that does not move the image
    torch.testing.assert_close(
        clip_directional_similarity(edited_image, source_image, source_text, target_text), -expected
    )
    assert (
        clip_directional_similarity(source_image, 3 * source_image, source_text, target_text).abs().max()
        < 1e-6
    )


# ------------------------------------------------------------------------------------------- tiny CLIP
def test_evaluate_with_a_tiny_clip_matches_numpy_cosines(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    source, edited = views(0), views(1)
    result = evaluate(load_clip(str(tiny_clip), "cpu"), source, edited, SOURCE, TARGET)

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = [processor(images=v, return_tensors="pt")["pixel_values"] for v in (source, edited)]
        image = [model.get_image_features(pixel_values=p) for p in pixels]
        tokens = processor(text=[SOURCE, TARGET], padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    src, edit = (getattr(e, "pooler_output", e).double().numpy() for e in image)
    src_text, tgt_text = getattr(text, "pooler_output", text).double().numpy()

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    score = unit(edit) @ unit(tgt_text)
    direction = unit(unit(edit) - unit(src)) @ unit(unit(tgt_text) - unit(src_text))
    assert result["num_views"] == 3
    np.testing.assert_allclose(result["clip_score"]["per_view"], score, atol=1e-5)
    np.testing.assert_allclose(result["clip_score"]["mean"], score.mean(), atol=1e-5)
    np.testing.assert_allclose(result["clip_score_source"]["per_view"], unit(src) @ unit(tgt_text), atol=1e-5)
    np.testing.assert_allclose(result["clip_directional_similarity"]["per_view"], direction, atol=1e-5)
    assert not np.allclose(direction, direction[0])  # views differ: per-view values are not a constant


def fake_run(root: Path, data: Path, source_prompt: str = SOURCE) -> Path:
    """A pds-edit run folder as ns-train writes it (config.yml, a checkpoint file), without training;
    output_dir is saved relative, as with `ns-train --output-dir outputs`."""
    from method_configs.guided_edits import pds_edit

    config = copy.deepcopy(pds_edit.config)
    config.output_dir, config.experiment_name, config.timestamp = Path("outputs"), "ball", "edit"
    config.pipeline.datamanager.data = data
    config.pipeline.target_prompt, config.pipeline.source_prompt = TARGET, source_prompt
    run = root / config.get_base_dir()
    (run / "nerfstudio_models").mkdir(parents=True)
    torch.save({"step": 1, "pipeline": {}}, run / "nerfstudio_models" / "step-000000001.ckpt")
    (run / "config.yml").write_text(yaml.dump(config))
    return run


def run_entrypoint(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["ns-distill-eval", *args])
    distill_eval.entrypoint()


def test_cli_scores_a_run_folder_from_another_directory(tiny_clip, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    run = fake_run(tmp_path, Path("data"))  # relative to tmp_path, where "ns-train" ran
    source, edited = views(2, 4), views(3, 4)
    calls = []

    def fake_render_runs(edited_config, source_config, every):
        calls.append((edited_config, source_config, every))
        return source[::every], edited[::every]

    monkeypatch.setattr(distill_eval, "render_runs", fake_render_runs)
    monkeypatch.chdir(tmp_path / "data")
    run_entrypoint(monkeypatch, "--edited-config", str(run), "--clip-model", str(tiny_clip), "--every", "2")
    assert calls == [(run / "config.yml", None, 2)]
    written = json.loads((run / "distill_eval.json").read_text())
    assert written["source"] == "dataset images of the edit run"
    assert (written["source_prompt"], written["target_prompt"]) == (SOURCE, TARGET)  # from config.yml
    expected = evaluate(load_clip(str(tiny_clip), "cpu"), source[::2], edited[::2], SOURCE, TARGET)
    assert written["num_views"] == 2
    for key in ("clip_score", "clip_score_source", "clip_directional_similarity"):
        assert written[key]["mean"] == pytest.approx(expected[key]["mean"], abs=1e-6)
    assert "directional similarity" in capsys.readouterr().out

    # the flags override the run's prompts; --source-config must be a run too
    run_entrypoint(
        monkeypatch, "--edited-config", str(run / "config.yml"), "--source-config", str(run),
        "--clip-model", str(tiny_clip), "--target-prompt", "a cat", "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["target_prompt"] == "a cat" and written["source"] == str(run / "config.yml")


@pytest.mark.parametrize(
    "case, needles",
    [
        ("no-config", ["no config.yml there", "--edited-config"]),
        ("no-checkpoints", ["no checkpoints", "train the run first"]),
        ("no-source-prompt", ["--source-prompt", "directional similarity"]),
        ("missing-clip-folder", ["--clip-model folder", "does not exist"]),
        ("unknown-clip-id", ["could not load CLIP model 'nobody/no-such-clip'", "HF_HUB_OFFLINE=1"]),
        ("not-a-clip-folder", ["could not load CLIP model", "from the local folder", "save_pretrained"]),
        ("output-is-a-folder", ["--output", "is a folder"]),
        ("unknown-device", ["--device 'banana'"]),
        ("truncated-checkpoint", ["truncated", "delete it"]),
    ],
)
def test_bad_input_is_one_line(tiny_clip, tmp_path, monkeypatch, case, needles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network
    monkeypatch.setattr(distill_eval, "render_runs", lambda *a: pytest.fail("rendered despite bad input"))
    (tmp_path / "data").mkdir()
    run = fake_run(tmp_path, tmp_path / "data", "" if case == "no-source-prompt" else SOURCE)
    clip = str(tiny_clip)
    if case == "no-config":
        (run / "config.yml").unlink()
    elif case == "no-checkpoints":
        (run / "nerfstudio_models" / "step-000000001.ckpt").unlink()
    elif case == "missing-clip-folder":
        clip = str(tmp_path / "no" / "clip")
    elif case == "unknown-clip-id":
        clip = "nobody/no-such-clip"
    elif case == "not-a-clip-folder":
        clip = str(tmp_path / "data")
    extra = []
    if case == "output-is-a-folder":
        extra = ["--output", str(tmp_path / "data")]
    elif case == "unknown-device":
        extra = ["--device", "banana"]
    elif case == "truncated-checkpoint":
        (run / "nerfstudio_models" / "step-000000001.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(SystemExit) as exit_info:
        run_entrypoint(monkeypatch, "--edited-config", str(run), "--clip-model", clip, *extra)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert not (run / "distill_eval.json").exists()


def test_load_clip_error_is_an_eval_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match="from the local cache"):
        load_clip("nobody/no-such-clip")


def test_run_folder_without_config_exits_non_zero_with_one_stderr_line(tmp_path):
    proc = subprocess.run(
        [str(BIN / "ns-distill-eval"), "--edited-config", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: --edited-config {tmp_path}: no config.yml there; pass a run's config.yml "
        "(outputs/<experiment>/<method>/<timestamp>/config.yml) or its folder"
    ]
