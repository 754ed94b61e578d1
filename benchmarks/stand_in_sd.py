"""Train a small Stable Diffusion on an exact-prior image set: a "pretrained" network prior for scored CPU runs.

No real Stable Diffusion weights can be downloaded here, and the exact prior (a closed-form denoiser) has no
network that a LoRA could adapt, so VSD cannot be scored with either. This script makes the stand-in that the
text-to-3D benchmark's ``--prior sd`` uses: a diffusers Stable Diffusion folder (``model_index.json``,
``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, as ``save_pretrained`` writes it) whose networks have
learned the images of an exact-prior set (``exact_prior.json`` and one PNG folder per prompt):

1. the VAE (factor 2: 32 px images, 4 x 16 x 16 latents) trains as an autoencoder on the images (L2 on the
   decoded posterior mean, a small KL), and its ``scaling_factor`` is set to 1 / std of the latents;
2. the UNet (the tests' tiny layout: two levels, 0.8 M parameters; about 0.25 s a step of 32 rows on 2 CPU
   threads) trains with the DDPM loss (ε-prediction, t ~ U[0, T), the scheduler of SD 1.5) on the latents of
   the images, conditioned on their prompts through a frozen random tiny CLIP text encoder, with the empty
   prompt for 10 % of the rows so that classifier-free guidance works.

The networks start as the tests' tiny random SD (``tests/tiny_sd.py``); its tokenizer, text encoder and
scheduler stay as they are. The report (``stand_in.json`` in the folder) gives each stage's first and final
loss, the VAE's reconstruction PSNR and the UNet's one-step denoising PSNR at a few t, beside the exact
prior's on the same noisy inputs (how close the stand-in is to the set's optimal denoiser).

``python benchmarks/stand_in_sd.py PRIOR_SET OUT [--unet-steps N] [--vae-steps N]``; ``--json`` prints the
report as one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.tiny_sd (the offline CLIP tokenizer and tiny text encoder)
    sys.path.insert(0, str(ROOT))

from nerfstudio_distill.priors.config import ExactPriorConfig  # noqa: E402

STAND_IN_FILE = "stand_in.json"
"""The training report, written into the model folder (its presence marks a finished stand-in)."""


def load_set(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Images ``N x 3 x H x W`` in [0, 1] of an exact-prior set and the prompt of each."""
    images, prompts = [], []
    for prompt, sub in ExactPriorConfig(folder=folder).folders().items():
        for png in sorted(sub.glob("*.png")):
            images.append(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255)
            prompts.append(prompt)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), prompts


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of images in [0, 1]."""
    return 10 * math.log10(1 / max(float((a.clamp(0, 1) - b).pow(2).mean()), 1e-10))


def train_vae(
    vae, images: torch.Tensor, steps: int, batch: int, lr: float, log
) -> tuple[dict[str, float], torch.Tensor]:
    """Autoencoder training of ``vae`` on ``images``; sets its scaling factor; returns its figures and the
    scaled latents of ``images`` (posterior means times that factor), which the UNet trains on."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    x = images * 2 - 1
    vae.train()
    first = None
    for step in range(steps):
        xb = x[torch.randint(0, len(x), (batch,))]
        posterior = vae.encode(xb).latent_dist
        recon = vae.decode(posterior.mean).sample
        loss = (recon - xb).pow(2).mean() + 1e-6 * posterior.kl().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step:5d} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
        recon = torch.cat([vae.decode(z[i : i + 64]).sample for i in range(0, len(z), 64)])
    scale = 1.0 / float(z.std())
    vae.register_to_config(scaling_factor=scale)
    report = {
        "vae_loss_first": first,
        "vae_loss": loss.item(),
        "vae_psnr": psnr((recon + 1) / 2, images),
        "scaling_factor": scale,
    }
    return report, z * scale


def train_unet(
    unet, latents, embeddings, null, alphas_cumprod, steps: int, batch: int, lr: float, log, seed: int
) -> dict[str, float]:
    """DDPM (ε) training of ``unet`` on ``latents`` with their text ``embeddings`` (``null`` for 10 %)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    unet.train()
    window = max(1, min(100, steps // 4))
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0, cond = latents[idx], embeddings[idx].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = null
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(x_t, t, encoder_hidden_states=cond).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"unet {step:5d} loss {np.mean(losses[-window:]):.5f}")
    unet.eval().requires_grad_(False)
    # means over the first and the last `window` steps (each row at its own random t and noise)
    return {"unet_loss_first": float(np.mean(losses[:window])), "unet_loss": float(np.mean(losses[-window:]))}


@torch.no_grad()
def denoising_psnr(
    folder: Path, model: Path, fractions=(0.05, 0.2, 0.5), count: int = 64
) -> dict[str, float]:
    """One-step x̂0 PSNR (decoded, against the clean image) of the stand-in and of the exact prior of the
    set, on the same ``count`` images of the set noised at each fraction of T (the same noise)."""
    from nerfstudio_distill.guidance.common import add_noise, predict_x0
    from nerfstudio_distill.priors.base import Condition
    from nerfstudio_distill.priors.stable_diffusion import StableDiffusionPrior

    images, prompts = load_set(folder)
    pick = torch.linspace(0, len(images) - 1, count).long()
    images, prompts = images[pick], [prompts[i] for i in pick]
    out = {}
    for name, prior in (
        ("stand_in", StableDiffusionPrior(model=str(model), device="cpu", dtype="fp32")),
        ("exact", ExactPriorConfig(folder=folder).setup("cpu")),
    ):
        gen = torch.Generator().manual_seed(0)
        x0 = prior.encode(images)
        for f in fractions:
            t = torch.full((count,), int(f * prior.num_train_timesteps))
            x_t = add_noise(prior.alphas_cumprod, x0, torch.randn(x0.shape, generator=gen), t)
            eps = torch.cat(  # one group (the image's prompt) of one row per call, CFG off
                [
                    prior.predict_noise(x_t[None, i : i + 1], t[i : i + 1], [Condition(p)], 1.0)[0]
                    for i, p in enumerate(prompts)
                ]
            )
            out[f"{name}_psnr_t{f}"] = psnr(
                prior.decode(predict_x0(prior.alphas_cumprod, x_t, eps, t)), images
            )
    return out


def train_stand_in(
    prior_set: Path,
    out: Path,
    unet_steps: int = 3000,
    vae_steps: int = 600,
    batch: int = 32,
    seed: int = 0,
    log=print,
) -> Path:
    """Write the stand-in SD folder ``out`` for the exact-prior set ``prior_set``; returns ``out``.

    A folder that already holds a finished stand-in (:data:`STAND_IN_FILE`) for the same set and settings
    is reused as it is.
    """
    from diffusers import StableDiffusionPipeline

    from tests.tiny_sd import save_tiny, tiny_components

    settings = {
        "prior_set": str(Path(prior_set).resolve()),
        "unet_steps": unet_steps,
        "vae_steps": vae_steps,
        "batch": batch,
        "seed": seed,
    }
    record = Path(out) / STAND_IN_FILE
    if record.exists() and json.loads(record.read_text()).get("settings") == settings:
        return Path(out)
    start = time.perf_counter()
    images, prompts = load_set(Path(prior_set))
    parts = tiny_components(seed=seed)
    vae, text_encoder, tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
    torch.manual_seed(seed)
    report, latents = train_vae(vae, images, vae_steps, batch, 1e-3, log)
    with torch.no_grad():
        names = sorted(set(prompts)) + [""]
        tokens = tokenizer(names, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        table = dict(zip(names, text_encoder(tokens.input_ids)[0], strict=True))
    embeddings = torch.stack([table[p] for p in prompts])
    report |= train_unet(
        parts["unet"],
        latents,
        embeddings,
        table[""],
        parts["scheduler"].alphas_cumprod,
        unet_steps,
        batch,
        1e-3,
        log,
        seed,
    )
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    save_tiny(pipe, out)
    report["seconds"] = time.perf_counter() - start
    report |= denoising_psnr(Path(prior_set), Path(out))
    record.write_text(json.dumps({"settings": settings, "report": report}, indent=2))
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior_set", type=Path, help="exact-prior image set (a folder with exact_prior.json)")
    parser.add_argument("out", type=Path, help="where to write the Stable Diffusion folder")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object last")
    args = parser.parse_args()
    folder = train_stand_in(args.prior_set, args.out, args.unet_steps, args.vae_steps, args.batch, args.seed)
    report = json.loads((folder / STAND_IN_FILE).read_text())["report"]
    for key, value in report.items():
        print(f"{key:24s} {value:.4f}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
