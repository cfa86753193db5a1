"""Notebook 07's figures draw from frames of the shape the analyses return."""

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from topk_lib.analysis.selection import frontier
from topk_lib.plots import selectors as plots

RNG = np.random.default_rng(0)


def metrics():
    rows = [{"selector": s, "budget": b, "layer": l, "head": h, "recall": RNG.random(), "mass": RNG.random(),
             "rel_error": RNG.random(), "kept": float(b), "param": s}
            for s, b, l, h in itertools.product(["oracle", "quest", "h2o"], [16, 32], range(3), range(2))]
    return pd.DataFrame(rows)


def test_frontier_and_heatmaps():
    front = pd.concat([frontier(metrics()).assign(model=m) for m in ("a", "b")])
    fig = plots.plot_frontier(front, title="t")
    assert len(fig.axes) == 6 and any("bound" in t.get_text() for t in fig.axes[2].get_legend().get_texts())
    fig2 = plots.plot_selector_heatmaps(metrics(), budget=16)
    assert sum(ax.axison for ax in fig2.axes) >= 3
    plt.close("all")


def test_dynamics_cascade_and_downstream():
    dyn = pd.DataFrame([{"model": "a", "layer": l, "head": h, "metric": m, "value": RNG.random()}
                        for l, h, m in itertools.product(range(4), range(2), ["overlap", "group_overlap", "mass_own",
                                                                              "mass_shared", "mass_block16"])])
    assert len(plots.plot_decode_dynamics(dyn).axes) == 3
    cas = pd.DataFrame([{"model": "a", "layer_i": i, "layer_j": j, "metric": m, "value": RNG.random()}
                        for i, j, m in itertools.product([0, 1], [2, 3], ["output_error", "topk_overlap"])])
    assert len(plots.plot_cascade(cas).axes) == 2
    ppl = pd.DataFrame([{"model": "a", "selector": s, "budget": b, "kept": b, "perplexity": 10 + RNG.random(),
                         "exact": 10.0} for s, b in itertools.product(["oracle", "quest"], [16, 32])])
    keys = ppl.assign(accuracy=0.5)
    assert len(plots.plot_downstream(ppl, keys).axes) == 2
    plt.close("all")
