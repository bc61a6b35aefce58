"""Plots of a benchmarks/throughput.py run: time and peak memory against seq_len for the
op-level long sweep, one panel per (dtype, head_dim, causal) and one row per mode (needs
matplotlib; skipped with a message without it)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

from summary import ordered

SPEED_PLOT, MEMORY_PLOT = "speed_vs_seqlen.png", "memory_vs_seqlen.png"
PLOT_MODES = ("fwd", "bwd", "fwd_bwd")


def write_plots(rows: Sequence[dict], out: Path) -> List[str]:
    """Speed and memory against seq_len for the op-level long sweep; returns messages."""
    sweep = [r for r in rows if r["level"] == "op" and r["shape"] == "long"]
    if not sweep:
        return ["plots: no long-sweep measurements, no plots written"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed"]
    messages = []
    for metric, name, ylabel in (("ms_p50", SPEED_PLOT, "time per call, ms (median)"),
                                 ("peak_mem_mb", MEMORY_PLOT, "peak memory above inputs, MiB")):
        data = [r for r in sweep if not math.isnan(r[metric])]
        if not data:
            messages.append(f"plots: no {metric} numbers (none on CPU), {name} not written")
            continue
        modes = [m for m in PLOT_MODES if any(r["mode"] == m for r in data)]
        panels = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in data})
        providers = ordered({r["provider"] for r in data})
        fig, axes = plt.subplots(len(modes), len(panels), squeeze=False,
                                 figsize=(4.2 * len(panels), 3.4 * len(modes)))
        for i, mode in enumerate(modes):
            for j, (dtype, head_dim, causal) in enumerate(panels):
                ax = axes[i][j]
                for provider in providers:
                    pts = sorted((r["seq_len"], r[metric]) for r in data
                                 if (r["mode"], r["dtype"], r["head_dim"], r["causal"],
                                     r["provider"]) == (mode, dtype, head_dim, causal, provider))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{mode} {dtype} d={head_dim}{' causal' if causal else ''}",
                             fontsize=9)
                ax.set_xlabel("seq_len (batch x seq_len fixed)")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"op level, long sweep: {data[0]['device']}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        messages.append(f"wrote {out / name}")
    return messages
