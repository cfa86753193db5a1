"""Query-chunk helpers shared by the attention kernels and the attention-statistics capture.

A kernel walks the queries ``C`` rows at a time; for each chunk it needs the scaled, masked
scores against the keys that chunk may see, with grouped-query heads reading their key/value
head without repeating K (Gupta et al. 2021, section 3.1: only one ``[C, Lk]`` score block per
head is ever alive).

Dimensions
----------
``B``   batch dims (any number, written ``...`` in shapes)
``Hq``  query heads; ``Hkv`` key/value heads; ``G = Hq // Hkv`` query heads per key/value head
``Lq``  queries; ``Lk`` keys; ``C`` queries in one chunk (``c`` for the last, shorter one)
``d``   query/key head dim; ``dv`` value head dim
"""

from __future__ import annotations

import math

import torch

__all__ = ["grouped_mask", "chunk_scores", "mask_scores", "causal_end", "flat_rows"]


def grouped_mask(attn_mask, query, hkv):
    """View ``attn_mask`` as ``[..., Hkv|1, G|1, Lq|1, Lk|1]`` to match grouped queries.

    ``attn_mask`` broadcasts to ``[..., Hq, Lq, Lk]`` (or is ``None``, returned as is);
    ``query [..., Hq, Lq, d]`` gives the number of dims; ``hkv`` is ``Hkv``. No copy is made.
    """
    if attn_mask is None:
        return None
    mask = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
    mask_heads = mask.shape[-3]
    if mask_heads == 1:
        return mask.unsqueeze(-3)  # [..., 1, 1, Lq|1, Lk|1]
    return mask.unflatten(-3, (hkv, mask_heads // hkv))  # [..., Hkv, G, Lq|1, Lk|1]


def chunk_scores(q_grouped, key, mask_grouped, r0, r1, k_end, lq, lk, is_causal, scale, softcap=None):
    """Scaled, masked scores of query rows ``r0:r1`` against keys ``0:k_end``.

    ``q_grouped [..., Hkv, G, Lq, d]``, ``key [..., Hkv, Lk, d]``, ``mask_grouped`` from
    :func:`grouped_mask` (or ``None``). With ``softcap`` ``c`` the scores become
    ``c * tanh(s / c)`` before the mask is added (Gemma-2's order: scale, cap, mask). Masked
    keys score ``-inf``; a float mask is added. Returns a new tensor ``[..., Hkv, G, c, k_end]``
    that callers may overwrite in place.
    """
    q_chunk = q_grouped[..., r0:r1, :] * scale  # [..., Hkv, G, c, d] scaled first: no fp16 overflow
    hkv, g, c, d = q_chunk.shape[-4:]
    scores = torch.matmul(q_chunk.reshape(*q_chunk.shape[:-3], g * c, d), key[..., :k_end, :].transpose(-1, -2))
    scores = scores.view(*q_chunk.shape[:-1], k_end)  # [..., Hkv, G, c, k_end]
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    return mask_scores(scores, mask_grouped, r0, r1, lq, lk, is_causal)


def mask_scores(scores, mask_grouped, r0, r1, lq, lk, is_causal):
    """Apply the mask and the causal rule to the scores ``[..., Hkv, G, c, k_end]`` of rows ``r0:r1``, in place."""
    k_end = scores.shape[-1]
    if mask_grouped is not None:
        mask = mask_grouped[..., r0:r1, :] if mask_grouped.shape[-2] != 1 else mask_grouped
        mask = mask[..., :k_end] if mask.shape[-1] != 1 else mask  # [..., Hkv|1, G|1, c|1, k_end|1]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    if is_causal:
        pos = torch.arange(lk - lq + r0, lk - lq + r1, device=scores.device)  # [c] absolute query positions
        future = torch.arange(k_end, device=scores.device)[None, :] > pos[:, None]  # [c, k_end]
        scores.masked_fill_(future, float("-inf"))
    return scores


def causal_end(is_causal, lq, lk, r1):
    """How many keys a chunk ending at query row ``r1`` can see: later keys are all masked."""
    return max(0, min(lk, lk - lq + r1)) if is_causal else lk


def flat_rows(t):
    """``t [..., H, L, d]`` as ``[prod(...)*H*L, d]``, plus each (batch, head)'s first row.

    The offsets have shape ``[..., H, 1, 1, 1]``: added to key positions ``[..., H, G, c, k]``
    they give rows of the flat tensor.
    """
    n_heads = math.prod(t.shape[:-2])
    offsets = torch.arange(n_heads, device=t.device) * t.shape[-2]  # [prod(...)*H]
    return t.reshape(-1, t.shape[-1]), offsets.view(*t.shape[:-2], 1, 1, 1)
