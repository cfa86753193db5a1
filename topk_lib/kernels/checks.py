"""Argument checks of the attention kernels, so every bad input fails with a message naming it.

Shapes, dtypes, devices and masks are checked here; int arguments through
:mod:`topk_lib._validate` (wrong type -> ``TypeError``, out of range -> ``ValueError``).

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``Hq`` query heads; ``Hkv`` key/value heads
``Lq``  queries; ``Lk`` keys; ``d`` query/key head dim; ``dv`` value head dim
"""

from __future__ import annotations

import numbers

import torch

from topk_lib._validate import optional_k, positive_int

__all__ = ["check_attention_inputs"]


def check_attention_inputs(query, key, value, attn_mask, topk, chunk_size, scale):
    """Raise ``TypeError``/``ValueError`` unless the arguments are valid for the attention kernels.

    ``query [..., Hq, Lq, d]``, ``key [..., Hkv, Lk, d]``, ``value [..., Hkv, Lk, dv]``; ``topk``
    a positive int or ``None``; ``chunk_size`` a positive int; ``scale`` a number or ``None``;
    ``attn_mask`` ``None``, bool or of the query dtype, broadcastable to ``[..., Hq, Lq, Lk]``.
    """
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
    optional_k(topk, "topk")
    positive_int(chunk_size, "chunk_size")
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
