"""Figures of the training experiments (notebook 05): learning curves and test accuracy against k.

Inputs are the frames of :func:`topk_lib.experiments.training.listops.listops_sweep` and
:func:`topk_lib.experiments.training.finetune.finetune_sweep` (k labels are strings, "full" =
exact/dense, ordered by :func:`topk_lib.experiments.training.summaries.k_order`). Every
function returns a Figure; saving goes through :func:`topk_lib.plots.style.save_figure`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from topk_lib.experiments.training.summaries import k_order
from topk_lib.plots.style import styled

__all__ = ["plot_learning_curves", "plot_test_accuracy_vs_k", "plot_finetune_vs_k"]

_REFERENCE_STYLES = ("--", ":", "-.")


def _references(ax, references):
    for (value, label), ls in zip(references, _REFERENCE_STYLES):  # e.g. a paper's number, a baseline
        ax.axhline(value, color="grey", ls=ls, lw=1, label=label)


@styled
def plot_learning_curves(curves, *, title: str, references=()):
    """Validation accuracy against step, one line per k (mean over seeds, band: ± 1 std).

    ``references``: ``(value, label)`` pairs drawn as grey horizontal lines.
    """
    order = k_order(curves.k)
    palette = dict(zip(order, sns.color_palette("viridis", len(order) - 1) + [(0.1, 0.1, 0.1)]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=curves, x="step", y="val_acc", hue="k", hue_order=order, palette=palette, errorbar="sd",
                 marker="o", markersize=3, ax=ax)
    _references(ax, references)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(title="k (keys per query)", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _k_axis(ax, order):
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("k (keys kept per query; full = exact)")


@styled
def plot_test_accuracy_vs_k(results, *, title: str, y="test_acc", ylabel="test accuracy", references=()):
    """Mean test accuracy per k with ± 1 std error bars over seeds, and the single seeds as dots."""
    order = k_order(results.k)
    stats = results.groupby("k")[y].agg(["mean", "std"]).reindex(order).fillna(0.0)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = range(len(order))
    ax.errorbar(x, stats["mean"], yerr=stats["std"], fmt="o-", capsize=4, color="C0", label="mean ± std over seeds")
    pos = {k: i for i, k in enumerate(order)}
    ax.scatter([pos[k] for k in results.k], results[y], s=12, color="C0", alpha=0.4, label="single seeds")
    _references(ax, references)
    _k_axis(ax, order)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


_STYLES = {("trained", "acc"): ("o-", "C0"), ("swap", "acc"): ("s--", "C1"),
           ("trained", "f1"): ("o-", "C2"), ("swap", "f1"): ("s--", "C3")}
_MODE_LABELS = {"trained": "fine-tuned with top-k", "swap": "fine-tuned vanilla, top-k at test"}


@styled
def plot_finetune_vs_k(results, *, title: str):
    """Accuracy and F1 against attention k (left) and feed-forward k (right), trained vs swapped.

    ``results`` as from ``finetune_sweep``; points are means over seeds, error bars ± 1 std.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [("attn_k", results[results.ff_k == "full"], "attention k"),
              ("ff_k", results[results.attn_k == "full"], "feed-forward k")]
    for ax, (col, df, name) in zip(axes, panels):
        order = k_order(df[col])
        pos = {k: i for i, k in enumerate(order)}
        for (mode, metric), (fmt, color) in _STYLES.items():
            part = df[df["mode"] == mode]
            if mode == "swap":  # the swap curve ends at the vanilla model itself
                part = pd.concat([part, df[(df["mode"] == "trained") & (df[col] == "full")]], ignore_index=True)
            if part.empty:
                continue
            stats = part.groupby(col)[metric].agg(["mean", "std"]).fillna(0.0)
            stats = stats.reindex([k for k in order if k in stats.index])
            offset = {"trained": -0.05, "swap": 0.05}[mode]
            ax.errorbar([pos[k] + offset for k in stats.index], stats["mean"], yerr=stats["std"], fmt=fmt,
                        color=color, capsize=3, label=f"{metric}: {_MODE_LABELS[mode]}")
        _k_axis(ax, order)
        ax.set_xlabel(f"{name} (full = exact/dense)")
        ax.set_title(name)
    axes[0].set_ylabel("test score (mean ± std over seeds)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, names, fontsize="small", loc="lower center", ncols=2, frameon=False)
    return fig
