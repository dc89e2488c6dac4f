"""Latent DiT training from extracted latents vs encoding every batch on the fly, in the same run.

    python benchmarks/latent_cache.py                  # digits preset + ImageNet-shaped rows (a few minutes)
    python benchmarks/latent_cache.py --rows digits    # the digits row only

Both paths run the diffusion task's own training step (genvis/training/tasks/diffusion.py: draw, loss,
backward, AdamW step) under the precision training would use here; they differ only in where x0 comes
from: `tokenizer.encode(images)` every step (tokenizer.path=VAE on an image dataset) or the stored latents
(data.name=latents, what `genvis tokenizer extract` writes). Data loading is left out of both (in-memory
tensors), so the ratio is the encoder's share of a step and is a lower bound for image files that must
also be decoded from disk. Weights are random: the speed does not depend on them. Timing rounds of the two
paths are interleaved and the best of each is kept.

Rows: digits (configs/digits/dit_vae.yaml's DiT-tiny/2 on configs/digits/vae.yaml's VAE architecture,
1x16x16 -> 4x8x8, batch 128), and the ImageNet shape (SD-VAE's architecture, 3x256x256 -> 4x32x32, with
DiT-S/2 and DiT-B/2, batch 8).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from genvis.config import load_config
from genvis.precision import autocast, resolve_precision
from genvis.tokenizers.kl import KLTokenizer
from genvis.training.tasks import DataInfo
from genvis.training.tasks.diffusion import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]


def make_step(cfg, data: DataInfo, precision: str):
    """One training step of the diffusion task for (images or latents, labels) -> seconds."""
    task = DiffusionTask(cfg)
    torch.manual_seed(0)
    modules = task.build(data)
    model = modules["model"].train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")

    def step(x, labels, i):
        draws = task.draw(len(x), torch.Generator().manual_seed(i))
        with autocast(device, precision):
            loss = task.losses(modules, [x, labels], draws, i)["model"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, task


def measure(name, cfg_path, overrides, vae_section, image_shape, batch, steps, rounds, precision):
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = Path(tmp) / "vae"
        torch.manual_seed(0)
        KLTokenizer.from_config(vae_section, image_shape).save_pretrained(vae_dir)
        on_the_fly_cfg = load_config(cfg_path, [f"output_dir={tmp}/run", f"tokenizer.path={vae_dir}", *overrides,
                                                "data.name=digits", "data.path=null"])
        images = torch.rand(batch, *image_shape) * 2 - 1
        labels = torch.randint(0, 10, (batch,))
        fly, task = make_step(on_the_fly_cfg, DataInfo(10, image_shape), precision)
        latent_shape = task.sample_shape
        cached_cfg = load_config(cfg_path, [f"output_dir={tmp}/run", *overrides])
        cached, _ = make_step(cached_cfg, DataInfo(10, latent_shape, encoded_by=str(vae_dir)), precision)
        with torch.no_grad():
            latents = task.tokenizer.encode(images)
        best = {"cached": float("inf"), "on the fly": float("inf")}
        for r in range(rounds + 1):  # round 0 warms up
            for label, step, x in (("cached", cached, latents), ("on the fly", fly, images)):
                t0 = time.perf_counter()
                for i in range(steps):
                    step(x, labels, i)
                if r:
                    best[label] = min(best[label], (time.perf_counter() - t0) / steps)
    rate = {k: batch / v for k, v in best.items()}
    print(f"| {name} | {batch} | {rate['cached']:.1f} | {rate['on the fly']:.1f} | {rate['cached'] / rate['on the fly']:.2f}x |",
          flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="digits,imagenet-S,imagenet-B", help="comma-separated: digits, imagenet-S, imagenet-B")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    precision = resolve_precision("auto", torch.device("cpu"))
    print(f"precision {precision}, {torch.get_num_threads()} threads\n")
    print("| DiT / VAE | batch | img/s from latents | img/s encoding on the fly | ratio |")
    print("|---|---|---|---|---|")
    vae_digits = load_config(str(ROOT / "configs" / "digits" / "vae.yaml"), ["output_dir=x"]).tokenizer
    vae_sd = load_config(str(ROOT / "configs" / "imagenet256" / "vae-f8.yaml"), ["output_dir=x"]).tokenizer
    dit_vae = str(ROOT / "configs" / "digits" / "dit_vae.yaml")
    rows = {
        "digits": ("DiT-tiny/2 on the digits VAE (1x16x16 -> 4x8x8)", dit_vae, [], vae_digits, (1, 16, 16), 128, 10),
        "imagenet-S": ("DiT-S/2 on SD-VAE's architecture (3x256x256 -> 4x32x32)", dit_vae,
                       ["model.size=S", "model.depth=null", "model.hidden_size=null", "model.num_heads=null"], vae_sd,
                       (3, 256, 256), 8, 2),
        "imagenet-B": ("DiT-B/2 on SD-VAE's architecture", dit_vae, ["model.size=B"], vae_sd, (3, 256, 256), 8, 2),
    }
    for key in args.rows.split(","):
        name, cfg_path, overrides, vae, shape, batch, steps = rows[key]
        measure(name, cfg_path, overrides, vae, shape, batch, steps, args.rounds, precision)


if __name__ == "__main__":
    main()
