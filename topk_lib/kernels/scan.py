"""The top-k forward's scores and selection, fused slab by slab so the scores stay in cache (Gupta et al. 2021, 3.1).

The chunked path (:func:`~topk_lib.kernels.chunking.chunk_scores`, then
:class:`~topk_lib.kernels.selection.RowSelector` over the whole chunk) writes a ``[..., c, Lk]``
score block per chunk to fresh memory, masks it in full and reads it back to select. Here a
chunk is cut into slabs of a few key/value heads and query rows. With two or more threads each
worker thread runs whole slabs, ``Q K^T`` into its own reused buffer of about one L2 cache
(:data:`WORKER_SLAB_BYTES`) with torch single-threaded, then the compiled selection of
:mod:`.native` while the scores are still cached; no thread waits for another between a
product and its selection. The causal rule becomes a per-row length (no ``masked_fill``), and
each slab stops at its own last visible key, so fewer masked scores are computed. The result is
the same kept set (up to ties at the k-th score) and the same values as the chunked path.

Where a transform of the scores goes (a soft cap, say): on the slab's buffer right after its
product, before the mask (marked in :func:`_run_slabs`); a monotone transform with no float
mask may instead be applied to the kept values only, since it keeps the same top k.

What was tried (one causal layer B=1, H=12, d=64, k=128, C=1024, float32, 8192 tokens, forward,
torch 2.13 on this project's 2-core Intel Xeon VM with 2 threads, median of 3, each interleaved
with SDPA in one process; the machine was shared, 1-min load about 2, 2026-12-01):

=============================================================  ========  ==========
forward                                                        seconds   x SDPA
=============================================================  ========  ==========
SDPA (``F.scaled_dot_product_attention``)                      0.38      1.00
chunked path: chunk scores, numpy ``argpartition`` in threads   2.07      5.5
fused, one thread runs the products, slabs of 64 MiB            0.83      2.2
fused, worker threads run whole slabs of 1 MiB                 0.66      1.76
fused, worker threads run whole slabs of 2 MiB (used)          0.63      1.67
fused, worker threads run whole slabs of 8 MiB                 0.63      1.67
the same with the selection skipped (products alone)           0.39      1.0
=============================================================  ========  ==========

On one chunk (12 heads x 1024 queries x 8192 keys, 2 threads): ``torch.topk`` 273 ms; a
pure-torch filter (maxima of key groups, ``topk`` of them, ``topk`` among the kept groups)
191-200 ms; the compiled selection 46 ms. ``torch.matmul`` into a reused buffer took 70 ms,
into a fresh tensor 116 ms (page faults). Slabs of 4-64 MiB run by one thread with torch's
two threads lost most of the gain on a busy machine: every product is a parallel region
whose threads wait for each other.

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``Hkv`` key/value heads; ``G`` query heads per
        key/value head; ``c`` queries of the chunk; ``k`` kept keys per query; ``d`` head dim
``hb``  key/value heads of a slab; ``ra`` query rows of a slab; ``ke`` keys a slab can see
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np
import torch

from topk_lib.kernels import native
from topk_lib.kernels.chunking import causal_end

__all__ = ["SLAB_BYTES", "can_scan", "select_chunk"]

#: Score bytes per slab when one thread runs the products (with torch's threads): big enough for
#: BLAS to run near its peak, yet far below a whole chunk.
SLAB_BYTES = 64 * 1024**2
#: Score bytes per slab when each worker thread runs its own slabs: about one core's L2 cache.
WORKER_SLAB_BYTES = 2 * 1024**2
#: Whether worker threads run whole slabs (product and selection); else one thread runs the products.
WORKERS = True


def can_scan(query) -> bool:
    """Whether :func:`select_chunk` runs for ``query``: CPU float32/float64 and the compiled selection built."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64) and native.available()


def select_chunk(q_grouped, key, mask_grouped, r0, r1, lq, lk, is_causal, scale, k, selector):
    """The ``k`` largest masked, scaled scores of query rows ``r0:r1`` against each row's visible keys.

    ``q_grouped [..., Hkv, G, Lq, d]``, ``key [..., Hkv, Lk, d]``, ``mask_grouped`` from
    :func:`~topk_lib.kernels.chunking.grouped_mask` (or ``None``); ``selector`` lends its
    worker threads. Returns ``(values, indices)``, each ``[..., Hkv, G, c, k]`` (indices int64);
    as :func:`~topk_lib.kernels.chunking.chunk_scores` then a selection would give, except that
    a row with fewer than ``k`` visible keys fills its spare slots with ``-inf`` at key 0.
    """
    batch, (hkv, g, _, d) = q_grouped.shape[:-4], q_grouped.shape[-4:]
    c = r1 - r0
    q_chunk = q_grouped[..., r0:r1, :] * scale  # [..., Hkv, G, c, d] scaled first, as chunk_scores does
    vals = q_chunk.new_empty(*q_chunk.shape[:-1], k)  # [..., Hkv, G, c, k]
    idx = torch.empty(vals.shape, dtype=torch.int64)
    item = q_chunk.element_size()
    k_end = causal_end(is_causal, lq, lk, r1)
    threads = selector.thread_count()
    workers = WORKERS and threads > 1
    budget = WORKER_SLAB_BYTES if workers else SLAB_BYTES
    # slab: hb heads x ra rows, hb*G*ra*ke*item <= budget (at least one head and one row)
    per_head = g * c * k_end * item
    hb = max(1, min(hkv, budget // max(per_head, 1)))
    ra = c if hb > 1 or per_head <= budget else max(1, budget // (g * k_end * item))
    slabs = [(bi, h0, min(hkv, h0 + hb), a0, min(c, a0 + ra)) for bi in itertools.product(*(range(s) for s in batch))
             for h0 in range(0, hkv, hb) for a0 in range(0, c, ra)]
    mask_b = None if mask_grouped is None else mask_grouped.expand(*batch, *mask_grouped.shape[-4:])
    job = dict(q_chunk=q_chunk, key=key, mask_b=mask_b, vals=vals, idx=idx, r0=r0, c=c, lq=lq, lk=lk,
               is_causal=is_causal, k=k, buf_numel=hb * g * min(ra, c) * k_end)
    workers = workers and len(slabs) > 1
    if not workers:  # one thread runs the products (torch's threads) and hands each slab's rows to the pool
        _run_slabs(slabs, job, selector)
        return vals, idx
    # each worker runs whole slabs, product and selection, with torch single-threaded: no thread ever
    # waits for another between a product and its selection (on a busy machine those waits dominate)
    n = min(threads, len(slabs))
    with _torch_threads(1):
        list(selector.workers(n).map(lambda part: _run_slabs(part, job, None), [slabs[t::n] for t in range(n)]))
    return vals, idx


def _run_slabs(slabs, job, selector):
    """Scores and selection of each slab ``(batch index, h0, h1, a0, a1)`` of ``job`` (see :func:`select_chunk`)."""
    if selector is None:  # a worker thread: grad mode is per thread, and no op here may record a graph
        torch.set_num_threads(1)
        with torch.no_grad():
            return _run_slabs(slabs, job, _NO_SELECTOR)
    selector = None if selector is _NO_SELECTOR else selector
    q_chunk, key, mask_b, vals, idx = (job[n] for n in ("q_chunk", "key", "mask_b", "vals", "idx"))
    r0, c, lq, lk, is_causal, k = (job[n] for n in ("r0", "c", "lq", "lk", "is_causal", "k"))
    g, d = q_chunk.shape[-3], q_chunk.shape[-1]
    lib = native.load()
    fn = lib.topk_rows_f32 if q_chunk.dtype == torch.float32 else lib.topk_rows_f64
    buf = torch.empty(job["buf_numel"], dtype=q_chunk.dtype)  # reused by every slab of this thread
    for bi, h0, h1, a0, a1 in slabs:
        q_b, k_b, v_out, i_out = q_chunk[bi], key[bi], vals[bi], idx[bi]  # [Hkv, G, c, d], [Hkv, Lk, d], ...
        ke = causal_end(is_causal, lq, lk, r0 + a1)
        rows = (h1 - h0) * g * (a1 - a0)
        if ke == 0:
            v_out[h0:h1, :, a0:a1].fill_(float("-inf"))
            i_out[h0:h1, :, a0:a1].zero_()
            continue
        q_rows = q_b[h0:h1, :, a0:a1].reshape(h1 - h0, g * (a1 - a0), d)  # [hb, G*ra, d]
        scores = buf[: rows * ke].view(h1 - h0, g * (a1 - a0), ke)
        torch.matmul(q_rows, k_b[h0:h1, :ke].transpose(-1, -2), out=scores)
        # a transform of the raw scores (a soft cap) goes here, before the mask
        if mask_b is not None:
            m = mask_b[bi]  # [Hkv|1, G|1, Lq|1, Lk|1]
            m = m[h0:h1] if m.shape[0] != 1 else m
            m = m[..., r0 + a0 : r0 + a1, :] if m.shape[-2] != 1 else m
            m = m[..., :ke] if m.shape[-1] != 1 else m  # [hb|1, G|1, ra|1, ke|1]
            grid = scores.view(h1 - h0, g, a1 - a0, ke)
            grid.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else grid.add_(m)
        lens = None
        if is_causal:  # row a sees keys up to its absolute position lk - lq + r0 + a
            lens = np.clip(np.arange(lk - lq + r0 + a0 + 1, lk - lq + r0 + a1 + 1), 0, ke).astype(np.int64)
            lens = np.tile(lens, rows // (a1 - a0))  # one per row of [hb, G, ra]
        whole = a1 - a0 == c  # then the slab's rows are contiguous in the outputs: written in place
        ov = v_out[h0:h1].view(rows, k) if whole else torch.empty(rows, k, dtype=q_chunk.dtype)
        oi = i_out[h0:h1].view(rows, k) if whole else torch.empty(rows, k, dtype=torch.int64)
        _run_rows(selector, fn, scores, rows, ke, lens, k, ov, oi)
        if not whole:
            v_out[h0:h1, :, a0:a1] = ov.view(h1 - h0, g, a1 - a0, k)
            i_out[h0:h1, :, a0:a1] = oi.view(h1 - h0, g, a1 - a0, k)


_NO_SELECTOR = object()  # marks a worker thread's own call: select in this thread
_threads_lock = threading.Lock()
_threads_state = {"users": 0, "saved": None}


@contextlib.contextmanager
def _torch_threads(n):
    """torch's intra-op threads set to ``n`` while any caller is inside; the first one in saves the setting,
    the last one out restores it (so calls from several threads never leave it changed)."""
    with _threads_lock:
        if _threads_state["users"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
        _threads_state["users"] += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["users"] -= 1
            if _threads_state["users"] == 0:
                torch.set_num_threads(_threads_state["saved"])


def _run_rows(selector, fn, scores, rows, ke, lens, k, ov, oi):
    """The compiled selection over ``rows`` rows of ``scores`` (row lengths ``lens`` or all ``ke``), across threads."""
    item = scores.element_size()
    base, vbase, ibase = scores.data_ptr(), ov.data_ptr(), oi.data_ptr()
    lens_ptr = None if lens is None else lens.ctypes.data

    def part(span):
        a, b = span
        lp = None if lens_ptr is None else lens_ptr + a * 8
        fn(base + a * ke * item, b - a, ke, lp, b - a, ke, k, vbase + a * k * item, ibase + a * k * 8)

    threads = 1 if selector is None else min(selector.thread_count(), rows // 32)  # a thread per 32 rows at least
    if threads <= 1:
        part((0, rows))
        return
    step = -(-rows // threads)
    list(selector.workers(threads).map(part, [(a, min(rows, a + step)) for a in range(0, rows, step)]))
