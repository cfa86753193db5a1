"""Figures of notebook 07: practical selectors against the exact top-k oracle.

Each function takes frames of :mod:`topk_lib.analysis.selection` /
:mod:`topk_lib.experiments.selectors` and returns a Figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from topk_lib.plots.style import styled

__all__ = ["plot_frontier", "plot_selector_heatmaps", "plot_decode_dynamics", "plot_cascade", "plot_downstream",
           "selector_palette"]

METRIC_LABELS = {
    "rel_error": "relative output error ‖o_S − o‖/‖o‖",
    "mass": "attention mass captured",
    "recall": "recall of the oracle's top-|S| keys",
    "perplexity": "perplexity",
    "accuracy": "passkey accuracy",
}


def selector_palette(names):
    """One colour per selector, the oracle in black (it is the bound the others approach)."""
    others = [n for n in names if n != "oracle"]
    colours = dict(zip(others, sns.color_palette("tab10", max(len(others), 1))))
    return {"oracle": "black", **colours}


@styled
def plot_frontier(points: pd.DataFrame, *, metrics=("rel_error", "mass", "recall"), title="", logy=("rel_error",)):
    """One panel per metric against the mean keys kept per query; one line per selector, oracle dashed.

    ``points``: rows ``selector, budget, kept`` and the metrics (means over layers and heads,
    :func:`topk_lib.analysis.selection.frontier`), one frame per model with a ``model`` column
    giving one row of panels each.
    """
    models = list(points["model"].unique()) if "model" in points else [None]
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.6 * len(metrics), 3.8 * len(models)), squeeze=False)
    palette = selector_palette(list(points["selector"].unique()))
    for row, model in zip(axes, models):
        df = points if model is None else points[points["model"] == model]
        for ax, metric in zip(row, metrics):
            for name, part in df.groupby("selector", sort=False):
                part = part.sort_values("kept")
                oracle = name == "oracle"
                ax.plot(part["kept"], part[metric], marker="o", ms=4, color=palette[name], lw=2.2 if oracle else 1.4,
                        ls="--" if oracle else "-", label=f"{name} (bound at fixed B)" if oracle else name, zorder=3 if oracle else 2)
            ax.set_xscale("log", base=2)
            if metric in logy:
                ax.set_yscale("log")
            ax.set_xlabel("keys kept per query (mean)")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.set_title(f"{model}: {metric}" if model else metric, fontsize="medium")
    axes[0, -1].legend(fontsize="x-small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_selector_heatmaps(metrics: pd.DataFrame, *, metric="rel_error", budget, title="", vmax=None):
    """Layer x head heatmaps of ``metric`` at one budget, one panel per selector (shared colour scale)."""
    df = metrics[metrics["budget"] == budget]
    names = list(df["selector"].unique())
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    vmax = float(df[metric].quantile(0.98)) if vmax is None else vmax
    for ax, name in zip(axes.flat, names):
        grid = df[df["selector"] == name].pivot_table(index="layer", columns="head", values=metric)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap="magma_r" if metric == "rel_error" else "viridis",
                    cbar=ax is axes.flat[len(names) - 1])
        ax.set_title(name, fontsize="medium")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or f"{METRIC_LABELS.get(metric, metric)} at budget {budget}")
    fig.tight_layout()
    return fig


@styled
def plot_decode_dynamics(dynamics: pd.DataFrame, *, title=""):
    """Per layer (median over heads): step-to-step overlap, shared-vs-own GQA mass, and mass by block size.

    ``dynamics``: :func:`topk_lib.analysis.selection.decode_dynamics` rows, with a ``model`` column.
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    med = dynamics.groupby(["model", "layer", "metric"], as_index=False)["value"].median()
    models = list(med["model"].unique())
    colours = dict(zip(models, sns.color_palette("deep", len(models))))
    for model in models:
        m = med[med["model"] == model]
        depth = m["layer"] / max(m["layer"].max(), 1)
        for metric, ls in (("overlap", "-"), ("group_overlap", ":")):
            part = m[m["metric"] == metric]
            axes[0].plot(depth[part.index], part["value"], ls=ls, color=colours[model], label=f"{model}: {metric}")
        for metric, ls in (("mass_own", "-"), ("mass_shared", "--")):
            part = m[m["metric"] == metric]
            axes[1].plot(depth[part.index], part["value"], ls=ls, color=colours[model], label=f"{model}: {metric}")
        blocks = m[m["metric"].str.startswith("mass_block")].copy()
        blocks["block"] = blocks["metric"].str.removeprefix("mass_block").astype(int)
        curve = blocks.groupby("block")["value"].mean()
        own = m[m["metric"] == "mass_own"]["value"].mean()
        axes[2].plot([1, *curve.index], [own, *curve.values], marker="o", color=colours[model], label=model)
    axes[0].set(xlabel="layer (fraction of depth)", ylabel="overlap of top-k sets", title="drift between steps / heads")
    axes[1].set(xlabel="layer (fraction of depth)", ylabel="mass captured", title="own top-k vs one per KV head")
    axes[2].set(xlabel="block size (1 = tokens)", ylabel="mass captured (mean)", title="token vs block granularity")
    axes[2].set_xscale("log", base=2)
    for ax in axes:
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_cascade(cascade: pd.DataFrame, *, metrics=("output_error", "topk_overlap"), title=""):
    """Each later layer's change against the exact run, one line per layer ``i`` switched (per model row)."""
    models = list(cascade["model"].unique())
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(5 * len(metrics), 3.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        df = cascade[(cascade["model"] == model) & (cascade["layer_j"] >= 0)]
        layers = sorted(df["layer_i"].unique())
        colours = dict(zip(layers, sns.color_palette("viridis", len(layers))))
        for ax, metric in zip(row, metrics):
            for i in layers:
                part = df[(df["layer_i"] == i) & (df["metric"] == metric)].sort_values("layer_j")
                ax.plot(part["layer_j"], part["value"], marker=".", color=colours[i], label=f"layer {i}")
                ax.axvline(i, color=colours[i], lw=0.6, ls=":")
            ax.set(xlabel="later layer j", ylabel=metric, title=f"{model}: {metric}")
            if metric == "output_error":
                ax.set_yscale("log")
        row[-1].legend(fontsize="x-small", title="switched", title_fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_downstream(perplexity: pd.DataFrame, passkey: pd.DataFrame, *, title=""):
    """Perplexity and passkey accuracy against the mean keys kept, one line per selector (per model row)."""
    models = list(perplexity["model"].unique())
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.8 * len(models)), squeeze=False)
    palette = selector_palette(list(perplexity["selector"].unique()))
    for row, model in zip(axes, models):
        for ax, (df, metric) in zip(row, ((perplexity, "perplexity"), (passkey, "accuracy"))):
            part_m = df[df["model"] == model]
            for name, part in part_m.groupby("selector", sort=False):
                part = part.sort_values("kept")
                ax.plot(part["kept"], part[metric], marker="o", ms=4, color=palette.get(name, "grey"),
                        ls="--" if name == "oracle" else "-", label=name)
            if "exact" in part_m.columns and part_m["exact"].notna().any():
                ax.axhline(float(part_m["exact"].iloc[0]), color="grey", lw=1, ls=":", label="exact")
            ax.set_xscale("log", base=2)
            if metric == "perplexity":
                ax.set_yscale("log")
            ax.set(xlabel="keys kept per query (mean)", ylabel=METRIC_LABELS[metric], title=f"{model}: {metric}")
        row[-1].legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
