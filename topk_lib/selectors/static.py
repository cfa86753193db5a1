"""Selectors that need no estimate of the scores: the exact top-k oracle, sinks + window, random keys.

Each is a :class:`~topk_lib.selectors.base.Selector`; the rule each implements is in its
docstring, with the paper it comes from.
"""

from __future__ import annotations

import torch

from topk_lib.kernels.selection import DEFAULT_SELECTOR
from topk_lib.selectors.base import Selector, as_chunk_dims, top_positions

__all__ = ["Oracle", "SinkWindow", "RandomKeys", "hash_noise"]


class Oracle(Selector):
    """Exact top-k (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention", section 3.1).

    Rule: each query (of each query head) keeps the ``budget`` keys of largest exact score
    ``scale * q.k`` plus mask; masked keys never count. It selects with the kernel's own
    :data:`~topk_lib.kernels.selection.DEFAULT_SELECTOR` on the same chunk scores, so its output
    is :func:`~topk_lib.kernels.attention.topk_attention`'s (up to ties at the budget-th score).
    """

    name = "oracle"

    def select(self, call, chunk, budget):
        return DEFAULT_SELECTOR(chunk.scores, min(budget, chunk.n_keys))[1]  # [..., Hkv, G, c, w]


class SinkWindow(Selector):
    """Attention sinks plus a sliding window (Xiao et al. 2024, "Efficient Streaming Language Models
    with Attention Sinks", StreamingLLM).

    Rule: a query at position ``t`` keeps the first ``n_sink`` keys of the sequence and the
    ``budget - n_sink`` most recent keys up to ``t`` (``t - budget + n_sink + 1 ... t``), the
    same set for every head; with ``budget <= n_sink`` only the first ``budget`` keys.
    ``n_sink=0`` is a plain sliding window.
    """

    name = "sink_window"

    def __init__(self, n_sink=4):
        super().__init__()
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0 (0: a plain sliding window), got {n_sink!r}")
        self.n_sink = n_sink

    def select(self, call, chunk, budget):
        pos = call.positions(chunk.r0, chunk.r1)  # [c]
        sinks = min(self.n_sink, budget)
        first = torch.arange(sinks, device=pos.device).expand(len(pos), sinks)  # [c, sinks]
        recent = pos[:, None] - torch.arange(budget - sinks, device=pos.device)[None, :]  # [c, budget - sinks]
        return as_chunk_dims(torch.cat([first, recent], -1), chunk.scores.dim())  # [1.., c, budget]

    def __repr__(self):
        return f"SinkWindow(n_sink={self.n_sink})"


_MASK32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (two rounds of xor-shift-multiply), on int64 tensors holding uint32."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def hash_noise(seed, heads, positions, keys):
    """Pseudo-random integers ``[heads, len(positions), keys]`` fixed by (seed, head, query position, key).

    The draw of a query does not depend on how the queries are chunked or batched, so a
    selection by this noise is reproducible in a model and in a dense reference.
    """
    h = _mix(torch.arange(heads, dtype=torch.int64) + (int(seed) & _MASK32) * 7919)  # [H]
    h = _mix((h[:, None] * 31 + positions.long().cpu()[None, :]) & _MASK32)  # [H, c]
    return _mix((h[..., None] * 131 + torch.arange(keys, dtype=torch.int64)) & _MASK32)  # [H, c, n]


class RandomKeys(Selector):
    """Random keys, the baseline of no information (e.g. the random-selection control of Gupta et al. 2021).

    Rule: each query of each query head keeps ``budget`` keys drawn uniformly without
    replacement from the keys it may attend (all of them when fewer), the draw fixed by
    ``seed``, the query head, the query's position and the key (:func:`hash_noise`).
    """

    name = "random"

    def __init__(self, seed=0):
        super().__init__()
        self.seed = int(seed)

    def select(self, call, chunk, budget):
        hkv, g = call.query.shape[-4], call.query.shape[-3]
        noise = hash_noise(self.seed, hkv * g, call.positions(chunk.r0, chunk.r1), chunk.n_keys)  # [Hq, c, n]
        noise = (noise >> 8).view(hkv, g, *noise.shape[1:]).to(chunk.scores.device).float()  # 24 bits: exact floats
        noise = noise.view(*(1,) * (chunk.scores.dim() - 4), *noise.shape).expand_as(chunk.scores)
        return top_positions(noise, chunk.allowed, budget)  # [..., Hkv, G, c, w]

    def __repr__(self):
        return f"RandomKeys(seed={self.seed})"
