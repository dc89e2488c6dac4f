"""Generation speed of the generator families, measured in one run.

    python benchmarks/generation_speed.py [--num 1000] [--imagenet-batch 8] [--device cpu] [--skip-digits]

1. ImageNet-256 shapes, random weights: VAR-d16 (width 1024, 16 heads, 4,096 codes of dim 32, the 10 scales
   1..16 = 680 tokens, 1,000 classes) decoding with guidance (two half-batches), top-k 900, top-p 0.96: the KV
   cache against recomputing the whole prefix at every scale, the same draws (ids compared), best of 2.
   Also the matmul FLOP ratio of the two (VAR.flops_per_image), which bounds what the cache can save.
2. Digits, the trained presets at the quality each reaches (fd and class accuracy of --num class-balanced
   samples, digits features): DiT (configs/digits/dit.yaml, its demo sampler: euler, 50 steps, cfg 2) and VAR
   (configs/digits/var.yaml, its run's sample: defaults) with and without the KV cache; images/s including
   decoding. Runs missing under runs/ are trained first (DiT: 2.5 min; VAR: the msvq tokenizer, its ids and
   the VAR: about 15 min on 2 CPU cores).
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


def digits_rows(num: int, device: str) -> None:
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
    labels = class_labels(num, 10)
    rows = []
    for name, run, options in (("DiT-tiny/4, euler 50 steps, cfg 2 (the demo)", "runs/digits-dit", {}),
                               ("VAR-d4, KV cache (4 passes)", "runs/digits-var", {}),
                               ("VAR-d4, whole prefix at every scale", "runs/digits-var", {"kv_cache": False})):
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
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-imagenet", action="store_true")
    args = parser.parse_args()
    if not args.skip_imagenet:
        imagenet_rows(args.imagenet_batch, args.device)
    if not args.skip_digits:
        digits_rows(args.num, args.device)


if __name__ == "__main__":
    main()
