"""The top-k attention backward on CPU, fused into one compiled pass per query row (Gupta et al. 2021, 3.1).

The forward saves Q, K, V, the kept key indices and the row log-sum-exp. The backward needs, at
the ``k`` kept entries of each row only, the scores again, ``p = exp(s - lse)``, ``dp = dO . v``
and ``ds = p (dp - delta)`` with ``delta = sum p dp``, then ``dQ = scale ds K``,
``dK += scale ds^T Q`` and ``dV += p^T dO``. The sparse-product backward
(:class:`~topk_lib.kernels.product.KeptMatrix`) builds these per chunk from two
``sampled_addmm``, a CSR product for dQ and an ``argsort`` transpose of the pattern for dK and
dV, each writing ``[..., c, k]`` tensors to memory between steps. Here compiled code
(:data:`~topk_lib.kernels.native.BACKWARD_SOURCE`) does it row by row: gather the row's kept
keys and values once, keep its ``k`` weights on the stack, and add into dK and dV in place.

Threads never write the same dK/dV rows: each (batch, key/value head) group belongs to one
worker thread of the selector's pool (the group's rows read and write only its own keys). With
fewer groups than threads, or a count that does not split evenly, each group's rows are split
over the threads instead, each thread adding into its own dK/dV buffer (summed afterwards):
``threads - 1`` extra copies of dK and dV.

It runs for CPU float32/float64 where the compiled library builds, with the CSR products
(``product="auto"`` or ``"csr"``) and ``RowSelector(method="auto")``, for bool or float masks
that need no gradient; soft-capped scores, attention sinks, a float mask that requires a
gradient, and everything else take the sparse products. The old path stays selectable:
``RowSelector(method="chunked")`` (the chunked forward and its backward), ``product="gather"``,
or ``TOPK_LAB_FUSED_BACKWARD=0`` (read at import; :data:`FUSED`) with the fused forward.

What was tried (one causal layer B=1, H=12, d=64, k=128, C=1024, float32, 8192 tokens, torch
2.13 on this project's 2-core Intel Xeon VM, 2026-12-01). The machine was busy (1-min load 5-8),
so first CPU milliseconds per head of one thread over the same saved forward, the kept keys
spread over all 8192 (random inputs) or squeezed into the first 512 (all in cache: the compute).
The sparse products' figure is their process CPU time over 12 heads, waits of torch's threads
for each other on the busy machine included; quiet, their backward took 0.87 s of wall time:

=====================================================================  ========  =========
backward of one head, one thread                                       spread    in cache
=====================================================================  ========  =========
sparse products (``KeptMatrix``, torch's 2 threads; see below)         about 400
fused, per row: gather, two passes over the kept keys                  55        31
the same, prefetching the kept rows 8 entries ahead (used)             43        32
the same, hand-written AVX2 dot products                               42        28
=====================================================================  ========  =========

Then forward+backward against SDPA, interleaved in one process (``python -m topk_lib.bench
kernels --threads 2 --min-L 8192``, median of 3 after a warm-up; the sparse products measured on
a quiet machine, load 1.2-2.1; the fused backward in four runs at load 1.2-5.2, which slows
SDPA too, so compare the ratios; the quietest run: 1.57 s / 1.97 s and 6.51 s / 11.32 s):

==========================  ======================  ======================
backward                    8192 tokens, x SDPA     16384 tokens, x SDPA
==========================  ======================  ======================
sparse products             1.15 (1.48 s / 1.29 s)  0.85 (4.29 s / 5.02 s)
fused (used)                0.79-0.84               0.55-0.59
==========================  ======================  ======================

Memory falls: no ``[..., c, k]`` intermediates or transposed patterns, only dQ, dK, dV and
contiguous copies of the inputs; the forward+backward peak at 16384 tokens is 352 MB (peak RSS
over the inputs) against 605 MB with the sparse products.

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``Hq`` query heads; ``Hkv`` key/value heads;
        ``G = Hq // Hkv``; ``N`` (batch, key/value head) groups
``Lq``  queries; ``Lk`` keys; ``k`` kept keys per query; ``d`` query/key dim; ``dv`` value dim
"""

from __future__ import annotations

import itertools
import os

import torch

from topk_lib.kernels import native
from topk_lib.kernels.chunking import grouped_mask

__all__ = ["FUSED", "can_fuse", "fused_backward"]

#: Whether :func:`can_fuse` lets the fused backward run; ``TOPK_LAB_FUSED_BACKWARD=0`` turns it off.
FUSED = os.environ.get("TOPK_LAB_FUSED_BACKWARD", "1") != "0"


def can_fuse(query, ctx, sinks) -> bool:
    """Whether :func:`fused_backward` computes the gradients of the top-k forward of context ``ctx``.

    ``ctx`` gives the forward's ``backend`` (``"csr"`` or ``"gather"``), ``selector``, ``softcap``
    and ``needs_input_grad`` (of query, key, value, attn_mask, ...); ``sinks`` is its sinks or ``None``.
    """
    return (FUSED and ctx.backend == "csr" and ctx.selector.method == "auto" and ctx.softcap is None
            and sinks is None and not ctx.needs_input_grad[3] and query.device.type == "cpu"
            and query.dtype in (torch.float32, torch.float64) and native.available())


def fused_backward(query, key, value, attn_mask, idx_all, lse, grad_out, ctx):
    """The gradients of top-k attention for Q, K and V through the kept entries, in compiled code.

    Arguments:
        query: ``[..., Hq, Lq, d]``, CPU float32/float64; key ``[..., Hkv, Lk, d]``, value
            ``[..., Hkv, Lk, dv]`` of its dtype.
        attn_mask: ``None``, bool, or float of the query dtype, broadcastable to
            ``[..., Hq, Lq, Lk]`` (a float mask's values are added to the recomputed scores;
            a bool one already shaped the kept set).
        idx_all: ``[..., Hkv, G, Lq, k]`` int32 kept key positions, -1 = not kept.
        lse: ``[..., Hkv, G, Lq, 1]`` row log-sum-exp (float32, float64 for float64 inputs;
            -inf for a row that kept nothing).
        grad_out: ``[..., Hq, Lq, dv]``.
        ctx: the forward's context: its ``scale`` (a float), ``needs_input_grad`` (the first three
            say which of dQ, dK, dV to compute) and ``selector`` (the
            :class:`~topk_lib.kernels.selection.RowSelector` whose threads run).

    Returns:
        ``(dq [..., Hq, Lq, d], dk [..., Hkv, Lk, d], dv [..., Hkv, Lk, dv])``, ``None`` where
        not needed.
    """
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    scale, selector = ctx.scale, ctx.selector
    batch, (hq, lq, d) = query.shape[:-3], query.shape[-3:]
    hkv, lk, dvd = key.shape[-3], key.shape[-2], value.shape[-1]
    g, kk = hq // hkv, idx_all.shape[-1]
    n = idx_all[..., 0, 0, 0].numel()  # groups
    q = query.detach().contiguous().view(n, g, lq, d)  # [N, G, Lq, d]
    go = grad_out.contiguous().view(n, g, lq, dvd)  # [N, G, Lq, dv]
    k_f, v_f = key.detach().contiguous().view(n, lk, d), value.detach().contiguous().view(n, lk, dvd)
    idx = idx_all.contiguous().view(n, g, lq, kk)  # [N, G, Lq, k]
    lse = lse.contiguous().view(n, g, lq)  # [N, G, Lq]
    dq = torch.zeros_like(q) if need_q else None
    dk = torch.zeros_like(k_f) if need_k else None
    dv = torch.zeros_like(v_f) if need_v else None
    masks = _group_masks(attn_mask, query, batch, hkv, g, lq, lk)
    threads = max(1, min(selector.thread_count(), n * lq))
    whole = threads == 1 or (n >= threads and (n % threads == 0 or n >= 4 * threads))
    if whole:  # thread t runs groups t, t + threads, ...: each writes only its own groups' dK/dV rows
        plans = [[(i, 0, lq, dk, dv) for i in range(t, n, threads)] for t in range(threads)]
    else:  # thread t runs part t of every group's rows, adding into its own dK/dV (thread 0: the result)
        own = [(dk, dv)] + [(None if dk is None else torch.zeros_like(dk), None if dv is None else torch.zeros_like(dv))
                            for _ in range(threads - 1)]
        cuts = [lq * t // threads for t in range(threads + 1)]
        plans = [[(i, cuts[t], cuts[t + 1], *own[t]) for i in range(n)] for t in range(threads)]
    fn = native.load().topk_backward_f32 if query.dtype == torch.float32 else native.load().topk_backward_f64

    def run(plan):
        for i, l0, l1, dk_t, dv_t in plan:
            if l1 <= l0:
                continue
            mask_ptr, (msg, msl, msk) = masks[i] if masks is not None else (None, (0, 0, 0))
            fn(q[i].data_ptr(), go[i].data_ptr(), idx[i].data_ptr(), lse[i].data_ptr(),
               None if dq is None else dq[i].data_ptr(), k_f[i].data_ptr(), v_f[i].data_ptr(),
               None if dk_t is None else dk_t[i].data_ptr(), None if dv_t is None else dv_t[i].data_ptr(),
               mask_ptr, msg, msl, msk, g, lq, l0, l1, kk, d, dvd, float(scale))

    if threads == 1:
        run(plans[0])
    else:  # ctypes releases the GIL: the threads run in parallel
        list(selector.workers(threads).map(run, plans))
    if not whole:
        for dk_t, dv_t in own[1:]:
            if dk is not None:
                dk += dk_t
            if dv is not None:
                dv += dv_t
    return (None if dq is None else dq.view(query.shape), None if dk is None else dk.view(key.shape),
            None if dv is None else dv.view(value.shape))


def _group_masks(attn_mask, query, batch, hkv, g, lq, lk):
    """Per group, a float mask's ``(data pointer, (G, Lq, Lk) element strides))``; ``None`` for no or a bool mask.

    Broadcast dims have stride 0, so no ``Lq x Lk`` copy is made.
    """
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return None
    m = grouped_mask(attn_mask, query, hkv).expand(*batch, hkv, g, lq, lk)  # [..., Hkv, G, Lq, Lk], a view
    out = []
    for pos in itertools.product(*(range(s) for s in (*batch, hkv))):
        view = m[pos]  # [G, Lq, Lk]
        out.append((view.data_ptr(), tuple(view.stride())))
    return out
