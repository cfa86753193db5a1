"""Per-head attention budgets: how many keys each head keeps, from what each head needs.

A budget is a ``{(layer, head): k}`` dict that :func:`topk_lib.hf.patching.use_topk` takes
as ``attn_k``. :func:`per_head_budget` turns measured per-head statistics (e.g. the k that
keeps 99 % of the attention mass) into one, optionally rescaled to a given average k;
:func:`scale_budget` rescales a budget to another average with the same proportions
(:func:`scaled_budgets` to several);
:func:`save_budget` / :func:`load_budget` store it as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from topk_lib.infra.cache import atomic_write

__all__ = ["per_head_budget", "scale_budget", "scaled_budgets", "budget_summary", "save_budget", "load_budget"]


def per_head_budget(per_head: pd.DataFrame, *, value: str = "value", average_k: float | None = None,
                    min_k: int = 1, max_k: int | None = None) -> dict[tuple[int, int], int]:
    """``{(layer, head): k}`` from a table with columns ``layer``, ``head`` and ``value``.

    ``value`` is the k each head needs (e.g. k for 99 % of the mass). With ``average_k``
    every head's k is scaled by ``average_k / mean(value)`` so the budget keeps the
    measured proportions at a given mean; rounding makes the mean approximate, within
    0.5. Results are clipped to ``[min_k, max_k]``.
    """
    missing = {"layer", "head", value} - set(per_head.columns)
    if missing:
        raise ValueError(f"per_head needs columns layer, head and {value!r}; missing {sorted(missing)}")
    if per_head.duplicated(["layer", "head"]).any():
        raise ValueError("per_head has several rows for one (layer, head): aggregate first")
    if average_k is not None and average_k <= 0:
        raise ValueError(f"average_k must be positive, got {average_k}")
    need = per_head[value].astype(float)
    if average_k is not None:
        need = need * (average_k / need.mean())
    ks = need.round().clip(lower=min_k, upper=max_k)
    return {(int(l), int(h)): int(k) for l, h, k in zip(per_head["layer"], per_head["head"], ks)}



def scale_budget(budget, *, average_k, max_k=None):
    """The budget's per-head proportions rescaled to mean ``average_k`` (:func:`per_head_budget`)."""
    if not isinstance(budget, dict) or not budget:
        raise ValueError("budget must be a non-empty {(layer, head): k} dict")
    table = pd.DataFrame([{"layer": l, "head": h, "value": float(k)} for (l, h), k in budget.items()])
    return per_head_budget(table, average_k=average_k, min_k=1, max_k=max_k)


def scaled_budgets(budget, average_ks, *, max_k=None):
    """``{average_k: budget}``: :func:`scale_budget` to each of ``average_ks``."""
    return {k: scale_budget(budget, average_k=k, max_k=max_k) for k in average_ks}


def budget_summary(budget):
    """One line about a budget: how many heads, the range, median and mean of their k."""
    ks = np.array(list(budget.values()))
    return f"{len(budget)} heads, k from {ks.min()} to {ks.max()}, median {np.median(ks):g}, mean {ks.mean():.1f}"

def save_budget(budget: dict, path, *, overwrite: bool = False, **info) -> Path:
    """Write a budget as JSON (keys ``"layer,head"``) atomically; ``info`` is stored beside it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    ks = list(budget.values())
    doc = {
        **info,
        "average_k": sum(ks) / len(ks) if ks else math.nan,
        "budget": {f"{layer},{head}": int(k) for (layer, head), k in sorted(budget.items())},
    }
    return atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def load_budget(path) -> dict[tuple[int, int], int]:
    """Read a budget written by :func:`save_budget`, ready for ``use_topk(model, attn_k=...)``."""
    doc = json.loads(Path(path).read_text())
    try:
        return {tuple(int(x) for x in key.split(",")): int(k) for key, k in doc["budget"].items()}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a budget written by save_budget: {err}") from None
