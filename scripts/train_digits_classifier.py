"""Train the digits classifier behind genvis's offline digits metrics, and ship its weights.

    python scripts/train_digits_classifier.py [--steps 1500]

Deterministic (seed 0, deterministic kernels) on the fixed digits train split; about a minute on
2 CPU cores. Writes genvis/evaluation/assets/digits_classifier.safetensors and, next to it,
digits_classifier.json with the held-out test accuracy. Both are written to temporary names and
renamed, so an interrupted run never leaves a truncated asset behind.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from genvis.data.digits import DigitsDataset  # noqa: E402
from genvis.evaluation.digits import CLASSIFIER_PATH, DigitsClassifier, prepare_images  # noqa: E402
from genvis.io import atomic_path, write_text_atomic  # noqa: E402

# Generators are evaluated at their own resolution and resized to 16 by prepare_images, so the
# classifier is trained on the train split as seen through each of those paths (8 -> 16 is
# identical to the native 16 rendering, since upsampling ignores antialiasing).
TRAIN_RESOLUTIONS = (16, 32, 64)


def rendered_split(split: str):
    """The split through prepare_images at each TRAIN_RESOLUTIONS: ([M, 1, 16, 16], labels [M])."""
    images, labels = [], []
    for resolution in TRAIN_RESOLUTIONS:
        data = DigitsDataset(split=split, resolution=resolution)
        images.append(prepare_images(data.images))
        labels.append(data.labels)
    return torch.cat(images), torch.cat(labels)


def random_affine(x_N1HW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation (+-10 deg), scale (0.9..1.1) and shift (+-2 px) of [-1, 1] images."""
    n, _, h, _ = x_N1HW.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / h)  # 2 px in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # N, 2, 3
    grid = F.affine_grid(theta, list(x_N1HW.shape), align_corners=False)
    # grid_sample pads with 0; shift to [0, 2] so the padding is the background value -1.
    return F.grid_sample(x_N1HW + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine-decayed to 0 (default 2e-3)")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH, help=f"weights file (default {CLASSIFIER_PATH})")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(0)

    train_x, train_y = rendered_split("train")
    test = DigitsDataset(split="test", resolution=16)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    start = time.time()
    for step in range(args.steps):
        model.train()
        index = torch.randint(0, train_x.shape[0], (args.batch_size,), generator=generator)
        x = random_affine(train_x[index], generator)
        loss = F.cross_entropy(model(x), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            acc = accuracy(model, test.images, test.labels)
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  test acc {acc:.4f}  {time.time() - start:.0f}s", flush=True)

    test_accuracy = accuracy(model, test.images, test.labels)
    for resolution in (8, 32, 64):
        other = DigitsDataset(split="test", resolution=resolution)
        print(f"test accuracy at resolution {resolution}: {accuracy(model, prepare_images(other.images), other.labels):.4f}")
    print(f"test accuracy: {test_accuracy:.4f}")

    from safetensors.torch import save_file

    with atomic_path(args.out) as tmp:  # renamed with a plain write's mode (package data, not owner-only)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    info = {"test_accuracy": test_accuracy, "script": "scripts/train_digits_classifier.py", "steps": args.steps}
    json_path = args.out.with_suffix(".json")
    write_text_atomic(json_path, json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
