"""T-Stitch and DiT step caching on the digits DiT: quality (digits Frechet distance, class accuracy)
and sampling time against the plain model, in the same run.

    python benchmarks/sampler_accel.py [--run runs/digits-dit] [--small runs/digits-dit-small] [--num 1000]

--run is the large model (trained from configs/digits/dit.yaml when missing, as in
sampler_digits.py); --small is a smaller model of the same latent space (trained when missing:
the same preset with depth 2, width 96, 2 heads). Every row samples the same --num class-balanced
images from the same seeds with unipc, 10 steps, the run's guidance scale.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from genvis.evaluation.digits import digits_metrics
from genvis.generate import class_labels, generate
from genvis.models import load_model
from genvis.tokenizers import load_tokenizer


def trained(run, overrides) -> Path:
    run = Path(run)
    if (run / "model" / "config.json").is_file():
        return run
    from genvis.config import load_config
    from genvis.training.loop import train

    print(f"training {run} ...", flush=True)
    train(load_config("configs/digits/dit.yaml", [f"output_dir={run}", *overrides]))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/digits-dit")
    parser.add_argument("--small", default="runs/digits-dit-small")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    large_run = trained(args.run, [])
    large = load_model(large_run)
    small = load_model(trained(args.small, ["model.depth=2", "model.hidden_size=96", "model.num_heads=2"]))
    tokenizer = load_tokenizer(large_run)  # what decodes the large model's output (pixels for the digits preset)
    torch.set_grad_enabled(False)
    labels = class_labels(args.num, large.num_classes)
    common = dict(seed=0, sampler="unipc", steps=args.steps, cfg=2.0, batch_size=len(labels))
    rows = [
        ("large model", large, {}),
        ("small model", small, {}),
        ("T-Stitch, small for the first 40%", large, {"stitch_small": small, "stitch_fraction": 0.4}),
        ("T-Stitch, small for the first 60%", large, {"stitch_small": small, "stitch_fraction": 0.6}),
        ("step cache, refresh 2, keep 2 of 6 blocks", large, {"cache_refresh": 2, "cache_keep_blocks": 2}),
        ("step cache, refresh 3, keep 2 of 6 blocks", large, {"cache_refresh": 3, "cache_keep_blocks": 2}),
    ]
    results = []
    for name, model, options in rows:
        generate(model, tokenizer, labels[:20], **{**common, "batch_size": 20}, **options)  # warm-up
        best = float("inf")
        for _ in range(2):
            calls = {"first": 0, "last": 0}
            hooks = [model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1)),
                     model.blocks[-1].register_forward_pre_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))]
            t0 = time.perf_counter()
            images = generate(model, tokenizer, labels, **common, **options)
            best = min(best, time.perf_counter() - t0)
            for h in hooks:
                h.remove()
        # share of the large model's block evaluations actually run (first block: every call; last: full calls)
        keep, depth = options.get("cache_keep_blocks", 0), len(model.blocks)
        blocks = (keep * calls["first"] + (depth - keep) * calls["last"]) / (depth * calls["first"]) if calls["first"] else 0.0
        m = digits_metrics(images, labels)
        results.append((name, m["fd"], m["class_accuracy"], best, blocks))
        print(f"  {name}: fd {m['fd']:.1f}, accuracy {m['class_accuracy']:.3f}, {best:.2f} s, large-model blocks {blocks:.2f}",
              flush=True)
    base = results[0][3]
    print(f"\nunipc, {args.steps} steps, cfg 2.0, {args.num} samples; large {sum(p.numel() for p in large.parameters()) / 1e6:.2f}M "
          f"parameters, small {sum(p.numel() for p in small.parameters()) / 1e6:.2f}M\n")
    print("| sampling | fd | class accuracy | time / large model | large-model block evaluations |")
    print("|---|---|---|---|---|")
    for name, fd, acc, seconds, blocks in results:
        print(f"| {name} | {fd:.1f} | {acc:.3f} | {seconds / base:.2f} | {blocks:.2f} |")


if __name__ == "__main__":
    main()
