"""Memory-efficient top-k attention (Gupta et al. 2021, section 3.1).

Queries are processed in chunks of ``chunk_size`` rows. For each chunk the scores
against all keys are computed, the ``topk`` largest per query are kept (masked keys
never count), a softmax runs over those only, and their values are summed with the
kept weights. Peak memory is O(C*Lk + Lq*k) instead of O(Lq*Lk).

The backward pass is a custom ``torch.autograd.Function``: it saves Q, K, V, the
top-k indices (int32) and the kept probabilities (Lq*k each), and recomputes
everything else by gathering the kept rows of K and V. No Lq x Lk tensor or mask is
saved. The exact path (``topk=None`` or ``topk >= Lk``, and :func:`chunked_attention`)
saves the per-row log-sum-exp instead and recomputes one chunk of scores at a time,
as FlashAttention does.

Semantics
---------
* query ``[..., Hq, Lq, d]``, key ``[..., Hkv, Lk, d]``, value ``[..., Hkv, Lk, dv]``
  with ``Hq % Hkv == 0``; query head ``h`` reads key/value head ``h // (Hq // Hkv)``
  (the ``repeat_kv`` convention of transformers). K and V are never repeated.
* ``attn_mask`` as in ``scaled_dot_product_attention``: bool (True = may attend) or
  float (added to the scores), broadcastable to ``[..., Hq, Lq, Lk]``.
* ``is_causal``: query ``i`` sits at absolute position ``Lk - Lq + i`` and attends keys
  at positions <= its own, so decoding with a KV cache (Lq < Lk) works.
* A row with fewer than k allowed keys uses only the allowed ones; a row with none
  returns zeros (and zero gradients).
* Ties at the k-th score are broken by ``torch.topk``, which differs across devices:
  outputs are well defined only up to such ties.

Sparse weights times V: one chunk of 12 heads x 1024 queries, d=64, k=128, float32, median ms
of 5 on this project's 2-core CPU (AMD EPYC, torch 2.13.0, 2 threads;
``python -m topk_lib.bench product``):

=======================================  =========  =========  ==========
method                                   Lk=2048    Lk=8192    Lk=16384
=======================================  =========  =========  ==========
dense scatter, then matmul (the paper)   54.2       181.8      379.8
gather the k rows of V, then bmm         122.6      127.0      133.2
gather, then multiply and sum            226.3      239.6      248.1
block-diagonal CSR matrix x V (used)     5.9        9.9        15.0
Q.K^T of the same chunk, for scale       41.3       176.9      379.1
torch.topk (unsorted)                    95.2       246.9      319.6
=======================================  =========  =========  ==========

CPU float32/float64 therefore use CSR kernels (``sparse_csr_tensor`` x dense forward;
``sampled_addmm`` and a transposed CSR matrix in the backward); other devices and dtypes
gather the kept rows (the tested fallback). The selection itself costs more than Q.K^T with
``torch.topk``; on CPU numpy's ``argpartition`` over blocks of rows in two threads does it
1.4-3.5x faster (``_topk_rows``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["topk_attention", "chunked_attention", "vanilla_attention"]


# --------------------------------------------------------------------------- checks


def _check_inputs(query, key, value, attn_mask, topk, chunk_size, scale):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have shape [..., heads, length, dim], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}; "
            "cast them with .to(dtype)"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if query.dim() != key.dim() or key.dim() != value.dim():
        raise ValueError(
            f"query, key and value must have the same number of dims, got "
            f"{query.dim()}, {key.dim()}, {value.dim()}"
        )
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            f"query, key and value must share batch dims, got {tuple(query.shape[:-3])}, "
            f"{tuple(key.shape[:-3])}, {tuple(value.shape[:-3])}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must share the head dim, got {query.shape[-1]} and {key.shape[-1]}"
        )
    if key.shape[-3:-1] != value.shape[-3:-1]:
        raise ValueError(
            f"key and value must share [heads, length], got {tuple(key.shape[-3:-1])} and "
            f"{tuple(value.shape[-3:-1])}"
        )
    hq, hkv = query.shape[-3], key.shape[-3]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
            raise TypeError(f"topk must be a positive int or None, got {topk!r}")
        if topk <= 0:
            raise ValueError(f"topk must be a positive int or None (exact attention), got {topk}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None (1/sqrt(d)), got {scale!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask must be bool (True = may attend) or floating point (added to scores), "
                f"got {attn_mask.dtype}"
            )
        if attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
            raise TypeError(
                f"a float attn_mask must have the query dtype {query.dtype}, got {attn_mask.dtype}"
            )
        target = (*query.shape[:-2], query.shape[-2], key.shape[-2])
        try:
            ok = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [..., Hq, Lq, Lk] = "
                f"{target}; give it singleton dims where it is shared"
            )


def _grouped_mask(attn_mask, query, hkv):
    """View the mask as ``[..., Hkv|1, G|1, Lq|1, Lk|1]`` to match grouped queries."""
    if attn_mask is None:
        return None
    m = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
    hm = m.shape[-3]
    if hm == 1:
        return m.unsqueeze(-3)  # [..., 1, 1, Lq|1, Lk|1]
    return m.unflatten(-3, (hkv, hm // hkv))  # [..., Hkv, G, Lq|1, Lk|1]


def _chunk_scores(q5, key, mask5, r0, r1, kend, lq, lk, is_causal, scale):
    """Scaled, masked scores of query rows r0:r1 against keys 0:kend: ``[..., Hkv, G, c, kend]``."""
    qc = q5[..., r0:r1, :] * scale  # [..., Hkv, G, c, d] scaled first: no fp16 overflow
    hkv, g, c, d = qc.shape[-4:]
    s = torch.matmul(qc.reshape(*qc.shape[:-3], g * c, d), key[..., :kend, :].transpose(-1, -2))
    s = s.view(*qc.shape[:-1], kend)  # [..., Hkv, G, c, kend]
    if mask5 is not None:
        m = mask5[..., r0:r1, :] if mask5.shape[-2] != 1 else mask5
        m = m[..., :kend] if m.shape[-1] != 1 else m
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m)
    if is_causal:
        pos = torch.arange(lk - lq + r0, lk - lq + r1, device=s.device)  # absolute query positions
        future = torch.arange(kend, device=s.device)[None, :] > pos[:, None]  # [c, kend]
        s.masked_fill_(future, float("-inf"))
    return s


def _causal_end(is_causal, lq, lk, r1):
    """Keys past the last query's position are all masked: skip them."""
    return max(0, min(lk, lk - lq + r1)) if is_causal else lk


def _flat_rows(t):
    """``[..., H, L, d]`` -> ``[prod(...)*H*L, d]`` plus the row offset of each (batch, head)."""
    n_bh = math.prod(t.shape[:-2])
    offsets = torch.arange(n_bh, device=t.device) * t.shape[-2]
    return t.reshape(-1, t.shape[-1]), offsets.view(*t.shape[:-2], 1, 1, 1)


class _Kept:
    """The kept entries of one query chunk as a sparse matrix with k entries per row.

    Rows are all (batch, kv head, group, query) of the chunk, columns all (batch, kv
    head, key): one block-diagonal matrix, so a whole chunk is one sparse product.
    ``idx [..., Hkv, G, c, k]`` holds key positions; entries with weight 0 are inert.
    CPU float32/float64 use CSR kernels (sparse x dense and sampled dense x dense);
    other dtypes and devices gather the kept rows of K and V instead.
    """

    def __init__(self, idx, offsets, n_cols):
        self.shape = idx.shape  # [..., Hkv, G, c, k]
        self.cols = (idx.long() + offsets).reshape(-1)  # [rows * k]
        self.n_rows, self.k, self.n_cols = idx[..., 0].numel(), idx.shape[-1], n_cols
        self.csr = _PRODUCT == "csr" and idx.device.type == "cpu"
        self._order = None

    def _matrix(self, values, dtype):
        crow = torch.arange(0, self.n_rows * self.k + 1, self.k, device=self.cols.device)
        return _csr(crow, self.cols, values.reshape(-1).to(dtype), (self.n_rows, self.n_cols))

    def times(self, values, dense):
        """``P @ dense`` with P's kept entries ``values [..., c, k]``: ``[..., c, d]``."""
        if self.csr and dense.dtype in (torch.float32, torch.float64):
            out = self._matrix(values, dense.dtype) @ dense  # [rows, d]
        else:
            picked = dense.index_select(0, self.cols).view(self.n_rows, self.k, -1)  # [rows, k, d]
            out = torch.matmul(values.reshape(self.n_rows, 1, self.k).to(dense.dtype), picked).squeeze(-2)
        return out.view(*self.shape[:-1], dense.shape[-1])

    def sampled(self, rows, dense):
        """``(rows @ dense^T)`` at the kept entries; ``rows [..., c, d]``: ``[..., c, k]``."""
        rows2 = rows.reshape(self.n_rows, -1)
        if self.csr and dense.dtype in (torch.float32, torch.float64):
            pattern = self._matrix(torch.zeros(self.cols.numel(), dtype=dense.dtype), dense.dtype)
            out = torch.sparse.sampled_addmm(pattern, rows2.contiguous(), dense.t(), beta=0.0).values()
        else:
            picked = dense.index_select(0, self.cols).view(self.n_rows, self.k, -1)  # [rows, k, d]
            out = torch.matmul(picked, rows2.unsqueeze(-1)).squeeze(-1)
        return out.view(self.shape)

    def t_times(self, values, rows):
        """``P^T @ rows`` for ``rows [..., c, d]``: one sum per key, ``[n_cols, d]``."""
        rows2 = rows.reshape(self.n_rows, -1)
        if self.csr and rows.dtype in (torch.float32, torch.float64):
            if self._order is None:  # transpose the pattern once, reuse it for dK and dV
                self._order = torch.argsort(self.cols)
                counts = torch.bincount(self.cols, minlength=self.n_cols)
                self._t_crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
                self._t_cols = torch.div(self._order, self.k, rounding_mode="floor")
            vals = values.reshape(-1)[self._order].to(rows.dtype)
            return _csr(self._t_crow, self._t_cols, vals, (self.n_cols, self.n_rows)) @ rows2.contiguous()
        out = rows2.new_zeros(self.n_cols, rows2.shape[-1])
        contrib = values.reshape(self.n_rows, self.k, 1).to(rows.dtype) * rows2.unsqueeze(1)  # [rows, k, d]
        return out.index_add_(0, self.cols, contrib.reshape(-1, rows2.shape[-1]))


_PRODUCT = "csr"  # "csr" or "gather"; tests run both


def _csr(crow, cols, values, size):
    with warnings.catch_warnings():  # "CSR support is in beta": what we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


_POOL = None


def _topk_rows(s, k):
    """The k largest entries of each row of ``s [..., n]`` (unsorted): values and int64 indices.

    On CPU, numpy's introselect (``argpartition``, run on row blocks in parallel threads:
    it releases the GIL) is 1.4-3.5x faster than ``torch.topk`` for these shapes; see the
    module docstring. Elsewhere ``torch.topk``.
    """
    if s.device.type != "cpu" or s.dtype not in (torch.float32, torch.float64) or k >= s.shape[-1]:
        return s.topk(k, dim=-1, sorted=False)
    global _POOL
    rows = s.reshape(-1, s.shape[-1]).numpy()  # [R, n], a view
    n = rows.shape[-1]
    # argpartition returns all n int64 indices of a row: blocks of 256 rows bound that scratch
    blocks = np.array_split(rows, max(1, rows.shape[0] // 256))
    # copy: the slice would keep each block's [256, n] index array alive
    select = lambda b: np.argpartition(b, n - k, axis=-1)[:, n - k :].copy()  # noqa: E731
    threads = min(torch.get_num_threads(), len(blocks))
    if threads <= 1:
        idx = np.concatenate([select(b) for b in blocks])
    else:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="topk")
        idx = np.concatenate(list(_POOL.map(select, blocks)))
    vals = np.take_along_axis(rows, idx, axis=-1)  # [R, k]
    shape = (*s.shape[:-1], k)
    return torch.from_numpy(vals).view(shape), torch.from_numpy(idx).view(shape)


def _softmax_kept(vals):
    """Softmax over the kept scores and its row log-sum-exp; all -inf rows give zeros, not NaN."""
    work = vals.float() if vals.dtype in (torch.float16, torch.bfloat16) else vals
    m = work.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(work - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    return p.to(vals.dtype), m + denom.log()  # log(0) = -inf marks an empty row


def _mask_at(mask5, r0, r1, idx):
    """Float mask values at the kept keys ``idx [..., Hkv, G, c, k]`` (broadcast views, no copy)."""
    m = mask5[..., r0:r1, :] if mask5.shape[-2] != 1 else mask5
    if m.shape[-1] == 1:
        return m.expand(*idx.shape[:-1], 1)
    return m.expand(*idx.shape[:-1], m.shape[-1]).gather(-1, idx)


# --------------------------------------------------------------------------- top-k


class _TopkAttention(torch.autograd.Function):
    """Saves Q, K, V, the kept indices (int32, -1 = not kept) and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, topk, chunk_size, is_causal, scale):
        hq, lq = query.shape[-3], query.shape[-2]
        hkv, lk, dv = key.shape[-3], key.shape[-2], value.shape[-1]
        g = hq // hkv
        kk = min(topk, lk)
        q5 = query.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, d]
        mask5 = _grouped_mask(attn_mask, query, hkv)
        v_flat, offsets = _flat_rows(value)
        batch = query.shape[:-3]
        out = query.new_zeros(*batch, hq, lq, dv)  # [..., Hq, Lq, dv]
        out5 = out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv], a view to write into
        idx_all = torch.full((*batch, hkv, g, lq, kk), -1, dtype=torch.int32, device=query.device)
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        lse = query.new_full((*batch, hkv, g, lq, 1), float("-inf"), dtype=lse_dtype)  # [..., Lq, 1]
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            kend = _causal_end(is_causal, lq, lk, r1)
            if kend == 0:
                continue
            s = _chunk_scores(q5, key, mask5, r0, r1, kend, lq, lk, is_causal, scale)
            kc = min(kk, kend)
            vals, idx = _topk_rows(s, kc)  # [..., Hkv, G, c, kc]
            del s
            p, lse[..., r0:r1, :] = _softmax_kept(vals)
            out5[..., r0:r1, :] = _Kept(idx, offsets, v_flat.shape[0]).times(p, v_flat)  # [..., c, dv]
            # masked keys picked only because a row has fewer than k allowed ones: not kept
            idx_all[..., r0:r1, :kc] = idx.masked_fill_(vals == float("-inf"), -1)
        ctx.save_for_backward(query, key, value, attn_mask, idx_all, lse)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, attn_mask, idx_all, lse = ctx.saved_tensors
        hq, lq, d = query.shape[-3:]
        hkv, lk = key.shape[-3], key.shape[-2]
        g = hq // hkv
        scale, chunk_size = ctx.scale, ctx.chunk_size
        q5 = query.unflatten(-3, (hkv, g))
        go5 = grad_out.unflatten(-3, (hkv, g))  # [..., Hkv, G, Lq, dv]
        mask5 = _grouped_mask(attn_mask, query, hkv)
        float_mask = mask5 is not None and mask5.dtype != torch.bool
        k_flat, offsets = _flat_rows(key)
        v_flat, _ = _flat_rows(value)
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(q5) if need_q else None
        dk_flat = torch.zeros_like(k_flat) if need_k else None
        dv_flat = torch.zeros_like(v_flat) if need_v else None
        dmask = query.new_zeros(*q5.shape[:-1], lk) if need_m else None
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            kept = idx_all[..., r0:r1, :] >= 0  # [..., Hkv, G, c, k]
            idx = idx_all[..., r0:r1, :].clamp(min=0).long()
            pattern = _Kept(idx, offsets, k_flat.shape[0])
            qc = q5[..., r0:r1, :] * scale  # [..., Hkv, G, c, d]
            s = pattern.sampled(qc, k_flat)  # kept scores, recomputed [..., c, k]
            if float_mask:
                s = s + _mask_at(mask5, r0, r1, idx)
            l = lse[..., r0:r1, :]
            p = torch.exp(s.to(l.dtype) - torch.where(torch.isinf(l), torch.zeros_like(l), l))
            p = p.masked_fill_(~kept, 0.0).to(query.dtype)  # [..., Hkv, G, c, k]
            go = go5[..., r0:r1, :]  # [..., Hkv, G, c, dv]
            dp = pattern.sampled(go, v_flat)  # [..., Hkv, G, c, k]
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward on kept entries
            if need_q:
                dq[..., r0:r1, :] = pattern.times(ds, k_flat) * scale
            if need_k:
                dk_flat += pattern.t_times(ds, qc)
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
        return (*grads, None, None, None, None)


def _reduce_to(grad, shape):
    """Sum a gradient over the dims that were broadcast to reach its shape."""
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead else grad
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


# --------------------------------------------------------------------------- exact, chunked


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, chunk_size, is_causal, scale):
        hq, lq = query.shape[-3], query.shape[-2]
        hkv, lk, dv = key.shape[-3], key.shape[-2], value.shape[-1]
        g = hq // hkv
        q5 = query.unflatten(-3, (hkv, g))
        mask5 = _grouped_mask(attn_mask, query, hkv)
        out = query.new_zeros(*query.shape[:-1], dv)  # [..., Hq, Lq, dv]
        out5 = out.unflatten(-3, (hkv, g))
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        lse = query.new_full((*q5.shape[:-1], 1), float("-inf"), dtype=lse_dtype)  # [..., Hkv, G, Lq, 1]
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            kend = _causal_end(is_causal, lq, lk, r1)
            if kend == 0:
                continue
            s = _chunk_scores(q5, key, mask5, r0, r1, kend, lq, lk, is_causal, scale)
            work = s if s.dtype in (torch.float32, torch.float64) else s.float()
            m = work.amax(-1, keepdim=True)  # [..., c, 1]
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            e = work.sub_(m).exp_()  # in place: one chunk-sized buffer
            del s, work
            denom = e.sum(-1, keepdim=True)
            lse[..., r0:r1, :] = torch.where(denom > 0, m + denom.log(), torch.full_like(m, float("-inf")))
            p = (e / torch.where(denom == 0, torch.ones_like(denom), denom)).to(value.dtype)
            del e
            pv = torch.matmul(p.flatten(-3, -2), value[..., :kend, :])  # [..., Hkv, G*c, dv]
            out5[..., r0:r1, :] = pv.view(*q5.shape[:-2], r1 - r0, dv)
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        ctx.chunk_size, ctx.is_causal, ctx.scale = chunk_size, is_causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        hq, lq, d = query.shape[-3:]
        hkv, lk = key.shape[-3], key.shape[-2]
        g = hq // hkv
        chunk_size, is_causal, scale = ctx.chunk_size, ctx.is_causal, ctx.scale
        q5 = query.unflatten(-3, (hkv, g))
        go5 = grad_out.unflatten(-3, (hkv, g))
        mask5 = _grouped_mask(attn_mask, query, hkv)
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(q5) if need_q else None
        dk = torch.zeros_like(key) if need_k else None
        dv = torch.zeros_like(value) if need_v else None
        dmask = query.new_zeros(*q5.shape[:-1], lk) if need_m else None
        delta = (go5 * out.unflatten(-3, (hkv, g))).sum(-1, keepdim=True)  # [..., Hkv, G, Lq, 1] = rowsum(dP * P)
        for r0 in range(0, lq, chunk_size):
            r1 = min(r0 + chunk_size, lq)
            kend = _causal_end(is_causal, lq, lk, r1)
            if kend == 0:
                continue
            c = r1 - r0
            s = _chunk_scores(q5, key, mask5, r0, r1, kend, lq, lk, is_causal, scale)
            l = lse[..., r0:r1, :]
            work = s if s.dtype in (torch.float32, torch.float64) else s.float()
            p = work.sub_(torch.where(torch.isinf(l), torch.zeros_like(l), l)).exp_()  # own buffer: in place
            p = p.masked_fill_(torch.isinf(l), 0.0).to(value.dtype)  # fully masked rows: zero weights
            del s, work
            go = go5[..., r0:r1, :]  # [..., Hkv, G, c, dv]
            go3 = go.flatten(-3, -2)  # [..., Hkv, G*c, dv]
            p3 = p.flatten(-3, -2)  # [..., Hkv, G*c, kend]
            if need_v:
                dv[..., :kend, :] += torch.matmul(p3.transpose(-1, -2), go3)
            dp = torch.matmul(go3, value[..., :kend, :].transpose(-1, -2)).view_as(p)
            ds = p.mul_(dp.sub_(delta[..., r0:r1, :]))  # [..., Hkv, G, c, kend]
            del dp
            ds3 = ds.flatten(-3, -2)
            if need_q:
                dq[..., r0:r1, :] = torch.matmul(ds3, key[..., :kend, :]).view(*q5.shape[:-2], c, d) * scale
            if need_k:
                qc = q5[..., r0:r1, :].flatten(-3, -2) * scale
                dk[..., :kend, :] += torch.matmul(ds3.transpose(-1, -2), qc)
            if need_m:
                dmask[..., r0:r1, :kend] = ds
        grads = [
            dq.flatten(-4, -3) if need_q else None,
            dk,
            dv,
            _reduce_to(dmask.flatten(-4, -3), attn_mask.shape) if need_m else None,
        ]
        return (*grads, None, None, None)


# --------------------------------------------------------------------------- public API


def topk_attention(query, key, value, *, topk, chunk_size=1024, attn_mask=None, is_causal=False, scale=None):
    """Attention that keeps, per query, only the ``topk`` largest scores.

    ``topk=None`` or ``topk >= Lk`` gives exact attention (see :func:`chunked_attention`).
    Returns ``[..., Hq, Lq, dv]``. See the module docstring for shapes, masks and ties.
    """
    _check_inputs(query, key, value, attn_mask, topk, chunk_size, scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if topk is None or topk >= key.shape[-2]:
        return _ChunkedAttention.apply(query, key, value, attn_mask, int(chunk_size), bool(is_causal), scale)
    return _TopkAttention.apply(query, key, value, attn_mask, int(topk), int(chunk_size), bool(is_causal), scale)


def chunked_attention(query, key, value, *, chunk_size=1024, attn_mask=None, is_causal=False, scale=None):
    """Exact attention computed ``chunk_size`` query rows at a time, in O(C*Lk) memory.

    The backward pass recomputes each chunk's scores from the saved row log-sum-exp.
    """
    return topk_attention(
        query, key, value, topk=None, chunk_size=chunk_size, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )


def vanilla_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None):
    """The plain reference: the full Lq x Lk matrix, autograd saves all of it."""
    _check_inputs(query, key, value, attn_mask, None, 1, scale)
    hq, hkv = query.shape[-3], key.shape[-3]
    lq, lk = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    key = key.repeat_interleave(hq // hkv, dim=-3)  # [..., Hq, Lk, d]
    value = value.repeat_interleave(hq // hkv, dim=-3)
    s = torch.matmul(query * scale, key.transpose(-1, -2))  # [..., Hq, Lq, Lk]
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        pos = torch.arange(lk - lq, lk, device=s.device)
        s = s.masked_fill(torch.arange(lk, device=s.device)[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> zeros
    return torch.matmul(p, value)
