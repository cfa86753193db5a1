"""Selectors that keep the keys past queries attended to most: H2O and SnapKV (stateful, for decoding).

Both keep per-layer state in ``self.state[layer]`` between the calls of one sequence; a
prefill call starts a new sequence. The choice is shared by the query heads of one key/value
head (a KV cache is per KV head), from the attention summed over the group. A sliding-window
cache (Gemma-3's local layers) drops its oldest keys as it decodes: a call with fewer keys
than the state expects shifts the state by as many (:func:`_slide`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from topk_lib._validate import positive_int
from topk_lib.kernels.chunking import chunk_scores
from topk_lib.selectors.base import Selector, positions_mask, top_positions

__all__ = ["H2O", "SnapKV"]


def _probs(scores):
    """Softmax over the last dim of masked scores; an all -inf row gives zeros."""
    p = torch.softmax(scores.float(), -1)
    return p.nan_to_num(0.0)


def _slide(selector, call, names):
    """Drop from a layer's per-key state (``names``, ``[..., Hkv, n]``) the keys the cache no longer holds."""
    st = selector.state.get(call.layer)
    if call.prefill or st is None or "seen" not in st:
        return 0
    shift = st["seen"] + call.n_queries - call.n_keys  # keys that left a sliding-window cache
    if shift > 0:
        for name in names:
            st[name] = st[name][..., shift:]
    return max(shift, 0)


class H2O(Selector):
    """Heavy-hitter oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models").

    Rule: a query at position ``t`` keeps the ``r = budget // 2`` most recent keys
    (``t - r + 1 ... t``) and the ``budget - r`` older keys not yet evicted with the largest
    accumulated attention, the sum of the attention weights all earlier queries gave them
    (summed over the query heads of a KV head). Decoding is greedy eviction: after each step
    the older keys it did not keep are evicted for good, and its own attention over the kept
    keys is added to the sums. In a prefill, the sums for query ``t`` come from the exact
    attention of queries ``< t`` (H2O's masked simulation uses the sparse attention row by
    row), and the last prompt query's selection is the cache decoding starts from.
    """

    name = "h2o"
    stateful = True
    batched_decode = False

    def begin(self, call, budget):
        super().begin(call, budget)
        _slide(self, call, ("acc", "alive"))

    def select(self, call, chunk, budget):
        recent = budget // 2
        heavy = budget - recent
        st = self._state(call, chunk.n_keys)
        pos = call.positions(chunk.r0, chunk.r1)  # [c]
        keys = torch.arange(chunk.n_keys, device=pos.device)  # [n]
        old = keys[None, :] <= (pos[:, None] - recent)  # [c, n] older than the window
        allowed = chunk.allowed.any(-3)  # [..., Hkv, c, n]: a key any head of the group may see
        if call.prefill:  # exclusive running sums: the attention of the queries before each row
            p = _probs(chunk.scores).sum(-3)  # [..., Hkv, c, n]
            acc = st["acc"][..., None, :] + p.cumsum(-2) - p  # [..., Hkv, c, n]
            st["acc"] = st["acc"] + p.sum(-2)
            chosen = self._choose(acc, allowed & old, pos, recent, heavy, chunk.n_keys)  # [..., Hkv, c, budget]
            st["last"] = chosen[..., -1, :]
            return chosen.unsqueeze(-3)  # [..., Hkv, 1, c, budget]
        rows = []
        for i in range(chunk.r1 - chunk.r0):  # decoding: each row evicts for the next
            cand = allowed[..., i, :] & old[i] & st["alive"]  # [..., Hkv, n]
            chosen = self._choose(st["acc"][..., None, :], cand[..., None, :], pos[i : i + 1], recent, heavy,
                                  chunk.n_keys)  # [..., Hkv, 1, budget]
            kept = positions_mask(chosen[..., 0, :], chunk.n_keys)  # [..., Hkv, n]
            st["alive"] &= kept | ~old[i]  # older keys not kept are gone
            row = chunk.scores[..., i, :].masked_fill(~kept.unsqueeze(-2), float("-inf"))  # [..., Hkv, G, n]
            st["acc"] = st["acc"] + _probs(row).sum(-2)
            rows.append(chosen)
        return torch.cat(rows, -2).unsqueeze(-3)  # [..., Hkv, 1, c, budget]

    @staticmethod
    def _choose(acc, candidates, pos, recent, heavy, n):
        """The window ``[c, recent]`` and the ``heavy`` candidates of largest ``acc``: ``[..., Hkv, c, budget]``."""
        window = pos[:, None] - torch.arange(recent, device=pos.device)[None, :]  # [c, recent]
        window = window.expand(*candidates.shape[:-1], recent)  # [..., Hkv, c, recent]
        hitters = top_positions(acc.expand_as(candidates), candidates, heavy) if heavy else window[..., :0]
        return torch.cat([window, hitters], -1)

    def _state(self, call, n):
        """The layer's sums and survivors, widened to ``n`` keys (new keys: no attention yet, alive)."""
        shape = call.key.shape[:-1]  # [..., Hkv, Lk]
        st = self.state.setdefault(call.layer, {
            "acc": torch.zeros(*shape[:-1], 0, device=call.key.device),
            "alive": torch.ones(*shape[:-1], 0, dtype=torch.bool, device=call.key.device),
        })
        grow = n - st["acc"].shape[-1]
        if grow > 0:
            st["acc"] = F.pad(st["acc"], (0, grow))
            st["alive"] = F.pad(st["alive"], (0, grow), value=True)
        return st

    def observe(self, call, budget):
        st = self.state.get(call.layer)
        if st is not None:
            st["seen"] = call.n_keys
        if call.prefill and st is not None and "last" in st:  # the cache decoding starts from
            st["alive"] = positions_mask(st.pop("last"), st["alive"].shape[-1])  # [..., Hkv, Lk]


class SnapKV(Selector):
    """SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

    Rule: the prompt runs exact attention. Its last ``w = min(window, budget // 2)`` queries
    (the observation window) vote: each prompt key before the window scores the attention
    they give it, summed over the window's queries and the query heads of its KV head, then
    average-pooled over ``kernel`` neighbouring keys; the ``budget - w`` best of those plus
    the window's own keys are the prompt's compressed cache. Each decoding query then uses
    that cache and every key generated since (so its count is ``budget`` plus the tokens
    generated so far).
    """

    name = "snapkv"
    stateful = True
    batched_decode = False
    exact_prefill = True

    def __init__(self, window=32, kernel=7):
        super().__init__()
        self.window, self.kernel = positive_int(window, "window"), positive_int(kernel, "kernel")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pooling window), got {kernel}")

    def begin(self, call, budget):
        super().begin(call, budget)
        st = self.state.get(call.layer)
        if st is not None:
            st["prompt"] = max(0, st["prompt"] - _slide(self, call, ("keep",)))

    def observe(self, call, budget):
        if not call.prefill:
            self.state[call.layer]["seen"] = call.n_keys
            return
        n = call.n_keys
        w = min(self.window, budget // 2, n)
        if n <= budget:
            keep = torch.ones(*call.key.shape[:-1], dtype=torch.bool, device=call.key.device)  # [..., Hkv, n]
        else:
            scores = chunk_scores(call.query, call.key, call.mask, n - w, n, n, n, n, call.causal, call.scale)
            votes = _probs(scores).sum((-3, -2))  # [..., Hkv, n]
            lead = votes.shape[:-1]
            pooled = F.avg_pool1d(votes.reshape(-1, 1, n), self.kernel, stride=1, padding=self.kernel // 2,
                                  count_include_pad=False).view(*lead, n)  # [..., Hkv, n]
            prefix = torch.arange(n, device=votes.device) < n - w  # [n]
            chosen = top_positions(pooled[..., None, :], prefix.expand_as(pooled)[..., None, :], budget - w)
            keep = positions_mask(chosen[..., 0, :], n) | ~prefix  # [..., Hkv, n]: the chosen and the window
        self.state[call.layer] = {"keep": keep, "prompt": n, "seen": n}

    def width(self, call, budget):
        st = self.state.get(call.layer)
        return budget if st is None or call.prefill else budget + max(0, call.n_keys - st["prompt"])

    def select(self, call, chunk, budget):
        st = self.state.get(call.layer)
        if st is None:
            raise RuntimeError("SnapKV: a decoding call came before any prefill of this layer; run the prompt first")
        n, prompt = chunk.n_keys, st["prompt"]
        keep = F.pad(st["keep"], (0, max(0, n - prompt)), value=True)[..., :n]  # [..., Hkv, n]: generated keys stay
        score = keep.float()[..., None, None, :].expand_as(chunk.scores)  # [..., Hkv, G, c, n]
        return top_positions(score, chunk.allowed & keep[..., None, None, :], self.width(call, budget))

    def selects_all(self, call, budget):
        return False

    def __repr__(self):
        return f"SnapKV(window={self.window}, kernel={self.kernel})"
