"""Figures of the benchmarks (``python -m topk_lib.bench``): memory and time against a size.

Each function takes the rows of ``data/results/bench_<device>.csv`` as a DataFrame and returns
a Figure; points that did not fit or timed out are drawn as crosses at the top of the panel.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import pandas as pd

from topk_lib.bench.report import method_label
from topk_lib.plots.style import styled

# One colour per method in every figure; top-k variants (k, C, ff_k) take the TOPK colours in order.
METHOD_COLORS = {"vanilla": "tab:brown", "dense": "tab:brown", "sdpa": "tab:green", "performer": "tab:orange",
                 "chunked": "tab:blue"}
TOPK_COLORS = ("tab:red", "tab:purple", "tab:pink", "tab:olive")


@styled
def plot_memory_time(rows: pd.DataFrame, *, x: str, xlabel: str, title: str, passes=("fwd", "fwd+bwd")):
    """Peak memory (top) and median time (bottom) against ``x``, one column per pass, log-log axes."""
    df = rows.copy()
    df["label"] = df.apply(method_label, axis=1)
    df["peak_MB"] = df["peak_bytes"] / 1e6
    passes = [p for p in passes if (df["pass"] == p).any()]
    fig, axes = plt.subplots(2, len(passes), figsize=(5.6 * len(passes), 7.2), squeeze=False, sharex=True)
    palette = _palette(df)
    for j, p in enumerate(passes):
        for i, (col, ylabel) in enumerate((("peak_MB", "peak memory (MB over inputs)"), ("median_s", "median time (s)"))):
            ax = axes[i][j]
            part = df[df["pass"] == p]
            ok = part[part.status == "ok"]
            for label, g in ok.groupby("label"):
                g = g.sort_values(x)
                ax.plot(g[x], g[col], marker="o", label=label, color=palette[label])
            failed = part[part.status != "ok"]
            if len(failed) and len(ok):
                top = ok[col].max() * 1.5
                for label, g in failed.groupby("label"):
                    ax.scatter(g[x], [top] * len(g), marker="x", s=60, color=palette[label])
                ax.annotate("× did not fit / timed out", xy=(0.02, 0.97), xycoords="axes fraction", va="top", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{p}")
            if i == 1:
                ax.set_xlabel(xlabel)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.suptitle(textwrap.fill(title, width=int(11 * 5.6 * len(passes))))  # a long title would widen a one-column figure
    fig.tight_layout()
    return fig


def _palette(df) -> dict:
    """Label -> colour: fixed per method, so a method looks the same in every figure."""
    labels = sorted(df.label.unique())
    topk = iter(TOPK_COLORS)
    return {label: METHOD_COLORS.get(label.split()[0]) or next(topk, "tab:gray") for label in labels}


__all__ = ["plot_memory_time"]
