"""DiT-S/2 speed: genvis vs diffusers DiTTransformer2DModel, same config, same machine, one run.

    python benchmarks/dit_speed.py [--batch 32] [--repeats 5] [--precisions fp32,bf16]

Prints forward and training-step images/s in fp32 and bf16 autocast for both (bf16 by default only where the
machine runs it natively: `benchmark_precisions`), the matmul peak
measured in this run, the fraction of that peak each reaches, and genvis (default precision) /
diffusers (fp32) ratios. Input 32x32x4 latents, 1000 classes, learned sigma (8 output channels).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from genvis.models.dit import DiT, dit_config
from genvis.precision import bf16_supported, resolve_precision


def synchronize(device) -> None:
    """Wait for the kernels queued on `device` (CUDA runs them asynchronously), so that a timer around a call times
    the call; nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = None, seconds: float = 3.0) -> float:
    """FLOP/s of the fastest of repeated n x n matmuls on `device` over `seconds` (at least 5): on a shared machine a
    short measurement can land in a slow moment and understate the peak. n: 2048 on the CPU, 8192 on a GPU (where
    2048 is too small to fill it)."""
    n = n or (2048 if torch.device(device).type == "cpu" else 8192)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    best, start, count = float("inf"), time.perf_counter(), 0
    while count < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        count += 1
    return 2 * n**3 / best


def benchmark_precisions(device: str, requested: str = None, allowed=("fp32", "bf16", "fp16")) -> list:
    """The precisions a benchmark times: `requested` (comma-separated, each one of `allowed`), or by default fp32
    and, where the device runs it natively (`genvis.precision.bf16_supported`: CUDA with bf16, a CPU with AVX-512
    BF16 or AMX), bf16. Where it is not, bf16 is emulated: on 2 cores of an AVX2 EPYC one speed.py MaskGIT sampling
    batch took 91 s in bf16 against 10.7 s in fp32, a timing that says nothing about genvis, and a full run would
    take hours. Prints what it leaves out."""
    if requested is not None:
        precisions = [p.strip() for p in requested.split(",") if p.strip()]
        if not precisions or any(p not in allowed for p in precisions):
            raise SystemExit(f"--precisions {requested!r}: expected a comma-separated list of {', '.join(allowed)}")
        return precisions
    if bf16_supported(torch.device(device)):
        return ["fp32", "bf16"]
    why = " (no AVX-512 BF16 / AMX)" if torch.device(device).type == "cpu" else ""
    print(f"bf16 is not native on this {device}{why}: timing fp32 only (--precisions fp32,bf16 times it anyway)")
    return ["fp32"]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the training tables' matmuls run in at `precision` ("bf16" or "fp32")."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: str = "cpu"):
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_steps(model, call, batch: int, precision: str, device: str = "cpu"):
    """(forward, train_step) closures for one model and precision on fixed random inputs on `device`."""
    x = torch.randn(batch, 4, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, 8, 32, 32, device=device)

    def forward():
        model.eval()
        with torch.no_grad(), autocast(precision, device):
            call(model, x, t, y)
        synchronize(device)

    return forward, loss_step(model, lambda m: F.mse_loss(call(m, x, t, y).float(), target), precision, device)


def loss_step(model, loss_fn, precision: str, device: str = "cpu"):
    """A training step as the loop runs it: loss_fn(model) under autocast, backward, a default AdamW step; it returns
    when the device has run it (`synchronize`), so a timer around it times the step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        with autocast(precision, device):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)

    return step


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each closure; rounds are interleaved so drifts in machine speed hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default=None, help="comma-separated fp32, bf16 (default: fp32, and bf16 where "
                        "native)")
    args = parser.parse_args()
    precisions = benchmark_precisions("cpu", args.precisions, allowed=("fp32", "bf16"))
    torch.manual_seed(0)

    from diffusers import DiTTransformer2DModel

    genvis_model = DiT(**dit_config("S", 2, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True))
    # Non-zero adaLN / output weights, so both models do real work (the official init zeroes them).
    with torch.no_grad():
        for p in genvis_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    diffusers_model = DiTTransformer2DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
        attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    flops = genvis_model.flops_per_image()
    default = resolve_precision("auto", torch.device("cpu"))
    default = "bf16" if default == "bf16" else "fp32"

    peaks = {p: matmul_peak(compute_dtype(p)) for p in precisions}
    rows = []
    calls = {
        "genvis": (genvis_model, lambda m, x, t, y: m(x, t, y)),
        "diffusers": (diffusers_model, lambda m, x, t, y: m(x, timestep=t, class_labels=y).sample),
    }
    fns = {}
    for name, (model, call) in calls.items():
        for precision in precisions:
            forward, train_step = make_steps(model, call, args.batch, precision)
            fns[(name, precision, "forward")] = forward
            fns[(name, precision, "train")] = train_step
    times = best_times(fns, args.repeats)
    results = {}
    for name in calls:
        for precision in precisions:
            fwd = args.batch / times[(name, precision, "forward")]
            trn = args.batch / times[(name, precision, "train")]
            results[(name, precision)] = (fwd, trn)
            peak = peaks[precision]
            rows.append((name, precision, fwd, trn, fwd * flops / peak, trn * 3 * flops / peak))

    print(f"DiT-S/2, 32x32x4, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"forward FLOPs/image: {flops / 1e9:.2f} G; measured matmul peak: "
          + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    print()
    print("| model | precision | forward img/s | train img/s | forward % peak | train % peak |")
    print("|---|---|---|---|---|---|")
    for name, precision, fwd, trn, fpk, tpk in rows:
        print(f"| {name} | {precision} | {fwd:.1f} | {trn:.1f} | {100 * fpk:.0f}% | {100 * tpk:.0f}% |")
    if default in precisions and "fp32" in precisions:
        g_fwd, g_trn = results[("genvis", default)]
        d_fwd, d_trn = results[("diffusers", "fp32")]
        print()
        print(f"genvis ({default}, its default here) / diffusers fp32: forward {g_fwd / d_fwd:.2f}x (target >= 3x), "
              f"training step {g_trn / d_trn:.2f}x (target >= 2.5x)")


if __name__ == "__main__":
    main()
