"""Feature-extraction speed: genvis compute_metrics vs torch_fidelity.calculate_metrics, same
images, same extractor, same machine, one run; plus genvis's peak memory for 10k vs 2k images.

    python benchmarks/eval_speed.py [--num 2000] [--big 10000] [--batch 64] [--rounds 3]
                                    [--inception-budget 120] [--inception-rounds 2]

Rows: extractor "genvis-digits" (genvis's shipped classifier) and "inception-v3-compat"
(torch-fidelity's Inception-v3 with synthetic weights in its layout written to a local file:
nothing is downloaded, and throughput does not depend on the weight values). Each row runs FID
between two folders of 32x32 RGB PNGs (samples and reference, N images each) with both tools,
interleaved, best of `--rounds`; images/s counts both folders (2N images). The Inception row uses fewer images per
folder when all of them would not fit in `--inception-budget` seconds (at the probed rate); the output
says how many it used. On a 2-core CPU, `--inception-budget 1800 --inception-rounds 1` runs all 2,000.

Memory: in a fresh child process per case, peak RSS (VmHWM after a reset) growth of genvis compute_metrics
(fid, digits features) on a 2k and a 10k image ADM .npz (samples = reference = that file).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 32, 32, 3]: blocky noise (8x8 noise upsampled x4), so PNGs are not all-random."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return small.repeat(4, axis=1).repeat(4, axis=2)


def write_folder(path: Path, images: np.ndarray) -> Path:
    from PIL import Image

    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:06d}.png")
    return path


def time_genvis(samples, ref, features, weights, batch):
    from genvis.evaluation.reference import compute_metrics

    t0 = time.perf_counter()
    r = compute_metrics(str(samples), str(ref), metrics=("fid",), features=features, weights=weights,
                        batch_size=batch)
    return time.perf_counter() - t0, r["frechet_inception_distance"]


def time_fidelity(samples, ref, extractor, weights, batch):
    import torch_fidelity

    import genvis.evaluation.features  # noqa: F401  registers "genvis-digits"

    t0 = time.perf_counter()
    r = torch_fidelity.calculate_metrics(input1=str(samples), input2=str(ref), fid=True, feature_extractor=extractor,
                                         feature_extractor_weights_path=weights, cache=False, cuda=False,
                                         batch_size=batch, verbose=False)
    return time.perf_counter() - t0, r["frechet_inception_distance"]


def compare(samples, ref, n_total, features, extractor, weights, batch, rounds):
    best_g = best_t = float("inf")
    fid_g = fid_t = None
    for _ in range(rounds):  # interleaved
        t, fid_g = time_genvis(samples, ref, features, weights, batch)
        best_g = min(best_g, t)
        t, fid_t = time_fidelity(samples, ref, extractor, weights, batch)
        best_t = min(best_t, t)
    return {"extractor": extractor, "images": n_total, "genvis_s": best_g, "tf_s": best_t,
            "genvis_ips": n_total / best_g, "tf_ips": n_total / best_t, "ratio": best_t / best_g,
            "fid_genvis": fid_g, "fid_tf": fid_t}


def inception_rate(weights, batch) -> float:
    """Images/s of genvis's Inception extractor on one batch of 32x32 noise (after a warm-up)."""
    import torch

    from genvis.evaluation.features import build_extractor, extract

    ext = build_extractor("inception", weights=weights, features=["2048"])
    x = torch.from_numpy(make_images(batch, 99)).permute(0, 3, 1, 2).contiguous()
    extract(ext, [x[:4]])
    t0 = time.perf_counter()
    extract(ext, [x])
    return batch / (time.perf_counter() - t0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def child_memory(npz: str, batch: int) -> None:
    """Runs in a fresh process: prints JSON with RSS (KiB) after imports and peak RSS during compute_metrics.

    ru_maxrss of a freshly exec'd child is useless here: it starts at the parent's RSS (the kernel
    records the pre-exec, vfork-shared address space) and at the import peak. So the peak is VmHWM
    of this process's own address space, reset to the current RSS (clear_refs 5) after imports.
    """
    import torch  # noqa: F401

    from genvis.evaluation.reference import compute_metrics

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    r = compute_metrics(npz, npz, metrics=("fid",), features="digits", batch_size=batch)
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "num": r["num_samples"]}))


def memory_case(npz: Path, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-memory", str(npz), "--batch", str(batch)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000, help="images per folder (samples and reference)")
    parser.add_argument("--big", type=int, default=10000, help="images in the large .npz of the memory case")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the digits row (best of)")
    parser.add_argument("--inception-rounds", type=int, default=2)
    parser.add_argument("--inception-budget", type=float, default=120.0,
                        help="seconds the whole Inception row may take (approximately)")
    parser.add_argument("--child-memory", metavar="NPZ", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.batch)
        return

    import warnings

    import torch
    import torch_fidelity

    from genvis.evaluation.features import write_synthetic_inception_weights

    # torch-fidelity's default 4 DataLoader workers on a 2-CPU machine: torch warns on every call
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    t_start = time.perf_counter()
    print(f"# eval_speed: torch {torch.__version__}, torch-fidelity {torch_fidelity.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, batch {args.batch}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="genvis_eval_speed_") as tmp:
        tmp = Path(tmp)
        samples_img, ref_img = make_images(args.num, 0), make_images(args.num, 1)
        samples = write_folder(tmp / "samples", samples_img)
        ref = write_folder(tmp / "ref", ref_img)
        weights = write_synthetic_inception_weights(tmp / "inception_synthetic.pth")

        rows.append(compare(samples, ref, 2 * args.num, "digits", "genvis-digits", None, args.batch, args.rounds))

        rate = inception_rate(str(weights), args.batch)
        n_inc = args.num
        note = ""
        # 2 tools x rounds x 2 folders x n images within the budget (at genvis's probed rate)
        fit = int(args.inception_budget * rate / (2 * args.inception_rounds * 2))
        if fit < args.num:
            n_inc = max(args.batch, fit)
            note = (f"Inception probe {rate:.1f} img/s: Inception row uses {n_inc} images per folder "
                    f"(budget {args.inception_budget:.0f} s; raise --inception-budget for all {args.num})")
        inc_s = write_folder(tmp / "samples_inc", samples_img[:n_inc])
        inc_r = write_folder(tmp / "ref_inc", ref_img[:n_inc])
        row = compare(inc_s, inc_r, 2 * n_inc, "inception", "inception-v3-compat", str(weights), args.batch,
                      args.inception_rounds)
        rows.append(row)

        small, big = tmp / "small.npz", tmp / "big.npz"
        np.savez(small, arr_0=make_images(2000, 2))
        np.savez(big, arr_0=make_images(args.big, 3))
        mem_small = memory_case(small, args.batch)
        mem_big = memory_case(big, args.batch)

    print()
    print("| extractor | images (2 folders) | genvis s | genvis img/s | torch-fidelity s | torch-fidelity img/s "
          "| genvis/torch-fidelity | FID genvis | FID torch-fidelity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['extractor']} | {r['images']} | {r['genvis_s']:.2f} | {r['genvis_ips']:.1f} | {r['tf_s']:.2f} "
              f"| {r['tf_ips']:.1f} | {r['ratio']:.2f}x | {r['fid_genvis']:.4f} | {r['fid_tf']:.4f} |")
    print()
    print(f"- digits row: best of {args.rounds} interleaved rounds; Inception row: best of {args.inception_rounds}.")
    print("- Inception uses synthetic weights from a local file (no download); throughput does not depend on "
          "weight values, FID values of that row are meaningless.")
    if note:
        print(f"- {note}.")
    print("- torch-fidelity decodes with its default DataLoader (num_workers=min(4, 2*cpu_count)); "
          "genvis decodes in the calling process.")
    print()
    g_s = (mem_small["peak_kib"] - mem_small["base_kib"]) / 1024
    g_b = (mem_big["peak_kib"] - mem_big["base_kib"]) / 1024
    print("| genvis compute_metrics, .npz, digits, fid (samples = ref) | peak RSS MiB | growth over imports MiB |")
    print("|---|---|---|")
    print(f"| {mem_small['num']} images | {mem_small['peak_kib'] / 1024:.1f} | {g_s:.1f} |")
    print(f"| {mem_big['num']} images | {mem_big['peak_kib'] / 1024:.1f} | {g_b:.1f} |")
    mem_ratio = g_b / g_s if g_s > 0 else float("nan")
    print(f"| ratio {mem_big['num']}/{mem_small['num']} | {mem_big['peak_kib'] / mem_small['peak_kib']:.2f}x "
          f"| {mem_ratio:.2f}x |")
    print()
    d, i = rows
    print(f"Summary: genvis is {d['ratio']:.2f}x torch-fidelity's throughput with genvis-digits "
          f"({d['genvis_ips']:.0f} vs {d['tf_ips']:.0f} img/s) and {i['ratio']:.2f}x with inception-v3-compat "
          f"({i['genvis_ips']:.1f} vs {i['tf_ips']:.1f} img/s); peak RSS growth {g_s:.1f} MiB at "
          f"{mem_small['num']} vs {g_b:.1f} MiB at {mem_big['num']} images ({mem_ratio:.2f}x); "
          f"total {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
