"""The numbers notebook 07 prints under its figures: every caption is computed from the frames it describes."""

from __future__ import annotations

import pandas as pd

__all__ = ["frontier_caption", "dynamics_caption", "cascade_caption", "downstream_caption", "budget_table"]


def budget_table(front: pd.DataFrame, metric="rel_error"):
    """``metric`` per fixed-budget selector (rows) and budget (columns); adaptive selectors at their own rows."""
    return front.pivot_table(index="selector", columns="budget", values=metric).round(3)


def _at_budget(front):
    """The rows whose selector kept at most 5 % more keys than its budget (a fair comparison at that budget)."""
    return front["kept"] <= 1.05 * front["budget"]


def frontier_caption(front: pd.DataFrame, *, model: str) -> str:
    """Per budget: the oracle's error and mass, the closest and the farthest practical selector at that budget,
    then the selectors that kept more keys than their budget (SnapKV, top-p, thresholds) at their mean count.

    ``front``: :func:`topk_lib.analysis.selection.frontier` rows of one model.
    """
    fair = front[_at_budget(front) & ~front["selector"].isin(["top_p", "threshold"])]
    lines = [f"{model} (means over layers and heads, decoded queries):"]
    for budget, part in fair.groupby("budget"):
        oracle = part[part["selector"] == "oracle"]
        rest = part[part["selector"] != "oracle"].sort_values("rel_error")
        if oracle.empty or rest.empty:
            continue
        o, best, worst = oracle.iloc[0], rest.iloc[0], rest.iloc[-1]
        lines.append(
            f"  B={budget}: oracle error {o.rel_error:.3f} (mass {o.mass:.3f}); closest {best.selector} "
            f"{best.rel_error:.3f} (mass {best.mass:.3f}, recall {best.recall:.2f}, {best.rel_error / o.rel_error:.1f}x "
            f"the oracle); farthest {worst.selector} {worst.rel_error:.3f}"
        )
    oracle = fair[fair["selector"] == "oracle"].sort_values("budget")
    if len(oracle):
        small = oracle.iloc[0]
        reach = []
        for name, part in front[~front["selector"].isin(["oracle", "top_p"])].groupby("selector"):
            ok = part[part["rel_error"] <= small.rel_error].sort_values("kept")
            reach.append(f"{name} {f'B={int(ok.iloc[0].budget)} ({ok.iloc[0].kept:.0f} keys)' if len(ok) else 'never'}")
        lines.append(f"  keys each selector needs to match the oracle's error at B={int(small.budget)} "
                     f"({small.rel_error:.3f}): " + ", ".join(reach))
    over = front[~_at_budget(front) | front["selector"].isin(["top_p", "threshold"])]
    for name, part in over.groupby("selector", sort=False):
        pts = "; ".join(f"{r.param if name == 'top_p' else f'B={r.budget}'}: {r.kept:.1f} keys, error "
                        f"{r.rel_error:.3f}, mass {r.mass:.3f}" for r in part.sort_values("kept").itertuples())
        lines.append(f"  {name} (more keys than its budget, at its mean count): {pts}")
    return "\n".join(lines)


def dynamics_caption(dynamics: pd.DataFrame, *, k: int) -> str:
    """Means over layers and heads of the decoding statistics, per model."""
    lines = []
    for model, part in dynamics.groupby("model", sort=False):
        m = part.groupby("metric")["value"].mean()
        sizes = sorted(int(name.removeprefix("mass_block")) for name in m.index if name.startswith("mass_block"))
        blocks = ", ".join(f"{b}: {m[f'mass_block{b}']:.3f}" for b in sizes)
        lines.append(
            f"{model}, top-{k} under generate: consecutive steps share {m.get('overlap', float('nan')):.1%} of the "
            f"oracle set (min over layers {part[part.metric == 'overlap'].groupby('layer').value.mean().min():.1%}); "
            f"heads of one GQA group share {m.get('group_overlap', float('nan')):.1%}; one selection per KV head keeps "
            f"mass {m['mass_shared']:.3f} vs {m['mass_own']:.3f} per head; whole blocks at equal budget keep "
            f"(block size: mass) {blocks}"
        )
    return "\n".join(lines)


def cascade_caption(cascade: pd.DataFrame) -> str:
    """Per model and switched layer: next-token KL and how the attention of the next and the last layer moved."""
    lines = []
    for model, part in cascade.groupby("model", sort=False):
        for i, rows in part.groupby("layer_i"):
            kl = rows[rows.metric == "logits_kl"].value.iloc[0]
            err = rows[rows.metric == "output_error"].sort_values("layer_j")
            over = rows[rows.metric == "topk_overlap"].sort_values("layer_j")
            if err.empty:
                lines.append(f"{model}, layer {i} switched: next-token KL {kl:.4f} (no later layers)")
                continue
            lines.append(
                f"{model}, layer {i} switched: next-token KL {kl:.4f}; attention output error of layer "
                f"{int(err.iloc[0].layer_j)} {err.iloc[0].value:.3f}, of layer {int(err.iloc[-1].layer_j)} "
                f"{err.iloc[-1].value:.3f} (max {err.value.max():.3f}); top-k overlap with the exact run "
                f"{over.value.min():.1%} at worst"
            )
    return "\n".join(lines)


def downstream_caption(perplexity: pd.DataFrame, passkey: pd.DataFrame) -> str:
    """Per model and budget: perplexity of each selector (exact first) and passkey accuracy (exact first)."""
    lines = []
    for model, part in perplexity.groupby("model", sort=False):
        exact = part["exact"].iloc[0] if "exact" in part else float("nan")
        pk_exact = passkey[passkey.model == model]["exact"].iloc[0] if "exact" in passkey else float("nan")
        for budget, rows in part[~part.selector.isin(["top_p", "threshold"])].groupby("budget"):
            ppl = ", ".join(f"{r.selector} {r.perplexity:.2f}" for r in rows.sort_values("perplexity").itertuples())
            pk = passkey[(passkey.model == model) & (passkey.budget == budget)].sort_values("accuracy", ascending=False)
            keys = ", ".join(f"{r.selector} {r.accuracy:.0%}" for r in pk.itertuples())
            lines.append(f"{model}, B={budget}: perplexity (exact {exact:.2f}) {ppl}; passkey (exact {pk_exact:.0%}, "
                         f"{int(pk.n.iloc[0]) if len(pk) else 0} prompts) {keys}")
    return "\n".join(lines)
