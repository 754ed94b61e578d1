"""``ns-distill-eval``: the CLIP metrics that text-driven editing papers report, for an edited run.

- CLIP score: cosine similarity of each edited render's CLIP image embedding with the target prompt's
  text embedding (Hessel et al. 2021 without their 2.5 scale and clipping at 0; torchmetrics'
  ``CLIPScore`` reports ``100 · max(cos, 0)``).
- CLIP directional similarity (StyleGAN-NADA, Gal et al. 2022; InstructPix2Pix's
  ``ClipSimilarity.sim_direction``): cosine of (E_I(edited) − E_I(source)) with
  (E_T(target) − E_T(source)), all four embeddings L2-normalised first, per view.

Both runs are rendered from the edit run's training cameras (``eval_setup(..., test_mode="inference")``),
or, without ``--source-config``, the source views are the edit run's dataset images. CLIP is
transformers' ``CLIPModel`` + ``CLIPProcessor`` (imported lazily)::

    ns-distill-eval --edited-config outputs/ball/pds-edit/<ts>/config.yml \
        --source-config outputs/ball/nerfacto/<ts>/config.yml
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor

from nerfstudio_distill.errors import DistillError, EvalError, exit_message, one_line
from nerfstudio_distill.priors.base import check_device
from nerfstudio_distill.priors.stable_diffusion import hub_offline, looks_like_path

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
OUTPUT_NAME = "distill_eval.json"

Images = Sequence[UInt8[np.ndarray, "H W 3"]]
"""RGB images, uint8, one array per view (sizes may differ between views)."""


@dataclass
class EvalArgs:
    """CLIP score and CLIP directional similarity of an edited run; writes a JSON."""

    edited_config: Path
    """config.yml of the edit run (outputs/<exp>/pds-edit/<timestamp>/config.yml), or its run folder."""
    source_config: Path | None = None
    """config.yml (or run folder) of the unedited base run, rendered from the edit run's cameras. None:
    the source views are the edit run's dataset images."""
    target_prompt: str | None = None
    """Text the edited renders are scored against. None: the edit run's pipeline.target_prompt."""
    source_prompt: str | None = None
    """Text of the unedited scene, for the directional similarity. None: the edit run's
    pipeline.source_prompt (it must not be empty)."""
    clip_model: str = DEFAULT_CLIP
    """CLIP checkpoint: a Hugging Face hub id, or a local folder holding a CLIPModel and its CLIPProcessor
    (save_pretrained). Offline: a local folder, or HF_HUB_OFFLINE=1 with the model in the local cache."""
    output: Path | None = None
    """Where the JSON goes. None: distill_eval.json in the edit run's folder."""
    every: int = 1
    """Use every n-th training camera (1: all)."""
    per_view: bool = True
    """Also write the per-view values, in camera order."""
    device: str | None = None
    """Device of CLIP; None: "cuda" when available, else "cpu"."""


# --------------------------------------------------------------------------------------------- metrics
def clip_score(image_embeds: Float[Tensor, "N D"], text_embed: Float[Tensor, " D"]) -> Float[Tensor, " N"]:
    """cos(E_I(image_n), E_T(text)) per image."""
    return F.cosine_similarity(image_embeds, text_embed[None].expand_as(image_embeds), dim=-1)


def clip_directional_similarity(
    source_image_embeds: Float[Tensor, "N D"],
    edited_image_embeds: Float[Tensor, "N D"],
    source_text_embed: Float[Tensor, " D"],
    target_text_embed: Float[Tensor, " D"],
) -> Float[Tensor, " N"]:
    """cos(Ê_I(edited_n) − Ê_I(source_n), Ê_T(target) − Ê_T(source)) per view, Ê = E / ‖E‖."""
    image_delta = F.normalize(edited_image_embeds, dim=-1) - F.normalize(source_image_embeds, dim=-1)
    text_delta = F.normalize(target_text_embed, dim=-1) - F.normalize(source_text_embed, dim=-1)
    return F.cosine_similarity(image_delta, text_delta[None].expand_as(image_delta), dim=-1)


def summary(values: Float[Tensor, " N"], per_view: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": float(values.mean())}
    if per_view:
        out["per_view"] = [round(float(v), 6) for v in values]
    return out


# ------------------------------------------------------------------------------------------------ CLIP
class Clip:
    """A loaded CLIP model and its processor; :func:`load_clip` builds it."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)

    @staticmethod
    def _pooled(output: Any) -> Tensor:
        # transformers < 5 returns the projected embedding, >= 5 a BaseModelOutputWithPooling holding it
        return output if torch.is_tensor(output) else output.pooler_output

    @torch.no_grad()
    def embed_images(self, images: Images, batch_size: int = 32) -> Float[Tensor, "N D"]:
        """Projected CLIP image embeddings (float32, CPU), not normalised."""
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=list(images[start : start + batch_size]), return_tensors="pt")
            values = pixels["pixel_values"].to(self.device, self.model.dtype)
            chunks.append(self._pooled(self.model.get_image_features(pixel_values=values)).float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Float[Tensor, "N D"]:
        """Projected CLIP text embeddings (float32, CPU), not normalised."""
        length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor(
            text=list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self._pooled(self.model.get_text_features(**tokens)).float().cpu()


def load_clip(name: str, device: str | None = None) -> Clip:
    """CLIPModel + CLIPProcessor from a hub id or a local folder, or a one-line :class:`EvalError`."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except Exception as e:
        raise EvalError(f"CLIP needs transformers ({one_line(e)}): pip install transformers") from e
    path = os.path.expanduser(name)
    local = os.path.isdir(path)
    if not local and looks_like_path(name):
        raise EvalError(
            f"--clip-model folder {name!r} does not exist: pass a folder holding a CLIPModel and its "
            f"CLIPProcessor (save_pretrained), or a hub id such as {DEFAULT_CLIP!r}"
        )
    offline = hub_offline()
    try:
        model = CLIPModel.from_pretrained(path if local else name, local_files_only=offline)
        processor = CLIPProcessor.from_pretrained(path if local else name, local_files_only=offline)
    except Exception as e:  # OSError, hub errors, ValueError, ...: all mean "not loadable from there"
        where = "the local folder" if local else "the local cache" if offline else "the hub or cache"
        raise EvalError(
            f"could not load CLIP model {name!r} from {where} ({one_line(e, 120)}): pass --clip-model a "
            "local folder (CLIPModel + CLIPProcessor saved with save_pretrained), or download it once online "
            f"(hf download {name}) and run with HF_HUB_OFFLINE=1"
        ) from e
    return Clip(model, processor, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def evaluate(
    clip: Clip,
    source_images: Images,
    edited_images: Images,
    source_prompt: str,
    target_prompt: str,
    per_view: bool = True,
) -> dict[str, Any]:
    """CLIP score of the edited (and, for reference, the source) images against the target prompt, and
    the directional similarity of each (source, edited) pair with (source prompt, target prompt)."""
    if len(source_images) != len(edited_images) or not edited_images:
        raise EvalError(
            f"got {len(source_images)} source and {len(edited_images)} edited views: pass one source view "
            "per edited view (at least one)"
        )
    source, edited = clip.embed_images(source_images), clip.embed_images(edited_images)
    source_text, target_text = clip.embed_texts([source_prompt, target_prompt])
    return {
        "num_views": len(edited_images),
        "clip_score": summary(clip_score(edited, target_text), per_view),
        "clip_score_source": summary(clip_score(source, target_text), per_view),
        "clip_directional_similarity": summary(
            clip_directional_similarity(source, edited, source_text, target_text), per_view
        ),
    }


# ------------------------------------------------------------------------------------------------ runs
def load_run(path: Path, flag: str) -> tuple[Path, Any]:
    """A run's config.yml (given the file or its run folder) and its TrainerConfig, checked for what
    rendering needs: checkpoints and the dataset. One-line :class:`EvalError` otherwise."""
    path = Path(path)
    config_path = path / "config.yml" if path.is_dir() else path
    if not config_path.is_file():
        raise EvalError(
            f"{flag} {path}: no config.yml there; pass a run's config.yml "
            "(outputs/<experiment>/<method>/<timestamp>/config.yml) or its folder"
        )
    import yaml

    import method_configs  # noqa: F401  (the plugin's classes and compat layer, as ns-train loads them)

    try:
        config = _relocate(config_path)(yaml.load(config_path.read_text(), Loader=yaml.Loader))
        checkpoints = config.get_checkpoint_dir()
        if not hasattr(config.pipeline.datamanager, "dataparser"):
            raise EvalError(
                f"{flag} {config_path} is a {config.method_name} run, which has no dataset to compare with: "
                "pass an edit run (pds-edit, dds-edit, sds-edit) or a nerfacto run"
            )
        data = config.pipeline.datamanager.data or config.pipeline.datamanager.dataparser.data
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(
            f"{flag} {config_path} is not a nerfstudio run config ({one_line(e, 120)}): pass the "
            "config.yml that ns-train wrote"
        ) from e
    steps = sorted(Path(checkpoints).glob("step-*.ckpt"))
    if not steps:
        raise EvalError(f"{flag} {config_path}: no checkpoints in {checkpoints}; train the run first")
    if not zipfile.is_zipfile(steps[-1]):  # what torch.save writes; a cut-short file is not one
        raise EvalError(
            f"{flag} {config_path}: its checkpoint {steps[-1]} is truncated or not a checkpoint; delete it "
            "(an earlier one is used) or retrain the run"
        )
    if data is None or not Path(data).exists():
        raise EvalError(
            f"{flag} {config_path}: its dataset {data} is not found; put it back, or run from the folder "
            "ns-train ran in if the run folder was moved"
        )
    return config_path, config


def _relocate(config_path: Path) -> Callable[[Any], Any]:
    """Config callback: point the saved relative paths (output_dir, the dataset), which are relative to
    the folder ns-train ran in, at the run folder where config.yml now is, so any working directory works.
    Applies when the run folder ends in <experiment>/<method>/<timestamp>, as ns-train writes it."""

    def update(config: Any) -> Any:
        run = config_path.resolve().parent
        names = (config.experiment_name, config.method_name, str(config.timestamp))
        if len(run.parents) < 3 or (run.parents[1].name, run.parent.name, run.name) != names:
            return config
        root, saved = run.parents[2], Path(config.output_dir)
        n = len(saved.parts)
        if not saved.is_absolute() and n and root.parts[-n:] == saved.parts:
            cwd = Path(*root.parts[:-n])  # where ns-train ran
            datamanager = config.pipeline.datamanager
            for holder in (datamanager, datamanager.dataparser):
                if holder.data is not None and not Path(holder.data).is_absolute():
                    holder.data = cwd / holder.data
        config.output_dir = root
        return config

    return update


def render_run(
    config: Path, cameras: Any = None, every: int = 1
) -> tuple[list[UInt8[np.ndarray, "H W 3"]], Any, Any]:
    """RGB renders of a run from ``cameras`` (None: every ``every``-th of its own training cameras), as
    ``scripts/pictures.py`` renders them; also returns the cameras used (CPU) and the training dataset."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config, test_mode="inference", update_config_callback=_relocate(config))
    dataset = pipeline.datamanager.train_dataset
    cameras = dataset.cameras[::every] if cameras is None else cameras
    frames = []
    with torch.no_grad():
        for index in range(len(cameras)):
            rgb = pipeline.model.get_outputs_for_camera(cameras[index : index + 1].to(pipeline.device))["rgb"]
            frames.append((rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    return frames, cameras.to("cpu"), dataset


def render_runs(edited_config: Path, source_config: Path | None, every: int = 1) -> tuple[Images, Images]:
    """(source views, edited renders) for every ``every``-th training camera of the edit run: the base run
    rendered from those cameras, or the edit run's dataset images without ``source_config``."""
    edited, cameras, dataset = render_run(edited_config, every=every)
    if source_config is not None:
        source, _, _ = render_run(source_config, cameras)
    else:
        source = [dataset.get_numpy_image(i)[..., :3] for i in range(0, len(dataset), every)]
    return source, edited


# ------------------------------------------------------------------------------------------------- CLI
def prompts(args: EvalArgs, run_config: Any) -> tuple[str, str]:
    """(source, target) prompts: the flags, else the edit run's; one-line errors when empty."""
    pipeline = getattr(run_config, "pipeline", None)
    target = args.target_prompt if args.target_prompt is not None else getattr(pipeline, "target_prompt", "")
    source = args.source_prompt if args.source_prompt is not None else getattr(pipeline, "source_prompt", "")
    if not (target or "").strip():
        raise EvalError('no target prompt: pass --target-prompt "..." (the edit run has none)')
    if not (source or "").strip():
        raise EvalError(
            'no source prompt, which the directional similarity needs: pass --source-prompt "..." '
            "(the edit run's is empty)"
        )
    return source, target


def main(args: EvalArgs) -> tuple[dict[str, Any], Path]:
    """Check the inputs, load CLIP, render both runs, score, write the JSON; returns it and its path."""
    if args.every < 1:
        raise EvalError(f"--every {args.every}: use 1 or more")
    edited_config, run_config = load_run(args.edited_config, "--edited-config")
    source_config = None if args.source_config is None else load_run(args.source_config, "--source-config")[0]
    source_prompt, target_prompt = prompts(args, run_config)
    output = args.output or edited_config.parent / OUTPUT_NAME
    if not output.parent.is_dir():
        raise EvalError(f"--output {output}: its folder does not exist; create it or choose another path")
    if output.is_dir():
        raise EvalError(f"--output {output} is a folder: pass a file path, e.g. {output / OUTPUT_NAME}")
    check_device(args.device, "--device")
    clip = load_clip(args.clip_model, args.device)  # before rendering: a missing model fails in seconds
    source, edited = render_runs(edited_config, source_config, args.every)
    result = {
        "edited_config": str(edited_config),
        "source": str(source_config) if source_config else "dataset images of the edit run",
        "clip_model": args.clip_model,
        "source_prompt": source_prompt,
        "target_prompt": target_prompt,
        **evaluate(clip, source, edited, source_prompt, target_prompt, args.per_view),
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result, output


def entrypoint() -> None:
    """``ns-distill-eval``: parse the command line, run, report bad input in one ``error:`` line."""
    import tyro

    args = tyro.cli(EvalArgs, prog="ns-distill-eval")
    try:
        result, output = main(args)
    except DistillError as err:
        raise SystemExit(exit_message(err)) from None
    print(
        f"CLIP score {result['clip_score']['mean']:.4f} (source {result['clip_score_source']['mean']:.4f}), "
        f"directional similarity {result['clip_directional_similarity']['mean']:.4f} over "
        f"{result['num_views']} views -> {output}"
    )


if __name__ == "__main__":
    entrypoint()
