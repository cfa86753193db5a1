"""Selectors whose number of keys adapts per query: top-p (Twilight) and calibrated thresholds (Top-θ).

The ``budget`` they are given is a cap; the keys they keep on average is what
:class:`~topk_lib.selectors.base.SelectionLog` reports as ``mean_budget``.
"""

from __future__ import annotations

import numbers

import torch

from topk_lib._validate import positive_int
from topk_lib.kernels.chunking import causal_end, chunk_scores
from topk_lib.selectors.base import Selector

__all__ = ["TopP", "Threshold"]


class TopP(Selector):
    """Top-p (nucleus) attention (Lin et al. 2025, "Twilight: Adaptive Attention Sparsity with
    Hierarchical Top-p Pruning").

    Rule: each query of each query head keeps the smallest set of keys, taken in decreasing
    order of exact attention weight, whose weights sum to at least ``p`` (at most ``budget``
    keys, the cap). Twilight prunes the candidates of a base selector this way, with
    estimated weights; here the weights are exact, so this is the oracle of its rule.
    """

    name = "top_p"
    adaptive = True

    def __init__(self, p=0.9):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"p must be a number in (0, 1], the attention mass to keep, got {p!r}")
        self.p = float(p)

    def select(self, call, chunk, budget):
        probs = torch.softmax(chunk.scores.float(), -1).nan_to_num(0.0)  # [..., Hkv, G, c, n]
        w = min(budget, chunk.n_keys)
        vals, idx = probs.topk(w, dim=-1)  # [..., c, w], largest first
        before = vals.cumsum(-1) - vals  # mass of the keys ranked above each one
        keep = (before < self.p * (1 - 1e-6)) & (vals > 0)  # the first key whose total reaches p is the last kept
        return idx.masked_fill(~keep, -1)

    def __repr__(self):
        return f"TopP(p={self.p:g})"


class Threshold(Selector):
    """Calibrated per-head score thresholds (Berestizshevsky et al. 2025, "Top-Theta Attention:
    Sparsifying Transformers by Compensated Thresholding").

    Rule: per layer and query head, a threshold ``theta`` on the scaled scores, calibrated on
    another text as the mean over its queries (those with at least ``budget`` keys) of their
    ``budget``-th largest score; a query keeps every key it may attend whose score is
    ``>= theta`` (at most ``cap * budget`` keys, the largest). So the budget is met on
    average on text like the calibration text, and adapts per query.
    """

    name = "threshold"
    adaptive = True

    def __init__(self, cap=4):
        super().__init__()
        self.cap = positive_int(cap, "cap")
        self.thresholds = {}  # {(layer, budget): [Hq] tensor}

    def calibrate(self, records, budgets, chunk_size=256):
        """Thresholds for each budget from ``{layer: (q, k, v)}`` causal activations of another text; returns self."""
        budgets = [positive_int(b, "budgets") for b in budgets]
        for layer, (q, k, _) in records.items():
            q, k = q.float(), k.float()
            hkv, lq, lk = k.shape[1], q.shape[-2], k.shape[-2]
            qg = q.unflatten(-3, (hkv, q.shape[-3] // hkv))  # [B, Hkv, G, L, d]
            sums = {b: 0.0 for b in budgets}
            counts = {b: 0 for b in budgets}
            for r0 in range(0, lq, chunk_size):
                r1 = min(r0 + chunk_size, lq)
                end = causal_end(True, lq, lk, r1)
                s = chunk_scores(qg, k, None, r0, r1, end, lq, lk, True, q.shape[-1] ** -0.5)  # [B, Hkv, G, c, n]
                for b in budgets:
                    if b > end:
                        continue
                    kth = s.topk(b, -1).values[..., -1]  # [B, Hkv, G, c]
                    ok = kth > float("-inf")  # rows that see at least b keys
                    sums[b] = sums[b] + torch.where(ok, kth, 0.0).sum((0, -1)).flatten()  # [Hq]
                    counts[b] = counts[b] + ok.sum((0, -1)).flatten()
            for b in budgets:
                if isinstance(counts[b], int):
                    raise ValueError(f"Threshold.calibrate: the calibration text of layer {layer} has fewer than "
                                     f"{b} keys; use a longer text or smaller budgets")
                self.thresholds[(layer, b)] = sums[b] / counts[b].clamp(min=1)
        return self

    def width(self, call, budget):
        return self.cap * budget

    def select(self, call, chunk, budget):
        theta = self.thresholds.get((call.layer, budget))
        if theta is None:
            raise RuntimeError(f"Threshold: no threshold for layer {call.layer!r} at budget {budget}; call "
                               f".calibrate(record_qkv(model, other_ids, layers=...), budgets=[{budget}, ...]) first")
        hkv, g = call.query.shape[-4], call.query.shape[-3]
        theta = theta.to(chunk.scores.device).view(hkv, g, 1, 1)  # [Hkv, G, 1, 1]
        vals, idx = chunk.scores.topk(min(self.width(call, budget), chunk.n_keys), dim=-1)  # [..., c, w]
        return idx.masked_fill(~(vals >= theta) | (vals == float("-inf")), -1)

    def __repr__(self):
        return f"Threshold(cap={self.cap})"
