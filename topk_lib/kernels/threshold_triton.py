"""Pass 1 of the threshold top-k attention as a Triton kernel: scores and a running top-k, no score matrix.

One program takes ``BQ`` query rows of one query head and walks the key blocks it may see (causal
blocks past its last row are never visited). For each block of ``BK`` keys it forms the scores as
pass 2 will (``tl.dot`` accumulated in float32, times the scale, soft-cap, float mask, bool mask,
causal rule; :mod:`.threshold` states the rule), records the block's largest score, and merges
the block into each row's running top-``K`` (``K = BK``, a power of two above ``k``): with the
running list sorted descending and the block sorted ascending, their elementwise maximum holds
exactly the ``K`` largest of both (a bitonic merge), and one more sort restores the order. A block
with no score above any row's ``K``-th so far is not merged. At the end each row's ``tau`` is the
midpoint of its k-th and (k+1)-th entries, and each (query block, key block) pair gets the
largest score of the pair; :func:`triton_thresholds` turns those into the needed blocks (a key
block is needed when that maximum reaches the smallest ``tau`` of the query block).

State per program: ``BQ x K`` float32 of running top-k in registers. Nothing of size ``Lq x Lk``
is written; the block maxima are ``B * Hq * nq * nk`` floats.

Triton is imported when a kernel is first needed, so this module imports without it; under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly: tests only).

Dimensions
----------
``B``   batch; ``Hq``, ``Hkv`` query and key/value heads; ``Lq``, ``Lk`` queries and keys; ``d`` head dim
``BQ``  rows per program; ``BK`` keys per step (= ``K``, the running list's length); ``nq``, ``nk`` blocks of 128
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from topk_lib.kernels.threshold import BLOCK, Thresholds, work_dtype

__all__ = ["available", "supports", "triton_thresholds"]

BQ = 32  # rows per program: the running lists are BQ x K float32 in registers


def available() -> bool:
    """True when Triton can be imported (it ships with CUDA builds of torch; on CPU only for the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(query, topk) -> bool:
    """Whether the kernel runs for ``query [B, Hq, Lq, d]``: Triton importable, CUDA (or the interpreter),
    ``d`` a power of two of at least 16, ``k + 1 <= 256`` (a longer running list spills registers)."""
    d = query.shape[-1]
    return (available() and (query.is_cuda or _interpreting()) and query.dtype != torch.float64
            and d >= 16 and d & (d - 1) == 0 and topk + 1 <= 256)


@functools.lru_cache(maxsize=2)
def _kernel(interpret):
    # triton.jit reads TRITON_INTERPRET when it decorates: one kernel per setting
    import triton
    import triton.language as tl

    @triton.jit
    def pass1(Q, K, FM, BM, TAU, BMAX, scale, softcap,
              sqb, sqh, sqm, skb, skh, skn, sfb, sfh, sfm, sfn, sbb, sbh, sbm, sbn,
              HQ: tl.constexpr, G: tl.constexpr, LQ, LK, NQB, NKB, TOPK: tl.constexpr,
              D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, RATIO: tl.constexpr,
              HAS_FM: tl.constexpr, HAS_BM: tl.constexpr, CAUSAL: tl.constexpr, CAP: tl.constexpr,
              IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // HQ, pid_bh % HQ
        rows = pid_m * BQ + tl.arange(0, BQ)  # [BQ]
        cols = tl.arange(0, BK)  # [BK]
        dims = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=rows[:, None] < LQ, other=0.0)
        k_base = K + b * skb + (h // G) * skh
        top = tl.full((BQ, BK), float("-inf"), tl.float32)  # running top-K, sorted descending
        last = LK
        if CAUSAL:
            last = tl.minimum(LK, LK - LQ + pid_m * BQ + BQ)  # keys the block's last row may see
        n_steps = tl.cdiv(tl.maximum(last, 0), BK)
        qb = (pid_m * BQ) // 128  # the 128-row block of the block mask these rows belong to
        for j in range(0, n_steps):
            keys = j * BK + cols  # [BK]
            kt = tl.load(k_base + keys[None, :] * skn + dims[:, None], mask=keys[None, :] < LK, other=0.0)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")  # [BQ, BK] float32
            else:
                s = tl.dot(q, kt)
            s = s * scale
            if CAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # c * tanh(s / c)
            inside = (rows[:, None] < LQ) & (keys[None, :] < LK)
            if HAS_FM:
                fm = tl.load(FM + b * sfb + h * sfh + rows[:, None] * sfm + keys[None, :] * sfn, mask=inside,
                             other=0.0)
                s = s + fm.to(tl.float32)
            if HAS_BM:
                bm = tl.load(BM + b * sbb + h * sbh + rows[:, None] * sbm + keys[None, :] * sbn, mask=inside, other=0)
                inside = inside & (bm != 0)
            if CAUSAL:
                inside = inside & (keys[None, :] <= rows[:, None] + (LK - LQ))
            s = tl.where(inside, s, float("-inf"))
            # the largest score of each 128-key block within this step, for the block mask
            if RATIO >= 1:  # BK = RATIO blocks of 128 keys
                sub = tl.max(tl.reshape(tl.max(s, 0), (RATIO, BK // RATIO)), 1)  # [RATIO]
                tl.atomic_max(BMAX + (pid_bh * NQB + qb) * NKB + j * RATIO + tl.arange(0, RATIO), sub,
                              mask=j * RATIO + tl.arange(0, RATIO) < NKB)
            else:  # BK < 128: the step lies inside one block of 128 keys
                tl.atomic_max(BMAX + (pid_bh * NQB + qb) * NKB + (j * BK) // 128, tl.max(s))
            kth_so_far = tl.min(top, 1)  # [BQ]
            if tl.max(tl.where(s > kth_so_far[:, None], 1, 0)) > 0:
                up = tl.sort(s, dim=1, descending=False)
                top = tl.sort(tl.maximum(top, up), dim=1, descending=True)
        kth = tl.max(tl.where(cols[None, :] == TOPK - 1, top, float("-inf")), 1)  # [BQ]
        nxt = tl.max(tl.where(cols[None, :] == TOPK, top, float("-inf")), 1)
        tau = tl.where(nxt == float("-inf"), float("-inf"), kth * 0.5 + nxt * 0.5)
        tl.store(TAU + pid_bh * LQ + rows, tau, mask=rows < LQ)

    return pass1


def _strides(t, ndim=4):
    return (0,) * ndim if t is None else tuple(t.stride())


def triton_thresholds(query, key, *, topk, scale, softcap=None, float_mask=None, bool_mask=None, is_causal=False,
                      min_bk=None):
    """:class:`~topk_lib.kernels.threshold.Thresholds` by the Triton kernel (same arguments as
    :func:`~topk_lib.kernels.threshold.torch_thresholds`); ``supports(query, topk)`` must hold.

    ``tau`` equals the torch pass's within float rounding (the rule of :mod:`.threshold`); the block
    needs are a superset of its per-row ones (from each query block's largest score per key block
    against the block's smallest ``tau``). ``min_bk`` (a power of two from 16 to 128) is the least number of keys
    per step; ``None`` means 128, or 16 under the interpreter, whose sorts are slow.
    """
    if not supports(query, topk):
        raise ValueError(f"the Triton pass 1 needs Triton, CUDA (or TRITON_INTERPRET=1), a head dim that is a power "
                         f"of two >= 16 and topk + 1 <= 256; got d={query.shape[-1]}, topk={topk}, "
                         f"device {query.device}, {query.dtype}: use backend='torch'")
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    nq, nk = math.ceil(lq / BLOCK), math.ceil(lk / BLOCK)
    min_bk = min_bk or (16 if _interpreting() else BLOCK)
    bk = max(min_bk, 1 << min(topk, lk).bit_length())  # the smallest power of two > k, at least min_bk
    tau = torch.full((b, hq, lq), float("-inf"), device=query.device, dtype=work_dtype(query.dtype))
    bmax = torch.full((b, hq, nq, nk), float("-inf"), device=query.device, dtype=torch.float32)
    fm = None if float_mask is None else float_mask.expand(b, hq, lq, lk)  # views: stride 0 where broadcast
    bm = None if bool_mask is None else bool_mask.expand(b, hq, lq, lk).view(torch.uint8)
    q = query.contiguous() if query.stride(-1) != 1 else query
    k = key.contiguous() if key.stride(-1) != 1 else key
    grid = (math.ceil(lq / BQ), b * hq)
    _kernel(_interpreting())[grid](
        q, k, q if fm is None else fm, q if bm is None else bm, tau, bmax, float(scale), float(softcap or 1.0),
        *q.stride()[:3], *k.stride()[:3], *_strides(fm), *_strides(bm),
        HQ=hq, G=hq // hkv, LQ=lq, LK=lk, NQB=nq, NKB=nk, TOPK=min(topk, lk), D=d, BQ=BQ, BK=bk,
        RATIO=bk // BLOCK if bk >= BLOCK else 0, HAS_FM=fm is not None, HAS_BM=bm is not None, CAUSAL=bool(is_causal),
        CAP=softcap is not None, IEEE=query.dtype == torch.float32, num_warps=8 if bk > BLOCK else 4,
    )
    if topk >= lk:
        tau.fill_(float("-inf"))
    # conservative: one row of block maxima per query block, against the block's smallest tau
    pad = nq * BLOCK - lq
    tau_min = torch.nn.functional.pad(tau, (0, pad), value=float("inf")).unflatten(-1, (nq, BLOCK)).amin(-1)
    needs = (bmax >= tau_min[..., None]) & (bmax > float("-inf"))  # [B, Hq, nq, nk]
    return Thresholds(tau, needs)
