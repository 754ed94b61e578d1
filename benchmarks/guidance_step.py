"""Cost of one guidance step (SDS, SDI, DDS, PDS, VSD) relative to its floor, measured in the same run.

The floor is the work no implementation can skip:

- ONE batched prior evaluation of the branches the method needs (``prior._eps`` under no_grad on
  2·B rows for SDS and SDI, 4·B rows for DDS and PDS: conditional + unconditional per group);
- ONE encoder forward and backward on the same images (VAE encode with grad w.r.t. the images, then
  backward of a scalar); none for the exact prior, whose encoder is the identity;
- VSD: 3·B rows (pretrained unconditional and conditional, LoRA) of the UNet with its adapters switched
  off, plus ONE UNet forward and backward on B rows with the LoRA on (its training loss; the gradient
  reaches the adapters). VSD runs on its own copy of the prior with the camera LoRA added (SD only).

A step of ours is: images (requires_grad) → ``prior.encode`` → guidance function (source latents
encoded once, outside the timed loop) → ``out.loss.backward()``. SDI does ``--inversion-steps`` + 1
prior evaluations, so its goal is ratio ≤ 1.05 · (K + 1); the others aim at ratio ≤ 1.05.

The floor runs as one call in the order a step needs (encoder forward, evaluation, encoder backward);
its two parts are also timed alone, for information (their sum runs a little above the joint call).

Timing: ``--warmup`` untimed rounds, then ``--repeats`` rounds that each time the floor, our step and the
floor's two parts once, in a rotating order (so slow drifts of a noisy machine hit all alike); on CUDA
each timed call is synchronised. Reported: median times, and ``ratio`` = the median over rounds of
step / floor of the same round (``ratio_of_medians`` too). On CPU the default is one torch thread: with
two threads on a busy 2-core machine, waits for a descheduled worker dominate.
``--clock process`` times CPU seconds of the process instead of wall time (CPU only; immune to time
stolen by other processes, not to their cache and memory-bandwidth pressure).

Peak memory of one step (and of one floor, for comparison), after the timing:
- CUDA: ``torch.cuda.max_memory_allocated`` reset before the call (absolute, weights included; "delta"
  is the growth over what was allocated just before the call).
- CPU (Linux): peak resident set size of the whole process during the call, read as ``VmHWM`` from
  ``/proc/self/status`` after glibc ``malloc_trim(0)`` (so freed heap pages must be faulted in again)
  and a reset through ``/proc/self/clear_refs``; "delta" is its growth over ``VmRSS`` just before. It
  counts pages touched, not tensor bytes: an approximation, good for comparing step and floor.
  Elsewhere: ``ru_maxrss``, the process's lifetime high-water mark (monotonic; labelled as such).

Sizes (random weights, built from configs in memory, wrapped with ``StableDiffusionPrior.from_components``):
- ``tiny`` (default, CPU): UNet (64, 128, 256) with one layer per block, VAE (32, 64, 64, 64) with factor 8,
  at 128 px (latents 4 x 16 x 16): there the VAE encoder forward + backward costs roughly 65 % of a
  batch-4 UNet forward (about 70 % where the published PDS code was measured at 1.14 x its floor).
  Smaller UNets at 64 px are bound by per-op overhead (batch 2 costs as much as batch 4).
- ``sd15``: SD 1.5's UNet, VAE and a 768-wide CLIP text encoder, for a GPU at 512 px in fp16.
- ``--prior exact``: the closed-form ExactPrior over 64 random 3 × R × R images (floor = evaluation).

    python benchmarks/guidance_step.py                        # tiny, CPU, table
    python benchmarks/guidance_step.py --size sd15 --resolution 512 --device cuda --json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.tiny_sd (the offline CLIP tokenizer) when run as a script
    sys.path.insert(0, str(ROOT))

from nerfstudio_distill.guidance import dds, pds, sdi, sds, vsd  # noqa: E402
from nerfstudio_distill.priors import ExactPrior, Prior, StableDiffusionPrior  # noqa: E402
from nerfstudio_distill.priors.base import Condition  # noqa: E402
from nerfstudio_distill.priors.lora import LoraSpec, lora_disabled  # noqa: E402

METHODS = ("sds", "sdi", "dds", "pds")
"""The methods of the GPU suite (benchmarks/gpu_suite.py)."""
ALL_METHODS = (*METHODS, "vsd")
"""What ``--methods`` may name (and runs by default)."""
BRANCHES = {"sds": 2, "sdi": 2, "dds": 4, "pds": 4, "vsd": 3}
"""Rows per image of the ONE evaluation in each method's floor (cond + uncond per group)."""
PROMPT, PROMPT_SRC = "a photo of a dog", "a photo of a cat"
GUIDANCE_SCALE = 7.5  # != 1, so every prior runs the unconditional branch too
TOLERANCE = 1.05


# ------------------------------------------------------------------------------------------- priors
def build_sd(size: str, device: torch.device, dtype: str, seed: int) -> StableDiffusionPrior:
    """A random SD-shaped prior built from configs (no files, no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_sd import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer(tmp)  # a valid CLIP BPE tokenizer (~540 tokens), offline
    if size == "sd15":
        unet_kw = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64)
        unet_kw.update(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
        unet_kw.update(up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    else:
        unet_kw = dict(block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=16)
        unet_kw.update(down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",))
        unet_kw.update(up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
        vae_kw = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise the weights where they will run (fast for sd15 on a GPU)
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=text["hidden_size"],
            attention_head_dim=8,
            **unet_kw,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            scaling_factor=0.18215,
            **vae_kw,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text,
            )
        )
    dt = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype)
    if dt == torch.float16 or (dt is None and device.type == "cuda"):
        # nn.Module.half: no diffusers cast warning, and from_components then has nothing to cast
        unet.half()
        vae.half()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return StableDiffusionPrior.from_components(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        device=str(device),
        dtype=dtype,
        guidance_scale=GUIDANCE_SCALE,
    )


def build_exact(resolution: int, device: torch.device, dtype: str, seed: int) -> ExactPrior:
    """ExactPrior over 64 random 3 x R x R images, half labelled PROMPT, half PROMPT_SRC."""
    if dtype == "fp16":
        raise SystemExit("--prior exact runs in float64 (auto) or float32 (--dtype fp32), not fp16")
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(64, 3, resolution, resolution, generator=g)
    labels = [PROMPT, PROMPT_SRC] * 32
    prior = ExactPrior(
        points,
        labels,
        guidance_scale=GUIDANCE_SCALE,
        dtype=torch.float32 if dtype == "fp32" else torch.float64,
    )
    return prior.to(device)


# ------------------------------------------------------------------------------------- the calls
def floor_calls(prior: Prior, images: torch.Tensor, branches: int) -> tuple[Callable, Callable | None]:
    """(one prior evaluation of ``branches`` x B rows, one encoder forward + backward or None).

    ``encoder(between)`` runs ``between`` after its forward and before its backward: ``encoder(evaluate)``
    is the whole floor in the order a step needs it (the backward can only come after the evaluation).
    """
    with torch.no_grad():
        latents = prior.encode(images)
    dtype = getattr(prior, "dtype", torch.float32)
    x_in = torch.randn(branches * latents.shape[0], *latents.shape[1:], device=prior.device).to(dtype)
    t = torch.full((x_in.shape[0],), 500, dtype=torch.long, device=prior.device)
    prompts = [PROMPT, PROMPT_SRC][: branches // 2] + [""] * (branches // 2) + [PROMPT] * (branches % 2)
    conds = [c for c in prior.embed(prompts) for _ in range(latents.shape[0])]

    def evaluate() -> None:
        with torch.no_grad():
            prior._eps(x_in, t, conds)

    if getattr(prior, "camera_lora", None) is not None:  # VSD: the bare UNet, and the LoRA's training call
        unet, text = prior.unet, torch.cat(conds[: latents.shape[0]])
        x_train, t_train = x_in[: latents.shape[0]], t[: latents.shape[0]]

        def evaluate() -> None:
            with torch.no_grad(), lora_disabled(unet):
                unet(x_in, t, encoder_hidden_states=torch.cat(conds))
            unet(x_train, t_train, encoder_hidden_states=text).sample.float().square().mean().backward()

    if not isinstance(prior, StableDiffusionPrior):
        return evaluate, None
    vae = prior.vae

    def encoder(between: Callable | None = None) -> None:
        leaf = images.detach().requires_grad_(True)
        x = prior._memory_format(leaf.to(prior.dtype) * 2 - 1)
        latents = vae.encode(x).latent_dist.mean
        if between is not None:  # e.g. the evaluation, while the encoder's graph is alive
            between()
        latents.sum().backward()

    return evaluate, encoder


def step_call(prior: Prior, method: str, images: torch.Tensor, sources: torch.Tensor, steps: int) -> Callable:
    """Our full step: encode with grad, the guidance function, backward of its loss."""
    with torch.no_grad():
        x0_src = prior.encode(sources)  # cached source latents (DDS, PDS)
    cameras = torch.randn(images.shape[0], 12, generator=torch.Generator().manual_seed(0)).to(images.device)

    def step() -> None:
        x0 = prior.encode(images.detach().requires_grad_(True))
        if method == "sds":
            out = sds(prior, x0, PROMPT)
        elif method == "sdi":
            out = sdi(prior, x0, PROMPT, num_inversion_steps=steps)
        elif method == "dds":
            out = dds(prior, x0, x0_src, PROMPT, PROMPT_SRC)
        elif method == "pds":
            out = pds(prior, x0, x0_src, PROMPT, PROMPT_SRC)
        else:  # the gradient and the LoRA's loss, backpropagated together as the trainer does
            out = vsd(prior, x0, Condition(PROMPT, camera=cameras))
            out.loss = out.loss + out.train_loss
        out.loss.backward()

    return step


# ---------------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
"""``process``: CPU seconds of this process (all its threads), blind to time lost to other processes."""


def time_interleaved(
    calls: dict[str, Callable], warmup: int, repeats: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds of each call per timed round; every round runs all calls once, in a rotating order."""
    now = CLOCKS[clock]
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start = now()
            calls[name]()
            _sync(device)
            if r >= warmup:
                samples[name].append((now() - start) * 1e3)
    return samples


def _proc_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: return free heap memory to the OS (no-op where unavailable)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated during one call (absolute, weights included)"
    if os.access("/proc/self/clear_refs", os.W_OK):
        return "CPU peak RSS of the process during one call (malloc_trim, then VmHWM reset via clear_refs)"
    return "CPU ru_maxrss: lifetime high-water mark of the process (monotonic, NOT per call)"


def peak_memory(call: Callable, device: torch.device) -> tuple[float, float]:
    """(peak MB, growth MB over the memory in use just before) of one call; see the module docstring."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / 2**20, (peak - before) / 2**20
    if os.access("/proc/self/clear_refs", os.W_OK):
        _malloc_trim()  # hand freed heap pages back, so the call's allocations show up as RSS growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _proc_kb("VmRSS")
        call()
        peak = _proc_kb("VmHWM")
        return peak / 1024, (peak - before) / 1024
    unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / unit, (peak - before) / unit


# ------------------------------------------------------------------------------------------- main
def measure(
    prior: Prior,
    method: str,
    images: torch.Tensor,
    sources: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Median times of the floor's parts and of our step, their ratio, and peak memory, for one method."""
    evaluate, encoder = floor_calls(prior, images, BRANCHES[method])
    step = step_call(prior, method, images, sources, args.inversion_steps)
    floor = (lambda: encoder(evaluate)) if encoder else evaluate  # encoder forward, evaluation, backward
    calls = {"floor": floor, "step": step} | ({"eval": evaluate, "encoder": encoder} if encoder else {})
    samples = time_interleaved(calls, args.warmup, args.repeats, device, args.clock)
    ms = {name: statistics.median(values) for name, values in samples.items()}
    # Per-round ratios: step and floor measured within a second of each other, so slow drifts cancel.
    ratio = statistics.median(a / b for a, b in zip(samples["step"], samples["floor"], strict=True))
    peak, delta = peak_memory(step, device)
    floor_peak, floor_delta = peak_memory(floor, device)
    evals = args.inversion_steps + 1 if method == "sdi" else 1
    return {
        "ratio": ratio,
        "ms": ms["step"],
        "floor_ms": ms["floor"],
        "ratio_of_medians": ms["step"] / ms["floor"],
        "peak_mb": peak,
        "evals": evals,
        "ratio_per_eval": ratio / evals,
        "goal": TOLERANCE * evals,
        "floor_eval_ms": ms.get("eval", ms["floor"]),
        "floor_encoder_ms": ms.get("encoder", 0.0),
        "peak_delta_mb": delta,
        "floor_peak_mb": floor_peak,
        "floor_peak_delta_mb": floor_delta,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", choices=("sd", "exact"), default="sd")
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny", help="SD-shaped prior size")
    parser.add_argument(
        "--resolution", type=int, default=None, help="px (default: tiny 128, sd15 512, exact 64)"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per step (B)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16"), default="auto")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--methods", default=",".join(ALL_METHODS), help="comma-separated subset of sds,sdi,dds,pds,vsd"
    )
    parser.add_argument("--inversion-steps", type=int, default=10, help="SDI's K")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per method")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: 1 on CPU, steadier on a shared machine; 0: torch default)",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or CPU time of the process (CPU only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; use a comma-separated subset of {','.join(ALL_METHODS)}")
    if "vsd" in methods and args.prior == "exact":
        parser.error("--methods vsd trains a LoRA of Stable Diffusion's UNet: drop it with --prior exact")
    args.methods = methods
    if args.clock == "process" and (args.device or "cpu").startswith("cuda"):
        parser.error("--clock process measures CPU time: use it with --device cpu")
    if args.resolution is None:
        args.resolution = (
            512 if args.size == "sd15" and args.prior == "sd" else 128 if args.prior == "sd" else 64
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table (or, with ``--json``, one JSON line) and return the results.

    Leaves the caller's torch thread count and global RNG state as they were (callable from tests).
    """
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    try:
        if args.threads or (args.threads is None and device.type == "cpu"):
            torch.set_num_threads(args.threads or 1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            report = run(args, device)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return report


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if args.prior == "exact":
        prior: Prior = build_exact(args.resolution, device, args.dtype, args.seed)
    else:
        prior = build_sd(args.size, device, args.dtype, args.seed)
    shape = (args.batch, 3, args.resolution, args.resolution)
    images, sources = torch.rand(shape, device=device), torch.rand(shape, device=device)
    prior.embed([PROMPT, PROMPT_SRC, ""])  # text embeddings are cached: not part of any step
    results = {}
    for m in args.methods:
        if m == "vsd":  # a copy with the camera LoRA, which would slow the other methods' calls
            vsd_prior = build_sd(args.size, device, args.dtype, args.seed)
            vsd_prior.add_camera_lora(LoraSpec(rank=4))
            vsd_prior.embed([PROMPT, PROMPT_SRC, ""])
            results[m] = measure(vsd_prior, m, images, sources, args, device)
        else:
            results[m] = measure(prior, m, images, sources, args, device)
    settings = {
        "prior": args.prior,
        "size": args.size if args.prior == "sd" else None,
        "resolution": args.resolution,
        "batch": args.batch,
        "dtype": str(getattr(prior, "dtype", None) or prior.points.dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "inversion_steps": args.inversion_steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "clock": args.clock,
        "guidance_scale": GUIDANCE_SCALE,
        "memory": memory_label(device),
        "torch": torch.__version__,
    }
    return {"methods": results, "settings": settings}


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"{s['prior']} {s['size'] or ''} {s['resolution']}px B={s['batch']} {s['dtype']} on "
        f"{s['device_name']} ({s['threads']} threads), {s['clock']} clock, median of {s['repeats']} rounds "
        f"after {s['warmup']} warm-up"
    )
    head = ("method", "evals", "step ms", "floor ms", "(eval", "encoder)", "ratio", "/evals", "goal")
    head += ("peak MB", "+step", "+floor")
    row = "{:<7}{:>6}{:>10}{:>10}{:>9}{:>10}{:>8}{:>8}{:>7}{:>9}{:>7}{:>7}"
    print(row.format(*head))
    for name, r in report["methods"].items():
        print(
            row.format(
                name,
                r["evals"],
                f"{r['ms']:.1f}",
                f"{r['floor_ms']:.1f}",
                f"{r['floor_eval_ms']:.1f}",
                f"{r['floor_encoder_ms']:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['ratio_per_eval']:.3f}",
                f"{r['goal']:.2f}",
                f"{r['peak_mb']:.0f}",
                f"{r['peak_delta_mb']:.0f}",
                f"{r['floor_peak_delta_mb']:.0f}",
            )
            + ("" if r["ratio"] <= r["goal"] else "  over goal")
        )
    print(
        f"ratio = median over rounds of step / floor; goal = {TOLERANCE} x evals; (eval encoder) = floor parts."
    )
    print(f"Peak memory: {s['memory']};")
    print("+step / +floor: its growth during one step / one floor.")


if __name__ == "__main__":
    main()
