"""Forward time and peak memory of DiT-S/2 (softmax attention, PyTorch SDPA) against its linear-attention
twin (genvis LinearDiT, LiT recipe: ReLU linear attention, 2 heads, 5x5 depthwise conv on V; same width
384, depth 12 and patch 2) as the token count grows, in fp32 and bf16 autocast, in one run.

    python benchmarks/attention_scaling.py                       # 256, 1024, 4096, 16384 tokens (CPU: ~10 min)
    python benchmarks/attention_scaling.py --tokens 256,1024 --dtypes bf16
    python benchmarks/attention_scaling.py --json attention_scaling.json   # then benchmarks/plots.py attention-scaling

N tokens = (input_size / 2)^2: 256 is a 256 px image's SD-VAE latent (32x32), 16384 a 2048 px one.
Batch 1, no grad, random weights (speed and memory do not depend on them). Two rows per setting: the
whole model, and the attention layer alone (DiT's Attention vs LinearAttention on the same [1, N, 384]
input). FLOP ratio: the models' forward matmul FLOPs, softmax over linear, i.e. the speed-up equal
efficiency would give. Each measurement runs in its own process: time is the best of up to --repeats
forwards after one warm-up (at least 2, more while they add up to under 20 s); peak memory is what the
forward adds on top of the weights and the input (CUDA: the allocator's peak; CPU: the process's peak
resident set minus the resident set before the first forward, which allocator caching makes coarse).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WIDTH, DEPTH, HEADS, PATCH = 384, 12, 6, 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(kind: str, part: str, tokens: int, dtype: str, repeats: int, device: str, budget_s: float = 20.0) -> dict:
    import torch

    from genvis.models.dit import DiT
    from genvis.models.layers import Attention
    from genvis.models.linear_dit import LinearAttention, LinearDiT

    torch.manual_seed(0)
    grid = int(round(tokens**0.5))
    dev = torch.device(device)
    if part == "model":
        common = dict(input_size=grid * PATCH, patch_size=PATCH, in_channels=4, hidden_size=WIDTH, depth=DEPTH,
                      num_classes=1000, learn_sigma=True)
        module = DiT(**common, num_heads=HEADS) if kind == "softmax" else LinearDiT(**common, num_heads=2, v_conv=5)
        inputs = (torch.randn(1, 4, grid * PATCH, grid * PATCH), torch.tensor([500.0]), torch.tensor([1]))
    else:
        module = Attention(WIDTH, HEADS) if kind == "softmax" else LinearAttention(WIDTH, 2, (grid, grid), v_conv=5)
        inputs = (torch.randn(1, tokens, WIDTH),)
    module = module.to(dev).eval()
    inputs = tuple(x.to(dev) for x in inputs)
    cast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run():
        with torch.no_grad(), cast:
            module(*inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    run()
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    gflop = module.flops_per_image() / 1e9 if part == "model" else float("nan")
    return {"ms": 1000 * min(times), "peak_mb": max(peak, 0.0), "gflop": gflop}


def one(args) -> dict:
    cmd = [sys.executable, __file__, "--one", args.kind, args.part, str(args.n), args.dtype,
           "--repeats", str(args.repeats), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {args.kind} {args.part} {args.n} {args.dtype} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="256,1024,4096,16384", help="comma-separated token counts (perfect squares)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--repeats", type=int, default=7,
                   help="at most this many timed forwards after the warm-up (at least 2, then while under 20 s); the best is kept")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (for benchmarks/plots.py)")
    p.add_argument("--one", nargs=4, metavar=("KIND", "PART", "TOKENS", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        kind, part, n, dtype = args.one
        print(json.dumps(measure(kind, part, int(n), dtype, args.repeats, args.device)))
        return
    tokens = [int(n) for n in args.tokens.split(",")]
    for n in tokens:
        if int(round(n**0.5)) ** 2 != n:
            raise SystemExit(f"--tokens: {n} is not a perfect square")
    print(f"DiT-S/2 (softmax, SDPA) vs its linear twin (LiT recipe), batch 1, forward, device {args.device}\n")
    print("| part | dtype | tokens | softmax ms | linear ms | speed-up | FLOP ratio | softmax peak MB | linear peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    linear_ms, rows = {}, []
    for part in ("model", "attention"):
        for dtype in args.dtypes.split(","):
            for n in tokens:
                row = {}
                for kind in ("softmax", "linear"):
                    row[kind] = one(argparse.Namespace(kind=kind, part=part, n=n, dtype=dtype, repeats=args.repeats,
                                                       device=args.device))
                s, lin = row["softmax"], row["linear"]
                rows.append(dict(part=part, dtype=dtype, tokens=n, softmax=s, linear=lin))
                linear_ms[part, dtype, n] = lin["ms"]
                ratio = s["peak_mb"] / lin["peak_mb"] if lin["peak_mb"] > 0 else float("nan")
                flops = f"{s['gflop'] / lin['gflop']:.2f}x" if part == "model" else ""
                print(f"| {part} | {dtype} | {n} | {s['ms']:.1f} | {lin['ms']:.1f} | {s['ms'] / lin['ms']:.2f}x | {flops} | "
                      f"{s['peak_mb']:.0f} | {lin['peak_mb']:.0f} | {ratio:.2f}x |", flush=True)
    if args.json:
        from genvis.io import write_json_atomic

        write_json_atomic(args.json, dict(device=args.device, rows=rows))
    if 1024 in tokens and 4096 in tokens:
        print("\nlinear cost growth from 1024 to 4096 tokens (4x the tokens):")
        for (part, dtype, n), ms in linear_ms.items():
            if n == 4096:
                print(f"  {part}, {dtype}: {ms / linear_ms[part, dtype, 1024]:.2f}x")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
