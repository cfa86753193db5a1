"""Memory-efficient top-k attention and its exact baselines (Gupta et al. 2021, section 3.1).

Queries are processed in chunks of ``chunk_size`` rows. For each chunk the scores against all keys are
computed, the ``topk`` largest per query are kept (masked keys never count), a softmax runs over those only,
and their values are summed with the kept weights. Peak memory is O(C*Lk + Lq*k) instead of O(Lq*Lk).

The code is in tiers: backends in their own modules (:mod:`.chunking`: score chunks, :mod:`.selection`: per-row
top-k, :mod:`.scan` and :mod:`.native`: the CPU forward fusing the scores with a compiled selection, :mod:`.backward`:
the compiled CPU backward, :mod:`.product`: sparse weights x V products, :mod:`.logits`: soft-capping and sinks,
:mod:`.checks`: argument checks, :mod:`.flex`: the two-pass threshold path CUDA tensors take), here
``torch.autograd.Function`` classes that save a row log-sum-exp instead of any Lq x Lk tensor, and the public
functions :func:`topk_attention`, :func:`chunked_attention` and :func:`vanilla_attention`, whose docstrings give
the full semantics (shapes, masks, ties, empty rows, what backward saves).

Dimensions
----------
``B``   batch dims (any number, written ``...`` in shapes)
``Hq``  query heads; ``Hkv`` key/value heads; ``G = Hq // Hkv`` query heads per key/value head
``Lq``  queries; ``Lk`` keys; ``C`` queries in one chunk (``c`` for the last, shorter one)
``k``   keys kept per query (``topk``, at most ``Lk``)
``d``   query/key head dim; ``dv`` value head dim
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from topk_lib.kernels.backward import can_fuse, fused_backward
from topk_lib.kernels.checks import check_attention_inputs, first_order_only
from topk_lib.kernels.flex import fast_path_applies, threshold_topk_attention
from topk_lib.kernels.chunking import causal_end, chunk_scores, flat_rows, grouped_mask, mask_scores
from topk_lib.kernels.logits import add_sink, as_sink_rows, cap_with_derivative, empty_lse, row_shift, rows, sink_grad
from topk_lib.kernels.product import KeptMatrix, resolve_product
from topk_lib.kernels.scan import can_scan, select_chunk
from topk_lib.kernels.selection import DEFAULT_SELECTOR, RowSelector
from topk_lib.kernels.threshold import work_dtype

__all__ = ["topk_attention", "chunked_attention", "vanilla_attention"]


def _softmax_kept(vals, sink=None):
    """Softmax over the kept scores ``[..., c, k]`` and its row log-sum-exp ``[..., c, 1]``.

    ``sink`` (``[..., c|1, 1]`` or None) joins each row's denominator. All -inf rows give zero
    weights (not NaN) and a log-sum-exp of -inf (the sink's, with one).
    """
    work = vals.float() if vals.dtype in (torch.float16, torch.bfloat16) else vals
    row_max = row_shift(work, sink)  # [..., c, 1]
    e = torch.exp(work - row_max)  # [..., c, k]
    denom = add_sink(e.sum(-1, keepdim=True), sink, row_max)  # [..., c, 1]
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)  # [..., c, k]
    return p.to(vals.dtype), row_max + denom.log()  # log(0) = -inf marks an empty row


def _mask_at(mask_grouped, r0, r1, idx):
    """Float mask values at the kept keys ``idx [..., Hkv, G, c, k]`` (broadcast views, no copy)."""
    mask = mask_grouped[..., r0:r1, :] if mask_grouped.shape[-2] != 1 else mask_grouped
    if mask.shape[-1] == 1:
        return mask.expand(*idx.shape[:-1], 1)  # [..., Hkv, G, c, 1]
    return mask.expand(*idx.shape[:-1], mask.shape[-1]).gather(-1, idx)  # [..., Hkv, G, c, k]


def _reduce_to(grad, shape):
    """Sum a gradient over the dims that were broadcast to reach its shape."""
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead else grad
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


# --------------------------------------------------------------------------- top-k


class _TopkAttention(torch.autograd.Function):
    """Saves Q, K, V, the mask, the kept indices (int32, -1 = not kept) and the row log-sum-exp."""

    @staticmethod
    def forward(
        ctx, query, key, value, attn_mask, topk, chunk_size, is_causal, scale, backend, selector, softcap, sinks
    ):
        hq, lq = query.shape[-3], query.shape[-2]
        hkv, lk, dv = key.shape[-3], key.shape[-2], value.shape[-1]
        g = hq // hkv
        k_eff = min(topk, lk)
        q_grouped = query.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, d]
        mask_grouped = grouped_mask(attn_mask, query, hkv)  # [..., Hkv|1, G|1, Lq|1, Lk|1]
        v_flat, offsets = flat_rows(value)  # [B*Hkv*Lk, dv], [..., Hkv, 1, 1, 1]
        batch = query.shape[:-3]
        out = query.new_zeros(*batch, hq, lq, dv)  # [..., Hq, Lq, dv]
        out_grouped = out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv], a view to write into
        # [..., Hkv, G, Lq, k] and [..., Hkv, G, Lq, 1]
        idx_all = torch.full((*batch, hkv, g, lq, k_eff), -1, dtype=torch.int32, device=query.device)
        sinks_grouped = grouped_mask(sinks, query, hkv)  # [..., Hkv|1, G|1, Lq|1, 1] or None
        lse = empty_lse(q_grouped, sinks_grouped, work_dtype(query.dtype))  # [..., Hkv, G, Lq, 1]
        # The fused forward selects on the raw scores; soft-capped ones go through the chunks.
        fused = selector.method == "auto" and softcap is None and can_scan(query)
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            k_end = causal_end(is_causal, lq, lk, r1)
            if k_end == 0:
                continue
            k_chunk = min(k_eff, k_end)
            if fused:  # scores slab by slab in cache, compiled selection (see .scan)
                vals, idx = select_chunk(q_grouped, key, mask_grouped, r0, r1, lq, lk, is_causal, scale, k_chunk,
                                         selector)  # [..., Hkv, G, c, k_chunk]
            else:  # [..., Hkv, G, c, k_end], then the k largest of each row
                scores = chunk_scores(q_grouped, key, mask_grouped, r0, r1, k_end, lq, lk, is_causal, scale, softcap)
                vals, idx = selector.rows(scores, k_chunk, r0, r1)  # [..., Hkv, G, c, k_chunk]
                del scores
            p, lse[..., r0:r1, :] = _softmax_kept(vals, rows(sinks_grouped, r0, r1))  # [..., Hkv, G, c, k_chunk]
            kept = KeptMatrix(idx, offsets, v_flat.shape[0], backend=backend)
            out_grouped[..., r0:r1, :] = kept.times(p, v_flat)  # [..., Hkv, G, c, dv]
            # masked keys picked only because a row has fewer than k allowed ones: not kept
            idx_all[..., r0:r1, :k_chunk] = idx.masked_fill_(vals == float("-inf"), -1)
        ctx.save_for_backward(query, key, value, attn_mask, idx_all, lse, sinks)
        ctx.chunk_size, ctx.scale, ctx.backend, ctx.softcap, ctx.selector = chunk_size, scale, backend, softcap, selector
        return out

    @staticmethod
    @first_order_only("topk_attention")
    def backward(ctx, grad_out):
        query, key, value, attn_mask, idx_all, lse, sinks = ctx.saved_tensors
        if can_fuse(query, ctx, sinks):  # compiled, row by row, with the selector's threads (see .backward)
            return (*fused_backward(query, key, value, attn_mask, idx_all, lse, grad_out, ctx), *[None] * 9)
        hq, lq, d = query.shape[-3:]
        hkv, lk = key.shape[-3], key.shape[-2]
        g = hq // hkv
        scale, chunk_size = ctx.scale, ctx.chunk_size
        q_grouped = query.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, d]
        grad_grouped = grad_out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv]
        mask_grouped = grouped_mask(attn_mask, query, hkv)
        float_mask = mask_grouped is not None and mask_grouped.dtype != torch.bool
        k_flat, offsets = flat_rows(key)  # [B*Hkv*Lk, d]
        v_flat, _ = flat_rows(value)  # [B*Hkv*Lk, dv]
        (need_q, need_k, need_v, need_m), need_s = ctx.needs_input_grad[:4], ctx.needs_input_grad[-1]
        delta_rows = torch.zeros_like(lse) if need_s else None  # [..., Hkv, G, Lq, 1], for the sinks
        dq = torch.zeros_like(q_grouped) if need_q else None  # [..., Hkv, G, Lq, d]
        dk_flat = torch.zeros_like(k_flat) if need_k else None
        dv_flat = torch.zeros_like(v_flat) if need_v else None
        dmask = query.new_zeros(*q_grouped.shape[:-1], lk) if need_m else None  # [..., Hkv, G, Lq, Lk]
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            kept = idx_all[..., r0:r1, :] >= 0  # [..., Hkv, G, c, k]
            idx = idx_all[..., r0:r1, :].clamp(min=0).long()  # [..., Hkv, G, c, k]
            pattern = KeptMatrix(idx, offsets, k_flat.shape[0], backend=ctx.backend)
            q_chunk = q_grouped[..., r0:r1, :] * scale  # [..., Hkv, G, c, d]
            scores = pattern.sampled(q_chunk, k_flat)  # kept scores, recomputed [..., Hkv, G, c, k]
            scores, cap_grad = cap_with_derivative(scores, ctx.softcap)  # [..., Hkv, G, c, k] or None
            if float_mask:
                scores = scores + _mask_at(mask_grouped, r0, r1, idx)
            lse_chunk = lse[..., r0:r1, :]  # [..., Hkv, G, c, 1]
            shift = torch.where(torch.isinf(lse_chunk), torch.zeros_like(lse_chunk), lse_chunk)
            p = torch.exp(scores.to(lse_chunk.dtype) - shift)
            p = p.masked_fill_(~kept, 0.0).to(query.dtype)  # [..., Hkv, G, c, k]
            go = grad_grouped[..., r0:r1, :]  # [..., Hkv, G, c, dv]
            dp = pattern.sampled(go, v_flat)  # [..., Hkv, G, c, k]
            delta = (p * dp).sum(-1, keepdim=True)  # [..., Hkv, G, c, 1]
            ds = p * (dp - delta)  # softmax backward on kept entries (a sink has no value: dp = 0)
            if need_s:
                delta_rows[..., r0:r1, :] = delta
            ds_raw = ds if cap_grad is None else ds * cap_grad  # through the cap, to the raw scores
            if need_q:
                dq[..., r0:r1, :] = pattern.times(ds_raw, k_flat) * scale
            if need_k:
                dk_flat += pattern.t_times(ds_raw, q_chunk)
            if need_v:
                dv_flat += pattern.t_times(p, go)
            if need_m:
                dmask[..., r0:r1, :].scatter_add_(-1, idx, ds)
        grads = [
            dq.flatten(-4, -3) if need_q else None,
            dk_flat.view_as(key) if need_k else None,
            dv_flat.view_as(value) if need_v else None,
            _reduce_to(dmask.flatten(-4, -3), attn_mask.shape) if need_m else None,
        ]
        dsinks = sink_grad(sinks, grouped_mask(sinks, query, hkv), lse, delta_rows) if need_s else None
        return (*grads, None, None, None, None, None, None, None, dsinks)


# --------------------------------------------------------------------------- exact, chunked


class _ChunkedAttention(torch.autograd.Function):
    """Saves Q, K, V, the mask, the output and the row log-sum-exp; recomputes one chunk of scores at a time."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, chunk_size, is_causal, scale, softcap, sinks):
        hq, lq = query.shape[-3], query.shape[-2]
        hkv, lk, dv = key.shape[-3], key.shape[-2], value.shape[-1]
        g = hq // hkv
        q_grouped = query.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, d]
        mask_grouped = grouped_mask(attn_mask, query, hkv)
        out = query.new_zeros(*query.shape[:-1], dv)  # [..., Hq, Lq, dv]
        out_grouped = out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv], a view to write into
        sinks_grouped = grouped_mask(sinks, query, hkv)  # [..., Hkv|1, G|1, Lq|1, 1] or None
        lse = empty_lse(q_grouped, sinks_grouped, work_dtype(query.dtype))  # [..., Hkv, G, Lq, 1]
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            k_end = causal_end(is_causal, lq, lk, r1)
            if k_end == 0:
                continue
            scores = chunk_scores(q_grouped, key, mask_grouped, r0, r1, k_end, lq, lk, is_causal, scale, softcap)
            work = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()  # [..., c, k_end]
            sink = rows(sinks_grouped, r0, r1)  # [..., Hkv|1, G|1, c|1, 1] or None
            row_max = row_shift(work, sink)  # [..., Hkv, G, c, 1]
            e = work.sub_(row_max).exp_()  # in place: one chunk-sized buffer
            del scores, work
            denom = add_sink(e.sum(-1, keepdim=True), sink, row_max)  # [..., Hkv, G, c, 1]
            lse[..., r0:r1, :] = torch.where(denom > 0, row_max + denom.log(), torch.full_like(row_max, float("-inf")))
            p = (e / torch.where(denom == 0, torch.ones_like(denom), denom)).to(value.dtype)  # [..., Hkv, G, c, k_end]
            del e
            pv = torch.matmul(p.flatten(-3, -2), value[..., :k_end, :])  # [..., Hkv, G*c, dv]
            out_grouped[..., r0:r1, :] = pv.view(*q_grouped.shape[:-2], r1 - r0, dv)
        ctx.save_for_backward(query, key, value, attn_mask, out, lse, sinks)
        ctx.chunk_size, ctx.is_causal, ctx.scale, ctx.softcap = chunk_size, is_causal, scale, softcap
        return out

    @staticmethod
    @first_order_only("chunked_attention (topk_attention's exact path)")
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse, sinks = ctx.saved_tensors
        hq, lq, d = query.shape[-3:]
        hkv, lk = key.shape[-3], key.shape[-2]
        g = hq // hkv
        chunk_size, is_causal, scale = ctx.chunk_size, ctx.is_causal, ctx.scale
        q_grouped = query.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, d]
        grad_grouped = grad_out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv]
        mask_grouped = grouped_mask(attn_mask, query, hkv)
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(q_grouped) if need_q else None  # [..., Hkv, G, Lq, d]
        dk = torch.zeros_like(key) if need_k else None  # [..., Hkv, Lk, d]
        dv = torch.zeros_like(value) if need_v else None  # [..., Hkv, Lk, dv]
        dmask = query.new_zeros(*q_grouped.shape[:-1], lk) if need_m else None  # [..., Hkv, G, Lq, Lk]
        # rowsum(dP * P) = rowsum(dO * O)  [..., Hkv, G, Lq, 1]
        delta = (grad_grouped * out.unflatten(-3, (hkv, g))).sum(-1, keepdim=True)
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            k_end = causal_end(is_causal, lq, lk, r1)
            if k_end == 0:
                continue
            c = r1 - r0
            cap_grad = None
            if ctx.softcap is None:
                scores = chunk_scores(q_grouped, key, mask_grouped, r0, r1, k_end, lq, lk, is_causal, scale)
            else:  # the cap's derivative needs the raw scores, so the mask comes after
                raw = chunk_scores(q_grouped, key, None, r0, r1, k_end, lq, lk, False, scale)
                scores, cap_grad = cap_with_derivative(raw, ctx.softcap)  # [..., Hkv, G, c, k_end] each
                scores = mask_scores(scores, mask_grouped, r0, r1, lq, lk, is_causal)
                del raw
            lse_chunk = lse[..., r0:r1, :]  # [..., Hkv, G, c, 1]
            work = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
            shift = torch.where(torch.isinf(lse_chunk), torch.zeros_like(lse_chunk), lse_chunk)
            p = work.sub_(shift).exp_()  # own buffer: in place  [..., Hkv, G, c, k_end]
            p = p.masked_fill_(torch.isinf(lse_chunk), 0.0).to(value.dtype)  # fully masked rows: zero weights
            del scores, work
            go = grad_grouped[..., r0:r1, :]  # [..., Hkv, G, c, dv]
            go_rows = go.flatten(-3, -2)  # [..., Hkv, G*c, dv]
            p_rows = p.flatten(-3, -2)  # [..., Hkv, G*c, k_end]
            if need_v:
                dv[..., :k_end, :] += torch.matmul(p_rows.transpose(-1, -2), go_rows)
            dp = torch.matmul(go_rows, value[..., :k_end, :].transpose(-1, -2)).view_as(p)  # [..., Hkv, G, c, k_end]
            ds = p.mul_(dp.sub_(delta[..., r0:r1, :]))  # [..., Hkv, G, c, k_end]
            del dp
            if need_m:
                dmask[..., r0:r1, :k_end] = ds
            if cap_grad is not None:
                ds = ds.mul_(cap_grad)  # through the cap, to the raw scores
            ds_rows = ds.flatten(-3, -2)  # [..., Hkv, G*c, k_end]
            if need_q:
                dq[..., r0:r1, :] = torch.matmul(ds_rows, key[..., :k_end, :]).view(*q_grouped.shape[:-2], c, d) * scale
            if need_k:
                q_rows = q_grouped[..., r0:r1, :].flatten(-3, -2) * scale  # [..., Hkv, G*c, d]
                dk[..., :k_end, :] += torch.matmul(ds_rows.transpose(-1, -2), q_rows)
        grads = [dq.flatten(-4, -3) if need_q else None, dk, dv,
                 _reduce_to(dmask.flatten(-4, -3), attn_mask.shape) if need_m else None]
        need_s = ctx.needs_input_grad[-1]
        dsinks = sink_grad(sinks, grouped_mask(sinks, query, hkv), lse, delta) if need_s else None
        return (*grads, None, None, None, None, dsinks)


# --------------------------------------------------------------------------- public API


def _scores_of_width_zero(query, key, scale):
    """``query``, ``key`` and the float scale, with ``d = 0`` made a zero feature of width 1.

    With no features every score is an empty dot product, 0, whatever the scale, so each row
    averages its allowed values, as SDPA does; one zero feature gives the same scores through
    shapes the kernels handle, and ``F.pad`` keeps the (empty) gradients of Q and K. The scale
    is checked already (:func:`~topk_lib.kernels.checks.check_attention_inputs`).
    """
    if query.shape[-1] == 0:
        return F.pad(query, (0, 1)), F.pad(key, (0, 1)), 1.0 if scale is None else float(scale)
    return query, key, 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def topk_attention(
    query, key, value, *, topk, chunk_size=1024, attn_mask=None, is_causal=False, scale=None,
    product="auto", selector=None, softcap=None, sinks=None,
):
    """Attention that keeps, per query, only the ``topk`` largest scores (Gupta et al. 2021, 3.1).

    For each chunk of ``chunk_size`` queries: scores ``scale * Q K^T`` (soft-capped) plus the
    mask, the ``topk`` largest per query, a softmax over those only (and the sink), and their
    values summed with the kept weights. ``topk=None`` or ``topk >= Lk`` is exact attention,
    computed as :func:`chunked_attention` does.

    Arguments:
        query: ``[..., Hq, Lq, d]``, floating point (float16, bfloat16, float32, float64), any
            number of batch dims ``...``.
        key: ``[..., Hkv, Lk, d]``, the dtype and device of ``query``, ``Hq % Hkv == 0``:
            query head ``h`` reads key/value head ``h // G`` (the ``repeat_kv`` convention of
            transformers). K and V are never repeated.
        value: ``[..., Hkv, Lk, dv]``, the dtype and device of ``query``.
        topk: ``k``, a positive int, or ``None`` for exact attention.
        chunk_size: ``C``, queries per chunk, a positive int. Memory is O(C*Lk) per chunk;
            results do not depend on it.
        attn_mask: ``None``, or as in ``scaled_dot_product_attention``: bool (True = may
            attend) or of the query dtype (added to the scores), broadcastable to
            ``[..., Hq, Lq, Lk]``. A float mask gets a gradient, summed over broadcast dims.
        is_causal: query ``i`` sits at absolute position ``Lk - Lq + i`` and attends keys at positions
            <= its own, so decoding with a KV cache (``Lq < Lk``) works. Combines with ``attn_mask``.
        scale: the score scale, a finite number (zero and negative ones are defined, as in
            SDPA); ``None`` means ``1 / sqrt(d)``.
        product: the sparse weights x V backend (:mod:`topk_lib.kernels.product`): ``"auto"``
            (CSR kernels on CPU float32/float64, gathers elsewhere), ``"csr"`` or ``"gather"``.
            The result is the same within float rounding.
        selector: the :class:`~topk_lib.kernels.selection.RowSelector` that selects the top-k
            (it owns the CPU worker threads, and its ``method`` picks the fused or the chunked
            forward; on CUDA ``"auto"`` takes the threshold path of :mod:`.flex` where
            :func:`~topk_lib.kernels.flex.fast_path_applies` holds); ``None`` uses
            :data:`~topk_lib.kernels.selection.DEFAULT_SELECTOR`. While the fused forward's worker
            threads run, torch's intra-op threads are set to one (restored when it returns).
        softcap: ``c``, a positive number, or ``None``: the scores become ``c * tanh(s / c)``
            before the mask is added and the top-k selected (Gemma-2's
            ``attn_logit_softcapping``); soft-capped calls run the chunked forward.
        sinks: ``None``, or sink logits of the query dtype and device: ``[Hq]`` (one per query
            head, GPT-OSS's ``sinks``) or broadcastable to ``[..., Hq, Lq, 1]``. Each row's
            softmax denominator gets ``exp(sink)`` (a key with no value), so the kept weights
            sum to less than 1. The sinks get a gradient, summed over broadcast dims.

    Returns:
        ``[..., Hq, Lq, dv]``, the dtype of ``query``.

    Raises:
        TypeError: query, key or value not a floating-point tensor, or of different dtypes; a
            mask neither bool nor of the query dtype; ``topk`` or ``chunk_size`` not an int
            (``bool`` included); ``scale`` not a number (``bool`` included); ``selector`` not a
            ``RowSelector``.
        ValueError: fewer than 3 dims; mismatched batch dims, head dims or key/value shapes;
            ``Hq % Hkv != 0``; tensors on different devices; a mask that does not broadcast to
            ``[..., Hq, Lq, Lk]``; ``topk`` or ``chunk_size`` < 1; a NaN or infinite ``scale``;
            ``product`` not one of
            ``"auto"``, ``"csr"``, ``"gather"``, or ``"csr"`` for inputs that are not CPU
            float32/float64; ``softcap`` not positive and finite; ``sinks`` of another shape.

    Semantics:
        * Masked keys never count: a row with fewer than ``k`` allowed keys uses only the
          allowed ones; a row with none returns zeros, and zero gradients (with a sink too:
          all its mass is on the sink, which has no value).
        * Ties at the k-th score are broken by the selection backend (on CPU float32/float64
          the compiled selection of :mod:`.native`, or numpy's ``argpartition`` without a C++
          compiler or with ``RowSelector(method="chunked")``; ``torch.topk`` elsewhere), which
          differs across backends: outputs are well defined only up to such ties. The CUDA
          threshold path (:mod:`.flex`) keeps every key tied with the k-th.
        * Scores are scaled before the product (no float16 overflow); the softmax of half
          precision inputs runs in float32.
        * Empty inputs behave as in SDPA: no batch, rows or value features give an empty
          output and zero gradients; ``d = 0`` makes every score 0, so each row averages its
          allowed values (top-k then keeps any k of them: all scores tie).

    Backward:
        Saves Q, K, V, the mask, the kept key indices (``[..., Hkv, G, Lq, k]`` int32, -1 = not
        kept) and the row log-sum-exp (``[..., Hkv, G, Lq, 1]``, float32; float64 for float64
        inputs; the sink included) and the sinks, and recomputes the kept scores from the kept
        rows of K. No Lq x Lk tensor is saved. The exact path saves what :func:`chunked_attention` saves. Gradients are
        first order: differentiating them again (``create_graph=True``) raises a
        ``RuntimeError`` saying it is not supported.
    """
    check_attention_inputs(query, key, value, attn_mask, topk, chunk_size, scale, softcap, sinks)
    softcap, sinks = None if softcap is None else float(softcap), as_sink_rows(sinks)
    backend = resolve_product(product, query.device, query.dtype)
    if selector is not None and not isinstance(selector, RowSelector):
        raise TypeError(f"selector must be a RowSelector or None, got {type(selector).__name__}")
    query, key, scale = _scores_of_width_zero(query, key, scale)
    # An empty output (no batch, rows or value features) has nothing to select: the exact path
    # returns it, with zero gradients.
    empty = math.prod(query.shape[:-1]) == 0 or value.shape[-1] == 0
    full = topk is not None and topk >= key.shape[-2] and (selector is None or selector.exact_at_full_width)
    if topk is None or full or empty:
        return _ChunkedAttention.apply(query, key, value, attn_mask, int(chunk_size), bool(is_causal), scale,
                                       softcap, sinks)
    selector = DEFAULT_SELECTOR if selector is None else selector
    if selector.method == "auto" and fast_path_applies(query, key, value, topk, attn_mask, sinks):  # see .flex
        return threshold_topk_attention(query, key, value, topk=int(topk), attn_mask=attn_mask,
                                        is_causal=bool(is_causal), scale=scale, softcap=softcap)
    return _TopkAttention.apply(
        query, key, value, attn_mask, int(topk), int(chunk_size), bool(is_causal), scale, backend, selector,
        softcap, sinks,
    )


def chunked_attention(
    query, key, value, *, chunk_size=1024, attn_mask=None, is_causal=False, scale=None, softcap=None, sinks=None
):
    """Exact attention computed ``chunk_size`` query rows at a time, in O(C*Lk) memory.

    Equal to ``scaled_dot_product_attention`` with grouped-query heads within float rounding,
    and to :func:`topk_attention` with ``topk=None``.

    Arguments:
        query: ``[..., Hq, Lq, d]``, floating point, any number of batch dims ``...``.
        key: ``[..., Hkv, Lk, d]``, the dtype and device of ``query``, ``Hq % Hkv == 0``
            (query head ``h`` reads key/value head ``h // G``).
        value: ``[..., Hkv, Lk, dv]``, the dtype and device of ``query``.
        chunk_size: ``C``, queries per chunk, a positive int; results do not depend on it.
        attn_mask: ``None``, bool (True = may attend) or of the query dtype (added to the
            scores), broadcastable to ``[..., Hq, Lq, Lk]``; a float mask gets a gradient.
        is_causal: query ``i`` sits at position ``Lk - Lq + i`` and attends keys at positions
            <= its own.
        scale: the score scale, a number; ``None`` means ``1 / sqrt(d)``.
        softcap, sinks: soft-capping and sink logits, as in :func:`topk_attention`.

    Returns:
        ``[..., Hq, Lq, dv]``, the dtype of ``query``.

    Raises:
        TypeError, ValueError: as :func:`topk_attention` (``chunk_size`` not an int, or < 1;
            mismatched shapes, dtypes, devices; a mask that does not broadcast).

    Semantics:
        A row with no allowed key returns zeros and zero gradients. Half precision scores are
        exponentiated in float32.

    Backward:
        Saves Q, K, V, the mask, the sinks, the output and the row log-sum-exp
        (``[..., Hkv, G, Lq, 1]``) and recomputes one chunk of scores at a time, as FlashAttention does.
    """
    return topk_attention(
        query, key, value, topk=None, chunk_size=chunk_size, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        softcap=softcap, sinks=sinks,
    )


def vanilla_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, softcap=None, sinks=None):
    """The plain reference: the full ``[..., Hq, Lq, Lk]`` score matrix, softmax, times V.

    Arguments:
        query: ``[..., Hq, Lq, d]``, floating point, any number of batch dims ``...``.
        key: ``[..., Hkv, Lk, d]``, the dtype and device of ``query``, ``Hq % Hkv == 0``;
            repeated to ``Hq`` heads.
        value: ``[..., Hkv, Lk, dv]``, the dtype and device of ``query``.
        attn_mask: ``None``, bool (True = may attend) or of the query dtype (added to the
            scores), broadcastable to ``[..., Hq, Lq, Lk]``.
        is_causal: query ``i`` sits at position ``Lk - Lq + i`` and attends keys at positions
            <= its own.
        scale: the score scale, a number; ``None`` means ``1 / sqrt(d)``.
        softcap, sinks: soft-capping and sink logits, as in :func:`topk_attention`.

    Returns:
        ``[..., Hq, Lq, dv]``, the dtype of ``query``.

    Raises:
        TypeError, ValueError: as :func:`chunked_attention`.

    Semantics:
        A row with no allowed key returns zeros (zero weights times V), with zero gradients;
        NaN and infinite inputs propagate as in SDPA.

    Backward:
        Plain autograd: it saves the full Lq x Lk scores and probabilities of every head, the
        memory the chunked kernels avoid.
    """
    check_attention_inputs(query, key, value, attn_mask, None, 1, scale, softcap, sinks)
    hq, hkv = query.shape[-3], key.shape[-3]
    lq, lk = query.shape[-2], key.shape[-2]
    query, key, scale = _scores_of_width_zero(query, key, scale)
    key = key.repeat_interleave(hq // hkv, dim=-3)  # [..., Hq, Lk, d]
    value = value.repeat_interleave(hq // hkv, dim=-3)  # [..., Hq, Lk, dv]
    s = torch.matmul(query * scale, key.transpose(-1, -2))  # [..., Hq, Lq, Lk]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        pos = torch.arange(lk - lq, lk, device=s.device)  # [Lq] absolute query positions
        s = s.masked_fill(torch.arange(lk, device=s.device)[None, :] > pos[:, None], float("-inf"))
    # A row whose scores are all -inf has no key: zero weights and zero gradients. It is found
    # from the scores, not by clearing NaN afterwards, so NaN and inf inputs propagate as in SDPA.
    if sinks is not None:  # one more column, with no value: dropped after the softmax
        s = torch.cat([s, as_sink_rows(sinks).expand(*s.shape[:-1], 1)], dim=-1)  # [..., Hq, Lq, Lk + 1]
    empty = (s == float("-inf")).all(-1, keepdim=True)  # [..., Hq, Lq, 1]
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)  # [..., Hq, Lq, Lk(+1)]
    return torch.matmul(p[..., :lk], value)  # [..., Hq, Lq, dv]
