"""Tables and printed summaries of the training sweeps: mean ± std over seeds per k, the swap
against training with top-k, and the closing table of both experiments.

Inputs are the frames of :func:`.listops.listops_sweep` and :func:`.finetune.finetune_sweep`,
whose k columns hold strings ("full" = exact/dense).
"""

from __future__ import annotations

import pandas as pd

__all__ = ["k_order", "mean_std_table", "finetune_table", "swap_vs_trained", "closing_table", "listops_summary",
           "finetune_summary"]


def k_order(values):
    """Sort k labels numerically with "full" last."""
    return sorted(set(values), key=lambda v: (v == "full", int(v) if v != "full" else 0))


def mean_std_table(df, *, by, value):
    """``mean``, ``std`` and ``n`` of ``value`` per group ``by``, plus a ``mean ± std`` text column."""
    g = df.groupby(by, sort=False)[value].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    g["std"] = g["std"].fillna(0.0)
    g["mean ± std"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(g["mean"], g["std"])]
    return g


def finetune_table(ft_results):
    """Test accuracy and F1 (``mean ± std`` over seeds) per (mode, attn_k, ff_k) of a fine-tuning sweep."""
    return pd.concat({m: mean_std_table(ft_results, by=["mode", "attn_k", "ff_k"], value=m)["mean ± std"]
                      for m in ("acc", "f1")}, axis=1)


def swap_vs_trained(results, *, attn_ks=(), ff_ks=()):
    """Per top-k setting: the swap (vanilla fine-tuned, top-k at test) and fine-tuning with top-k, vs vanilla.

    ``results`` is :func:`finetune_sweep`'s frame. Columns: ``vanilla``, ``swap``, ``swap_std``,
    ``trained``, ``trained_std`` (test accuracy, mean and std over seeds; NaN where not run) and
    ``verdict``: whether trained minus swap is larger than the larger of the two seed stds.
    """
    stats = results.groupby(["mode", "attn_k", "ff_k"]).acc.agg(["mean", "std"])
    vanilla = stats.loc[("trained", "full", "full"), "mean"]
    rows = []
    for kind, ks in (("attention", attn_ks), ("feed-forward", ff_ks)):
        for k in ks:
            key = (str(k), "full") if kind == "attention" else ("full", str(k))
            swap = stats.loc[("swap", *key)]
            row = {"setting": f"{kind} k={k}", "vanilla": vanilla, "swap": swap["mean"], "swap_std": swap["std"],
                   "trained": float("nan"), "trained_std": float("nan"), "verdict": "not fine-tuned with top-k"}
            if ("trained", *key) in stats.index:
                trained = stats.loc[("trained", *key)]
                gap, noise = trained["mean"] - swap["mean"], max(trained["std"], swap["std"])
                if pd.isna(noise):
                    verdict = "one seed, no spread to compare with"
                elif abs(gap) <= noise:
                    verdict = "within the seed spread"
                else:
                    verdict = "training with top-k helps" if gap > 0 else "training with top-k hurts"
                row.update(trained=trained["mean"], trained_std=trained["std"], verdict=verdict)
            rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


def _accuracy_column(rows, by):
    return mean_std_table(rows, by=by, value="acc")["mean ± std"]


def closing_table(listops_results, ft_results):
    """Test accuracy (mean ± std over seeds) per k: ListOps trained, SpamAssassin trained and swapped.

    Rows are attention k (in :func:`k_order`), then ``feed-forward k=...``; "–" where a column
    has no run. The SpamAssassin swap column's "full" row is the vanilla fine-tuned model.
    """
    trained, swap = ft_results["mode"] == "trained", ft_results["mode"] == "swap"
    dense_ff, exact_attn = ft_results.ff_k == "full", ft_results.attn_k == "full"
    vanilla = ft_results[trained & exact_attn & dense_ff]
    columns = {
        "ListOps, trained from scratch": mean_std_table(listops_results, by="k", value="test_acc")["mean ± std"],
        "SpamAssassin, fine-tuned with top-k": _accuracy_column(ft_results[trained & dense_ff], "attn_k"),
        "SpamAssassin, vanilla fine-tuned, top-k at test": _accuracy_column(
            pd.concat([ft_results[swap & dense_ff], vanilla]), "attn_k"),
    }
    closing = pd.concat([column.rename(name) for name, column in columns.items()], axis=1)
    closing = closing.loc[k_order(closing.index)]
    ff_rows = ft_results[exact_attn & ~dense_ff]
    ff_closing = pd.concat({
        "SpamAssassin, fine-tuned with top-k": _accuracy_column(ff_rows[ff_rows["mode"] == "trained"], "ff_k"),
        "SpamAssassin, vanilla fine-tuned, top-k at test": _accuracy_column(ff_rows[ff_rows["mode"] == "swap"], "ff_k"),
    }, axis=1)
    ff_closing.index = [f"feed-forward k={k}" for k in ff_closing.index]
    return pd.concat([closing, ff_closing]).rename_axis("k").fillna("–")


def listops_summary(listops_results, curves, *, majority_acc) -> str:
    """What the ListOps sweep shows, in four lines: exact attention, the top-k range and its largest
    gap against the seed spread, the final validation accuracy and the seconds per step per k."""
    table = mean_std_table(listops_results, by="k", value="test_acc")
    full = table.loc["full"]
    topk_rows = table.drop(index="full")
    gap = (topk_rows["mean"] - full["mean"]).abs()
    final = curves[curves.step == curves.step.max()].groupby("k").val_acc.mean()
    per_step = listops_results.groupby("k").seconds_per_step.mean()
    return "\n".join([
        f"Exact attention: test accuracy {full['mean']:.1%} ± {full['std']:.1%} over {int(full['n'])} seed(s); "
        f"majority baseline {majority_acc:.1%}.",
        f"Top-k: from {topk_rows['mean'].min():.1%} (k={topk_rows['mean'].idxmin()}) to "
        f"{topk_rows['mean'].max():.1%} (k={topk_rows['mean'].idxmax()}); the largest gap to exact is "
        f"{gap.max():.1%} at k={gap.idxmax()}, against a seed std of up to {table['std'].max():.1%}.",
        "Final validation accuracy per k: " + ", ".join(f"{k}: {v:.1%}" for k, v in final.items()),
        "Seconds per training step (mean over seeds): " + ", ".join(f"k={k}: {v:.3f}" for k, v in per_step.items()),
    ])


def finetune_summary(ft_results, *, attn_ks, ff_ks, n_test) -> str:
    """Vanilla fine-tuning's accuracy, then per top-k setting the swap's cost and whether training helps."""
    trained_vanilla = ft_results[(ft_results["mode"] == "trained") & (ft_results.attn_k == "full")
                                 & (ft_results.ff_k == "full")]
    vanilla = mean_std_table(trained_vanilla, by="mode", value="acc").iloc[0]
    lines = [f"Vanilla fine-tuning: test accuracy {vanilla['mean']:.1%} ± {vanilla['std']:.1%} on {n_test} test emails."]
    for setting, r in swap_vs_trained(ft_results, attn_ks=attn_ks, ff_ks=ff_ks).iterrows():
        line = f"{setting}: swap {r.swap:.1%} ± {r.swap_std:.1%} ({r.swap - r.vanilla:+.1%} vs vanilla)"
        if pd.notna(r.trained):
            line += (f", trained with top-k {r.trained:.1%} ± {r.trained_std:.1%} "
                     f"({r.trained - r.swap:+.1%} vs swap: {r.verdict})")
        lines.append(line)
    return "\n".join(lines)
