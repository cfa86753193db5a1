"""Pass 1 of the threshold top-k attention: each query row's score threshold and the key blocks it needs.

The threshold path (:mod:`.flex`) keeps, per query row, every allowed score ``>= tau``, where
``tau`` lies between the row's k-th and (k+1)-th largest allowed scores. This module computes
``tau`` without keeping any score matrix, and, for each block of ``BLOCK`` queries, which blocks of
``BLOCK`` keys hold a score that passes it, so that pass 2 skips the others (FlexAttention's
``BlockMask``).

The threshold rule
------------------
``tau = s_k / 2 + s_(k+1) / 2`` (scores in float32, float64 for float64 inputs; ``s_j`` the j-th
largest allowed score of the row, ``-inf`` past the allowed ones), and ``-inf`` when the row has at
most ``k`` allowed keys (all are kept). The midpoint, not ``s_k`` itself, because pass 2 recomputes
the scores in another kernel: a rounding difference smaller than half the gap between the k-th
and the (k+1)-th score changes nothing. Ties: when ``s_k == s_(k+1)``, ``tau = s_k`` and *every*
key tied at the k-th score is kept (a row then keeps more than ``k``), where ``torch.topk`` and the
CPU kernels keep exactly ``k`` of them; on every row whose k-th and (k+1)-th scores differ (by more
than the rounding of the two kernels) both keep the same ``k`` keys.

Scores are formed as pass 2 forms them: ``(q . k) * scale`` accumulated in float32 (half
precision inputs are not rounded to their dtype), then ``c * tanh(s / c)`` (soft-cap), then the
float mask added; bool-masked keys, keys after the query (causal, queries at the last ``Lq`` of
``Lk`` positions) and padding never count.

Two implementations: :func:`torch_thresholds` (any device; one chunk of rows at a time, the
chunk's ``[B, Hq, c, Lk]`` float32 scores and one ``torch.topk(k + 1)``; exact per-row block
needs) and the Triton kernel of :mod:`.threshold_triton` (CUDA, or Triton's interpreter; no
score matrix, a per-row running top-``(k+1)``; block needs from each query block's largest score
in each key block against its smallest ``tau``, a superset of the exact ones). Both give the
same ``tau``; pass 2 applies ``tau`` itself, so a superset of blocks changes no output.

Dimensions
----------
``B``   batch (the flattened batch dims); ``Hq`` query heads; ``Hkv`` key/value heads; ``G = Hq // Hkv``
``Lq``  queries; ``Lk`` keys; ``c`` rows of one chunk; ``nq``, ``nk`` query and key blocks of ``BLOCK``
``k``   ``topk``; ``d`` head dim
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "Thresholds", "work_dtype", "midpoint", "torch_thresholds", "block_needs", "thresholds"]

#: Rows and keys per block of the block mask (FlexAttention's default sparse block size).
BLOCK = 128
#: Scores one chunk of :func:`torch_thresholds` may hold (float32: 128 MiB).
CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass
class Thresholds:
    """What pass 1 hands pass 2.

    ``tau [B, Hq, Lq]`` (float32; float64 for float64 inputs): keep the allowed scores ``>= tau``;
    ``needs [B, Hq, nq, nk]`` bool: key block ``j`` may hold a kept score of query block ``i``.
    """

    tau: torch.Tensor
    needs: torch.Tensor


def work_dtype(dtype):
    """The dtype scores are compared in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def midpoint(kth, nxt):
    """The threshold between the k-th and (k+1)-th largest scores: ``-inf`` when the (k+1)-th is ``-inf``."""
    return torch.where(nxt == float("-inf"), torch.full_like(kth, float("-inf")), kth * 0.5 + nxt * 0.5)


def _at(t, b0, b1, r0, r1):
    """Rows ``r0:r1`` of batch ``b0:b1`` of a 4D mask ``[B|1, H|1, Lq|1, Lk|1]`` (broadcast dims kept)."""
    t = t[b0:b1] if t.shape[0] != 1 else t
    return t[:, :, r0:r1] if t.shape[2] != 1 else t


def scores_of(q_rows, key, scale, softcap, float_mask, bool_mask, is_causal, r0, lq):
    """Pass 2's scores of query rows ``r0:r0+c``: ``q_rows [B, Hq, c, d]`` against ``key [B, Hkv, Lk, d]``.

    Masks are 4D views already cut to these rows (or ``None``). Returns ``[B, Hq, c, Lk]`` in the
    work dtype, masked keys ``-inf``.
    """
    b, hq, c, d = q_rows.shape
    hkv, lk = key.shape[1], key.shape[2]
    work = work_dtype(q_rows.dtype)
    q = q_rows.to(work).reshape(b, hkv, (hq // hkv) * c, d)  # [B, Hkv, G*c, d], a copy of the chunk
    s = torch.matmul(q, key.to(work).transpose(-1, -2)).view(b, hq, c, lk).mul_(scale)  # [B, Hq, c, Lk]
    if softcap is not None:
        s = s.div_(softcap).tanh_().mul_(softcap)
    if float_mask is not None:
        s = s.add_(float_mask.to(work))
    if bool_mask is not None:
        s = s.masked_fill_(~bool_mask, float("-inf"))
    if is_causal:
        pos = torch.arange(lk - lq + r0, lk - lq + r0 + c, device=s.device)  # [c] absolute query positions
        s = s.masked_fill_(torch.arange(lk, device=s.device)[None, :] > pos[:, None], float("-inf"))
    return s


def block_needs(block_max, tau, lq):
    """``needs [B, Hq, nq, nk]`` from ``block_max [B, Hq, rows, nk]`` (each row's largest score per key block).

    A key block is needed by a query block when one of its rows has an allowed score there that
    passes the row's ``tau [B, Hq, rows]``; rows past ``Lq`` (padding to whole blocks) need nothing.
    """
    need = (block_max >= tau[..., None]) & (block_max > float("-inf"))  # [B, Hq, rows, nk]
    rows = need.shape[2]
    pad = -rows % BLOCK
    need = F.pad(need, (0, 0, 0, pad), value=False) if pad else need
    return need.unflatten(2, (-1, BLOCK)).any(3)  # [B, Hq, rows / BLOCK, nk]


def torch_thresholds(query, key, *, topk, scale, softcap=None, float_mask=None, bool_mask=None, is_causal=False,
                     chunk_elements=CHUNK_ELEMENTS):
    """:class:`Thresholds` of ``query [B, Hq, Lq, d]`` against ``key [B, Hkv, Lk, d]``, in plain torch.

    ``topk``: ``k`` (``k >= Lk`` keeps every allowed key); masks 4D, broadcastable to
    ``[B, Hq, Lq, Lk]`` (or ``None``). Rows go in chunks of whole blocks whose scores hold at most
    about ``chunk_elements`` entries (at least one block of rows).
    """
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    nk = math.ceil(lk / BLOCK)
    tau = query.new_empty(b, hq, lq, dtype=work_dtype(query.dtype))  # [B, Hq, Lq]
    needs = []
    rows = max(1, chunk_elements // max(1, b * hq * lk * BLOCK)) * BLOCK
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        fm = None if float_mask is None else _at(float_mask, 0, b, r0, r1)
        bm = None if bool_mask is None else _at(bool_mask, 0, b, r0, r1)
        s = scores_of(query[:, :, r0:r1], key, scale, softcap, fm, bm, is_causal, r0, lq)  # [B, Hq, c, Lk]
        if topk >= lk:
            t = torch.full_like(s[..., 0], float("-inf"))  # [B, Hq, c]
        else:
            top = s.topk(topk + 1, dim=-1).values  # [B, Hq, c, k+1], sorted
            t = midpoint(top[..., topk - 1], top[..., topk])  # [B, Hq, c]
        tau[..., r0:r1] = t
        padded = F.pad(s, (0, nk * BLOCK - lk), value=float("-inf")) if nk * BLOCK != lk else s
        needs.append(block_needs(padded.unflatten(-1, (nk, BLOCK)).amax(-1), t, lq))  # [B, Hq, c/BLOCK, nk]
        del s, padded
    return Thresholds(tau, torch.cat(needs, dim=2))


def thresholds(query, key, *, topk, scale, softcap=None, float_mask=None, bool_mask=None, is_causal=False,
               backend="auto"):
    """:class:`Thresholds` by ``backend``: ``"torch"`` (:func:`torch_thresholds`), ``"triton"`` (the kernel of
    :mod:`.threshold_triton`), or ``"auto"``: Triton on CUDA when it is importable and the head dim is a power
    of two of at least 16, torch otherwise."""
    kw = dict(topk=topk, scale=scale, softcap=softcap, float_mask=float_mask, bool_mask=bool_mask,
              is_causal=is_causal)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        from topk_lib.kernels import threshold_triton

        backend = "triton" if query.is_cuda and threshold_triton.supports(query, topk) else "torch"
    if backend == "torch":
        return torch_thresholds(query, key, **kw)
    from topk_lib.kernels.threshold_triton import triton_thresholds

    return triton_thresholds(query, key, **kw)
