"""Figures: plot functions take data and return a Figure; saving happens here only.

Files are reproducible: the same data gives byte-identical PNG and PDF (no
timestamps or software stamps in the metadata, fixed hash salt).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from topk_lib import paths  # noqa: E402

STYLE = {"figure.dpi": 110, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "topk-lab"}
sns.set_theme(context="notebook", style="whitegrid", rc=STYLE)


def figures_dir() -> Path:
    """Where figures go (``TOPK_LAB_FIGURES`` overrides, e.g. quick mode)."""
    return Path(os.environ.get("TOPK_LAB_FIGURES", paths.FIGURES))


def save_figure(fig, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` atomically; returns the two paths."""
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ext, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None, "Creator": None})):
        final = folder / f"{name}.{ext}"
        tmp = folder / f".{name}.{ext}.tmp"
        fig.savefig(tmp, format=ext, metadata=metadata, bbox_inches="tight")
        os.replace(tmp, final)
        written.append(final)
    return written


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
