"""Generation speed of the generator families, measured in one run.

    python benchmarks/generation_speed.py [--num 1000] [--imagenet-batch 8] [--device cpu] [--skip-digits]
        [--skip-var] [--skip-titok] [--dit-batch 2]

1. ImageNet-256 shapes, random weights: VAR-d16 (width 1024, 16 heads, 4,096 codes of dim 32, the 10 scales
   1..16 = 680 tokens, 1,000 classes) decoding with guidance (two half-batches), top-k 900, top-p 0.96: the KV
   cache against recomputing the whole prefix at every scale, the same draws (ids compared), best of 2.
   Also the matmul FLOP ratio of the two (VAR.flops_per_image), which bounds what the cache can save.
2. ImageNet-256 shapes, random weights: TiTok-L-32 + MaskGIT (the released two-stage L-32 tokenizer: ViT-L
   decoder, 1,024 proxy codes, MaskGIT-VQGAN pixel decoder; the L-32 generator: BERT 24 x 768, 16 heads) with
   TiTok's FID sampling (8 steps, guidance 4.5 growing linearly = cfg 5.5, temperature 9.5, softmax annealing)
   against DiT-XL/2 (4x32x32 latents, learned sigma) with 50 DDIM steps and guidance 4 (its sample.py), both
   decoded to 256x256 images (DiT through an SD-VAE-shaped AutoencoderKL); best of 2 for TiTok, one DiT run.
3. Digits, the trained presets at the quality each reaches (fd and class accuracy of --num class-balanced
   samples, digits features): DiT (configs/digits/dit.yaml, its demo sampler: euler, 50 steps, cfg 2) and VAR
   (configs/digits/var.yaml, its run's sample: defaults) with and without the KV cache, and TiTok + MaskGIT
   (configs/digits/maskgit_titok.yaml, 8 steps); images/s including decoding. Runs missing under runs/ are
   trained first (DiT: 2.5 min; VAR: the msvq tokenizer, its ids and the VAR: about 15 min; MaskGIT: the
   TiTok, its ids and the MaskGIT, on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import torch

from genvis.generate import class_labels, generate, sample_generators
from genvis.models import load_model
from genvis.models.var import VAR, VAR_SCALES, var_config
from genvis.samplers.tokens import decode_var
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.multiscale_vq import MultiScaleQuantizer


def best_of(n, fn):
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def imagenet_rows(batch: int, device: str) -> None:
    torch.manual_seed(0)
    model = VAR(**var_config(16), vocab_size=4096, token_dim=32, scales=VAR_SCALES, num_classes=1000).to(device).eval()
    model.initialize_weights(init_adaln_gamma=0.5, init_head=1.0)  # non-trivial logits for the filtering
    quantizer = MultiScaleQuantizer(4096, 32, VAR_SCALES).to(device)
    labels = torch.arange(batch, device=device) * 7 % 1000
    dtype = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16

    def run(cache: bool):
        gens = sample_generators(0, range(batch))
        return decode_var(model, labels, quantizer=quantizer, generators=gens, cfg=2.5, top_k=900, top_p=0.96, kv_cache=cache,
                          autocast=lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype))

    run(True)  # warm-up
    with torch.no_grad():
        cached, ids_cached = best_of(2, lambda: run(True))
        full, ids_full = best_of(2, lambda: run(False))
    agree = (ids_cached == ids_full).float().mean().item()
    flops = model.flops_per_image(kv_cache=False) / model.flops_per_image(kv_cache=True)
    print(f"\nVAR-d16 ({model.num_params() / 1e6:.1f}M parameters), 10 scales / 680 tokens, batch {batch} x 2 (guidance), "
          f"{dtype}, {device}\n")
    print("| decoding | s / batch | images / s | speed-up | matmul FLOPs vs cache |")
    print("|---|---|---|---|---|")
    print(f"| KV cache | {cached:.2f} | {batch / cached:.2f} | {full / cached:.2f}x | 1.00 |")
    print(f"| whole prefix at every scale | {full:.2f} | {batch / full:.2f} | 1.00x | {flops:.2f} |")
    print(f"\nids equal between the two: {agree * 100:.2f}% (the same draws; bf16 rounding of different matmul shapes "
          "can move a logit)\n", flush=True)


def titok_imagenet_rows(batch: int, dit_batch: int, device: str) -> None:
    from diffusers import AutoencoderKL

    from genvis.models.dit import DiT, dit_config
    from genvis.models.maskgit import MaskGIT
    from genvis.samplers.options import DiffusionSampling, MaskGITSampling
    from genvis.tokenizers.kl import KLTokenizer
    from genvis.tokenizers.titok import TiTokTokenizer

    torch.manual_seed(0)
    precision = "bf16" if device == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    titok = TiTokTokenizer(image_size=256, num_latent_tokens=32, encoder_width=1024, encoder_depth=24, encoder_heads=16,
                           decoder_width=1024, decoder_depth=24, decoder_heads=16, codebook_size=4096, token_size=12,
                           decoder_head="proxy", legacy_latents=True).to(device).eval()
    maskgit = MaskGIT(vocab_size=4096, num_tokens=32, token_shape=(32,), num_classes=1000, hidden_size=768, depth=24,
                      num_heads=16, intermediate_size=3072).to(device).eval()
    dit = DiT(**dit_config("XL", 2, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)).to(device).eval()
    vae = KLTokenizer(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                    scaling_factor=0.18215)).to(device).eval()
    masked = MaskGITSampling(steps=8, temperature=9.5, cfg=5.5, cfg_schedule="linear", anneal_softmax=True)
    ddim = DiffusionSampling(sampler="ddim", steps=50, cfg=4.0)
    labels = torch.arange(max(batch, dit_batch)) * 7 % 1000

    def run(model, tokenizer, sampling, n):
        return generate(model, tokenizer, labels[:n], seed=0, sampling=sampling, batch_size=n, precision=precision)

    run(maskgit, titok, masked, 2)  # warm-up
    titok_s, images = best_of(2, lambda: run(maskgit, titok, masked, batch))
    assert images.shape == (batch, 3, 256, 256)
    dit_s, images = best_of(1, lambda: run(dit, vae, ddim, dit_batch))
    assert images.shape == (dit_batch, 3, 256, 256)
    rows = [("TiTok-L-32 + MaskGIT, 8 steps, cfg 5.5 (TiTok's 4.5)", sum(p.numel() for p in titok.parameters()) / 1e6 + maskgit.num_params() / 1e6,
             batch / titok_s),
            ("DiT-XL/2 + SD-VAE decoder, DDIM 50 steps, cfg 4", dit.num_params() / 1e6 + sum(p.numel() for p in vae.parameters()) / 1e6,
             dit_batch / dit_s)]
    print(f"\nImageNet-256 shapes, random weights, {precision}, {device}; TiTok batch {batch} (best of 2), DiT batch "
          f"{dit_batch} (one run), images decoded to 256x256\n")
    print("| generator | parameters | images / s | s / image | vs DiT |")
    print("|---|---|---|---|---|")
    for name, params, speed in rows:
        print(f"| {name} | {params:.0f}M | {speed:.3f} | {1 / speed:.2f} | {speed / rows[1][2]:.1f}x |")
    print(flush=True)


def digits_rows(num: int, device: str, titok: bool = True) -> None:
    from genvis.config import load_config
    from genvis.evaluation.digits import digits_metrics
    from genvis.training.loop import train

    def fit(config, run, *overrides):
        if not (Path(run) / "model" / "config.json").is_file():
            print(f"training {run} ...", flush=True)
            train(load_config(config, [f"output_dir={run}", *overrides]))

    fit("configs/digits/dit.yaml", "runs/digits-dit")
    if not Path("runs/digits-var/model/config.json").is_file():
        fit("configs/digits/msvq.yaml", "runs/digits-msvq")
        if not Path("runs/digits-msvq-ids/latents.json").is_file():
            subprocess.run([sys.executable, "-m", "genvis", "tokenizer", "extract", "runs/digits-msvq", "--data",
                            "configs/digits/msvq.yaml", "--out", "runs/digits-msvq-ids"], check=True)
        fit("configs/digits/var.yaml", "runs/digits-var")
    if titok and not Path("runs/digits-maskgit/model/config.json").is_file():
        fit("configs/digits/titok.yaml", "runs/digits-titok")
        if not Path("runs/digits-titok-ids/latents.json").is_file():
            subprocess.run([sys.executable, "-m", "genvis", "tokenizer", "extract", "runs/digits-titok", "--data",
                            "configs/digits/titok.yaml", "--out", "runs/digits-titok-ids"], check=True)
        fit("configs/digits/maskgit_titok.yaml", "runs/digits-maskgit")
    labels = class_labels(num, 10)
    rows = []
    for name, run, options in (("DiT-tiny/4, euler 50 steps, cfg 2 (the demo)", "runs/digits-dit", {}),
                               ("VAR-d4, KV cache (4 passes)", "runs/digits-var", {}),
                               ("VAR-d4, whole prefix at every scale", "runs/digits-var", {"kv_cache": False}),
                               ("TiTok-32 + MaskGIT, 8 steps", "runs/digits-maskgit", {}))[: None if titok else 3]:
        model, tokenizer = load_model(run, device=device), load_tokenizer(run, device=device)
        cfg = load_config(str(Path(run) / "config.yaml"))
        sampling = dataclasses.replace(cfg.sample, **options)
        generate(model, tokenizer, labels[:50], seed=0, sampling=sampling, batch_size=50)  # warm-up
        seconds, images = best_of(2, lambda: generate(model, tokenizer, labels, seed=0, sampling=sampling,
                                                      batch_size=250))
        m = digits_metrics(images, labels)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name, params, m["fd"], m["class_accuracy"], num / seconds))
        print(f"  {name}: fd {m['fd']:.1f}, accuracy {m['class_accuracy']:.3f}, {num / seconds:.1f} images/s", flush=True)
    base = rows[0][4]
    print(f"\nDigits, {num} class-balanced samples from seeds (0, i), batch 250, {device}\n")
    print("| generator | parameters | fd | class accuracy | images / s | vs DiT |")
    print("|---|---|---|---|---|---|")
    for name, params, fd, acc, speed in rows:
        print(f"| {name} | {params:.2f}M | {fd:.1f} | {acc:.3f} | {speed:.1f} | {speed / base:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1000, help="digits samples per row")
    parser.add_argument("--imagenet-batch", type=int, default=8, help="images per VAR-d16 batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dit-batch", type=int, default=2, help="images per DiT-XL/2 batch (ImageNet shapes)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-imagenet", action="store_true")
    parser.add_argument("--skip-var", action="store_true", help="leave out the VAR-d16 KV-cache rows")
    parser.add_argument("--skip-titok", action="store_true", help="leave out the TiTok + MaskGIT rows (against DiT-XL/2 "
                        "and on the digits)")
    args = parser.parse_args()
    if not args.skip_imagenet and not args.skip_var:
        imagenet_rows(args.imagenet_batch, args.device)
    if not args.skip_imagenet and not args.skip_titok:
        titok_imagenet_rows(args.imagenet_batch, args.dit_batch, args.device)
    if not args.skip_digits:
        digits_rows(args.num, args.device, titok=not args.skip_titok)


if __name__ == "__main__":
    main()
