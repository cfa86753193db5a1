"""The selector API: which keys each query may use, and attention over exactly those.

Exact top-k (Gupta et al. 2021, section 3.1) is the oracle every practical sparse-attention
method approximates. A :class:`Selector` maps one attention call (queries, keys, the mask, the
layer, whether it is a prefill or a decoding call, and the state it keeps) to the keys each
query may use. The softmax over the chosen keys and the product with V are the top-k kernel's
own (:func:`topk_lib.kernels.attention.topk_attention`, its chunked forward and sparse product):
the kernel walks the queries ``C`` rows at a time and asks the selector for each chunk, so no
Lq x Lk tensor is formed beyond one chunk of scores, and gradients flow as for top-k.

A selector implements :meth:`Selector.select`::

    class Every4th(Selector):
        '''Keys at positions divisible by 4 (a toy rule).'''
        def select(self, call, chunk, budget):
            pos = torch.arange(0, chunk.n_keys, 4)                     # [n]
            return pos.expand(*chunk.scores.shape[:-1], -1)            # [..., Hkv, G, c, n]

The index form: an int tensor ``[..., Hkv, G|1, c, w]`` of key positions, ``w <= budget``
(wider is an error), ``-1`` (or any negative entry) for "no key"; duplicates count once and
positions the mask (or the causal rule) forbids are dropped. ``G = 1`` means one selection
shared by the query heads of a key/value head. Stateful selectors keep per-layer tensors in
``self.state[layer]`` (reset by :meth:`Selector.reset`, which
:func:`topk_lib.hf.patching.use_sparse` calls on entry and exit, and for a layer at each new
prefill).

Dimensions
----------
``B``   batch dims (written ``...``); ``Hq``, ``Hkv`` query and key/value heads, ``G = Hq // Hkv``
``Lq``  queries of the call, ``Lk`` keys, ``c`` queries of one chunk, ``n`` keys the chunk may see
``w``   keys a selector returns per query (at most the budget)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from topk_lib._validate import positive_int
from topk_lib.kernels.attention import chunked_attention, topk_attention
from topk_lib.kernels.chunking import grouped_mask
from topk_lib.kernels.selection import RowSelector

__all__ = ["Selector", "AttentionCall", "Chunk", "sparse_attention", "SelectionLog", "top_positions", "as_chunk_dims",
           "positions_mask"]


@dataclass
class AttentionCall:
    """One attention call of one layer, as a selector sees it.

    ``query [..., Hkv, G, Lq, d]`` (grouped), ``key [..., Hkv, Lk, d]``, ``mask`` as
    :func:`~topk_lib.kernels.chunking.grouped_mask` gives it (or None). Query ``i`` sits at
    absolute position ``Lk - Lq + i``. ``prefill`` is true when the call holds the whole
    sequence so far (``Lq == Lk``): a new sequence starts.
    """

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    layer: object
    prefill: bool

    @property
    def n_queries(self):
        return self.query.shape[-2]

    @property
    def n_keys(self):
        return self.key.shape[-2]

    def positions(self, r0, r1):
        """Absolute positions ``[c]`` of query rows ``r0:r1``."""
        start = self.n_keys - self.n_queries
        return torch.arange(start + r0, start + r1, device=self.query.device)


@dataclass
class Chunk:
    """Query rows ``r0:r1`` of a call and their exact masked scores ``[..., Hkv, G, c, n]`` (-inf = not allowed)."""

    scores: torch.Tensor
    r0: int
    r1: int

    @property
    def n_keys(self):
        return self.scores.shape[-1]

    @property
    def allowed(self):
        """Bool ``[..., Hkv, G, c, n]``: keys the mask and the causal rule allow."""
        return self.scores > float("-inf")


@dataclass
class SelectionLog:
    """What the selections of the calls it sees kept: key counts per row, and the last index tensor."""

    keep_last: bool = False
    kept: float = 0.0  # keys kept, summed over rows
    rows: int = 0
    last: list = field(default_factory=list)  # the kept indices of each chunk of the last call, -1 = none

    @property
    def mean_budget(self):
        return self.kept / self.rows if self.rows else math.nan


class Selector:
    """Base class of a key selector (see the module docstring for the contract).

    Class attributes a subclass may set: ``name`` (for tables and plots), ``stateful`` (the
    choice depends on earlier calls, so every call goes through :meth:`select`, also where the
    budget covers every key), ``adaptive`` (the number of keys varies per query; the budget is
    its cap), ``exact_prefill`` (a prefill call runs exact attention, and :meth:`observe`
    sees it: SnapKV compresses the cache only after the prompt), ``batched_decode`` (a causal
    call of several queries chooses for each what one decoding step at its position would:
    false where the choice depends on earlier steps, or on keys after the query, as Quest's
    page bounds in a prefill do).
    """

    name = "selector"
    stateful = False
    adaptive = False
    exact_prefill = False
    batched_decode = True

    def __init__(self):
        self.state = {}

    def reset(self):
        """Forget every layer's state (a new context, or a new sequence)."""
        self.state = {}

    def begin(self, call: AttentionCall, budget: int):
        """Called once per call before its chunks; default: a prefill forgets the layer's state."""
        if call.prefill:
            self.state.pop(call.layer, None)

    def select(self, call: AttentionCall, chunk: Chunk, budget: int) -> torch.Tensor:
        """Key positions ``[..., Hkv, G|1, c, w]`` (``w <= budget``, -1 = none) for the chunk's queries."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(call, chunk, budget)")

    def observe(self, call: AttentionCall, budget: int):
        """Called after a call's chunks (and after an exact prefill); default: nothing."""

    def width(self, call: AttentionCall, budget: int) -> int:
        """The most keys a query may get in this call: the budget (SnapKV adds the generated keys)."""
        return budget

    def selects_all(self, call: AttentionCall, budget: int) -> bool:
        """Whether the call may run exact attention: a fixed budget that covers every key."""
        return not (self.stateful or self.adaptive) and budget >= call.n_keys

    def attend(self, query, key, value, *, budget, **kwargs):
        """:func:`sparse_attention` with this selector (what :func:`topk_lib.hf.patching.use_sparse` calls)."""
        return sparse_attention(query, key, value, selector=self, budget=budget, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}()"


class _Chooser(RowSelector):
    """Hands the kernel's chunks to a :class:`Selector` and turns its positions into kept entries."""

    exact_at_full_width = False  # a selector's rule holds at any budget

    def __init__(self, selector, call, budget, width, log):
        super().__init__(threads=1, method="chunked")
        self.selector, self.call, self.budget, self.width, self.log = selector, call, budget, width, log

    def rows(self, scores, k, r0, r1):
        name, n = type(self.selector).__name__, scores.shape[-1]
        idx = self.selector.select(self.call, Chunk(scores, r0, r1), self.budget)  # [..., Hkv, G|1, c, w]
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dim() != scores.dim():
            raise TypeError(f"{name}.select must return int key positions [..., Hkv, G|1, c, w] with "
                            f"{scores.dim()} dims, got {getattr(idx, 'shape', idx)!r}")
        if idx.shape[-1] > self.width:
            raise ValueError(f"{name}.select returned {idx.shape[-1]} keys per query, more than its width "
                             f"{self.width} (the budget, unless {name}.width says otherwise)")
        idx = idx.long().expand(*scores.shape[:-1], idx.shape[-1])  # [..., Hkv, G, c, w]
        # Sorted with "no key" as n, the valid entries come first and a repeat sits beside its first copy.
        idx = idx.masked_fill((idx < 0) | (idx >= n), n).sort(-1).values  # [..., Hkv, G, c, w]
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = (idx[..., 1:] == idx[..., :-1]) & (idx[..., 1:] < n)
        if dup.any():
            idx = idx.masked_fill(dup, n).sort(-1).values
        # Wider than the kernel's k only when the chunk sees fewer keys than the budget (k == n):
        # what is cut is "no key".
        idx = idx[..., :k]
        if idx.shape[-1] < k:  # pad to the kernel's width with "no key"
            idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - idx.shape[-1]), n)], -1)  # [..., c, k]
        vals = scores.gather(-1, idx.clamp(max=n - 1)).masked_fill(idx >= n, float("-inf"))  # [..., Hkv, G, c, k]
        valid = vals > float("-inf")  # positions the mask forbids go too
        self.log.kept += float(valid.sum())
        self.log.rows += valid[..., 0].numel()
        if self.log.keep_last:
            self.log.last.append(idx.masked_fill(~valid, -1))
        return vals, idx.masked_fill(~valid, 0)  # the kernel drops the -inf entries


def sparse_attention(query, key, value, *, selector, budget, layer=0, attn_mask=None, is_causal=False, scale=None,
                     chunk_size=1024, softcap=None, sinks=None, log=None):
    """Attention over the keys ``selector`` chooses, at most ``budget`` per query.

    Arguments:
        query: ``[..., Hq, Lq, d]``; key/value ``[..., Hkv, Lk, d|dv]`` (grouped-query heads as in
            :func:`~topk_lib.kernels.attention.topk_attention`, whose other arguments
            ``attn_mask, is_causal, scale, chunk_size, softcap, sinks`` these are).
        selector: a :class:`Selector`.
        budget: keys per query, a positive int (the cap, for an adaptive selector).
        layer: the key of the selector's state for this layer.
        log: a :class:`SelectionLog` that counts the keys kept (and keeps the last indices), or None.

    Returns:
        ``[..., Hq, Lq, dv]``. The kept keys' softmax and product with V are the top-k kernel's;
        a call the budget covers entirely (:meth:`Selector.selects_all`) runs exact attention.
    """
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a topk_lib.selectors Selector, got {type(selector).__name__}")
    budget = positive_int(budget, "budget")
    hkv = key.shape[-3]
    scale_ = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    call = AttentionCall(query.unflatten(-3, (hkv, query.shape[-3] // hkv)), key,
                         grouped_mask(attn_mask, query, hkv), bool(is_causal), scale_, layer,
                         query.shape[-2] == key.shape[-2])
    log = SelectionLog() if log is None else log
    log.last = []
    selector.begin(call, budget)
    exact = selector.selects_all(call, budget) or (call.prefill and selector.exact_prefill)
    if exact:
        out = chunked_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                chunk_size=chunk_size, softcap=softcap, sinks=sinks)
        allowed = _allowed_counts(call)  # [..., Hkv, G|1, Lq]
        log.kept += float(allowed.expand(*call.query.shape[:-1]).sum())
        log.rows += math.prod(call.query.shape[:-1])
    else:
        width = positive_int(selector.width(call, budget), f"{type(selector).__name__}.width")
        out = topk_attention(query, key, value, topk=width, chunk_size=chunk_size, attn_mask=attn_mask,
                             is_causal=is_causal, scale=scale, selector=_Chooser(selector, call, budget, width, log),
                             softcap=softcap, sinks=sinks)
    selector.observe(call, budget)
    return out


def as_chunk_dims(t, dims):
    """``t [c, w]`` (one choice per query row, shared by batch and heads) viewed with ``dims`` dims."""
    return t.view(*(1,) * (dims - 2), *t.shape)


def top_positions(estimate, allowed, budget):
    """Positions ``[..., c, min(budget, n)]`` of the largest ``estimate [..., c, n]`` among ``allowed`` keys, -1 = none.

    The rule of every selector that scores keys by an estimate (Loki, Double Sparsity, Quest's
    pages): the top ``budget`` of the estimate, disallowed keys never chosen.
    """
    estimate = estimate.masked_fill(~allowed, float("-inf"))
    vals, idx = estimate.topk(min(budget, estimate.shape[-1]), dim=-1)  # [..., c, w]
    return idx.masked_fill(vals == float("-inf"), -1)


def positions_mask(idx, n):
    """Bool ``[..., n]``: True at the positions ``idx [..., w]`` names (entries < 0 or >= n name none)."""
    slots = idx.long().masked_fill((idx < 0) | (idx >= n), n)
    out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, slots, True)[..., :n]


def _allowed_counts(call):
    """Keys each query may see under the causal rule and a bool mask (a float mask allows all): ``[..., Lq]``."""
    lq, lk = call.n_queries, call.n_keys
    count = torch.full((lq,), float(lk))
    if call.causal:
        count = torch.arange(lk - lq + 1, lk + 1, dtype=torch.float)
    if call.mask is not None and call.mask.dtype == torch.bool:
        m = call.mask.expand(*call.mask.shape[:-2], lq, lk) if call.mask.shape[-2] == 1 else call.mask
        allowed = m.sum(-1).float().cpu()
        return torch.minimum(allowed, count) if call.causal else allowed
    return count
