"""The suite's figure style and the one place figures are saved.

:func:`use_style` selects the matplotlib backend (``MPLBACKEND``, else the headless ``Agg``) and the
seaborn theme; plot functions apply it when they are called (:func:`styled`), so importing a
plots module changes nothing. :func:`save_figure` writes PNG and PDF reproducibly: the same
data gives byte-identical files (no timestamps or software stamps in the metadata, fixed
hash salt).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import matplotlib
import seaborn as sns

from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write

__all__ = ["STYLE", "use_style", "styled", "save_figure"]

STYLE = {"figure.dpi": 110, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "topk-lab"}

# Stamps matplotlib would write by default; without them the same figure gives the same bytes.
_NO_STAMPS = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


def use_style() -> None:
    """Select the backend (``MPLBACKEND``, else ``Agg``) and the suite's seaborn theme.

    Repeating it is free: matplotlib keeps a backend that is already selected, and the theme
    sets the same values again.
    """
    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    sns.set_theme(context="notebook", style="whitegrid", rc=STYLE)


def styled(plot):
    """Decorator for plot functions: apply :func:`use_style` before drawing."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        use_style()
        return plot(*args, **kwargs)

    return draw


def save_figure(fig, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` to ``paths.figures()``, each atomically; returns the two paths."""
    written = []
    for ext, metadata in _NO_STAMPS.items():
        rendered = io.BytesIO()
        fig.savefig(rendered, format=ext, metadata=metadata, bbox_inches="tight")
        written.append(atomic_write(paths.figures() / f"{name}.{ext}", rendered.getvalue()))
    return written
