"""The k explorer's figure (notebook 06): one head's attention map with what top-k keeps, and
the per-layer mass-kept profile at the same k (Gupta et al. 2021, section 4's analysis, one
head at a time).

:class:`ExplorerFigure` builds the figure once and then follows the sliders in place:
:meth:`~ExplorerFigure.update` swaps the data and texts of the existing artists and
:meth:`~ExplorerFigure.png` renders it for a widget. Rendering redraws only what a view
changes (the map, the profile, the titles, the legend) over a cached Agg background of the
axes, ticks and colour bar, and encodes with PIL at a low compression level: where a fresh
figure plus ``savefig`` took ~0.9 s at 512 tokens, an update takes a few tens of ms (measured
in :mod:`topk_lib.app.explorer`). :func:`plot_explorer_view` is the one-shot figure for saving
(:func:`topk_lib.plots.style.save_figure`).
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure

from topk_lib.plots.style import styled

__all__ = ["ExplorerFigure", "plot_explorer_view", "LABELS_UP_TO"]

LABELS_UP_TO = 64  # token tick labels only when at most this many rows / keys are shown
PNG_LEVEL = 1  # zlib level of the widget PNG: level 6 costs ~3x the time for ~1 % fewer bytes here


def _checked_rows(rows, n):
    start, stop = (0, n) if rows is None else rows
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= n):
        raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {n}, got {rows!r}")
    return start, stop


def _summary(view, n, title):
    kind = "causal" if view.causal else "bidirectional"
    summary = (f"k = {view.k}" + (f" (≥ L = {n}: exact)" if view.k >= n else "")
               + f" · head mass kept {view.mass_kept:.1%} · output error ‖o_k − o‖/‖o‖ = {view.relative_error:.3g}"
               + f" · {n} tokens, {kind}")
    return summary if title is None else f"{title}\n{summary}"


class ExplorerFigure:
    """The explorer figure of one (model, text), updated in place as the sliders move.

    ``pyplot=False`` (the widgets) makes a figure pyplot does not know, so a notebook never
    shows it twice nor keeps it open; ``True`` (saving) makes a pyplot figure as the other
    plots do. ``rows`` and ``tokens`` as in :func:`plot_explorer_view`.
    """

    @styled
    def __init__(self, view, *, tokens=None, rows=None, title: str | None = None, pyplot: bool = False):
        n = view.probs.shape[0]
        if tokens is not None and len(tokens) != n:
            raise ValueError(f"tokens must have one label per position ({n}), got {len(tokens)}")
        self.length, self.tokens, self.causal = n, tokens, view.causal
        start, stop = self.rows = _checked_rows(rows, n)
        keys = stop if view.causal else n
        p, kp = self._window(view)
        size = dict(figsize=(10.5, 5.0))
        fig = plt.figure(**size) if pyplot else Figure(**size)
        if not pyplot:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig)
        self.figure = fig
        ax, side = self.map_axes, self.side_axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
        self.norm = colors.PowerNorm(gamma=0.4, vmin=0.0, vmax=self._vmax(p))  # small probabilities stay visible
        extent = (-0.5, keys - 0.5, stop - 0.5, start - 0.5)
        self.dropped = ax.imshow(np.ma.masked_where(kp, p), cmap="Greys", norm=self.norm, interpolation="nearest",
                                 extent=extent, aspect="auto")
        self.kept = ax.imshow(np.ma.masked_where(~kp, p), cmap="plasma", norm=self.norm, interpolation="nearest",
                              extent=extent, aspect="auto")
        bar = fig.colorbar(self.kept, ax=ax, shrink=0.8)
        bar.set_label("probability (colour: kept, grey: dropped)", fontsize="small")
        ax.grid(False)
        if tokens is not None and stop - start <= LABELS_UP_TO and keys <= LABELS_UP_TO:
            ax.set_xticks(range(keys), tokens[:keys], rotation=90, fontsize=6)
            ax.set_yticks(range(start, stop), tokens[start:stop], fontsize=6)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax.set_title(self._map_title(view), fontsize="medium")

        layers = np.arange(len(view.profile))
        heads = view.head_profile.numpy()  # [layers, H]
        self.heads = side.scatter(np.repeat(layers, heads.shape[1]), heads.reshape(-1), s=8, color="0.6", alpha=0.6,
                                  label="one head")
        (self.mean,) = side.plot(layers, view.profile.numpy(), marker="o", ms=3, color="#1f77b4",
                                 label="mean over heads")
        self.star = side.scatter([view.layer], [view.mass_kept], s=70, marker="*", color="#d62728", zorder=3,
                                 label=self._star_label(view))
        side.set_ylim(min(0.0, float(heads.min())), 1.02)
        side.set_xlabel("layer")
        side.set_ylabel("attention mass kept (mean over query rows)")
        side.set_title(self._side_title(view), fontsize="medium")
        self.legend = side.legend(loc="best", fontsize="small")
        self.suptitle = fig.suptitle(_summary(view, n, title), fontsize="medium")
        fig.tight_layout()
        self.title = title
        # What a view changes, in the order a full draw paints it (spines over the images).
        self._dynamic = [self.dropped, self.kept, *ax.spines.values(), ax.title, self.heads, self.mean, self.star,
                         *side.spines.values(), self.legend, side.title, self.suptitle]
        self._background = None  # (vmax, Agg region) of everything else
        self.draws = 0  # full draws of the background (the cheap path redraws only self._dynamic)

    def _window(self, view):
        start, stop = self.rows
        keys = stop if self.causal else self.length
        probs, kept = view.probs.float().numpy(), view.kept.numpy()  # [L, L]
        return probs[start:stop, :keys], kept[start:stop, :keys]  # [R, K]

    @staticmethod
    def _vmax(p):
        return max(float(p.max()), 1e-6)

    @staticmethod
    def _map_title(view):
        return f"layer {view.layer}, head {view.head}: top-{view.effective_k} per row"

    @staticmethod
    def _side_title(view):
        return f"mass kept per layer at k = {view.effective_k}"

    @staticmethod
    def _star_label(view):
        return f"layer {view.layer} head {view.head}"

    def update(self, view, *, title: str | None = None) -> None:
        """Show ``view`` (same text and rows as the figure was built for) in the existing artists."""
        if view.probs.shape[0] != self.length or view.causal != self.causal:
            raise ValueError(f"view must come from the explorer this figure was built for ({self.length} tokens, "
                             f"causal={self.causal}); got {view.probs.shape[0]} tokens, causal={view.causal}")
        p, kp = self._window(view)
        self.norm.vmax = self._vmax(p)  # one norm: both images and the colour bar follow
        self.dropped.set_data(np.ma.masked_where(kp, p))
        self.kept.set_data(np.ma.masked_where(~kp, p))
        self.map_axes.set_title(self._map_title(view), fontsize="medium")
        layers = np.arange(len(view.profile))
        heads = view.head_profile.numpy()  # [layers, H]
        self.heads.set_offsets(np.column_stack([np.repeat(layers, heads.shape[1]), heads.reshape(-1)]))
        self.mean.set_ydata(view.profile.numpy())
        self.star.set_offsets([[view.layer, view.mass_kept]])
        self.legend.get_texts()[2].set_text(self._star_label(view))
        self.side_axes.set_title(self._side_title(view), fontsize="medium")
        self.title = self.title if title is None else title
        self.suptitle.set_text(_summary(view, self.length, self.title))

    def png(self) -> bytes:
        """The figure as PNG bytes for a widget: the same state gives the same bytes.

        The background (axes, ticks, colour bar) is drawn once per colour-bar range and kept;
        each call restores it and paints only the artists :meth:`update` changes.
        """
        from PIL import Image

        canvas, fig = self.figure.canvas, self.figure
        vmax = self.norm.vmax
        if self._background is None or self._background[0] != vmax:
            for artist in self._dynamic:
                artist.set_visible(False)
            canvas.draw()
            for artist in self._dynamic:
                artist.set_visible(True)
            self._background = (vmax, canvas.copy_from_bbox(fig.bbox))
            self.draws += 1
        else:
            canvas.restore_region(self._background[1])
        renderer = canvas.get_renderer()
        for artist in self._dynamic:
            artist.draw(renderer)
        width, height = canvas.get_width_height()
        image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=PNG_LEVEL)
        return out.getvalue()


@styled
def plot_explorer_view(view, *, tokens=None, rows=None, title: str | None = None):
    """Map of ``view.probs`` (kept entries in colour, dropped ones in grey) beside the profile.

    ``rows``: ``(start, stop)`` query rows to show (keys ``0..stop`` for causal attention, all
    keys otherwise); default all. ``tokens``: one label per position, drawn when few are shown.
    Returns a pyplot Figure (for :func:`~topk_lib.plots.style.save_figure`).
    """
    return ExplorerFigure(view, tokens=tokens, rows=rows, title=title, pyplot=True).figure
