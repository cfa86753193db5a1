"""Sparse products with the kept attention weights (Gupta et al. 2021, section 3.1).

After selection each query keeps ``k`` weights. The forward needs ``P @ V``, the backward
``P @ K``, ``(Q K^T)`` and ``(dO V^T)`` at the kept entries only, and ``P^T @ dO``,
``P^T @ Q``. :class:`KeptMatrix` computes all of them with one of two backends:

* ``"csr"``: the kept entries of a whole chunk as one block-diagonal CSR matrix
  (``sparse_csr_tensor`` x dense forward; ``sampled_addmm`` and a transposed CSR matrix in
  the backward). CPU float32/float64 only.
* ``"gather"``: gather the kept rows of K and V, then batched matrix products. Any device
  and dtype.

``"auto"`` (what :func:`~topk_lib.kernels.attention.topk_attention` uses by default) picks
CSR on CPU float32/float64 and gather elsewhere. Both give the same result within float
rounding; the tests run both.

Sparse weights times V: one chunk of 12 heads x 1024 queries, d=64, k=128, float32, median ms
of 5 on this project's 2-core CPU (AMD EPYC, torch 2.13.0, 2 threads;
``python -m topk_lib.bench product``; Q.K^T and ``torch.topk`` in :mod:`.selection`):

=======================================  =========  =========  ==========
method                                   Lk=2048    Lk=8192    Lk=16384
=======================================  =========  =========  ==========
dense scatter, then matmul (the paper)   54.2       181.8      379.8
gather the k rows of V, then bmm         122.6      127.0      133.2
gather, then multiply and sum            226.3      239.6      248.1
block-diagonal CSR matrix x V (used)     5.9        9.9        15.0
=======================================  =========  =========  ==========

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``Hkv`` key/value heads; ``G`` query heads per
        key/value head; ``c`` queries in the chunk; ``k`` kept keys per query
``R``   rows of the matrix: all (batch, key/value head, group, query) of the chunk
``N``   columns: all (batch, key/value head, key) = rows of the flat K or V
``d``   width of the dense operand (``d`` for K and Q, ``dv`` for V and dO)
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["PRODUCTS", "KeptMatrix", "resolve_product"]

PRODUCTS = ("auto", "csr", "gather")
CSR_DTYPES = (torch.float32, torch.float64)


def resolve_product(product, device, dtype) -> str:
    """The backend ``"csr"`` or ``"gather"`` that ``product`` means for tensors on ``device`` of ``dtype``.

    Raises ``ValueError`` for a name not in :data:`PRODUCTS`, or ``"csr"`` where CSR kernels
    are not used (not CPU float32/float64).
    """
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    csr_ok = torch.device(device).type == "cpu" and dtype in CSR_DTYPES
    if product == "csr" and not csr_ok:
        raise ValueError(
            f"product='csr' runs on CPU float32/float64 only, got {dtype} on {device}; use 'auto' or 'gather'"
        )
    if product == "auto":
        return "csr" if csr_ok else "gather"
    return product


class KeptMatrix:
    """The kept entries of one query chunk as a sparse matrix with ``k`` entries per row.

    Rows are all (batch, kv head, group, query) of the chunk, columns all (batch, kv head, key):
    one block-diagonal matrix, so a whole chunk is one sparse product.

    Arguments:
        idx: ``[..., Hkv, G, c, k]`` int key positions of the kept entries (entries whose
            weight is 0 are inert, so unused slots may point anywhere valid).
        offsets: ``[..., Hkv, 1, 1, 1]`` first flat row of each (batch, kv head), from
            :func:`~topk_lib.kernels.chunking.flat_rows`.
        n_cols: ``N``, the rows of the flat K/V the products read.
        backend: ``"csr"`` or ``"gather"`` (see :func:`resolve_product`).
    """

    def __init__(self, idx, offsets, n_cols, *, backend):
        if backend not in ("csr", "gather"):
            raise ValueError(f"backend must be 'csr' or 'gather' (see resolve_product), got {backend!r}")
        self.shape = idx.shape  # [..., Hkv, G, c, k]
        self.cols = (idx.long() + offsets).reshape(-1)  # [R * k]
        self.n_rows, self.k, self.n_cols = idx[..., 0].numel(), idx.shape[-1], n_cols
        self.csr = backend == "csr"
        self._transposed = None

    def _matrix(self, values, dtype):
        crow = torch.arange(0, self.n_rows * self.k + 1, self.k, device=self.cols.device)  # [R + 1]
        return _csr(crow, self.cols, values.reshape(-1).to(dtype), (self.n_rows, self.n_cols))  # [R, N]

    def times(self, values, dense):
        """``P @ dense`` for kept weights ``values [..., c, k]`` and ``dense [N, d]``: ``[..., c, d]``."""
        if self.csr:
            out = self._matrix(values, dense.dtype) @ dense  # [R, d]
        else:
            picked = dense.index_select(0, self.cols).view(self.n_rows, self.k, -1)  # [R, k, d]
            out = torch.matmul(values.reshape(self.n_rows, 1, self.k).to(dense.dtype), picked).squeeze(-2)  # [R, d]
        return out.view(*self.shape[:-1], dense.shape[-1])

    def sampled(self, rows, dense):
        """``rows @ dense^T`` at the kept entries, for ``rows [..., c, d]``, ``dense [N, d]``: ``[..., c, k]``."""
        rows_flat = rows.reshape(self.n_rows, -1)  # [R, d]
        if self.csr:
            pattern = self._matrix(torch.zeros(self.cols.numel(), dtype=dense.dtype), dense.dtype)  # [R, N]
            out = torch.sparse.sampled_addmm(pattern, rows_flat.contiguous(), dense.t(), beta=0.0).values()  # [R * k]
        else:
            picked = dense.index_select(0, self.cols).view(self.n_rows, self.k, -1)  # [R, k, d]
            out = torch.matmul(picked, rows_flat.unsqueeze(-1)).squeeze(-1)  # [R, k]
        return out.view(self.shape)

    def t_times(self, values, rows):
        """``P^T @ rows`` for kept weights ``values [..., c, k]``, ``rows [..., c, d]``: one sum per key, ``[N, d]``."""
        rows_flat = rows.reshape(self.n_rows, -1)  # [R, d]
        if self.csr:
            if self._transposed is None:  # transpose the pattern once, reuse it for dK and dV
                order = torch.argsort(self.cols)  # [R * k]
                counts = torch.bincount(self.cols, minlength=self.n_cols)  # [N]
                crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [N + 1]
                self._transposed = order, crow, torch.div(order, self.k, rounding_mode="floor")
            order, crow, cols = self._transposed
            vals = values.reshape(-1)[order].to(rows.dtype)  # [R * k]
            return _csr(crow, cols, vals, (self.n_cols, self.n_rows)) @ rows_flat.contiguous()  # [N, d]
        out = rows_flat.new_zeros(self.n_cols, rows_flat.shape[-1])  # [N, d]
        contrib = values.reshape(self.n_rows, self.k, 1).to(rows.dtype) * rows_flat.unsqueeze(1)  # [R, k, d]
        return out.index_add_(0, self.cols, contrib.reshape(-1, rows_flat.shape[-1]))


def _csr(crow, cols, values, size):
    with warnings.catch_warnings():  # "CSR support is in beta": what we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)
