"""The k explorer's figure (notebook 06): one head's attention map with what top-k keeps, and
the per-layer mass-kept profile at the same k (Gupta et al. 2021, section 4's analysis, one
head at a time).

Takes a :class:`topk_lib.app.explorer.HeadView` and returns a Figure; saving stays in
:func:`topk_lib.plots.style.save_figure`. Kept for speed: one ``imshow`` per layer of the map
(no per-cell markers), so redrawing 512 × 512 entries takes a fraction of a second.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors

from topk_lib.plots.style import styled

LABELS_UP_TO = 64  # token tick labels only when at most this many rows / keys are shown


@styled
def plot_explorer_view(view, *, tokens=None, rows=None, title: str | None = None):
    """Map of ``view.probs`` (kept entries in colour, dropped ones in grey) beside the profile.

    ``rows``: ``(start, stop)`` query rows to show (keys ``0..stop`` for causal attention, all
    keys otherwise); default all. ``tokens``: one label per position, drawn when few are shown.
    """
    probs = view.probs.float().numpy()  # [L, L]
    kept = view.kept.numpy()  # [L, L]
    n = probs.shape[0]
    start, stop = (0, n) if rows is None else rows
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= n):
        raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {n}, got {rows!r}")
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"tokens must have one label per position ({n}), got {len(tokens)}")
    keys = stop if view.causal else n
    p, kp = probs[start:stop, :keys], kept[start:stop, :keys]  # [R, K]

    fig, (ax, side) = plt.subplots(1, 2, figsize=(10.5, 5.0), gridspec_kw={"width_ratios": [1.35, 1]})
    vmax = max(float(p.max()), 1e-6)
    norm = colors.PowerNorm(gamma=0.4, vmin=0.0, vmax=vmax)  # small probabilities stay visible
    extent = (-0.5, keys - 0.5, stop - 0.5, start - 0.5)
    ax.imshow(np.ma.masked_where(kp, p), cmap="Greys", norm=norm, interpolation="nearest", extent=extent, aspect="auto")
    im = ax.imshow(np.ma.masked_where(~kp, p), cmap="plasma", norm=norm, interpolation="nearest", extent=extent,
                   aspect="auto")
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("probability (colour: kept, grey: dropped)", fontsize="small")
    ax.grid(False)
    if tokens is not None and stop - start <= LABELS_UP_TO and keys <= LABELS_UP_TO:
        ax.set_xticks(range(keys), tokens[:keys], rotation=90, fontsize=6)
        ax.set_yticks(range(start, stop), tokens[start:stop], fontsize=6)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"layer {view.layer}, head {view.head}: top-{view.effective_k} per row", fontsize="medium")

    layers = np.arange(len(view.profile))
    heads = view.head_profile.numpy()  # [layers, H]
    side.scatter(np.repeat(layers, heads.shape[1]), heads.reshape(-1), s=8, color="0.6", alpha=0.6, label="one head")
    side.plot(layers, view.profile.numpy(), marker="o", ms=3, color="#1f77b4", label="mean over heads")
    side.scatter([view.layer], [view.mass_kept], s=70, marker="*", color="#d62728", zorder=3,
                 label=f"layer {view.layer} head {view.head}")
    side.set_ylim(min(0.0, float(heads.min())), 1.02)
    side.set_xlabel("layer")
    side.set_ylabel("attention mass kept (mean over query rows)")
    side.set_title(f"mass kept per layer at k = {view.effective_k}", fontsize="medium")
    side.legend(loc="best", fontsize="small")

    kind = "causal" if view.causal else "bidirectional"
    summary = (f"k = {view.k}" + (f" (≥ L = {n}: exact)" if view.k >= n else "")
               + f" · head mass kept {view.mass_kept:.1%} · output error ‖o_k − o‖/‖o‖ = {view.relative_error:.3g}"
               + f" · {n} tokens, {kind}")
    fig.suptitle(summary if title is None else f"{title}\n{summary}", fontsize="medium")
    fig.tight_layout()
    return fig
