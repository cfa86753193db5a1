"""Baseline kernels the top-k kernels are compared against (Gupta et al. 2021, section 4).

* :func:`chunked_dense_feedforward`: the exact ReLU feed-forward layer, token-chunked and
  checkpointed (the memory baseline of the ``ff`` benchmark);
* :func:`sparse_weights_times_v`: the kept weights times V computed several ways (the
  ``product`` benchmark);
* :func:`performer_attention`: causal FAVOR+ random-feature attention (Choromanski et al.
  2021, ``performer-pytorch``), the linear-attention baseline of the approximation study.

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``H``/``Hq`` (query) heads; ``Hkv`` key/value heads
``C``   queries of one chunk; ``Lq`` queries; ``Lk`` keys; ``k`` kept keys per query; ``d`` head dim
``T``   tokens; ``d_ff`` hidden units of a feed-forward layer
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from topk_lib.kernels.product import KeptMatrix, resolve_product

__all__ = ["PRODUCT_METHODS", "chunked_dense_feedforward", "sparse_weights_times_v", "performer_attention"]

PRODUCT_METHODS = ("scatter_mm", "gather_bmm", "gather_mulsum", "csr")


def chunked_dense_feedforward(x, w_in, w_out, *, chunk_size):
    """Exact ReLU feed-forward layer, ``chunk_size`` tokens at a time (the token-chunked baseline).

    ``x [..., d]``, ``w_in [d_ff, d]``, ``w_out [d_out, d_ff]`` (``nn.Linear`` weights);
    returns ``[..., d_out]``. Under autograd each chunk is checkpointed, so backward
    recomputes the chunk's ``[c, d_ff]`` hidden layer instead of saving ``[T, d_ff]``:
    memory O(c * d_ff), like top-k's chunks.
    """
    from torch.utils.checkpoint import checkpoint

    def layer(xc):
        return F.linear(F.relu(F.linear(xc, w_in)), w_out)  # [c, d_out]

    x_rows = x.reshape(-1, x.shape[-1])  # [T, d]
    need_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, w_out))
    outs = []
    for t0 in range(0, x_rows.shape[0], chunk_size):
        xc = x_rows[t0 : t0 + chunk_size]  # [c, d]
        outs.append(checkpoint(layer, xc, use_reentrant=False) if need_ckpt else layer(xc))
    return torch.cat(outs).view(*x.shape[:-1], w_out.shape[0])


def sparse_weights_times_v(p, idx, v, *, method="gather_bmm"):
    """``out[h, i] = sum_j p[h, i, j] * v[h, idx[h, i, j]]``, several ways (the ``product`` benchmark).

    ``p [H, C, k]`` kept probabilities, ``idx [H, C, k]`` int64 key indices, ``v [H, Lk, d]``;
    returns ``[H, C, d]``. ``method`` is one of :data:`PRODUCT_METHODS`:
    ``scatter_mm``: dense ``[H, C, Lk]`` weights then a matmul, O(C*Lk*d) as in the paper;
    ``gather_bmm``: ``index_select`` the k rows, then ``p[..., None, :] @ v_sel``, O(C*k*d);
    ``gather_mulsum``: the same gather, then ``(p[..., None] * v_sel).sum(-2)``;
    ``csr``: what ``topk_attention`` does by default, :class:`~topk_lib.kernels.product.KeptMatrix`
    with the ``"auto"`` backend: one block-diagonal CSR matrix times V on CPU float32/float64
    (its gather elsewhere).
    """
    h, c, k = p.shape
    lk, d = v.shape[-2:]
    if method == "scatter_mm":
        dense = torch.zeros(h, c, lk, dtype=p.dtype, device=p.device).scatter_(-1, idx, p)  # [H, C, Lk]
        return torch.matmul(dense, v)  # [H, C, d]
    if method == "csr":
        offsets = torch.arange(h, device=p.device).view(h, 1, 1) * lk  # [H, 1, 1] first row of each head in [H*Lk, d]
        kept = KeptMatrix(idx, offsets, h * lk, backend=resolve_product("auto", v.device, v.dtype))
        return kept.times(p, v.reshape(-1, d))  # [H, C, d]
    rows = (idx + torch.arange(h, device=p.device).view(h, 1, 1) * lk).reshape(-1)  # [H*C*k] rows of v as [H*Lk, d]
    v_sel = v.reshape(-1, d).index_select(0, rows).view(h, c, k, d)  # [H, C, k, d]
    if method == "gather_bmm":
        return torch.matmul(p.unsqueeze(-2), v_sel).squeeze(-2)  # [H, C, d]
    if method == "gather_mulsum":
        return (p.unsqueeze(-1) * v_sel).sum(-2)  # [H, C, d]
    raise ValueError(f"method must be one of {PRODUCT_METHODS}, got {method!r}")


def performer_attention(query, key, value, *, n_features: int, seed: int = 0):
    """Causal FAVOR+ attention (Choromanski et al. 2021) with ``n_features`` random features.

    ``query [..., Hq, L, d]``, ``key [..., Hkv, L, d]``, ``value [..., Hkv, L, dv]`` with
    ``Lq == Lk == L`` (self-attention over the whole input); K and V are repeated to ``Hq``
    heads. The random projection is drawn from ``torch.manual_seed(seed)`` (this reseeds
    torch's global generator). Returns ``[..., Hq, L, dv]``. Needs ``performer-pytorch``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # performer-pytorch warns about its missing CUDA kernel
        from performer_pytorch import FastAttention

    torch.manual_seed(seed)  # the random projection is drawn at construction
    rep = query.shape[-3] // key.shape[-3]
    key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)  # [..., Hq, Lk, d]
    attn = FastAttention(dim_heads=query.shape[-1], nb_features=n_features, causal=True).to(query.device, query.dtype)
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("performer_attention needs Lq == Lk (self-attention over the whole input)")
    return attn(query, key, value)
