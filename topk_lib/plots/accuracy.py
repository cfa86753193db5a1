"""Figures of accuracy versus k (notebook 03): plot functions take data and return a Figure.

Inputs are the tidy frames of :mod:`topk_lib.experiments.accuracy` (one row per setting and metric, with
``value``, ``lo``, ``hi`` from a 95 % bootstrap). k is on a log2 axis; the vanilla model is a
dashed horizontal line (its interval a light band) in the colour of its task. Saving goes
through :func:`topk_lib.plots.style.save_figure`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from topk_lib.plots.style import styled

__all__ = ["plot_accuracy_vs_k", "plot_budget_frontier", "plot_paper_reference", "plot_relative_vs_k"]

_PANEL_TITLES = {
    "attention": "attention top-k",
    "ff": "feed-forward top-k",
    "both": "both",
    "budget": "per-head budget",
}


def _check(df, metric):
    if df.empty or metric not in set(df.metric):
        raise ValueError(f"metric {metric!r} has no rows; have {sorted(set(df.metric))}")


def _vanilla_line(ax, vanilla, color, *, band=True):
    if vanilla.empty:
        return
    r = vanilla.iloc[0]
    ax.axhline(r.value, color=color, ls="--", lw=1.1, alpha=0.9)
    if band and np.isfinite(r.lo) and np.isfinite(r.hi):
        ax.axhspan(r.lo, r.hi, color=color, alpha=0.08, lw=0)


def _k_ticks(ax, xs):
    """Ticks at the ks swept, written as plain integers (a log2 axis would print 2^n)."""
    xs = sorted({float(x) for x in xs if np.isfinite(x)})
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" if x >= 10 or x == int(x) else f"{x:.1f}" for x in xs], fontsize="small")
        ax.minorticks_off()


def _line(ax, pts, color, label, *, ls="-", marker="o"):
    pts = pts.sort_values("x")
    ax.plot(pts.x, pts.value, ls=ls, marker=marker, ms=4, color=color, label=label)
    ax.fill_between(pts.x, pts.lo, pts.hi, color=color, alpha=0.18, lw=0)


def _y_axis(ax, *, logy, percent):
    if logy:
        ax.set_yscale("log")
    if percent:
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))


def _finish(fig, handles, names, title):
    """One legend right of the panels, the title, a tight layout."""
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@styled
def plot_accuracy_vs_k(summary, *, metric, ylabel, title, kinds=("attention", "ff", "both"), hue="task",
                       labels=None, logy=False, percent=False):
    """One panel per ``kind`` present, one line (band: 95 % CI) per ``hue`` value, vanilla dashed.

    In the ``both`` panel the x axis is the attention k and tick labels read ``attn/ff``.
    ``labels`` renames hue values in the legend.
    """
    df = summary[summary.metric == metric]
    _check(df, metric)
    kinds = [k for k in kinds if (df.kind == k).any()]
    if not kinds:
        raise ValueError(f"no rows of kinds {kinds} for metric {metric!r}")
    groups = list(dict.fromkeys(df[hue]))
    palette = dict(zip(groups, sns.color_palette("tab10", len(groups))))
    labels = labels or {}
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds) + 1.6, 3.8), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for g in groups:
            sub = df[df[hue] == g]
            pts = sub[sub.kind == kind]
            if pts.empty:
                continue
            _vanilla_line(ax, sub[sub.kind == "vanilla"], palette[g])
            _line(ax, pts, palette[g], labels.get(g, g))
        ax.set_xscale("log", base=2)
        if kind == "both":
            pairs = df[df.kind == "both"].drop_duplicates("x").sort_values("x")
            ax.set_xticks(pairs.x.tolist())
            ax.set_xticklabels([f"{int(a)}/{int(f)}" for a, f in zip(pairs.attn_k, pairs.ff_k)], rotation=30,
                               fontsize="small")
            ax.minorticks_off()
            ax.set_xlabel("attention k / feed-forward k")
        else:
            _k_ticks(ax, df[df.kind == kind].x)
            ax.set_xlabel("feed-forward k (of d_ff)" if kind == "ff" else "attention k (keys per query)")
        ax.set_title(_PANEL_TITLES.get(kind, kind))
        _y_axis(ax, logy=logy, percent=percent)
    axes[0, 0].set_ylabel(ylabel)
    handles, names = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    handles.append(plt.Line2D([], [], color="grey", ls="--"))
    names.append("vanilla (band: 95 % CI)")
    return _finish(fig, handles, names, title)


@styled
def plot_budget_frontier(summary, *, metric, ylabel, title, labels=None, logy=False, percent=False):
    """Per task: uniform attention k against the per-head budget at the same average k."""
    df = summary[summary.metric == metric]
    _check(df, metric)
    tasks = [t for t in dict.fromkeys(df.task) if (df[df.task == t].kind == "budget").any()]
    if not tasks:
        raise ValueError(f"no budget rows for metric {metric!r}")
    labels = labels or {}
    colors = {"attention": sns.color_palette("tab10")[0], "budget": sns.color_palette("tab10")[3]}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks) + 1.6, 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = df[df.task == task]
        _vanilla_line(ax, sub[sub.kind == "vanilla"], "grey")
        budget = sub[sub.kind == "budget"]
        uniform = sub[(sub.kind == "attention") & (sub.x >= budget.x.min() / 2) & (sub.x <= budget.x.max() * 2)]
        _line(ax, uniform, colors["attention"], "uniform k")
        _line(ax, budget, colors["budget"], "per-head budget", marker="s")
        ax.set_xscale("log", base=2)
        _k_ticks(ax, uniform.x.tolist() + budget.x.tolist())
        ax.set_xlabel("average attention k")
        ax.set_title(labels.get(task, task))
        _y_axis(ax, logy=logy, percent=percent)
    axes[0, 0].set_ylabel(ylabel)
    handles, names = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="grey", ls="--"))
    names.append("vanilla")
    return _finish(fig, handles, names, title)


@styled
def plot_paper_reference(ours, paper, *, title, labels=None):
    """Accuracy relative to full against k / d_ff: our feed-forward curves beside the paper's T5 ones.

    ``ours``: rows ``task, k_frac, relative`` (:func:`topk_lib.experiments.accuracy.relative_to_vanilla`);
    ``paper``: rows ``model, k_frac, relative`` (:func:`topk_lib.experiments.accuracy.paper_reference`).
    """
    if ours.empty and paper.empty:
        raise ValueError("nothing to plot: ours and paper are both empty")
    labels = labels or {}
    fig, ax = plt.subplots(figsize=(7.2, 4.3))
    greys = sns.color_palette("Greys", len(set(paper.model)) + 2)[2:]
    for color, (model, pts) in zip(greys, paper.groupby("model", sort=False)):
        pts = pts.sort_values("k_frac")
        ax.plot(pts.k_frac, pts.relative, ls="--", marker="D", ms=4, color=color,
                label=f"UnifiedQA {model} (Gupta et al. 2021)")
    tasks = list(dict.fromkeys(ours.task))
    for color, task in zip(sns.color_palette("tab10", len(tasks)), tasks):
        pts = ours[ours.task == task].sort_values("k_frac")
        ax.plot(pts.k_frac, pts.relative, marker="o", ms=4, color=color, label=labels.get(task, task))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k / d_ff (share of feed-forward units kept)")
    ax.set_ylabel("accuracy relative to the full model")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def _share(x):
    """``0.0625`` -> ``"1/16"``: a share of units as the fraction it was chosen as, when it is one."""
    inverse = 1 / x if x else 0
    return f"1/{inverse:.0f}" if x < 1 and abs(inverse - round(inverse)) < 1e-6 else f"{x:g}"


@styled
def plot_relative_vs_k(curves, *, ylabel, title, logy=False):
    """Attention and feed-forward panels, one line per (model, task) of ``value / vanilla``.

    ``curves``: rows of :func:`topk_lib.experiments.summaries.relative_curves`; one colour per
    model, one line style per task. The feed-forward panel's x axis is k / d_ff.
    """
    if curves.empty:
        raise ValueError("nothing to plot: curves is empty")
    kinds = [k for k in ("attention", "ff") if (curves.kind == k).any()]
    models, tasks = list(dict.fromkeys(curves.model)), list(dict.fromkeys(curves.task))
    colors = dict(zip(models, sns.color_palette("tab10", len(models))))
    styles = dict(zip(tasks, ["-", "--", ":", "-.", (0, (3, 1, 1, 1))] * len(tasks)))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds) + 2.2, 3.8), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for (model, task), pts in curves[curves.kind == kind].groupby(["model", "task"], sort=False):
            pts = pts.sort_values("x")
            ax.plot(pts.x, pts.relative, ls=styles[task], marker="o", ms=4, color=colors[model],
                    label=f"{model}: {task}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        xs = sorted(set(curves[curves.kind == kind].x))
        ax.set_xticks(xs)
        ax.set_xticklabels([_share(x) if kind == "ff" else f"{x:g}" for x in xs], fontsize="small")
        ax.minorticks_off()
        ax.set_xlabel("feed-forward k / d_ff" if kind == "ff" else "attention k (keys per query)")
        ax.set_title(_PANEL_TITLES[kind])
        _y_axis(ax, logy=logy, percent=False)
    axes[0, 0].set_ylabel(ylabel)
    handles, names = [], []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    return _finish(fig, handles, names, title)
