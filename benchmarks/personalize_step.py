"""Time of one ns-distill-personalize step (DreamBooth-LoRA), measured on random SD-shaped networks.

A step is :func:`nerfstudio_distill.scripts.personalize.train_step` itself: crop, VAE encode (no grad), text
encoder, UNet forward and backward through the LoRA adapters, gradient clipping, AdamW. Three variants:
``unet`` (the default: UNet adapters, batch 1), ``text-encoder`` (--train-text-encoder) and ``prior`` (prior
preservation: one class image per step too, so the UNet runs at batch 2).

Sizes (random weights, nothing downloaded):
- ``tiny16``: the tests' tiny SD (tests/tiny_sd.py) at 16 px (latents 8 x 8);
- ``tiny``: the SD-shaped networks of benchmarks/guidance_step.py at 128 px (latents 16 x 16);
- ``sd15``: SD 1.5's UNet/VAE/text-encoder shapes, for a GPU at 512 px in fp16 (``--device cuda``).

    python benchmarks/personalize_step.py                      # tiny16 and tiny, CPU, 1 thread
    python benchmarks/personalize_step.py --sizes sd15 --device cuda --resolution 512

Reported: median seconds per step over ``--repeats`` steps after ``--warmup`` untimed ones, and the number
of trained parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):  # guidance_step (this folder), tests.tiny_sd (the repository)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from nerfstudio_distill.priors import StableDiffusionPrior  # noqa: E402
from nerfstudio_distill.priors.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraSpec, add_lora  # noqa: E402
from nerfstudio_distill.scripts.personalize import PersonalizeArgs, train_step  # noqa: E402

VARIANTS = ("unet", "text-encoder", "prior")
DEFAULT_RESOLUTION = {"tiny16": 16, "tiny": 128, "sd15": 512}


def build(size: str, device: torch.device, dtype: str) -> StableDiffusionPrior:
    """A random prior of ``size`` (see the module docstring)."""
    if size == "tiny16":
        from tests.tiny_sd import tiny_components

        return StableDiffusionPrior.from_components(**tiny_components(), device=str(device), dtype=dtype)
    from guidance_step import build_sd

    return build_sd(size, device, dtype, seed=0)


def measure(size: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    prior = build(size, device, args.dtype)
    resolution = args.resolution or DEFAULT_RESOLUTION[size]
    options = PersonalizeArgs(
        data=Path("."),
        prompt="a photo of a sks dog",
        resolution=resolution,
        train_text_encoder=variant == "text-encoder",
        class_prompt="a photo of a dog" if variant == "prior" else "",
    )
    params = add_lora(prior.unet, LoraSpec(options.rank, None, UNET_TARGETS), seed=0)
    if options.train_text_encoder:
        params += add_lora(prior.text_encoder, LoraSpec(options.rank, None, TEXT_ENCODER_TARGETS), seed=1)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, resolution, resolution + 8), generator=generator, dtype=torch.uint8)]
    class_images = list(images) if variant == "prior" else []
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=prior.dtype == torch.float16)

    def step() -> None:
        train_step(prior, options, images, class_images, generator, params, optimizer, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "size": size,
        "variant": variant,
        "resolution": resolution,
        "device": str(device),
        "dtype": str(prior.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "trained_parameters": sum(p.numel() for p in params),
        "median_s_per_step": statistics.median(times),
        "min_s_per_step": min(times),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny16", "tiny"], choices=list(DEFAULT_RESOLUTION))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--resolution", type=int, default=None, help="crop side in px (default: per size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (1: steady on a busy machine)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = [measure(size, variant, args) for size in args.sizes for variant in args.variants]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| size | px | variant | trained parameters | s/step (median) | device, threads |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['resolution']} | {r['variant']} | {r['trained_parameters']:,} | "
                  f"{r['median_s_per_step']:.4f} | {r['device']} {r['dtype']}, {r['threads']} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
