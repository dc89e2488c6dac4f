"""PNG plots of the benchmarks' JSON results (matplotlib: `pip install -e ".[benchmarks]"`).

    python benchmarks/sampler_error.py --json sampler_error.json
    python benchmarks/plots.py sampler-error sampler_error.json docs/sampler_error.png
    python benchmarks/sampler_digits.py --run runs/digits-dit --json sampler_digits.json
    python benchmarks/plots.py sampler-digits sampler_digits.json docs/sampler_digits.png
    python benchmarks/attention_scaling.py --json attention_scaling.json
    python benchmarks/plots.py attention-scaling attention_scaling.json docs/attention_scaling.png
    python benchmarks/speed.py --json speed.json
    python benchmarks/plots.py throughput speed.json docs/throughput.png

sampler-error: RMS error against the exact probability-flow solution vs NFE, log-log, one line per genvis
sampler (its best named grid at each NFE) and per diffusers scheduler (default options), the searched grids as
points. sampler-digits: fd of the digits features vs NFE, one line per sampler. attention-scaling: forward time vs
tokens of DiT-S/2 and its linear twin. throughput: benchmarks/speed.py's tables as bars.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('benchmarks/plots.py needs matplotlib: pip install -e ".[benchmarks]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_per_nfe(rows, key):
    """{label: [(nfe, error), ...]}: for each label and target NFE the smallest finite error."""
    best = defaultdict(dict)
    for r in rows:
        err = r.get("error")
        if err is None or not math.isfinite(err):
            continue
        label, nfe = key(r), r["target_nfe"]
        best[label][nfe] = min(err, best[label].get(nfe, math.inf))
    return {label: sorted(points.items()) for label, points in best.items()}


def sampler_error(data: dict, out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    named = [r for r in data["genvis"] if r.get("grid") != "searched"]
    for label, points in sorted(_best_per_nfe(named, lambda r: r["sampler"]).items()):
        ax.plot(*zip(*points), marker="o", label=f"genvis {label} (best named grid)")
    best_peer = _best_per_nfe(data["diffusers"], lambda r: "diffusers")["diffusers"]
    ax.plot(*zip(*best_peer), marker="x", color="black", linestyle="--", linewidth=2,
            label="diffusers, best scheduler and options at each NFE")
    searched = [r for r in data["genvis"] if r.get("grid") == "searched" and math.isfinite(r.get("error", math.nan))]
    if searched:
        ax.scatter([r["target_nfe"] for r in searched], [r["error"] for r in searched], marker="*", s=120, color="black",
                   zorder=5, label="genvis, searched grids")
    nfes = sorted({r["target_nfe"] for r in data["genvis"]})
    m = data["model"]
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMS error vs the exact PF-ODE solution",
           title=f"Sampler error: {m['components']}-Gaussian mixture, D={m['dim']}, {m['samples']} samples")
    _finish_axes(ax, nfes, legend_outside=True)
    _save(fig, out)


def sampler_digits(data: list, out: Path) -> None:
    plt = _pyplot()
    lines, reference = defaultdict(list), None
    for r in data:
        if r.get("reference"):
            reference = r
        else:
            lines[f"{r['sampler']} ({r['grid']})"].append((r["steps"], r["fd"]))
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in sorted(lines.items()):  # other grids dashed (and the colour cycle's 10 colours suffice)
        ax.plot(*zip(*sorted(points)), marker="o", label=label, linestyle="-" if label.endswith("(default)") else "--")
    if reference is not None:
        ax.axhline(reference["fd"], color="black", linestyle=":", label=f"ddpm {reference['steps']} steps")
    nfes = sorted({n for points in lines.values() for n, _ in points})
    ax.set(xscale="log", xlabel="NFE (steps)", ylabel="fd (digits classifier features)",
           title="Digits DiT: fd of class-balanced samples vs NFE")
    _finish_axes(ax, nfes, legend_outside=True)
    _save(fig, out)


def attention_scaling(data: dict, out: Path) -> None:
    """Forward ms vs tokens, log-log: softmax and linear, whole model and attention layer, per dtype."""
    plt = _pyplot()
    parts = sorted({r["part"] for r in data["rows"]}, key=["model", "attention"].index)
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for dtype, style in (("fp32", "-"), ("bf16", "--")):
            rows = sorted((r for r in data["rows"] if r["part"] == part and r["dtype"] == dtype), key=lambda r: r["tokens"])
            for kind, color in (("softmax", "tab:red"), ("linear", "tab:blue")):
                if rows:
                    ax.plot([r["tokens"] for r in rows], [r[kind]["ms"] for r in rows], style, color=color, marker="o",
                            label=f"{kind}, {dtype}")
        tokens = sorted({r["tokens"] for r in data["rows"]})
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward ms (batch 1)",
               title=f"DiT-S/2 vs its linear twin: {'whole model' if part == 'model' else 'attention layer'}")
        _finish_axes(ax, tokens)
    _save(fig, out)


def _tick(*parts: str) -> str:
    """A bar's tick label: each comma-separated part of `parts` on its own lines, wrapped at 11 characters."""
    return "\n".join(textwrap.fill(p, 11) for part in parts for p in part.split(", "))


def throughput(data: dict, out: Path) -> None:
    """Bars of benchmarks/speed.py: DiT-S/2 training and forward images/s per model and precision (with diffusers),
    training step images/s per family, and sampling images/s per family, eager vs compiled, with the peers."""
    plt = _pyplot()
    training = "dit_training" in data
    fig, axes = plt.subplots(2 if training else 1, 2, figsize=(13, 9.6 if training else 4.8), squeeze=False)
    axes = list(axes.flat)
    if training:
        tables = [data["dit_training"]] + ([data["dit_xl_training"]] if "dit_xl_training" in data else [])
        rows = [dict(r, model=f"{t.get('model', 'DiT-S/2')} {r['model']}") if len(tables) > 1 else r
                for t in tables for r in t["rows"]]
        for ax, what in zip(axes[:2], ("train", "forward")):
            labels = [f"{r['model']}\n{r['precision']}".replace("DiT-S/2 ", "DiT-S/2\n").replace("DiT-XL/2 ", "DiT-XL/2\n")
                      for r in rows]
            bars = ax.bar(range(len(rows)), [r[what] for r in rows],
                          color=["tab:gray" if r["model"].startswith("diffusers") else
                                 "tab:blue" if "compiled" in r["model"] else "tab:cyan" for r in rows])
            ax.bar_label(bars, [f"{r[what]:.1f}\n{100 * r[what + '_peak']:.0f}%" if math.isfinite(r[what + "_peak"])
                                else f"{r[what]:.1f}" for r in rows], fontsize=7)
            ax.set_xticks(range(len(rows)), labels, fontsize=7 if len(tables) == 1 else 5)
            sizes = " and ".join(f"{t.get('model', 'DiT-S/2')} batch {t['batch']}" for t in tables)
            ax.set(ylabel="images/s", title=f"{'Training step' if what == 'train' else 'Forward'}, {sizes}"
                                            + ("\n" if len(tables) > 1 else " ") + "(label: img/s, % of matmul peak)")
            if len(tables) > 1:  # DiT-XL/2 runs about 10x slower than DiT-S/2
                ax.set_yscale("log")
                ax.set_ylabel("images/s (log)")
                if what == "train":
                    ax.axhline(107, color="tab:red", ls="--", lw=1, label="fast-DiT DiT-XL/2, one A100, fp16 (published)")
                    ax.legend(fontsize=7)
        if "training" in data:
            rows = data["training"]["rows"]
            _eager_compiled(axes[2], rows, [_tick(r["family"], r["precision"], f"batch {r['batch']}") for r in rows])
            axes[2].set(title="Training step per family (label: compiled img/s, compiled / eager)")
        axes = axes[3:] if "training" in data else axes[2:]
    if "sampling" in data:  # absent after --skip-sample
        sampling = data["sampling"]
        rows = sampling["rows"]
        ax = axes[0]
        _eager_compiled(ax, rows, [_tick(r["family"], r["precision"]) for r in rows])
        peers = [(i, r["no_kv_cache"]) for i, r in enumerate(rows) if "no_kv_cache" in r]
        if peers:
            ax.scatter([i for i, _ in peers], [v for _, v in peers], marker="_", s=300, color="tab:red", zorder=3,
                       label="VAR without KV cache (eager)")
        if "dit_ddpm250" in sampling:
            ax.axhline(sampling["dit_ddpm250"], color="tab:gray", ls="--", lw=1,
                       label=f"DiT-S/2, 250 DDPM steps ({sampling['precision']}, eager)")
        ax.legend(fontsize=7)
        ax.set(title=f"Sampling, batch {sampling['batch']} (label: compiled img/s, compiled / eager)")
    for ax in fig.axes:
        ax.margins(y=0.2)
        if not ax.has_data():  # --skip-train: one panel; --skip-sample: an empty fourth
            ax.axis("off")
    fig.suptitle(f"benchmarks/speed.py on {data['device']}, {data['threads']} threads, torch {data['torch']}", fontsize=9)
    _save(fig, out)


def _eager_compiled(ax, rows, labels) -> None:
    """Side-by-side eager and compiled images/s bars of `rows` (dicts with eager, compiled), on a log axis."""
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [r["eager"] for r in rows], width, color="tab:cyan", label="eager")
    compiled = ax.bar([x + width / 2 for x in xs], [r["compiled"] for r in rows], width, color="tab:blue", label="compiled")
    ax.bar_label(compiled, [f"{r['compiled']:.2f}\n{r['compiled'] / r['eager']:.2f}x" for r in rows], fontsize=6)
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_yscale("log")
    ax.set(ylabel="images/s (log)")
    ax.legend(fontsize=7)


def _finish_axes(ax, ticks, legend_outside: bool = False) -> None:
    """Label the log x axis at `ticks` only, a light major grid, and the legend (beside the axes when outside)."""
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)


def _save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"wrote {out}")


PLOTS = {"sampler-error": sampler_error, "sampler-digits": sampler_digits, "attention-scaling": attention_scaling,
         "throughput": throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(PLOTS))
    parser.add_argument("json", type=Path, help="the benchmark's --json output")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{args.json}: not a readable JSON file ({err})") from None
    try:
        PLOTS[args.kind](data, args.out)
    except (KeyError, TypeError) as err:
        raise SystemExit(f"{args.json}: not the JSON of benchmarks/{args.kind.replace('-', '_')}.py (missing {err})") from None


if __name__ == "__main__":
    main()
