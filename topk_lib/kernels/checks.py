"""Argument checks of the kernels, so every bad input fails with a message naming it.

Shapes, dtypes, devices, masks, the score scale, the soft-cap and the sinks are checked here; int arguments through
:mod:`topk_lib._validate` (wrong type -> ``TypeError``, out of range -> ``ValueError``).
:func:`first_order_only` is the kernels' refusal of what their backward cannot do:
differentiating a gradient again.

Dimensions
----------
``B``   batch dims (any number, written ``...``); ``Hq`` query heads; ``Hkv`` key/value heads
``Lq``  queries; ``Lk`` keys; ``d`` query/key head dim; ``dv`` value head dim
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from topk_lib._validate import optional_k, positive_int

__all__ = ["check_attention_inputs", "check_scale", "check_softcap", "check_sinks", "first_order_only"]


def _broadcasts_to(t, target) -> bool:
    """True when ``t`` broadcasts to exactly ``target`` (no more dims, no size other than 1 or the target's)."""
    try:
        return t.dim() <= len(target) and torch.broadcast_shapes(t.shape, target) == tuple(target)
    except RuntimeError:
        return False


def check_scale(scale):
    """Raise unless ``scale`` is ``None`` or a finite real number (``bool`` is not a number here).

    Zero (uniform weights) and negative scales are accepted, as SDPA accepts them: the softmax
    of ``scale * Q K^T`` is defined for any finite scale. NaN and infinite scales give NaN
    scores and are refused.
    """
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None (1/sqrt(d)), got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(d)), got {scale!r}")


def check_softcap(softcap):
    """Raise unless ``softcap`` is ``None`` or a positive finite number (``bool`` is not a number here)."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(
            f"softcap must be a positive float or None (no cap), got {softcap!r} ({type(softcap).__name__})"
        )
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite float or None (no cap), got {softcap!r}")


def check_sinks(sinks, query):
    """Raise unless ``sinks`` is ``None`` or a sink logit tensor for ``query [..., Hq, Lq, d]``.

    ``sinks`` has the dtype and device of ``query`` and shape ``[Hq]`` (one logit per query
    head, as GPT-OSS's ``module.sinks``), ``[1]``, or any shape that broadcasts to
    ``[..., Hq, Lq, 1]`` (per batch element or per query, as a mask would).
    """
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    if sinks.dtype != query.dtype:
        raise TypeError(f"sinks must have the query dtype {query.dtype}, got {sinks.dtype}; cast it with .to(dtype)")
    if sinks.device != query.device:
        raise ValueError(f"sinks is on {sinks.device} but query is on {query.device}")
    hq = query.shape[-3]
    if sinks.dim() == 1:
        ok = sinks.shape[0] in (1, hq)
    else:
        ok = _broadcasts_to(sinks, (*query.shape[:-1], 1))
    if not ok:
        raise ValueError(
            f"sinks of shape {tuple(sinks.shape)} fits neither [Hq] = [{hq}] (one logit per query head) nor "
            f"[..., Hq, Lq, 1] = {(*query.shape[:-1], 1)}; give it singleton dims where it is shared"
        )


class _SecondOrderRefused(torch.autograd.Function):
    """Identity on first-order gradients whose own backward raises ``message``."""

    @staticmethod
    def forward(ctx, message, *grads):
        ctx.message = message
        # copies, not views: autograd may add into a gradient in place, which a view of a leaf forbids
        return tuple(None if g is None else g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def first_order_only(what):
    """Decorate an ``autograd.Function.backward`` that is computed once, without a graph of its own.

    The backward always runs under ``no_grad``. Under ``create_graph=True`` its gradients come
    back attached to a node that raises a ``RuntimeError`` naming ``what`` when they are
    differentiated again, instead of gradients that silently lack their second-order terms
    (``once_differentiable`` returns them detached when the incoming gradient is a constant,
    and names no function otherwise).
    """
    message = (
        f"{what}: second-order gradients (differentiating a gradient taken with create_graph=True) are not "
        "supported: its backward is computed once, without a graph; use the dense PyTorch operation "
        "(scaled_dot_product_attention, nn.Linear layers) where double backward is needed"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            # a leaf that requires grad makes the refusing node part of the graph
            leaves = [None if g is None else g.detach().requires_grad_() for g in grads]
            return _SecondOrderRefused.apply(message, *leaves)

        return wrapper

    return decorate


def check_attention_inputs(query, key, value, attn_mask, topk, chunk_size, scale, softcap=None, sinks=None):
    """Raise ``TypeError``/``ValueError`` unless the arguments are valid for the attention kernels.

    ``query [..., Hq, Lq, d]``, ``key [..., Hkv, Lk, d]``, ``value [..., Hkv, Lk, dv]``; ``topk``
    a positive int or ``None``; ``chunk_size`` a positive int; ``scale`` a number or ``None``;
    ``attn_mask`` ``None``, bool or of the query dtype, broadcastable to ``[..., Hq, Lq, Lk]``;
    ``softcap`` as :func:`check_softcap`, ``sinks`` as :func:`check_sinks`.
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
    check_scale(scale)
    check_softcap(softcap)
    check_sinks(sinks, query)
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
        if not _broadcasts_to(attn_mask, target):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [..., Hq, Lq, Lk] = "
                f"{target}; give it singleton dims where it is shared"
            )
