"""Speed of every family, eager vs compiled (torch.compile, inductor), against a peer measured in the same run.

    python benchmarks/speed.py [--device cpu|cuda] [--batch 32] [--sample-batch 8] [--repeats 3] [--skip-train]
        [--skip-sample] [--precisions fp32,bf16] [--dit-xl] [--dit-xl-batch 64] [--quick] [--json speed.json]

Precisions: fp32, and bf16 (autocast) where the device runs it natively (`dit_speed.benchmark_precisions`), unless
--precisions names them; the training tables time fp32 and bf16 of those, the sampling table all (fp16 too).

1. DiT-S/2 training step and forward (32x32x4 latents, 1,000 classes, learned sigma; the models of
   benchmarks/dit_speed.py): genvis eager and compiled, diffusers' DiTTransformer2DModel eager, each in fp32 and
   bf16 (autocast); images/s and % of the matmul peak measured in this run (3 x forward FLOPs for a step).
1b. DiT-XL/2's training step and forward, the same table at --dit-xl-batch (on a GPU by default; --dit-xl on the
   CPU, with 35 GB of memory or more: three 675M-parameter models and their AdamW states), for the GPU table's comparison with fast-DiT (107 img/s training on one A100, fp16, cached latents).
2. Training step images/s per family, eager vs compiled in place as `train.compile=true` does, fp32 and bf16: the
   models of the sampling table (LinearDiT-S/2, DiG-S/2 and MaskGIT at --batch, VAR-d8 at --batch / 4) on fixed
   random inputs (a regression target for the diffusion transformers, cross-entropy over the ids for the token
   families); % of the peak from 3 x each model's flops_per_image. DiT-S/2's rows are the first table's.
3. Sampling images/s per family, eager vs compiled (`generate(..., compile=True)`), in each of --precisions,
   random O(1) weights at the sizes named in the table: DiT-S/2, LinearDiT-S/2 (ReLU attention) and DiG-S/2
   (LinearDiT with gated attention, `recipe: dig`) (Euler 10, cfg 1.5, latents only), VAR-d8 (KV cache, 10
   scales to 16x16 = 680 tokens, cfg 2.5), MaskGIT (TiTok-S-128's generator
   shapes: BERT 12 x 512 over 128 tokens, 8 steps, cfg), the token families through a small tokenizer decoder.
   Peers in the same run: DiT-S/2 as released sampled by DiT's recipe (250 DDPM steps, guidance; eager, default
   precision), the baseline every family's compiled speed is divided by; VAR without its KV cache (the whole
   prefix at every scale, eager); and a KL-VAE decoder (SD-VAE's f8 architecture, 4 x 32 x 32 latents to
   256 x 256; in float32, as `generate` decodes, and compiled as --compile compiles it: `compile_decoder`)
   against diffusers' AutoencoderKL.decode, the same network eager. Compiled and eager outputs are compared (max
   |difference|; token families in fp32: the fraction of pixels within 1e-3, 1 when no draw flips; in bf16 the
   logits differ in their last bits and draws flip).
Every timed call returns when the device has run it (`dit_speed.synchronize`: CUDA queues kernels); the matmul
peak is measured on the device of the run (`dit_speed.matmul_peak`).
Compile time (the first call) is reported apart from the steady state (best of --repeats calls after it; eager
and compiled calls alternate, on two copies of the network, so that drifts in the machine's speed hit both
alike). Each table, and each family in the training and sampling tables, is measured in a fresh process
(`fresh_process`), as a `genvis train` or `genvis sample` run starts.
4. On the CPU, where the time goes: the DiT-S/2 step's matmuls timed alone (`dit_matmul_floor`, a lower bound on
   the step and the forward and so an upper bound on their % of peak and their ratios to diffusers), its softmax,
   tanh-GELU, LayerNorm + modulation and AdamW timed alone (`dit_elementwise_floor`), the compiled step's largest
   other kernels, and the profiler's share of each compiled sampling batch spent in the ATen kernels compiling
   keeps: matmuls, and the others (sort / topk / random draws, which inductor calls from ATen, and softmax and
   exact GELU, which genvis keeps as ATen's because inductor's ran slower). Those kernels, each replayed alone at
   its best with the batch's shapes (`kernel_floor`), are a floor under the compiled batch; eager time over the
   floor bounds compiled / eager.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import (  # noqa: E402
    benchmark_precisions, best_times, compute_dtype, loss_step, make_steps, matmul_peak, synchronize,
)

from genvis.generate import generate  # noqa: E402
from genvis.io import write_json_atomic  # noqa: E402
from genvis.models.dit import DiT, dit_config  # noqa: E402
from genvis.precision import resolve_precision  # noqa: E402
from genvis.training.loop import compile_module  # noqa: E402


def o1_weights(model, seed=0):
    """O(1) random weights: the official inits zero the adaLN and output layers, which would skip real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" not in name.lower():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawn); its result (JSON-able) is returned. Every measurement starts from
    the state a `genvis train` or `genvis sample` run starts from: no earlier table's heap, compiled code or dynamo
    caches carry into it."""
    import json
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        child = multiprocessing.get_context("spawn").Process(target=_write_result, args=(out, fn, args))
        child.start()
        child.join()
        if child.exitcode != 0:
            killed = " (killed by SIGKILL: on Linux, often the out-of-memory killer)" if child.exitcode == -9 else ""
            raise RuntimeError(f"{fn.__name__}{args}: the measuring process exited with code {child.exitcode}{killed}")
        return json.loads(out.read_text())


def _write_result(path, fn, args):
    write_json_atomic(path, fn(*args))


def timed_first_and_best(fn, repeats):
    """(seconds of the first call, best seconds of `repeats` calls after it, the last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return first, best, out


# Kernels that do the matmul FLOPs (inductor calls the same extern ones). On the CPU the profiler's self time of an
# op is its wall time on the calling thread, which drives the intra-op threads.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::mkldnn_convolution", "aten::convolution_overrideable"}
# Kernels that run as ATen's, compiled or not: sorting and per-generator random draws (inductor calls them from
# ATen), and softmax and exact GELU (layers.softmax_kernel, layers.gelu_kernel: genvis keeps ATen's, which beat
# inductor's on the CPU).
ATEN_ONLY_OPS = {"aten::sort", "aten::topk", "aten::uniform_", "aten::exponential_", "aten::multinomial",
                 "aten::normal_", "aten::randn", "aten::_softmax", "aten::gelu"}
torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's CPU kernels appear in the profile by name


def profile_split(fn, top=0, record_shapes=False):
    """One call of fn under torch.profiler (CPU): (wall seconds, seconds in MATMUL_OPS, seconds in ATEN_ONLY_OPS,
    [(seconds, calls, name)] of the `top` other ops by self time, the profiler's events). record_shapes: record
    each op's inputs too (for `kernel_floor`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=record_shapes) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    other = sorted(((e.self_cpu_time_total / 1e6, e.count, e.key) for e in events
                    if e.key not in MATMUL_OPS | ATEN_ONLY_OPS), reverse=True)
    return (wall, sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6,
            sum(e.self_cpu_time_total for e in events if e.key in ATEN_ONLY_OPS) / 1e6, other[:top], prof.events())


_PROFILER_DTYPES = {"c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16, "float": torch.float32,
                    "double": torch.float64, "long int": torch.int64, "int": torch.int32, "bool": torch.bool,
                    "unsigned char": torch.uint8}


def _replay(event):
    """A closure that calls the ATen op of a profiler event (recorded with its shapes) on fresh random tensors of the
    recorded shapes, strides and dtypes and the recorded scalars (defaults where none was recorded), or None when no
    overload of the op accepts them."""
    packet = getattr(torch.ops.aten, event.name.split("::", 1)[1])
    recorded = list(zip(event.input_shapes, event.input_dtypes, event.structured_input_strides, event.concrete_inputs))
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if len(op._schema.arguments) != len(recorded):
            continue
        args, kwargs = [], {}
        for arg, (shape, dtype, stride, value) in zip(op._schema.arguments, recorded):
            if dtype in _PROFILER_DTYPES:
                v = torch.empty_strided(shape, stride, dtype=_PROFILER_DTYPES[dtype])
                v.copy_(torch.randn(shape) if v.is_floating_point() else torch.randint(0, 2, shape))
            else:  # a scalar, or an argument the profiler does not record (a generator, a string): its default
                v = value if value not in (None, "") else (arg.default_value if arg.has_default_value() else None)
            (kwargs.__setitem__(arg.name, v) if arg.kwarg_only else args.append(v))
        try:
            op(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            continue
        return lambda: op(*args, **kwargs)
    return None


def kernel_floor(events, repeats):
    """Seconds of the ATen kernels a profiled call ran (`events`: profile_split's, recorded with record_shapes) that
    compiling leaves to ATen (MATMUL_OPS, ATEN_ONLY_OPS), each replayed alone (`_replay`: same shapes, strides,
    dtypes and scalars) at its best of `repeats`, times its number of calls: no implementation that calls these
    kernels takes less. CPU only. Returns (seconds, calls not replayed, [(seconds, calls, op, input shapes)]
    largest first)."""
    kept = MATMUL_OPS | ATEN_ONLY_OPS
    calls, example = {}, {}
    for e in events:
        parent = e.cpu_parent
        while parent is not None and parent.name not in kept:
            parent = parent.cpu_parent
        if e.name not in kept or parent is not None:  # a kept op inside another is timed with it
            continue
        key = (e.name, str(e.input_shapes), str(e.input_dtypes), str(e.structured_input_strides), str(e.concrete_inputs))
        calls[key] = calls.get(key, 0) + 1
        example.setdefault(key, e)
    seconds, missed, parts = 0.0, 0, []
    for key, count in calls.items():
        replay = _replay(example[key])
        if replay is None:
            missed += count
            continue
        best = timed_first_and_best(replay, repeats)[1]
        seconds += count * best
        parts.append((count * best, count, key[0], key[1]))
    return seconds, missed, sorted(parts, reverse=True)


def dit_matmul_floor(batch, precision, repeats, device="cpu"):
    """(seconds, FLOPs, forward seconds) of the DiT-S/2 training step's token matmuls run alone, best of `repeats`
    each: per block the qkv, proj, fc1 and fc2 linears (forward, gradient of the input, gradient of the weight, in
    the layouts autograd uses) and the six attention bmms (QK^T and PV forward, four backward), times 12 blocks;
    the forward seconds count the linears' forward products and QK^T and PV once each. The per-image matmuls
    (adaLN, embedders; under 1% of the FLOPs) are left out, so this is a lower bound on any implementation's step
    (and forward) with these kernels."""
    dtype = compute_dtype(precision)
    rows, bh, n, d = batch * 256, batch * 6, 256, 64
    pairs = []  # (a, b, calls per block, of them in the forward)
    for k, o in ((384, 1152), (384, 384), (384, 1536), (1536, 384)):  # (in, out) of qkv, proj, fc1, fc2
        x, w, g = (torch.randn(*shape, dtype=dtype, device=device) for shape in ((rows, k), (o, k), (rows, o)))
        pairs += [(x, w.t(), 1, 1), (g, w, 1, 0), (g.t(), x, 1, 0)]  # y = x W^T; dx = g W; dW = g^T x
    q, scores = torch.randn(bh, n, d, dtype=dtype, device=device), torch.randn(bh, n, n, dtype=dtype, device=device)
    # QK^T, dP = dO V^T; PV, dV, dQ, dK (each shape timed once)
    pairs += [(q, q.transpose(1, 2), 2, 1), (scores, q, 4, 1)]
    seconds = flops = forward = 0.0
    for a, b, count, in_forward in pairs:
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        seconds += 12 * count * best
        forward += 12 * in_forward * best
        flops += 12 * count * 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.ndim == 3 else 1)
    return seconds, flops, forward


def dit_elementwise_floor(batch, model, precision, repeats):
    """Seconds of the DiT-S/2 training step's unavoidable non-matmul work run alone, best of `repeats` each, in its
    fastest form here: the attention softmax ([6 batch, 256, 256]) and the tanh-GELU ([256 batch, 1536]), each
    compiled, times 12 blocks; LayerNorm + adaLN modulation ([batch, 256, 384] float32 in, the precision's dtype
    out), compiled, times 24; and one fused AdamW step over `model`'s parameters. Activations are bf16 for "bf16",
    float32 otherwise. Returns ({part: seconds forward + backward, AdamW included}, {part: seconds forward alone,
    under no_grad})."""
    from genvis.models.layers import gelu_tanh, modulate

    dtype = compute_dtype(precision)

    def best(fn):  # the first call compiles
        return timed_first_and_best(fn, repeats)[1]

    def timed(f, shape, in_dtype=dtype):  # (forward + backward, forward) seconds
        f = torch.compile(f)
        x = torch.randn(*shape, dtype=in_dtype, requires_grad=True)
        g = torch.randn(*shape, dtype=dtype)

        def forward():
            with torch.no_grad():
                f(x)

        return best(lambda: f(x).backward(g)), best(forward)

    shift, scale = (torch.randn(batch, 384, dtype=dtype, requires_grad=True) for _ in range(2))
    norm = torch.nn.LayerNorm(384, elementwise_affine=False, eps=1e-6)
    parts = {"softmax": (12, timed(lambda x: x.softmax(-1), (6 * batch, 256, 256))),
             "tanh-GELU": (12, timed(gelu_tanh, (256 * batch, 1536))),
             "LayerNorm + modulation": (24, timed(lambda x: modulate(norm(x), shift, scale).to(dtype),
                                                  (batch, 256, 384), torch.float32))}
    params = [torch.zeros_like(p, requires_grad=True) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    step = {k: n * t[0] for k, (n, t) in parts.items()} | {"AdamW (fused)": best(opt.step)}
    return step, {k: n * t[1] for k, (n, t) in parts.items()}


# ----------------------------------------------------------------------------- 1. DiT-S/2 training

def _floor_line(title, parts, matmul_s, seconds_at_peak, diffusers_s, what):
    """One line of table 1's profile: the non-matmul `parts` timed alone, added to the matmul floor, as an upper
    bound on % of the peak (`seconds_at_peak`: the call's FLOPs over the peak) and on the ratio to diffusers."""
    total = matmul_s + sum(parts.values())
    return (f"  {title}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in parts.items())
            + f": with the matmuls, {total:.2f} s, so no {what} built from these kernels exceeds "
            f"{100 * seconds_at_peak / total:.0f}% of the peak or {diffusers_s / total:.2f}x diffusers' eager {what}.")


def dit_training_table(batch, repeats, device, peaks, precisions, size="S"):
    """Table 1 (size "S": DiT-S/2, with the CPU's floors and profile) or 1b (size "XL": DiT-XL/2, the GPU table's
    training row)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    config = dit_config(size, 2, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    genvis_model = o1_weights(DiT(**config))
    peer = DiTTransformer2DModel(
        num_attention_heads=config["num_heads"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=4, out_channels=8, num_layers=config["depth"],
        attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    flops = genvis_model.flops_per_image()
    calls = {"genvis eager": (genvis_model, lambda m, x, t, y: m(x, t, y)),
             "genvis compiled": (None, lambda m, x, t, y: m(x, t, y)),  # compiled anew per precision
             "diffusers eager": (peer, lambda m, x, t, y: m(x, timestep=t, class_labels=y).sample)}
    rows, compile_times, profiles = {}, {}, {}
    for precision in precisions:
        fns = {}
        for name, (model, call) in calls.items():
            if name.endswith("compiled"):  # as a run in this precision compiles it (a recompile ran slower)
                torch._dynamo.reset()
                model = copy.deepcopy(genvis_model)
                compile_module(model, torch.device(device))
            forward, step = make_steps(model.to(device), call, batch, precision, device)
            if name.endswith("compiled"):  # the first calls compile; timed apart
                t0 = time.perf_counter()
                forward()
                compile_times[(precision, "forward")] = time.perf_counter() - t0
                t0 = time.perf_counter()
                step()
                compile_times[(precision, "train")] = time.perf_counter() - t0
            fns[(name, "forward")], fns[(name, "train")] = forward, step
        times = best_times(fns, repeats)
        for name in calls:
            fwd, trn = batch / times[(name, "forward")], batch / times[(name, "train")]
            rows[(name, precision)] = (fwd, trn, fwd * flops / peaks[precision], trn * 3 * flops / peaks[precision])
        if device == "cpu" and size == "S":  # the floors take DiT-S/2's shapes
            floor_s, floor_flops, forward_floor_s = dit_matmul_floor(batch, precision, 5)
            wall, in_mm, _, other, _ = profile_split(fns[("genvis compiled", "train")], top=8)
            step_parts, forward_parts = dit_elementwise_floor(batch, genvis_model, precision, 5)
            profiles[precision] = dict(floor_s=floor_s, floor_gflops=floor_flops / floor_s / 1e9, step_s=wall,
                                       forward_floor_s=forward_floor_s, step_matmul_s=in_mm,
                                       diffusers_step_s=times[("diffusers eager", "train")],
                                       diffusers_forward_s=times[("diffusers eager", "forward")],
                                       step_top_other=[dict(seconds=t, calls=n, kernel=k) for t, n, k in other],
                                       elementwise_floor_s=step_parts, forward_elementwise_floor_s=forward_parts)
    print(f"## DiT-{size}/2 training and forward, batch {batch}, {flops / 1e9:.2f} GFLOP per image forward"
          + (" (fast-DiT reports 107 img/s training on one A100, fp16, cached latents)" if size == "XL" else ""))
    print()
    print("| model | precision | forward img/s | train img/s | forward % peak | train % peak |")
    print("|---|---|---|---|---|---|")
    for (name, precision), (fwd, trn, fpk, tpk) in rows.items():
        print(f"| {name} | {precision} | {fwd:.1f} | {trn:.1f} | {100 * fpk:.0f}% | {100 * tpk:.0f}% |")
    print()
    for precision in precisions:
        g, c, d = rows[("genvis eager", precision)], rows[("genvis compiled", precision)], rows[("diffusers eager", precision)]
        print(f"{precision}: compiled / eager: forward {c[0] / g[0]:.2f}x, train {c[1] / g[1]:.2f}x; "
              f"genvis compiled / diffusers: forward {c[0] / d[0]:.2f}x, train {c[1] / d[1]:.2f}x; compile time "
              f"{compile_times[(precision, 'forward')]:.0f} s (forward) + {compile_times[(precision, 'train')]:.0f} s "
              f"(training step)")
    print()
    for precision, p in profiles.items():
        print(f"{precision} profile: the step's token matmuls run alone (dit_matmul_floor) take {p['floor_s']:.2f} s at "
              f"{p['floor_gflops']:.0f} GFLOP/s, {100e9 * p['floor_gflops'] / peaks[precision]:.0f}% of the peak; so no "
              f"step with these kernels exceeds {100 * 3 * flops * batch / p['floor_s'] / peaks[precision]:.0f}% of "
              f"the peak or {p['diffusers_step_s'] / p['floor_s']:.2f}x diffusers' eager step. The forward's matmuls "
              f"alone take {p['forward_floor_s']:.2f} s: no forward with them exceeds "
              f"{100 * flops * batch / p['forward_floor_s'] / peaks[precision]:.0f}% of the peak or "
              f"{p['diffusers_forward_s'] / p['forward_floor_s']:.2f}x diffusers' eager forward. The compiled step "
              f"under the profiler: {p['step_s']:.2f} s, {p['step_matmul_s']:.2f} s of it in matmul kernels, "
              f"{p['step_s'] - p['step_matmul_s']:.2f} s in the rest, most of it in:")
        for row in p["step_top_other"]:
            print(f"    {1e3 * row['seconds']:6.1f} ms  {row['calls']:4d} calls  {row['kernel'][:110]}")
        print(_floor_line("Run alone at their best (forward + backward, compiled)", p["elementwise_floor_s"],
                          p["floor_s"], 3 * flops * batch / peaks[precision], p["diffusers_step_s"], "step"))
        print(_floor_line("The forward's share, run alone (compiled, no_grad)", p["forward_elementwise_floor_s"],
                          p["forward_floor_s"], flops * batch / peaks[precision], p["diffusers_forward_s"], "forward"))
    print()
    return dict(model=f"DiT-{size}/2", batch=batch, gflop_per_image=flops / 1e9,
                compile_s={f"{p} {w}": v for (p, w), v in compile_times.items()},
                rows=[dict(model=name, precision=precision, forward=r[0], train=r[1], forward_peak=r[2], train_peak=r[3])
                      for (name, precision), r in rows.items()], profiles=profiles)


# ----------------------------------------------------------------------------- 2. training per family

def family_losses(model, kind, tokenizer, batch, device):
    """A loss closure on fixed random inputs for one family: the diffusion transformers regress a random target from
    latents (as the DiT-S/2 table), VAR's cross-entropy over all scales' ids from the teacher-forcing input its
    tokenizer builds, MaskGIT's cross-entropy with half of the ids masked."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    if kind == "diffusion":
        x = torch.randn(batch, *model.sample_shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        target = torch.randn(batch, model.out_channels, *model.sample_shape[1:], generator=g).to(device)
        return lambda m: torch.nn.functional.mse_loss(m(x, t, labels).float(), target)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, model.num_tokens), generator=g).to(device)
    if kind == "var":
        with torch.no_grad():
            x = tokenizer.teacher_forcing_input(ids)
        return lambda m: torch.nn.functional.cross_entropy(m(labels, x).flatten(0, 1).float(), ids.flatten())
    masked = (torch.rand(ids.shape, generator=g) < 0.5).to(device)
    inputs = torch.where(masked, model.mask_id, ids)
    return lambda m: torch.nn.functional.cross_entropy(m(inputs, labels).flatten(0, 1).float(), ids.flatten())


FAMILY_KINDS = ("diffusion", "diffusion", "diffusion", "var", "maskgit")  # of family_models' entries, in order


def family_training_rows(index, batch, repeats, device, peaks, quick, precisions):
    """The training table's rows (one per precision) of family_models' entry `index`: eager vs compiled in place as
    `train.compile=true` compiles (`compile_module`), rounds interleaved."""
    name, model, tokenizer, _, _ = family_models(quick)[index]
    kind = FAMILY_KINDS[index]
    b = max(1, batch // 4) if kind == "var" else batch
    model.to(device)
    if tokenizer is not None:
        tokenizer.to(device)
    loss = family_losses(model, kind, tokenizer, b, device)
    flops = 3 * model.flops_per_image()  # per image, forward + backward (as the DiT-S/2 table)
    rows = []
    for precision in precisions:
        torch._dynamo.reset()  # compiled anew per precision, as a run would (a recompile ran slower)
        twin = copy.deepcopy(model)
        compile_module(twin, torch.device(device))
        steps = {"eager": loss_step(model, loss, precision, device), "compiled": loss_step(twin, loss, precision, device)}
        t0 = time.perf_counter()
        steps["compiled"]()  # compiles forward and backward
        first = time.perf_counter() - t0
        times = best_times(steps, repeats)
        row = dict(family=name, batch=b, precision=precision, eager=b / times["eager"], compiled=b / times["compiled"],
                   compile_s=first, gflop_per_image=flops / 1e9)
        row.update(eager_peak=row["eager"] * flops / peaks[precision], compiled_peak=row["compiled"] * flops / peaks[precision])
        rows.append(row)
    return rows


def family_training_table(batch, repeats, device, peaks, quick, precisions, dit_rows=None):
    """Training step images/s per family (the models of the sampling table, each family in a fresh process:
    `family_training_rows`), in `precisions` (fp32, bf16 autocast); % of the matmul peak from 3 x the model's
    flops_per_image (VAR's counts the block-causal attention it needs, though training computes all L x L scores
    under the mask).
    Batches: `batch` for the diffusion transformers and MaskGIT, batch / 4 for VAR-d8 (680 tokens per image).
    DiT-S/2's rows come from its own table (dit_rows)."""
    rows = []
    for index in range(len(FAMILY_KINDS)):
        if index == 0 and dit_rows is not None:
            continue  # DiT-S/2: measured against diffusers in its own table
        rows += fresh_process(family_training_rows, index, batch, repeats, device, peaks, quick, precisions)
    if dit_rows is not None:  # DiT-S/2 first, from its table
        found = {(r["model"], r["precision"]): r for r in dit_rows["rows"]}
        rows = [dict(family="DiT-S/2", batch=dit_rows["batch"], precision=p, eager=found[("genvis eager", p)]["train"],
                     compiled=found[("genvis compiled", p)]["train"], compile_s=dit_rows["compile_s"][f"{p} train"],
                     gflop_per_image=3 * dit_rows["gflop_per_image"], eager_peak=found[("genvis eager", p)]["train_peak"],
                     compiled_peak=found[("genvis compiled", p)]["train_peak"]) for p in precisions] + rows
    print("## Training step images/s per family, eager vs compiled (train.compile=true)")
    print()
    print("| family | batch | precision | eager img/s | compiled img/s | compiled / eager | eager % peak | compiled % peak "
          "| compile time (first step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['batch']} | {r['precision']} | {r['eager']:.2f} | {r['compiled']:.2f} | "
              f"{r['compiled'] / r['eager']:.2f}x | {100 * r['eager_peak']:.0f}% | {100 * r['compiled_peak']:.0f}% | "
              f"{r['compile_s']:.0f} s |")
    print()
    return dict(rows=rows)


# ----------------------------------------------------------------------------- 3. sampling per family

def family_models(quick):
    """(name, model, tokenizer or None, sampling options, what the output is compared as)."""
    from genvis.models.linear_dit import LinearDiT
    from genvis.models.maskgit import MaskGIT
    from genvis.models.var import VAR, VAR_SCALES
    from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer
    from genvis.tokenizers.vq import VQTokenizer

    side = 8 if quick else 32
    size = dict(hidden_size=64, depth=2, num_heads=2) if quick else dict(hidden_size=384, depth=12, num_heads=6)
    dit = o1_weights(DiT(input_size=side, patch_size=2, in_channels=4, num_classes=1000, learn_sigma=False,
                         prediction_type="velocity", schedule="flow", **size))
    lin = o1_weights(LinearDiT(input_size=side, patch_size=2, in_channels=4, num_classes=1000, learn_sigma=False,
                               prediction_type="velocity", schedule="flow", **size))
    dig = o1_weights(LinearDiT(input_size=side, patch_size=2, in_channels=4, num_classes=1000, learn_sigma=False,
                               prediction_type="velocity", schedule="flow", attention="gated", v_conv=0, **size))
    flow = dict(sampler="euler", steps=10, cfg=1.5)
    scales = (1, 2, 3) if quick else VAR_SCALES
    torch.manual_seed(0)
    ms = MultiScaleVQTokenizer(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, norm_groups=8,
                               codebook_size=4096, scales=scales).eval()  # a small decoder: the transformer is timed
    var = o1_weights(VAR(vocab_size=4096, token_dim=32, scales=scales, num_classes=1000, depth=2 if quick else 8,
                         embed_dim=64 if quick else 512, num_heads=2 if quick else 8))
    n = 16 if quick else 128
    vq = VQTokenizer(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8,
                     codebook_size=4096, codebook_dim=8).eval()
    maskgit = o1_weights(MaskGIT(vocab_size=4096, num_tokens=n, token_shape=(int(n ** 0.5),) * 2 if quick else (8, 16),
                                 num_classes=1000, hidden_size=64 if quick else 512, depth=2 if quick else 12,
                                 num_heads=2 if quick else 8, intermediate_size=128 if quick else 2048))
    return [("DiT-S/2" if not quick else "DiT (quick)", dit, None, flow, "max |diff|"),
            ("LinearDiT-S/2" if not quick else "LinearDiT (quick)", lin, None, flow, "max |diff|"),
            ("DiG-S/2 (gated LinearDiT)" if not quick else "DiG (quick)", dig, None, flow, "max |diff|"),
            ("VAR-d8, 680 tokens" if not quick else "VAR (quick)", var, ms, dict(cfg=2.5, top_k=900, top_p=0.96), "equal ids"),
            ("MaskGIT 12 x 512, 128 tokens" if not quick else "MaskGIT (quick)", maskgit, vq,
             dict(steps=8, cfg=4.5, temperature=1.0), "equal ids")]


def dit_ddpm_baseline(batch, device, quick, precision):
    """Images/s of DiT's own recipe, the baseline the token generators are compared with: DiT-S/2 (learned sigma,
    linear schedule, as released) sampled by 250 DDPM steps with guidance 4 (DiT's sample.py), eager; one batch."""
    torch.manual_seed(0)
    size = dict(hidden_size=64, depth=2, num_heads=2) if quick else dict(hidden_size=384, depth=12, num_heads=6)
    model = o1_weights(DiT(input_size=8 if quick else 32, patch_size=2, in_channels=4, num_classes=1000,
                           learn_sigma=True, **size)).to(device)
    labels = torch.arange(batch) % 1000
    t0 = time.perf_counter()
    generate(model, None, labels, seed=0, sampler="ddpm", steps=250, cfg=4.0, precision=precision, batch_size=batch)
    return batch / (time.perf_counter() - t0)


def sampling_rows(index, batch, repeats, device, quick, precisions, auto, baseline):
    """The sampling table's rows (one per precision) of family_models' entry `index`."""
    labels = torch.arange(batch) % 1000
    profiled = device == "cpu"
    name, model, tokenizer, options, compare = family_models(quick)[index]
    model.to(device)
    decoder = tokenizer.to(device) if tokenizer is not None else None
    rows = []
    for precision in precisions:
        torch._dynamo.reset()  # compiled anew per precision, as a run would (a recompile ran slower)
        twin = copy.deepcopy(model)  # generate(compile=True) compiles the network in place: keep one eager

        def run(compile, **extra):
            return generate(twin if compile else model, decoder, labels, seed=0, precision=precision,
                            compile=compile, batch_size=batch, **{**options, **extra})

        t0 = time.perf_counter()
        run(True)  # compiles
        first = time.perf_counter() - t0
        fns = {"eager": lambda: run(False), "compiled": lambda: run(True)}
        if "top_k" in options:  # VAR's peer: the same draws without the KV cache (the whole prefix at every scale)
            fns["no KV cache"] = lambda: run(False, kv_cache=False)
        times = best_times(fns, repeats)  # interleaved rounds
        eager, comp = run(False), run(True)
        if compare == "max |diff|":
            agree = f"max |diff| {(eager - comp).abs().max().item():.1e}"
        elif precision == "fp32":  # the decoder's compiled kernels round differently; a flipped draw moves a patch
            agree = f"{((eager - comp).abs() < 1e-3).float().mean().item():.3f} of pixels within 1e-3"
        else:  # bf16 logits differ in the last bits, so some draws flip: compared in fp32 (above, and tests)
            agree = "draws differ in bf16"
        row = dict(family=name, precision=precision, eager=batch / times["eager"], compiled=batch / times["compiled"],
                   compile_s=first, agreement=agree)
        if "no KV cache" in times:
            row["no_kv_cache"] = batch / times["no KV cache"]
        if precision == auto:
            row["vs_dit_ddpm250"] = row["compiled"] / baseline
        if profiled:  # the kernels compiling leaves to ATen (matmuls, sorts, draws, softmax, GELU) bound what it saves
            wall, in_mm, in_aten, other, events = profile_split(lambda: run(True), top=8, record_shapes=True)
            floor, missed, parts = kernel_floor(events, max(repeats, 3))
            row.update(profiled_s=wall, matmul_s=in_mm, aten_only_s=in_aten, floor_s=floor, floor_missed_calls=missed,
                       compiled_s=times["compiled"], eager_s=times["eager"], ceiling=times["eager"] / floor,
                       floor_top=[dict(seconds=t, calls=c, kernel=k, shapes=sh) for t, c, k, sh in parts[:8]],
                       top_other=[dict(seconds=t, calls=c, kernel=k) for t, c, k in other])
        rows.append(row)
    return rows


def sampling_table(batch, repeats, device, quick, precisions):
    """Sampling images/s per family (each family in a fresh process: `sampling_rows`), the DiT DDPM-250 baseline and
    the KL decoder against diffusers (each in a fresh process too)."""
    auto = "bf16" if resolve_precision("auto", torch.device(device)) == "bf16" else "fp32"
    baseline = fresh_process(dit_ddpm_baseline, batch, device, quick, auto)
    profiled = device == "cpu"
    rows = []
    for index in range(len(FAMILY_KINDS)):
        rows += fresh_process(sampling_rows, index, batch, repeats, device, quick, precisions, auto, baseline)
    print(f"## Sampling images/s, batch {batch}, {device}; DiT-S/2 with 250 DDPM steps and guidance (DiT's sample.py, "
          f"eager, {auto}): {baseline:.3f} img/s")
    print()
    print("| family | precision | eager img/s | compiled img/s | compiled / eager | compile time (first batch) | agreement "
          f"| peer: VAR without KV cache, eager | compiled vs DiT-S/2 DDPM-250 ({auto}) |"
          + (" compiled batch in matmuls | in other ATen kernels (sort, topk, draws, softmax, GELU) | floor: those "
             "kernels replayed alone | ceiling of compiled / eager (eager / floor) |" if profiled else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if profiled else ""))
    for r in rows:
        agreement = r["agreement"].replace("|", "\\|")  # "max |diff|" inside a markdown cell
        line = (f"| {r['family']} | {r['precision']} | {r['eager']:.2f} | {r['compiled']:.2f} | {r['compiled'] / r['eager']:.2f}x "
                f"| {r['compile_s']:.0f} s | {agreement} | "
                + (f"{r['no_kv_cache']:.2f} img/s ({r['compiled'] / r['no_kv_cache']:.2f}x)" if "no_kv_cache" in r else "")
                + " | " + (f"{r['vs_dit_ddpm250']:.0f}x" if "vs_dit_ddpm250" in r else "") + " |")
        if profiled:
            line += (f" {100 * r['matmul_s'] / r['profiled_s']:.0f}% | {100 * r['aten_only_s'] / r['profiled_s']:.0f}% | "
                     f"{r['floor_s']:.2f} s (compiled {r['compiled_s']:.2f}, eager {r['eager_s']:.2f}"
                     + (f"; {r['floor_missed_calls']} calls not replayed" if r["floor_missed_calls"] else "")
                     + f") | {r['ceiling']:.2f}x |")
        print(line)
    print()
    if profiled:
        for r in rows:
            print(f"{r['family']}, {r['precision']}: the floor's largest kernels: "
                  + "; ".join(f"{k['kernel']} {k['shapes']} x {k['calls']}: {1e3 * k['seconds']:.0f} ms" for k in r["floor_top"][:4]))
        print()
    return dict(batch=batch, precision=auto, dit_ddpm250=baseline, rows=rows,
                vae=fresh_process(vae_table, batch, repeats, device, quick))


def vae_table(batch, repeats, device, quick):
    """A KL-VAE decoder in float32, as `generate` decodes: genvis's KLTokenizer.decode through `compile_decoder`
    (what --compile does) vs diffusers' AutoencoderKL.decode (the same network, eager), rounds interleaved."""
    from diffusers import AutoencoderKL

    from genvis.generate import compile_decoder
    from genvis.tokenizers.kl import KLTokenizer

    torch.manual_seed(0)
    widths = (32, 32) if quick else (128, 256, 512, 512)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
                        block_out_channels=widths, layers_per_block=2, latent_channels=4, norm_num_groups=32).eval().to(device)
    tokenizer = KLTokenizer(vae)
    side = 8 if quick else 32
    z = torch.randn(batch, 4, side, side, device=device)
    compiled = compile_decoder(tokenizer.decode, torch.device(device))

    @torch.no_grad()
    def peer():
        out = vae.decode(z / vae.config.scaling_factor).sample
        synchronize(device)
        return out

    @torch.no_grad()
    def ours():
        out = compiled(z)
        synchronize(device)
        return out

    t0 = time.perf_counter()
    ours()  # compiles
    first = time.perf_counter() - t0
    times = best_times({"peer": peer, "ours": ours}, repeats)
    diff = (peer() - ours()).abs().max().item()
    out = side * 2 ** (len(widths) - 1)
    print(f"KL-VAE decoder ({'SD-VAE f8' if not quick else 'quick'}, 4 x {side} x {side} -> {out} x {out}), batch {batch}, "
          f"float32: diffusers AutoencoderKL.decode {batch / times['peer']:.2f} img/s, genvis compiled decode "
          f"{batch / times['ours']:.2f} img/s ({times['peer'] / times['ours']:.2f}x; compile {first:.0f} s; max |diff| {diff:.1e})")
    print()
    return dict(precision="fp32", diffusers=batch / times["peer"], compiled=batch / times["ours"], compile_s=first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="DiT-S/2 training batch")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true", help="leave out tables 1 and 2")
    parser.add_argument("--skip-sample", action="store_true", help="leave out table 3")
    parser.add_argument("--dit-xl", action=argparse.BooleanOptionalAction, default=None,
                        help="table 1b, DiT-XL/2 training (default: on a GPU only; it holds three 675M-parameter models "
                        "with their AdamW states, about 35 GB)")
    parser.add_argument("--dit-xl-batch", type=int, default=64, help="DiT-XL/2 training batch (table 1b)")
    parser.add_argument("--precisions", default=None, help="comma-separated fp32, bf16, fp16 (default: fp32, and bf16 "
                        "where the device runs it natively); the training tables time fp32 and bf16 of them")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing useful")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (benchmarks/plots.py throughput)")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}")
    precisions = benchmark_precisions(args.device, args.precisions)
    trained = [p for p in precisions if p in ("fp32", "bf16")]
    peaks = {p: matmul_peak(compute_dtype(p), args.device) for p in trained}
    print("measured matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    print()
    results = dict(device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                   peaks_gflops={k: v / 1e9 for k, v in peaks.items()})
    if not args.skip_train and trained:
        results["dit_training"] = fresh_process(dit_training_table, args.batch, args.repeats, args.device, peaks, trained)
        if args.dit_xl if args.dit_xl is not None else args.device != "cpu":
            results["dit_xl_training"] = fresh_process(dit_training_table, args.dit_xl_batch, args.repeats, args.device,
                                                       peaks, trained, "XL")
        results["training"] = family_training_table(args.batch, args.repeats, args.device, peaks, args.quick, trained,
                                                    results["dit_training"])
    if not args.skip_sample:
        results["sampling"] = sampling_table(args.sample_batch, args.repeats, args.device, args.quick, precisions)
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
