"""Top-k attention on a GPU in two passes: a score threshold per query row, then FlexAttention above it.

:func:`~topk_lib.kernels.attention.topk_attention` runs this path on CUDA tensors
(:func:`fast_path_applies` says when); :func:`threshold_topk_attention` runs it on any device (on
CPU FlexAttention runs unfused, for tests). Gupta et al. (2021, section 3.1) keep the ``k``
largest scores of each query; on a GPU, writing each chunk's ``[C, Lk]`` scores to memory and
sorting them (``torch.topk`` and gathers) costs 3-12x SDPA's time and 20-140x its memory. Here:

1. **Pass 1** (:mod:`.threshold`, :mod:`.threshold_triton`): per query row the threshold ``tau``
   between its k-th and (k+1)-th largest allowed score, streamed over key blocks (a Triton kernel
   with a running top-k on CUDA; ``torch.topk`` over chunks of rows elsewhere), and per (query
   block, key block) whether the key block may hold a kept score.
2. **Pass 2**: FlexAttention (``torch.nn.attention.flex_attention``, compiled on CUDA) with a
   ``score_mod`` that soft-caps, adds the float mask and sets scores below ``tau`` to ``-inf``, a
   ``mask_mod`` for the bool mask and the causal rule, and a ``BlockMask`` that skips the key
   blocks pass 1 found no kept score in. FlexAttention generates the backward; ``tau`` is a
   constant there (the selection gets no gradient, as with ``torch.topk``'s).

Backward state: what FlexAttention saves (Q, K, V, the output, the row log-sum-exp) plus ``tau``
``[B, Hq, Lq]`` and the block mask (``B * Hq * nq * nk`` int32): O(Lq), no ``Lq x k`` indices.

Ties: every key tied with the k-th score is kept (:mod:`.threshold`); the CPU kernels keep
exactly ``k``. They agree on every row whose k-th and (k+1)-th scores differ.

Status: **no GPU number is measured yet.** The path was written and tested on a CPU: FlexAttention
unfused (forward and backward) and compiled (inductor's CPU forward), the Triton pass 1 under
Triton's interpreter. The CUDA compile, the times and the peak memory against SDPA and chunked
attention are still to be taken with ``scripts/gpu_check.sh``. Expected, not measured: with
random inputs pass 2 does all of FlashAttention's work and pass 1 adds a Q.K^T and a sort, so the
forward is slower than SDPA; the backward is FlexAttention's, with no indices or gathers.

Alternatives considered (none measured on a GPU either): (a) the existing path, ``torch.topk`` over materialised chunks plus
gathers (kept for CPU, and on CUDA with ``RowSelector(method="chunked")``); (b) one fused Triton
kernel (scores, running top-k and the sparse softmax x V in one pass): it saves re-reading K but
needs its own backward kernel; (c) radix/histogram selection of ``tau``: several passes over
Q.K^T, or a histogram per row that does not fit in shared memory. The two-pass design was chosen
because pass 2 and its backward come from FlexAttention; pass 1 costs one more Q.K^T plus the
sorting network of the running top-k, so with random inputs (where every key block holds some
row's top-k and nothing is skipped) it cannot be faster than dense FlashAttention; with real
attention, whose kept keys cluster, pass 2 skips blocks.

Pass 1 runs in torch (chunks of at most 128 MiB of float32 scores) where the Triton kernel does
not apply (``k >= 256``). Not on this path (they run the CPU-style kernels on CUDA too): attention sinks (FlexAttention
has no sink logit), a float mask that requires a gradient, head dims that are not a power of
two of at least 16, a number of query heads per key/value head that is not a power of two,
``topk=None`` or ``topk >= Lk`` (exact attention), and empty inputs.

Dimensions
----------
``B``   batch (the flattened batch dims ``...``); ``Hq``, ``Hkv`` query and key/value heads; ``G = Hq // Hkv``
``Lq``  queries; ``Lk`` keys; ``d``, ``dv`` head dims; ``nq``, ``nk`` blocks of 128 queries and keys
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from topk_lib.kernels.checks import check_attention_inputs
from topk_lib.kernels.threshold import BLOCK, thresholds

__all__ = ["fast_path_applies", "threshold_topk_attention"]


def _power_of_two(n) -> bool:
    return n >= 1 and n & (n - 1) == 0


def fast_path_applies(query, key, value, topk, attn_mask, sinks) -> bool:
    """Whether :func:`~topk_lib.kernels.attention.topk_attention` runs the threshold path: CUDA tensors,
    FlexAttention importable, ``topk < Lk``, no sinks, no float mask that requires grad, ``d`` and ``dv``
    powers of two of at least 16, ``Hq / Hkv`` a power of two, no empty dim."""
    if not query.is_cuda or topk is None or topk >= key.shape[-2] or sinks is not None:
        return False
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad:
        return False
    d, dv = query.shape[-1], value.shape[-1]
    if not (d >= 16 and dv >= 16 and _power_of_two(d) and _power_of_two(dv)):
        return False
    if not _power_of_two(query.shape[-3] // key.shape[-3]) or math.prod(query.shape[:-1]) == 0:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _four_d(t, batch, lead):
    """``t`` (broadcastable to ``[*batch, H, Lq, Lk]``) as 4D ``[B|1, H|1, Lq|1, Lk|1]``, a view where it can be."""
    if t is None:
        return None
    t = t.reshape((1,) * (lead + 3 - t.dim()) + tuple(t.shape))  # [*batch|1, H|1, Lq|1, Lk|1]
    if all(s == 1 for s in t.shape[:lead]):
        return t.reshape(1, *t.shape[lead:])
    return t.expand(*batch, *t.shape[lead:]).reshape(-1, *t.shape[lead:])


def _indexer(t):
    """A function ``(b, h, q, kv) -> t[...]`` that reads index 0 along the broadcast dims of the 4D ``t``."""
    keep = [s != 1 for s in t.shape]

    def at(b, h, q, kv):
        idx = [i if k else 0 for i, k in zip((b, h, q, kv), keep)]
        return t[idx[0], idx[1], idx[2], idx[3]]

    return at


def _mods(tau, float_mask, bool_mask, is_causal, softcap, lq, lk):
    """FlexAttention's ``score_mod`` (cap, float mask, threshold) and ``mask_mod`` (bool mask, causal rule)."""
    fm = None if float_mask is None else _indexer(float_mask)
    bm = None if bool_mask is None else _indexer(bool_mask)
    offset = lk - lq  # query i sits at position Lk - Lq + i

    def score_mod(score, b, h, q, kv):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if fm is not None:
            score = score + fm(b, h, q, kv)
        return torch.where(score >= tau[b, h, q], score, float("-inf"))

    def mask_mod(b, h, q, kv):
        allowed = kv >= 0
        if is_causal:
            allowed = allowed & (kv <= q + offset)
        if bm is not None:
            allowed = allowed & bm(b, h, q, kv)
        return allowed

    return score_mod, mask_mod


def _block_mask(needs, mask_mod, lq, lk):
    """The ``BlockMask`` of the needed key blocks ``needs [B, Hq, nq, nk]`` (needed ones first in each row)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = needs.sum(-1, dtype=torch.int32)  # [B, Hq, nq]
    order = torch.argsort((~needs).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # [B, Hq, nq, nk]
    return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(lq, lk))


def threshold_topk_attention(query, key, value, *, topk, attn_mask=None, is_causal=False, scale=None, softcap=None,
                             pass1="auto", compile=None):
    """Top-k attention by a threshold per row and FlexAttention (the module docstring has the design).

    Arguments:
        query, key, value, attn_mask, is_causal, scale, softcap: as in
            :func:`~topk_lib.kernels.attention.topk_attention` (``[..., Hq, Lq, d]``,
            ``[..., Hkv, Lk, d]``, ``[..., Hkv, Lk, dv]``; bool or float mask broadcastable to
            ``[..., Hq, Lq, Lk]``; queries at the last ``Lq`` of ``Lk`` positions when causal).
        topk: ``k``, a positive int, or ``None`` (every allowed key: exact attention).
        pass1: ``"auto"`` (Triton on CUDA where :func:`~topk_lib.kernels.threshold_triton.supports`
            holds, torch otherwise), ``"torch"`` or ``"triton"``.
        compile: run FlexAttention compiled (fused kernels); ``None`` means on CUDA only. Unfused
            FlexAttention builds the whole ``[B, Hq, Lq, Lk]`` score tensor (tests only).

    Returns:
        ``[..., Hq, Lq, dv]``, the dtype of ``query``.

    Raises:
        TypeError, ValueError: as ``topk_attention``; ValueError for a float ``attn_mask`` that
        requires grad (no gradient reaches it here: use ``topk_attention`` on CPU, or the chunked
        CUDA path with ``selector=RowSelector(method="chunked")``).
        NotImplementedError: FlexAttention's own refusals, e.g. a backward of CPU tensors.

    Semantics:
        Keeps every allowed score ``>= tau`` (:mod:`.threshold`): the ``k`` largest, and all keys
        tied with the k-th. Scores accumulate in float32 (float64 for float64 inputs). A row with
        fewer than ``k`` allowed keys keeps all of them; a row with none returns zeros.

    Backward:
        FlexAttention's generated backward (``tau`` constant); saved: Q, K, V, the output, the row
        log-sum-exp, ``tau`` and the block mask.
    """
    check_attention_inputs(query, key, value, attn_mask, topk, 1, scale, softcap, None)
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad:
        raise ValueError("attn_mask: a float mask that requires grad gets no gradient on the threshold path; "
                         "use topk_attention with selector=RowSelector(method='chunked'), or detach the mask")
    from torch.nn.attention.flex_attention import flex_attention

    batch, (hq, lq, d), (hkv, lk, dv) = query.shape[:-3], query.shape[-3:], key.shape[-3:-1] + value.shape[-1:]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    lead = len(batch)
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))  # [B, H, L, d]
    mask4 = _four_d(attn_mask, batch, lead)
    float_mask = mask4 if mask4 is not None and mask4.is_floating_point() else None
    bool_mask = mask4 if mask4 is not None and mask4.dtype == torch.bool else None
    with torch.no_grad():
        found = thresholds(q4.detach(), k4.detach(), topk=topk if topk is not None else lk, scale=scale,
                           softcap=softcap, float_mask=float_mask, bool_mask=bool_mask, is_causal=is_causal,
                           backend=pass1)
    score_mod, mask_mod = _mods(found.tau, float_mask, bool_mask, is_causal, softcap, lq, lk)
    block_mask = _block_mask(found.needs, mask_mod, lq, lk)
    compile = query.is_cuda if compile is None else compile
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=hq != hkv)
    if compile:
        out = _compiled_flex()(q4, k4, v4, **kw)
    else:
        # Unfused FlexAttention still traces the call; once a new shape marks it dynamic, torch 2.13 fails to
        # trace its CPU backward (an unbacked symbol): static shapes keep each shape its own trace.
        with warnings.catch_warnings(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(q4, k4, v4, **kw)  # [B, Hq, Lq, dv]
    return out.reshape(*batch, hq, lq, dv)
