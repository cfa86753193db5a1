"""Summaries of accuracy-versus-k sweeps: the numbers and sentences notebook 03 reports.

Inputs are the tidy frames of :mod:`topk_lib.experiments.accuracy` (one row per setting and
metric). Here: the smallest k that stays within a tolerance of vanilla
(:func:`smallest_k_within`, :func:`smallest_k_table`), a per-head budget against a uniform
k at the same average (:func:`budget_comparison`), feed-forward top-k relative to vanilla
beside the paper's published UnifiedQA numbers (:func:`relative_to_vanilla`,
:func:`paper_reference`, :data:`GUPTA2021_UNIFIEDQA_FF`), the compute time a run spent
(:func:`computed_seconds`), and the caption of each section of the notebook.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from topk_lib.tasks.classification import LANGUAGE_TEMPLATE

__all__ = [
    "GUPTA2021_UNIFIEDQA_FF",
    "MAIN_METRICS",
    "smallest_k_within",
    "smallest_k_table",
    "decoder_targets",
    "budget_comparison",
    "budget_frontier",
    "budget_table",
    "relative_to_vanilla",
    "relative_curves",
    "main_metrics",
    "paper_reference",
    "computed_seconds",
    "seconds_by_section",
    "metrics_as_tasks",
    "lm_caption",
    "classification_inputs_caption",
    "classification_caption",
    "qa_caption",
    "passkey_caption",
    "budget_caption",
    "retrieval_inputs_caption",
    "retrieval_caption",
    "relative_caption",
    "paper_caption",
    "closing_caption",
]

#: Gupta et al. (2021), "Memory-efficient Transformers via Top-k Attention", arXiv 2106.06899:
#: average exact match of UnifiedQA zero-shot over its QA datasets with top-k in the
#: feed-forward layers only (attention unchanged), as published. ``None`` = not reported.
GUPTA2021_UNIFIEDQA_FF = {
    "T5-base": {"d_ff": 3072, "full": 62.4, "k": {1024: 62.4, 256: 62.3, 128: 62.5, 64: 62.4, 32: 60.9, 16: 58.7}},
    "T5-3B": {"d_ff": 16384, "full": 76.7, "k": {1024: 76.7, 256: 76.5, 128: 76.0, 64: 74.8, 32: 71.8, 16: 64.3}},
    "T5-11B": {"d_ff": 65536, "full": 81.3, "k": {1024: 81.4, 256: 81.0, 128: 79.3, 64: 77.1}},
}

#: Task -> the metric its accuracy is read from (language-modelling tasks: next-token accuracy).
MAIN_METRICS = {"language_id": "accuracy", "polarity": "accuracy", "trivia": "contains", "sotu_retrieval": "acc@1"}


def _vanilla(df, task, metric):
    v = df[(df.task == task) & (df.metric == metric) & (df.kind == "vanilla")]
    if v.empty:
        raise ValueError(f"no vanilla row for task {task!r}, metric {metric!r}: every sweep needs a vanilla setting")
    return float(v.value.iloc[0])


def smallest_k_within(summary, *, metric, kind, points=0.01, relative=None, lower_is_better=False):
    """Per task, the smallest k of ``kind`` such that it and every larger k stay within tolerance.

    Tolerance: ``relative`` (e.g. 0.02 = 2 % relative) when given, else ``points`` absolute
    (0.01 = 1 point of accuracy); only a worse value counts. Point estimates, not intervals.
    Columns ``task, vanilla, k, value`` (k is <NA> when even the largest k fails).
    """
    df = summary[summary.metric == metric]
    rows = []
    for task in dict.fromkeys(df.task):
        base = _vanilla(df, task, metric)
        pts = df[(df.task == task) & (df.kind == kind)].sort_values("x", ascending=False)
        if pts.empty:
            continue
        allow = base * relative if relative is not None else points
        ok = (pts.value <= base + allow) if lower_is_better else (pts.value >= base - allow)
        k, value = pd.NA, math.nan
        for x, good, v in zip(pts.x, ok, pts.value):
            if not good:
                break
            k, value = int(x), float(v)
        rows.append({"task": task, "vanilla": base, "k": k, "value": value})
    out = pd.DataFrame(rows, columns=["task", "vanilla", "k", "value"])
    out["k"] = out["k"].astype("Int64")
    return out


def budget_comparison(summary, *, metric):
    """Per task and nominal average k: uniform attention k against the per-head budget.

    Columns ``task, average_k, budget_mean_k, uniform, budget, gain`` (``budget - uniform``;
    positive means the budget is better for accuracy-like metrics).
    """
    df = summary[summary.metric == metric]
    rows = []
    for _, b in df[df.kind == "budget"].iterrows():
        u = df[(df.task == b.task) & (df.kind == "attention") & (df.x == b.nominal_k)]
        if u.empty:
            continue
        rows.append({"task": b.task, "average_k": b.nominal_k, "budget_mean_k": b.x,
                     "uniform": float(u.value.iloc[0]), "budget": float(b.value),
                     "gain": float(b.value) - float(u.value.iloc[0])})
    return pd.DataFrame(rows, columns=["task", "average_k", "budget_mean_k", "uniform", "budget", "gain"])


def relative_to_vanilla(summary, *, metrics, kind="ff", d_ff=1536):
    """Rows of ``kind`` as ``value / vanilla`` against ``k / d_ff``; ``metrics`` maps task -> metric."""
    rows = []
    for task, metric in metrics.items():
        df = summary[(summary.task == task) & (summary.metric == metric)]
        if df.empty:
            continue
        base = _vanilla(df, task, metric)
        for _, r in df[df.kind == kind].iterrows():
            rows.append({"task": task, "metric": metric, "k": r.x, "k_frac": r.x / d_ff,
                         "relative": r.value / base if base else math.nan})
    return pd.DataFrame(rows, columns=["task", "metric", "k", "k_frac", "relative"])


def relative_curves(models, *, metric):
    """Attention and feed-forward rows of several models as ``value / vanilla``, to compare curves.

    ``models`` maps a model label to ``(summary, d_ff)``. Rows: ``model, task, kind, k, x,
    relative``, where ``x`` is the attention k, or k / d_ff for the feed-forward rows (models of
    different widths line up at the same share of units).
    """
    rows = []
    for label, (summary, d_ff) in models.items():
        df = summary[summary.metric == metric]
        for task in dict.fromkeys(df.task):
            base = _vanilla(df, task, metric)
            for _, r in df[(df.task == task) & df.kind.isin(["attention", "ff"])].iterrows():
                rows.append({"model": label, "task": task, "kind": r.kind, "k": r.x,
                             "x": r.x / d_ff if r.kind == "ff" else r.x, "relative": r.value / base if base else math.nan})
    return pd.DataFrame(rows, columns=["model", "task", "kind", "k", "x", "relative"])


def paper_reference():
    """:data:`GUPTA2021_UNIFIEDQA_FF` as rows ``model, d_ff, k, k_frac, exact_match, relative``."""
    rows = []
    for model, rec in GUPTA2021_UNIFIEDQA_FF.items():
        for k, em in sorted(rec["k"].items()):
            rows.append({"model": model, "d_ff": rec["d_ff"], "k": k, "k_frac": k / rec["d_ff"],
                         "exact_match": em, "relative": em / rec["full"]})
    return pd.DataFrame(rows)


def decoder_targets(lm_tasks):
    """``[(task, metric)]`` the decoder's smallest-k table reports: perplexity then next-token accuracy
    of every language-modelling task, then classification, trivia and passkey."""
    lm_tasks = list(dict.fromkeys(lm_tasks))
    return ([(task, m) for m in ("perplexity", "accuracy") for task in lm_tasks]
            + [("language_id", "accuracy"), ("polarity", "accuracy"), ("trivia", "contains"), ("passkey", "accuracy")])


def smallest_k_table(summary, targets):
    """Per ``(task, metric)`` of ``targets``: vanilla, and the smallest attention k and FF k within tolerance.

    Tolerance (:func:`smallest_k_within`): 2 % relative for perplexity (lower is better),
    1 point for every other metric. Columns ``vanilla, attention k, attention value, ff k,
    ff value`` (a kind's columns are missing for a task that did not sweep it), indexed by
    ``(task, metric)``.
    """
    table = {}
    for task, metric in targets:
        rows = summary[(summary.task == task) & (summary.metric == metric)]
        tolerance = dict(relative=0.02, lower_is_better=True) if metric == "perplexity" else dict(points=0.01)
        for kind in ("attention", "ff"):
            if (rows.kind == kind).any():
                within = smallest_k_within(rows, metric=metric, kind=kind, **tolerance).iloc[0]
                table.setdefault((task, metric), {"vanilla": within.vanilla})
                table[(task, metric)].update({f"{kind} k": within.k, f"{kind} value": within.value})
    return pd.DataFrame.from_dict(table, orient="index").rename_axis(["task", "metric"])


def budget_frontier(uniform, budget_rows):
    """The rows a budget-versus-uniform comparison needs: ``uniform``'s rows of the tasks in
    ``budget_rows`` (vanilla and uniform k), then the budget settings."""
    return pd.concat([uniform[uniform.task.isin(set(budget_rows.task))], budget_rows[budget_rows.kind == "budget"]],
                     ignore_index=True)


def budget_table(frontier, metrics=("perplexity", "accuracy")):
    """:func:`budget_comparison` for each metric side by side, indexed by ``(task, average_k)``."""
    return pd.concat({m: budget_comparison(frontier, metric=m).set_index(["task", "average_k"]) for m in metrics},
                     axis=1)


def main_metrics(lm_tasks):
    """Task -> main metric: next-token accuracy for the language-modelling tasks, then :data:`MAIN_METRICS`."""
    return {**{task: "accuracy" for task in dict.fromkeys(lm_tasks)}, **MAIN_METRICS}


def computed_seconds(summary):
    """Seconds this run spent computing a sweep's settings (cached settings count nothing)."""
    return summary.drop_duplicates(["sweep", "setting"]).query("computed").seconds.sum()


def seconds_by_section(sections):
    """:func:`computed_seconds` of each frame of ``sections`` (name -> frame), as a Series."""
    return pd.Series({name: computed_seconds(frame) for name, frame in sections.items()})


def metrics_as_tasks(summary, metrics=None):
    """Rows of ``metrics`` (default all) with each metric as the ``task`` and ``metric="score"``:
    several metrics of one task drawn as the lines of one panel."""
    rows = summary if metrics is None else summary[summary.metric.isin(metrics)]
    return rows.assign(task=rows.metric).assign(metric="score")


# --------------------------------------------------------------------------- captions


def lm_caption(lm):
    """Per language-modelling task: vanilla perplexity with its interval and tokens, perplexity at
    the smallest attention and FF k; then the compute time."""
    lines = []
    for task in dict.fromkeys(lm.task):
        t = lm[(lm.task == task) & (lm.metric == "perplexity")].set_index("setting")
        worst_attn = t[t.kind == "attention"].sort_values("x").iloc[0]
        worst_ff = t[t.kind == "ff"].sort_values("x").iloc[0]
        lines.append(f"{task}: vanilla perplexity {t.loc['vanilla', 'value']:.2f} "
                     f"[{t.loc['vanilla', 'lo']:.2f}, {t.loc['vanilla', 'hi']:.2f}] over {t.loc['vanilla', 'n']} "
                     f"tokens; attention k={worst_attn.x:g}: {worst_attn.value:.2f}, FF k={worst_ff.x:g}: "
                     f"{worst_ff.value:.2f}")
    lines.append(f"language modelling computed for {computed_seconds(lm):.0f} s this run "
                 "(cached settings cost nothing)")
    return "\n".join(lines)


def classification_inputs_caption(tokenizer, language_examples, polarity_examples, cls):
    """How many fortunes and polarity sentences, the language-id prompt lengths in tokens, the compute time."""
    prompt_tokens = [len(tokenizer(LANGUAGE_TEMPLATE.format(text=t))["input_ids"]) for t, _ in language_examples]
    per_label = len(language_examples) // len({label for _, label in language_examples})
    return (f"{len(language_examples)} fortunes ({per_label} per language, prompts of {min(prompt_tokens)}-"
            f"{max(prompt_tokens)} tokens), {len(polarity_examples)} polarity sentences; "
            f"computed for {computed_seconds(cls):.0f} s this run")


def classification_caption(cls, chance):
    """Per task (``chance`` maps task -> chance accuracy): vanilla calibrated and raw accuracy, and
    the range of what calibration changes across settings."""
    lines = []
    for task, p in chance.items():
        t = cls[cls.task == task].pivot_table(index="setting", columns="metric", values="value", sort=False)
        lines.append(f"{task}: vanilla {t.loc['vanilla', 'accuracy']:.1%} calibrated, "
                     f"{t.loc['vanilla', 'accuracy_raw']:.1%} raw (chance {p:.0%}); calibration changes accuracy by "
                     f"{(t.accuracy - t.accuracy_raw).min():+.1%} to {(t.accuracy - t.accuracy_raw).max():+.1%} "
                     "across settings")
    return "\n".join(lines)


def qa_caption(qa):
    """Vanilla containment with its interval and exact match, containment per setting, compute time."""
    t = qa[qa.metric == "contains"].set_index("setting")
    return (f"vanilla: gold answer contained in {t.loc['vanilla', 'value']:.1%} [{t.loc['vanilla', 'lo']:.1%}, "
            f"{t.loc['vanilla', 'hi']:.1%}] of {t.loc['vanilla', 'n']} answers, exact match "
            f"{qa[(qa.metric == 'exact') & (qa.setting == 'vanilla')].value.item():.1%}; "
            + ", ".join(f"{s}: {v:.1%}" for s, v in t.value.items() if s != "vanilla")
            + f"; computed for {computed_seconds(qa):.0f} s this run")


def passkey_caption(passkey, depths):
    """Pooled over lengths: keys and answer tokens right per setting, compute time."""
    pooled = passkey[passkey.task == "passkey"]
    t = pooled.pivot_table(index="setting", columns="metric", values="value", sort=False)
    return (f"{int(pooled.n.iloc[0])} prompts at depths {depths}: "
            + ", ".join(f"{s}: {r.accuracy:.0%} of keys ({r.digits:.0%} of answer tokens)" for s, r in t.iterrows())
            + f"; computed for {computed_seconds(passkey):.0f} s this run")


def budget_caption(table, budget_rows):
    """One line per (task, average k) of a :func:`budget_table`: perplexity and next-token accuracy,
    uniform against budget; then the compute time of ``budget_rows``."""
    lines = [f"{task}, average k {k:g} (budget mean {r[('perplexity', 'budget_mean_k')]:.2f}): perplexity "
             f"{r[('perplexity', 'uniform')]:.2f} uniform vs {r[('perplexity', 'budget')]:.2f} budget, next-token "
             f"accuracy {r[('accuracy', 'uniform')]:.1%} vs {r[('accuracy', 'budget')]:.1%}"
             for (task, k), r in table.iterrows()]
    lines.append(f"budget settings computed for {computed_seconds(budget_rows):.0f} s this run")
    return "\n".join(lines)


def retrieval_inputs_caption(tokenizer, pairs, *, max_length=256):
    """How many paragraphs and the document lengths in tokens."""
    doc_tokens = [len(ids) for ids in tokenizer([d for _, d in pairs])["input_ids"]]
    return (f"{len(pairs)} paragraphs; documents of {min(doc_tokens)}-{max(doc_tokens)} tokens "
            f"(median {int(np.median(doc_tokens))}, truncated at {max_length})")


def retrieval_caption(retrieval, n_documents):
    """Vanilla accuracy@1 and MRR against chance, the lowest cosine to vanilla, compute time."""
    t = retrieval.pivot_table(index="setting", columns="metric", values="value", sort=False)
    return (f"vanilla: accuracy@1 {t.loc['vanilla', 'acc@1']:.1%}, MRR {t.loc['vanilla', 'mrr']:.3f} over "
            f"{n_documents} documents (chance accuracy@1 {1 / n_documents:.2%}); lowest cosine to vanilla "
            f"{t.cosine.min():.3f} at {t.cosine.idxmin()}; computed for {computed_seconds(retrieval):.0f} s this run")


def relative_caption(curves, *, metric):
    """Per model and kind, ``metric / vanilla`` at each k, pooled over tasks (the mean of the tasks' ratios)."""
    lines = []
    for (model, kind), g in curves.groupby(["model", "kind"], sort=False):
        points = g.groupby("x", sort=True).relative.mean()
        name = "attention k" if kind == "attention" else "FF k/d_ff"
        lines.append(f"{model}, {name}: " + ", ".join(f"{x:g} -> {v:.3f}" for x, v in points.items()))
    return f"{metric} relative to vanilla (mean over texts and window lengths):\n" + "\n".join(lines)


def paper_caption(ours, paper):
    """The smallest k/d_ff where each of the paper's models stays within 1 % of full, and ours per task."""
    return ("k/d_ff where the paper's models stay within 1 % of full: "
            + ", ".join(f"{m}: down to {g[g.relative >= 0.99].k_frac.min():.4f}"
                        for m, g in paper.groupby("model", sort=False))
            + "\nours (relative to vanilla): "
            + "; ".join(f"{task}: " + ", ".join(f"{r.k_frac:.3f} -> {r.relative:.2f}" for _, r in g.iterrows())
                        for task, g in ours.groupby("task", sort=False)))


def closing_caption(table, seconds, wall_seconds):
    """Budget against uniform perplexity per (task, average k), the compute time per section and the wall time."""
    return ("Per-head budget vs uniform k at the same average k (perplexity; negative gain = budget better): "
            + "; ".join(f"{task} k={k:g}: {r[('perplexity', 'uniform')]:.2f} -> {r[('perplexity', 'budget')]:.2f}"
                        for (task, k), r in table.iterrows())
            + "\nSeconds spent computing this run: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; notebook wall time {wall_seconds / 60:.1f} min (cached results cost nothing).")
