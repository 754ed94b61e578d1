"""Before/after pictures of an edit: a strip of views and a turntable GIF, rendered from two runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from jaxtyping import UInt8
from PIL import Image


def load_run(config: Path, test_mode: str = "inference"):
    """nerfstudio's ``eval_setup`` of a finished run, with its data loaded in this process: nerfacto's
    ParallelDataManager would spawn worker processes just to list the cameras (most of the time of a
    short render). Returns the pipeline."""
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager
    from nerfstudio.data.datamanagers.parallel_datamanager import ParallelDataManager
    from nerfstudio.utils.eval_utils import eval_setup

    import method_configs  # noqa: F401  (the plugin's compat layer: checkpoints load under torch >= 2.6)

    def in_process(run_config):
        if issubclass(run_config.pipeline.datamanager._target, ParallelDataManager):
            run_config.pipeline.datamanager._target = VanillaDataManager
        return run_config

    _, pipeline, _, _ = eval_setup(Path(config), test_mode=test_mode, update_config_callback=in_process)
    return pipeline


def render_views(config: Path, every: int = 1) -> list[UInt8[np.ndarray, "H W 3"]]:
    """RGB renders of a run's training cameras (in dataset order: a turntable for ring scenes)."""
    pipeline = load_run(config)
    cameras = pipeline.datamanager.train_dataset.cameras.to(pipeline.device)
    frames = []
    with torch.no_grad():
        for index in range(0, len(cameras), every):
            rgb = pipeline.model.get_outputs_for_camera(cameras[index : index + 1])["rgb"]
            frames.append((rgb.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
    return frames


def before_after(
    base_config: Path, edit_config: Path, output_dir: Path, columns: int = 4, every: int = 1
) -> dict[str, Path]:
    """Write ``before_after.png`` (base row over edited row) and ``turntable.gif`` (side by side), from
    every ``every``-th training camera."""
    output_dir.mkdir(parents=True, exist_ok=True)
    before, after = render_views(base_config, every), render_views(edit_config, every)
    picks = np.linspace(0, len(before) - 1, columns).round().astype(int)
    strip = np.concatenate(
        [np.concatenate([before[i] for i in picks], 1), np.concatenate([after[i] for i in picks], 1)], 0
    )
    paths = {"strip": output_dir / "before_after.png", "gif": output_dir / "turntable.gif"}
    Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST).save(
        paths["strip"]
    )
    frames = [Image.fromarray(np.concatenate([b, a], 1)) for b, a in zip(before, after, strict=True)]
    frames = [f.resize((f.width * 2, f.height * 2), Image.NEAREST) for f in frames]
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=120 * every, loop=0)
    return paths
