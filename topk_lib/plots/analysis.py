"""Figures of the analysis notebooks (00-02): error, mass kept and k needed against k, per layer and head.

Each function takes a tidy data frame (or tables of one) and returns a Figure; saving goes
through :func:`topk_lib.plots.style.save_figure`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from topk_lib.plots.style import styled

__all__ = [
    "plot_error_vs_k",
    "plot_metric_vs_k",
    "plot_layer_head_heatmaps",
    "plot_bars",
    "plot_panels_vs_k",
    "plot_k_vs_position",
    "plot_head_drilldown",
]


@styled
def plot_error_vs_k(df: pd.DataFrame, *, title: str, x="k", y="relative_error", hue=None, logy=True):
    """Median lines (band: min-max) of an error metric against k, log axes; ``df`` is tidy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = "viridis" if hue is not None else None
    sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", ax=ax, estimator="median", errorbar=("pi", 100), palette=palette)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("k (keys kept per query)")
    ax.set_ylabel("relative output error ‖o_k − o‖ / ‖o‖")
    ax.set_title(title)
    fig.tight_layout()
    return fig


@styled
def plot_metric_vs_k(df: pd.DataFrame, *, y: str, ylabel: str, title: str, hue="layer", logy=False):
    """One line per ``hue`` value (median over heads, band = interquartile range) against k."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=df, x="k", y=y, hue=hue, estimator="median", errorbar=("pi", 50), palette="viridis", ax=ax)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("k (keys kept per query)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend() is not None:
        ax.legend(title=hue, fontsize="small", ncols=2 if df[hue].nunique() > 8 else 1)
    fig.tight_layout()
    return fig


@styled
def plot_layer_head_heatmaps(panels: dict, *, title: str, cbar_label: str, fmt=".2f", annotate=True, cmap="mako",
                             vmin=None, vmax=None):
    """Side-by-side layer x head heatmaps; ``panels`` maps a panel title to a [layer, head] DataFrame."""
    n = len(panels)
    first = next(iter(panels.values()))
    height = max(3.0, 0.28 * first.shape[0] + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(0.55 * first.shape[1] * n + 2.5 * n, height), squeeze=False)
    for ax, (name, table) in zip(axes[0], panels.items()):
        sns.heatmap(table, ax=ax, annot=annotate and table.size <= 400, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax,
                    cbar_kws={"label": cbar_label}, annot_kws={"fontsize": 6})
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_bars(df: pd.DataFrame, *, x: str, y: str, xlabel: str, ylabel: str, title: str, logy=False, hue=None):
    """Bars of ``y`` per ``x`` (e.g. KL per layer)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * df[x].nunique() + 2), 3.8))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, color=None if hue else sns.color_palette("mako")[3], seed=0)
    if df[x].astype(str).str.len().max() > 6:
        ax.tick_params(axis="x", labelrotation=25)
    if hue is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title=hue)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


@styled
def plot_panels_vs_k(df: pd.DataFrame, *, panels: dict, title: str, hue="layer", logy=()):
    """Side-by-side metric-vs-k panels from a tidy frame (``metric``, ``k``, ``value``, ``hue``).

    ``panels`` maps a metric name to its axis label; lines are medians over heads, bands
    the interquartile range; metrics named in ``logy`` get a log y axis.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    for i, (ax, (metric, label)) in enumerate(zip(axes[0], panels.items())):
        sns.lineplot(data=df[df["metric"] == metric], x="k", y="value", hue=hue, estimator="median",
                     errorbar=("pi", 50), palette="viridis", ax=ax, legend=i == len(panels) - 1)
        ax.set_xscale("log", base=2)
        if metric in logy:
            ax.set_yscale("log")
        ax.set_xlabel("k (keys kept per query)")
        ax.set_ylabel(label)
    legend = axes[0][-1].get_legend()
    if legend is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title=hue, fontsize="small",
                        ncols=2 if df[hue].nunique() > 12 else 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_k_vs_position(df: pd.DataFrame, *, y_label: str, title: str, hue="layer"):
    """A per-row statistic against query position: ``df`` has ``position`` (bucket start), ``value``, ``hue``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=df, x="position", y="value", hue=hue, estimator="median", errorbar=None, palette="viridis",
                 marker="o", ax=ax)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlim(left=0)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("query position (bucket start, tokens)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title=hue, fontsize="small",
                        ncols=2 if df[hue].nunique() > 12 else 1)
    fig.tight_layout()
    return fig


@styled
def plot_head_drilldown(probs, kept, tokens, *, title: str):
    """One head's attention map ``probs [L, L]`` with the kept entries ``kept [L, L]`` (bool) outlined."""
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(0.22 * n + 3, 0.22 * n + 1.5))
    sns.heatmap(probs, ax=ax, cmap="rocket_r", vmin=0, vmax=float(probs.max()), xticklabels=tokens, yticklabels=tokens,
                cbar_kws={"label": "attention probability", "shrink": 0.6}, square=True)
    rows, cols = np.nonzero(kept)
    ax.scatter(cols + 0.5, rows + 0.5, marker="s", s=18, facecolors="none", edgecolors="#1f77b4", linewidths=0.8,
               label="kept by top-k")
    ax.tick_params(labelsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig
