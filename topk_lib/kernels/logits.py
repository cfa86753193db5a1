"""Soft-capping and attention sinks: what some models do to the attention logits before the softmax.

Soft-capping (Gemma-2, ``attn_logit_softcapping``): the scaled scores ``s`` become
``c * tanh(s / c)`` before the mask is added, so each lies in ``(-c, c)``. The forward cap is
applied where the scores are formed (:func:`topk_lib.kernels.chunking.chunk_scores`); the
backward multiplies the score gradient by the cap's derivative ``1 - tanh^2``
(:func:`cap_with_derivative`).

Attention sinks (GPT-OSS ``s_aux``, DeepSeek-V4, MiMo-V2): one extra logit per row with no
value. It joins the softmax denominator of its row, so it only takes probability mass away::

    p_j = exp(s_j) / (exp(sink) + sum_i exp(s_i))      (i, j over the allowed/kept keys)

The row log-sum-exp the kernels save includes the sink, so the backward recovers ``p_j`` as
before, and the sink's own gradient is ``-p_sink * sum_j p_j dp_j`` per row
(:func:`sink_grad`), summed to the sinks' shape. A row with no allowed key puts all its
mass on the sink: its output is zero, and so are its gradients.

Dimensions
----------
``B``   batch dims (written ``...``); ``Hq`` query heads; ``Hkv`` key/value heads; ``G = Hq // Hkv``
``Lq``  queries; ``c`` queries in one chunk
"""

from __future__ import annotations

import torch

__all__ = ["as_sink_rows", "rows", "row_shift", "add_sink", "empty_lse", "cap_with_derivative", "sink_grad"]


def as_sink_rows(sinks):
    """``sinks`` as a tensor that broadcasts to ``[..., Hq, Lq, 1]``: ``[Hq]`` (or ``[1]``) becomes ``[Hq, 1, 1]``."""
    if sinks is None or sinks.dim() != 1:
        return sinks
    return sinks.view(-1, 1, 1)


def rows(t, r0, r1):
    """Rows ``r0:r1`` of ``t [..., Lq|1, X]`` (``None`` stays ``None``; a broadcast row dim is kept)."""
    if t is None:
        return None
    return t[..., r0:r1, :] if t.shape[-2] != 1 else t


def row_shift(work, sink):
    """The shift of each row's softmax ``[..., c, 1]``: its max, the sink included; 0 for rows all -inf.

    ``work [..., c, n]`` are the scores, ``sink`` the rows' sink logits (``[..., c|1, 1]``) or None.
    """
    row_max = work.amax(-1, keepdim=True)
    if sink is not None:
        row_max = torch.maximum(row_max, sink.to(row_max.dtype))
    return torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)


def add_sink(denom, sink, shift):
    """The softmax denominator ``[..., c, 1]`` with the sink's ``exp(sink - shift)`` added (as is without one)."""
    return denom if sink is None else denom + torch.exp(sink.to(shift.dtype) - shift)


def empty_lse(q_grouped, sinks_grouped, dtype):
    """The row log-sum-exp ``[..., Hkv, G, Lq, 1]`` of rows that see no key: -inf, or the row's sink."""
    lse = q_grouped.new_full((*q_grouped.shape[:-1], 1), float("-inf"), dtype=dtype)
    return lse if sinks_grouped is None else lse.copy_(sinks_grouped.expand_as(lse))


def cap_with_derivative(scores, softcap):
    """``(c * tanh(s / c), 1 - tanh(s / c)^2)`` of raw scaled scores; ``(scores, None)`` without a cap.

    Two new tensors of the shape of ``scores``; ``scores`` itself is not changed.
    """
    if softcap is None:
        return scores, None
    t = scores.div(softcap).tanh_()
    capped = t * softcap
    return capped, t.square_().neg_().add_(1.0)


def sink_grad(sinks, sinks_grouped, lse, delta):
    """The gradient of ``sinks`` (its shape and dtype): ``-p_sink * delta`` per row, summed over broadcast dims.

    ``sinks_grouped [..., Hkv|1, G|1, Lq|1, 1]`` is ``sinks`` viewed as the grouped queries,
    ``lse [..., Hkv, G, Lq, 1]`` the rows' log-sum-exp (sink included), ``delta`` each row's
    ``sum_j p_j dp_j``. Rows whose log-sum-exp is -inf (no key and a -inf sink) have no sink mass.
    """
    p_sink = torch.exp(sinks_grouped.to(lse.dtype) - lse)
    p_sink = p_sink.masked_fill(lse == float("-inf"), 0.0)  # [..., Hkv, G, Lq, 1]
    grad = -(p_sink * delta.to(lse.dtype)).flatten(-4, -3)  # [..., Hq, Lq, 1]
    return grad.sum_to_size(sinks.shape).to(sinks.dtype)
