"""ns-distill-personalize (DreamBooth with LoRA) and the shared LoRA module, on the tiny random SD.

The adapters are checked against the textbook LoRA update written out here (W + s·(α/r)·B A merged into a
copy of the UNet); training against its own fixed evaluation loss; resuming against an uninterrupted run; the
edit through ns-train with --pipeline.prior.stable-diffusion.lora; bad input as one line that writes nothing.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nerfstudio_distill.errors import PriorLoadError
from nerfstudio_distill.priors import PriorConfig, StableDiffusionPrior, StableDiffusionPriorConfig
from nerfstudio_distill.priors.lora import (
    ADAPTER,
    CONFIG_FILE,
    UNET_TARGETS,
    LoraSpec,
    add_lora,
    lora_disabled,
    lora_layers,
    lora_scale,
    save_lora,
    set_lora_enabled,
)
from nerfstudio_distill.scripts import personalize
from tests.conftest import FEW_SAMPLES, assert_error_line, ns_train, ns_train_here, ns_train_main, run_here
from tests.tiny_sd import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd, tiny_components

PROMPT = "a photo of a sks ball"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def randomise(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    """Non-zero A and B (a fresh adapter has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def merged(unet: torch.nn.Module, scale: float = 1.0, names: tuple[str, ...] = (ADAPTER,)) -> torch.nn.Module:
    """A plain copy of the base UNet with each adapted layer's weight replaced by W + s·(α/r)·B A (LoRA,
    Hu et al. 2022, Eq. 3) summed over the adapters ``names``, written out from each adapter's A, B, r and α."""
    plain = tiny_components()["unet"]
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(base)
    modules = dict(plain.named_modules())
    for name in names:
        for path, layer in lora_layers(unet, name).items():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            alpha, rank = layer.lora_alpha[name], layer.r[name]
            with torch.no_grad():
                modules[path].weight += scale * (alpha / rank) * (b @ a)
    return plain


def unet_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    emb = torch.randn(2, 77, 32, generator=generator)
    return x, torch.tensor([10, 700]), emb


# -------------------------------------------------------------------------------------------- the module
def test_adapter_equals_merged_weights_and_scale_zero_equals_base():
    unet = tiny_components()["unet"].eval()
    base = copy.deepcopy(unet)
    params = add_lora(unet, LoraSpec(rank=4, alpha=2.0))
    x, t, emb = unet_inputs()
    with torch.no_grad():
        want = base(x, t, emb).sample
        torch.testing.assert_close(unet(x, t, emb).sample, want, rtol=0, atol=0)  # B = 0: nothing changes
        randomise(params)
        adapted = unet(x, t, emb).sample
        assert (adapted - want).abs().max() > 1e-2
        torch.testing.assert_close(adapted, merged(unet)(x, t, emb).sample, rtol=1e-4, atol=1e-4)
        with lora_scale(unet, 0.5):
            torch.testing.assert_close(
                unet(x, t, emb).sample, merged(unet, 0.5)(x, t, emb).sample, rtol=1e-4, atol=1e-4
            )
        with lora_scale(unet, 0.0):
            torch.testing.assert_close(unet(x, t, emb).sample, want, rtol=0, atol=0)
        with lora_disabled(unet):
            torch.testing.assert_close(unet(x, t, emb).sample, want, rtol=0, atol=0)
        torch.testing.assert_close(unet(x, t, emb).sample, adapted, rtol=0, atol=0)  # both restored
    # 32 attention projections (q, k, v, out of 4 transformer blocks x 2 attentions), A and B each
    assert len(lora_layers(unet)) == 32 and len(params) == 64
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".lora_" not in n)
    for p in params:  # switching keeps what trains (a frozen, loaded adapter stays frozen)
        p.requires_grad_(False)
    set_lora_enabled(unet, False)
    set_lora_enabled(unet, True)
    assert not any(p.requires_grad for p in unet.parameters())


def test_a_second_adapter_keeps_the_first_on_and_frozen():
    """VSD adding its own adapter to a personalised UNet: both act (the sum of their updates), the first stays
    frozen, and lora_scale(net, 0, name) switches off one of them."""
    unet = tiny_components()["unet"].eval()
    first = add_lora(unet, LoraSpec(rank=4), seed=0)
    randomise(first, 0)
    for p in first:
        p.requires_grad_(False)
    second = add_lora(unet, LoraSpec(rank=2, alpha=4.0), name="vsd", seed=1)
    randomise(second, 1)
    assert not any(p.requires_grad for p in first) and all(p.requires_grad for p in second)
    x, t, emb = unet_inputs()
    with torch.no_grad():
        both = merged(unet, names=(ADAPTER, "vsd"))(x, t, emb).sample
        # float32 merged weights against the adapters' separate path: 1.3e-5 apart once in the full suite
        torch.testing.assert_close(unet(x, t, emb).sample, both, rtol=1e-4, atol=1e-4)
        with lora_scale(unet, 0.0, "vsd"):
            torch.testing.assert_close(
                unet(x, t, emb).sample, merged(unet)(x, t, emb).sample, rtol=1e-4, atol=1e-4
            )


def adapter_folder(folder: Path, seed: int = 0, rank: int = 4, **unet_changes) -> Path:
    """Random non-zero UNet adapters of the tiny SD's UNet (or of one built with ``unet_changes``)."""
    unet = tiny_components()["unet"]
    if unet_changes:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config({**unet.config, **unet_changes})
    randomise(add_lora(unet, LoraSpec(rank=rank)), seed)
    save_lora(folder, {"unet": unet}, {"unet": LoraSpec(rank=rank)}, {"model": "tiny"})
    return folder


def test_prior_loads_adapters_and_predicts_as_the_merged_unet(tiny_sd, tmp_path):
    lora = adapter_folder(tmp_path / "lora")
    plain = StableDiffusionPrior(model=str(tiny_sd), device="cpu")
    adapted = StableDiffusionPrior(model=str(tiny_sd), device="cpu", lora=lora)
    off = StableDiffusionPrior(model=str(tiny_sd), device="cpu", lora=lora, lora_scale=0.0)
    assert adapted.lora["model"] == "tiny" and plain.lora is None
    assert not any(p.requires_grad for p in adapted.parameters())  # frozen, as the rest of the prior
    x, t, _ = unet_inputs(1)
    predict = [p.predict_noise(x[None], t, [PROMPT], 3.0)[0] for p in (plain, adapted, off)]
    torch.testing.assert_close(predict[2], predict[0], rtol=0, atol=0)  # strength 0: the base model
    assert (predict[1] - predict[0]).abs().max() > 1e-2
    plain.unet = merged(adapted.unet)  # the base prior with the LoRA update merged into its weights
    torch.testing.assert_close(
        plain.predict_noise(x[None], t, [PROMPT], 3.0)[0], predict[1], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing", ["--pipeline.prior.stable-diffusion.lora", "does not exist", "ns-distill-personalize"]),
        ("no-adapters", ["holds no LoRA adapters", "ns-distill-personalize --output-dir"]),
        ("weights-missing", ["unet_lora.safetensors is missing"]),
        ("other-architecture", ["do not fit this model's unet", "trained on 'tiny'"]),
        ("rank-differs", ["rank 4 but lora.json says rank 8", "train the adapters again"]),
        ("not-safetensors", ["not a readable safetensors file"]),
    ],
)
def test_bad_adapter_folder_is_one_line(tiny_sd, tmp_path, case, needles):
    folder = tmp_path / "lora"
    if case == "no-adapters":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    elif case == "weights-missing":
        adapter_folder(folder).joinpath("unet_lora.safetensors").unlink()
    elif case == "other-architecture":
        adapter_folder(folder, cross_attention_dim=16)
    elif case == "rank-differs":
        record = json.loads(adapter_folder(folder).joinpath(CONFIG_FILE).read_text())
        record["networks"]["unet"]["rank"] = 8
        (folder / CONFIG_FILE).write_text(json.dumps(record))
    elif case == "not-safetensors":
        adapter_folder(folder).joinpath("unet_lora.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PriorLoadError) as err:
        StableDiffusionPrior(model=str(tiny_sd), device="cpu", lora=folder)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    if case in ("missing", "no-adapters", "weights-missing"):  # found before anything loads
        config = PriorConfig(stable_diffusion=StableDiffusionPriorConfig(model=str(tiny_sd), lora=folder))
        with pytest.raises(PriorLoadError, match=needles[0].replace(".", r"\.")):
            config.check()


def test_adapters_fit_only_after_a_failed_load_leaves_the_unet_untouched(tiny_sd, tmp_path):
    """A mismatched folder is refused before any layer changes: the networks given stay plain."""
    parts = tiny_components()
    with pytest.raises(PriorLoadError):
        StableDiffusionPrior.from_components(
            **parts, lora=adapter_folder(tmp_path / "l", cross_attention_dim=16)
        )
    assert not lora_layers(parts["unet"])


# ------------------------------------------------------------------------------------------- the script
def run(monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["ns-distill-personalize", *args])
    personalize.entrypoint()


def cli(scene: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(scene), "--prompt", PROMPT, "--model", str(model), "--output-dir", str(out),
            "--resolution", str(IMAGE_SIZE), "--device", "cpu", *extra]  # fmt: skip


def test_training_loss_falls_and_only_adapters_are_written(
    tiny_scene, tiny_sd, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "lora"
    run(monkeypatch, cli(tiny_scene, tiny_sd, out, "--steps", "60", "--lr", "1e-2"))
    assert "--pipeline.prior.stable-diffusion.lora" in capsys.readouterr().out
    record = json.loads((out / CONFIG_FILE).read_text())
    assert record["fixed_loss_end"] < 0.85 * record["fixed_loss_start"], record
    assert record["step"] == 60 and record["train_images"] == 11  # 12 views, nerfstudio's 90 % split
    assert record["networks"] == {
        "unet": {"rank": 4, "alpha": None, "targets": list(UNET_TARGETS), "file": "unet_lora.safetensors"}
    }
    assert sorted(p.name for p in out.iterdir()) == [
        CONFIG_FILE,
        personalize.STATE_FILE,
        "unet_lora.safetensors",
    ]
    weights = load_file(str(out / "unet_lora.safetensors"))
    assert len(weights) == 64 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert sum(v.numel() for v in weights.values()) < 0.02 * sum(
        p.numel() for p in tiny_components()["unet"].parameters()
    )
    # what was trained loads into the prior for every method, and moves its predictions
    plain = StableDiffusionPrior(model=str(tiny_sd), device="cpu")
    adapted = StableDiffusionPrior(model=str(tiny_sd), device="cpu", lora=out)
    x, t, _ = unet_inputs()
    assert (
        adapted.predict_noise(x[None], t, [PROMPT])[0] - plain.predict_noise(x[None], t, [PROMPT])[0]
    ).abs().max() > 1e-3


def test_prior_preservation_and_text_encoder(tiny_scene, tiny_sd, tmp_path, monkeypatch):
    """Class images are generated by the base model into the output folder (and reused on resume), and the
    text encoder's adapters are written and loaded with the UNet's."""
    out = tmp_path / "lora"
    extra = ["--class-prompt", "a photo of a ball", "--num-class-images", "3", "--class-sampling-steps", "2",
             "--train-text-encoder", "--steps", "4"]  # fmt: skip
    run(monkeypatch, cli(tiny_scene, tiny_sd, out, *extra))
    classes = sorted((out / personalize.CLASS_FOLDER).glob("*.png"))
    assert len(classes) == 3
    record = json.loads((out / CONFIG_FILE).read_text())
    assert set(record["networks"]) == {"unet", "text_encoder"} and record["class_images"] == 3
    prior = StableDiffusionPrior(model=str(tiny_sd), device="cpu", lora=out)
    assert lora_layers(prior.text_encoder) and lora_layers(prior.unet)
    stamp = [p.stat().st_mtime_ns for p in classes]
    run(monkeypatch, cli(tiny_scene, tiny_sd, out, *extra[:-1], "6", "--resume"))
    assert [p.stat().st_mtime_ns for p in classes] == stamp  # not generated again


def test_resume_after_ctrl_c_continues_from_the_saved_step(
    tiny_scene, tiny_sd, tmp_path, monkeypatch, capsys
):
    """A run stopped by Ctrl-C saves its step; --resume runs the rest and ends with the adapters of an
    uninterrupted run, bit for bit (optimizer moments, crop/timestep/noise stream restored)."""
    flags = ["--steps", "6", "--lr", "1e-2", "--train-text-encoder"]
    run(monkeypatch, cli(tiny_scene, tiny_sd, tmp_path / "whole", *flags))

    real_step, calls = personalize.train_step, []

    def stop_at_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    out = tmp_path / "stopped"
    monkeypatch.setattr(personalize, "train_step", stop_at_fifth)
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, cli(tiny_scene, tiny_sd, out, *flags))
    assert stop.value.code == 130 and "--resume" in capsys.readouterr().err
    assert json.loads((out / CONFIG_FILE).read_text())["step"] == 4
    monkeypatch.setattr(personalize, "train_step", real_step)
    run(monkeypatch, cli(tiny_scene, tiny_sd, out, *flags, "--resume"))
    assert "resuming" in capsys.readouterr().err
    record = json.loads((out / CONFIG_FILE).read_text())
    assert record["step"] == 6
    for name in ("unet_lora.safetensors", "text_encoder_lora.safetensors"):
        whole, resumed = (load_file(str(d / name)) for d in (tmp_path / "whole", out))
        assert whole.keys() == resumed.keys()
        for key in whole:
            torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing-data", ["--data", "does not exist"]),
        ("data-without-images", ["holds no images", "ns-process-data"]),
        ("frames-missing", ["training images are missing", "file_path"]),
        ("empty-prompt", ["--prompt is empty", "sks"]),
        ("rank-zero", ["--rank 0", ">= 1"]),
        ("lr-nan", ["--lr nan", "finite"]),
        ("resolution", ["--resolution 12", "multiple of 8"]),
        ("class-images-alone", ["--class-images needs --class-prompt"]),
        ("class-images-empty", ["holds no PNG/JPEG images"]),
        ("output-is-a-run", ["already holds adapters", "--resume"]),
        ("output-foreign", ["not empty", "no ns-distill-personalize run"]),
        ("resume-other-rank", ["--rank 8 differs", "pass --rank 4"]),
        ("resume-fewer-steps", ["--steps 2", "already trained 2 steps"]),
        ("missing-model", ["--model of ns-distill-personalize", "does not exist"]),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(
    tiny_scene, tiny_sd, tmp_path, monkeypatch, case, needles
):
    scene, model, out, extra = tiny_scene, tiny_sd, tmp_path / "out", []
    if case == "missing-data":
        scene = tmp_path / "nowhere"
    elif case == "data-without-images":
        scene = tmp_path / "empty"
        scene.mkdir()
        (scene / "notes.txt").write_text("x")
    elif case == "frames-missing":
        scene = tmp_path / "scene"
        scene.mkdir()
        (scene / "transforms.json").write_text((tiny_scene / "transforms.json").read_text())
    elif case == "empty-prompt":
        extra = ["--prompt", " "]
    elif case == "rank-zero":
        extra = ["--rank", "0"]
    elif case == "lr-nan":
        extra = ["--lr", "nan"]
    elif case == "resolution":
        extra = ["--resolution", "12"]
    elif case == "class-images-alone":
        extra = ["--class-images", str(tiny_scene / "images")]
    elif case == "class-images-empty":
        (tmp_path / "classes").mkdir()
        extra = ["--class-prompt", "a ball", "--class-images", str(tmp_path / "classes")]
    elif case == "missing-model":
        model = tmp_path / "no_model"
    elif case in ("output-is-a-run", "resume-other-rank", "resume-fewer-steps"):
        run(monkeypatch, cli(scene, model, out, "--steps", "2"))
        extra = {"output-is-a-run": [], "resume-other-rank": ["--resume", "--rank", "8", "--steps", "4"],
                 "resume-fewer-steps": ["--resume", "--steps", "2"]}[case]  # fmt: skip
    elif case == "output-foreign":
        out.mkdir()
        (out / "photo.png").write_bytes(b"x")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, cli(scene, model, out, *extra))
    assert_error_line(stop.value.code, *needles)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None
    assert after == before  # nothing written, nothing changed


def test_bad_input_in_a_process_exits_non_zero_with_one_stderr_line(tmp_path):
    from tests.conftest import offline_env, run_cli

    proc = run_cli(
        ["ns-distill-personalize", "--data", str(tmp_path / "x"), "--prompt", PROMPT],
        offline_env(tmp_path),
        tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    assert_error_line(proc.stderr.strip().splitlines()[-1], "--data", "does not exist")
    assert not (tmp_path / "lora").exists()


def test_help_documents_every_option(capsys):
    """Every field has a docstring under it, and --help shows it."""
    import ast
    import inspect

    import tyro

    body = ast.parse(inspect.getsource(personalize.PersonalizeArgs)).body[0].body
    docs = {}
    for field, doc in zip(body, body[1:], strict=False):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    names = [f.name for f in __import__("dataclasses").fields(personalize.PersonalizeArgs)]
    assert sorted(docs) == sorted(names)
    with pytest.raises(SystemExit):
        tyro.cli(personalize.PersonalizeArgs, args=["--help"], prog="ns-distill-personalize")
    shown = " ".join(capsys.readouterr().out.split())
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in shown, name
        assert " ".join(doc.split()[:3]) in shown, (name, doc)


# ------------------------------------------------------------------------------------- the edit, end to end
def sd_edit_flags(base_run: Path, model: Path, lora: Path) -> list[str]:
    return [
        "--load-dir", str(base_run), *FEW_SAMPLES,
        "--pipeline.source-prompt", PROMPT, "--pipeline.target-prompt", "a photo of a sks ball in red",
        "--pipeline.prior.kind", "stable-diffusion",
        "--pipeline.prior.stable-diffusion.model", str(model),
        "--pipeline.prior.stable-diffusion.dtype", "fp32",
        "--pipeline.prior.stable-diffusion.lora", str(lora),
        "--pipeline.prior-resolution", str(IMAGE_SIZE),
    ]  # fmt: skip


@pytest.mark.slow
def test_edit_with_personalised_prior_runs_and_saves_no_prior_weights(
    tiny_scene, tiny_sd, base_run, tmp_path, monkeypatch
):
    """ns-distill-personalize, then ns-train pds-edit with --pipeline.prior.stable-diffusion.lora for 2 steps:
    the prior the edit uses holds the adapters, and the edit's checkpoint holds neither them nor the prior."""
    lora = tmp_path / "lora"
    run(monkeypatch, cli(tiny_scene, tiny_sd, lora, "--steps", "3", "--lr", "1e-2"))
    from nerfstudio_distill.priors import lora as lora_module

    loaded, real_load = [], lora_module.load_lora

    def load_lora(folder, nets, *args, **kwargs):
        record = real_load(folder, nets, *args, **kwargs)
        loaded.append((Path(folder), {key: len(lora_layers(net)) for key, net in nets.items()}))
        return record

    monkeypatch.setattr(lora_module, "load_lora", load_lora)
    out = tmp_path / "out"
    run_here(ns_train_main, ns_train("pds-edit", out, tiny_scene, *sd_edit_flags(base_run, tiny_sd, lora)))
    assert loaded == [(lora, {"unet": 32, "text_encoder": 0})]
    (ckpt,) = (out / tiny_scene.name / "pds-edit" / "run" / "nerfstudio_models").glob("step-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = list(state["pipeline"])
    assert not [k for k in keys if "lora" in k or "unet" in k or "text_encoder" in k or "vae" in k]
    assert ckpt.stat().st_size < 1.05 * next(base_run.glob("step-*.ckpt")).stat().st_size
    import yaml

    config = yaml.load(
        (out / tiny_scene.name / "pds-edit" / "run" / "config.yml").read_text(), Loader=yaml.Loader
    )
    assert (
        config.pipeline.prior.stable_diffusion.lora == lora
    )  # the run records the adapters it was edited with


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "other-architecture"])
def test_edit_with_a_bad_adapter_folder_is_one_line(tiny_scene, tiny_sd, base_run, tmp_path, case):
    lora = tmp_path / "lora"
    if case == "other-architecture":
        adapter_folder(lora, cross_attention_dim=16)
    out = tmp_path / "out"
    code = ns_train_here(ns_train("pds-edit", out, tiny_scene, *sd_edit_flags(base_run, tiny_sd, lora)))
    needles = ["does not exist"] if case == "missing" else ["do not fit this model's unet"]
    assert_error_line(code, "--pipeline.prior.stable-diffusion.lora", *needles)
    assert not list(out.rglob("*.ckpt"))


def test_distill_2d_takes_the_adapters(tiny_sd, tiny_scene, tmp_path, monkeypatch):
    """ns-distill-2d (same PriorConfig) loads them with --prior.stable-diffusion.lora; a missing folder is
    one line with its own flag."""
    from nerfstudio_distill.scripts import distill_2d

    lora = adapter_folder(tmp_path / "lora")
    args = ["ns-distill-2d", "--image", str(tiny_scene), "--target-prompt", "a red ball", "--steps", "2",
            "--resolution", str(IMAGE_SIZE), "--device", "cpu", "--prior.stable-diffusion.model", str(tiny_sd)]  # fmt: skip
    monkeypatch.setattr(
        sys, "argv", [*args, "--output-dir", str(tmp_path / "a"), "--prior.stable-diffusion.lora", str(lora)]
    )
    distill_2d.entrypoint()
    report = json.loads((tmp_path / "a" / "distill_2d.json").read_text())
    assert report["settings"]["prior"]["stable_diffusion"]["lora"] == str(lora)
    monkeypatch.setattr(
        sys,
        "argv",
        [*args, "--output-dir", str(tmp_path / "b"), "--prior.stable-diffusion.lora", str(tmp_path / "x")],
    )
    with pytest.raises(SystemExit) as stop:
        distill_2d.entrypoint()
    assert_error_line(stop.value.code, "--prior.stable-diffusion.lora", "does not exist")
    assert not (tmp_path / "b").exists()


def test_step_benchmark_runs():
    """benchmarks/personalize_step.py builds its priors and times train_step (a smoke test; no timing is
    asserted)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "personalize_step.py"
    spec = importlib.util.spec_from_file_location("personalize_step_benchmark", script)
    personalize_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(personalize_step)
    threads = torch.get_num_threads()
    try:
        rows = personalize_step.main(["--sizes", "tiny16", "--warmup", "0", "--repeats", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert [r["variant"] for r in rows] == ["unet", "text-encoder", "prior"]
    assert rows[0]["trained_parameters"] == 9984 and all(r["median_s_per_step"] > 0 for r in rows)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_diffusers_training_loss(tmp_path, prediction_type):
    """diffusion_loss equals the loss diffusers' training scripts compute: x_t from the scheduler's add_noise,
    target ε, or the scheduler's get_velocity for v-prediction."""
    from diffusers import DDIMScheduler

    folder = build_tiny_sd(tmp_path / "sd", prediction_type=prediction_type)
    prior = StableDiffusionPrior(model=str(folder), device="cpu")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.tensor([5, 400, 990])
    emb = prior.text_embeddings([PROMPT] * 3)
    with torch.no_grad():
        ours = personalize.diffusion_loss(prior, latents, emb, t, noise)
        x_t = scheduler.add_noise(latents, noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        want = (prior.unet(x_t, t, encoder_hidden_states=emb).sample - target).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_training_images_follow_nerfstudios_split(tiny_scene, tmp_path):
    """transforms.json frames sorted by name, nerfstudio's 90 % split (or its train_filenames); a plain
    folder's images all."""
    frames = sorted(
        tiny_scene / f["file_path"]
        for f in json.loads((tiny_scene / "transforms.json").read_text())["frames"]
    )
    train = personalize.training_images(tiny_scene)
    assert (
        len(train) == 11 and set(train) <= set(frames) and train[0] == frames[0] and train[-1] == frames[-1]
    )
    scene = tmp_path / "scene"
    scene.mkdir()
    meta = json.loads((tiny_scene / "transforms.json").read_text())
    meta["frames"] = [{**f, "file_path": str(tiny_scene / f["file_path"])} for f in meta["frames"]]
    meta["train_filenames"] = [meta["frames"][3]["file_path"], meta["frames"][0]["file_path"]]
    (scene / "transforms.json").write_text(json.dumps(meta))
    assert personalize.training_images(scene) == sorted(Path(p) for p in meta["train_filenames"])
    assert len(personalize.training_images(tiny_scene / "images")) == 12


def test_a_run_stopped_while_generating_class_images_resumes(tiny_scene, tiny_sd, tmp_path, monkeypatch):
    """Ctrl-C while the class images are generated keeps those written (exit 130); the folder is then only
    continued with --resume, which generates the rest and trains."""
    import importlib

    sdedit_module = importlib.import_module("nerfstudio_distill.guidance.sdedit")
    out = tmp_path / "lora"
    extra = ["--class-prompt", "a photo of a ball", "--num-class-images", "3", "--class-sampling-steps", "2"]
    real_sdedit, real_generate, calls = sdedit_module.sdedit, personalize.generate_class_images, []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sdedit(*args, **kwargs)

    monkeypatch.setattr(sdedit_module, "sdedit", stop_at_second)
    monkeypatch.setattr(  # one image per batch: the first is written, the second is stopped
        personalize,
        "generate_class_images",
        lambda prior, args, folder: real_generate(prior, args, folder, batch=1),
    )
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, cli(tiny_scene, tiny_sd, out, *extra, "--steps", "2"))
    assert stop.value.code == 130
    assert [p.name for p in (out / personalize.CLASS_FOLDER).iterdir()] == ["class_0000.png"]
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, cli(tiny_scene, tiny_sd, out, *extra, "--steps", "2"))
    assert_error_line(stop.value.code, "stopped before training", "--resume")
    run(monkeypatch, cli(tiny_scene, tiny_sd, out, *extra, "--steps", "2", "--resume"))
    assert len(list((out / personalize.CLASS_FOLDER).glob("*.png"))) == 3
    assert json.loads((out / CONFIG_FILE).read_text())["class_images"] == 3
