"""Top-k feed-forward layers (Gupta et al. 2021, section 3.2).

A feed-forward layer read as a key-value memory, ``FF(x) = f(x W_in^T) W_out^T``,
keeps per token only the ``topk`` largest hidden activations. Gated layers
(SwiGLU, GeGLU) compute ``h = f(x W_gate^T) * (x W_in^T)`` and select on ``h``.

``select="value"`` keeps the largest activations (the natural choice for ReLU);
``select="magnitude"`` keeps the largest ``|h|`` (GELU, SiLU and gated layers, whose
activations can be large and negative).

Tokens are processed ``chunk_size`` at a time. The backward pass saves the input,
the top-k indices (int32) and the kept pre-activations (tokens x k), not the dense
``[tokens, d_ff]`` hidden layer; per chunk it scatters the kept gradient into a dense
``[chunk, d_ff]`` buffer so the weight gradients are plain matrix products.

Dimensions
----------
``T``     tokens (all leading dims of ``x`` flattened); ``C`` tokens in one chunk (``c`` for the last)
``d``     input features; ``d_out`` output features (``d`` in a residual block)
``d_ff``  hidden units; ``k`` hidden units kept per token (``topk``, at most ``d_ff``)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from topk_lib._validate import optional_k, positive_int
from topk_lib.kernels.checks import first_order_only

__all__ = ["topk_feedforward", "ACTIVATIONS"]

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _check(x, w_in, w_out, w_gate, b_in, b_out, topk, activation, select, chunk_size):
    for name, t in (("x", x), ("w_in", w_in), ("w_out", w_out)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(
            f"w_in must be [d_ff, d] and w_out [d, d_ff] (nn.Linear weights), got "
            f"{tuple(w_in.shape)} and {tuple(w_out.shape)}"
        )
    d_ff, d = w_in.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has feature size {x.shape[-1]} but w_in expects {d} (w_in is [d_ff, d])")
    if w_out.shape[1] != d_ff:
        raise ValueError(f"w_out must be [d_out, d_ff={d_ff}], got {tuple(w_out.shape)}")
    if w_gate is not None and w_gate.shape != w_in.shape:
        raise ValueError(f"w_gate must have the shape of w_in {tuple(w_in.shape)}, got {tuple(w_gate.shape)}")
    if b_in is not None and b_in.shape != (d_ff,):
        raise ValueError(f"b_in must be [d_ff={d_ff}], got {tuple(b_in.shape)}")
    if b_out is not None and b_out.shape != (w_out.shape[0],):
        raise ValueError(f"b_out must be [d_out={w_out.shape[0]}], got {tuple(b_out.shape)}")
    tensors = [t for t in (x, w_in, w_out, w_gate, b_in, b_out) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"x and the weights must share one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("x and the weights must be on one device")
    optional_k(topk, "topk")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if select not in ("value", "magnitude"):
        raise ValueError(f"select must be 'value' (ReLU) or 'magnitude' (GELU/SiLU/gated), got {select!r}")
    positive_int(chunk_size, "chunk_size")


def _rows(t):
    """``t [..., n]`` as ``[T, n]``; the row count is explicit, so ``n = 0`` or ``T = 0`` reshape too."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _hidden(xc, w_in, w_gate, b_in, act):
    """Pre-activations and the hidden layer of one token chunk, each ``[c, d_ff]``."""
    a = F.linear(xc, w_in, b_in)  # [c, d_ff]
    if w_gate is None:
        return a, None, act(a)
    gate = F.linear(xc, w_gate)  # [c, d_ff]
    return a, gate, act(gate) * a


class _TopkFeedForward(torch.autograd.Function):
    """Saves x, the weights, the kept indices (int32) and the kept pre-activations, ``[T, k]`` each."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, w_gate, b_in, b_out, topk, activation, select, chunk_size):
        act = ACTIVATIONS[activation]
        x_rows = _rows(x)  # [T, d]
        n, d_ff = x_rows.shape[0], w_in.shape[0]
        k = min(topk, d_ff)
        y = x_rows.new_empty(n, w_out.shape[0])  # [T, d_out]
        idx_all = torch.empty(n, k, dtype=torch.int32, device=x.device)  # [T, k]
        a_all = x_rows.new_empty(n, k)  # kept pre-activations of w_in  [T, k]
        g_all = x_rows.new_empty(n, k) if w_gate is not None else None  # kept gate pre-activations  [T, k]
        for t0 in range(0, n, chunk_size):
            t1 = min(t0 + chunk_size, n)
            a, gate, h = _hidden(x_rows[t0:t1], w_in, w_gate, b_in, act)  # [c, d_ff] each
            idx = (h.abs() if select == "magnitude" else h).topk(k, dim=-1, sorted=False).indices  # [c, k]
            idx_all[t0:t1] = idx
            a_all[t0:t1] = a.gather(-1, idx)
            if gate is not None:
                g_all[t0:t1] = gate.gather(-1, idx)
            del a, gate  # only h's [c, d_ff] buffer stays: the kept values are written back into it
            kept = h.gather(-1, idx)  # [c, k]
            h = h.zero_().scatter_(-1, idx, kept)  # sparse hidden layer  [c, d_ff]
            y[t0:t1] = F.linear(h, w_out, b_out)
        ctx.save_for_backward(x, w_in, w_out, w_gate, idx_all, a_all, g_all)
        ctx.activation, ctx.chunk_size, ctx.has_b_in = activation, chunk_size, b_in is not None
        return y.view(*x.shape[:-1], w_out.shape[0])

    @staticmethod
    @first_order_only("topk_feedforward")
    def backward(ctx, grad_y):
        x, w_in, w_out, w_gate, idx_all, a_all, g_all = ctx.saved_tensors
        act = ACTIVATIONS[ctx.activation]
        x_rows = _rows(x)  # [T, d]
        grad_rows = _rows(grad_y)  # [T, d_out]
        n, d_ff = x_rows.shape[0], w_in.shape[0]
        need = ctx.needs_input_grad
        dx = torch.zeros_like(x_rows) if need[0] else None  # [T, d]
        dw_in = torch.zeros_like(w_in) if need[1] else None
        dw_out = torch.zeros_like(w_out) if need[2] else None
        dw_gate = torch.zeros_like(w_gate) if need[3] else None
        db_in = x_rows.new_zeros(d_ff) if need[4] else None  # [d_ff]
        db_out = grad_rows.sum(0) if need[5] else None  # [d_out]
        for t0 in range(0, n, ctx.chunk_size):
            t1 = min(t0 + ctx.chunk_size, n)
            idx = idx_all[t0:t1].long()  # [c, k]
            a = a_all[t0:t1].detach().requires_grad_()  # [c, k]
            g = g_all[t0:t1].detach().requires_grad_() if g_all is not None else None  # [c, k]
            with torch.enable_grad():  # local autograd over [c, k] only: recomputes f and f'
                h = act(g) * a if g is not None else act(a)  # [c, k]
            grad_chunk = grad_rows[t0:t1]  # [c, d_out]
            dh = F.linear(grad_chunk, w_out.t()).gather(-1, idx)  # [c, k]
            dense = torch.zeros(t1 - t0, d_ff, dtype=x.dtype, device=x.device)  # one [c, d_ff] buffer, reused
            if dw_out is not None:
                dw_out += grad_chunk.t() @ dense.scatter_(-1, idx, h.detach())  # [d_out, d_ff]
            inputs = (a, g) if g is not None else (a,)
            grads = torch.autograd.grad(h, inputs, dh)
            da = dense.zero_().scatter_(-1, idx, grads[0])  # [c, d_ff]
            dg = torch.zeros_like(da).scatter_(-1, idx, grads[1]) if g is not None else None  # [c, d_ff]
            xc = x_rows[t0:t1]  # [c, d]
            if dx is not None:
                dx[t0:t1] = da @ w_in + (dg @ w_gate if dg is not None else 0)
            if dw_in is not None:
                dw_in += da.t() @ xc
            if dw_gate is not None:
                dw_gate += dg.t() @ xc
            if db_in is not None:
                db_in += da.sum(0)
        return (
            dx.view_as(x) if dx is not None else None,
            dw_in,
            dw_out,
            dw_gate,
            db_in,
            db_out,
            None,
            None,
            None,
            None,
        )


def topk_feedforward(
    x,
    w_in,
    w_out,
    *,
    topk,
    activation="relu",
    w_gate=None,
    select="value",
    b_in=None,
    b_out=None,
    chunk_size=4096,
):
    """Feed-forward layer keeping the ``topk`` largest hidden activations per token (section 3.2).

    Computes ``h = f(x W_in^T + b_in)`` (gated: ``h = f(x W_gate^T) * (x W_in^T + b_in)``),
    keeps per token the ``topk`` entries of ``h`` selected by ``select``, zeroes the rest, and
    returns ``h W_out^T + b_out``, ``chunk_size`` tokens at a time.

    Arguments:
        x: ``[..., d]`` floating point, any number of leading dims (``T`` tokens in all).
        w_in: ``[d_ff, d]``, an ``nn.Linear`` weight, the dtype and device of ``x``.
        w_out: ``[d_out, d_ff]``, an ``nn.Linear`` weight, the dtype and device of ``x``.
        topk: ``k``, a positive int, or ``None`` for the dense layer (also when ``topk >= d_ff``).
        activation: ``f``, one of :data:`ACTIVATIONS` (``"relu"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"silu"``).
        w_gate: ``None``, or ``[d_ff, d]`` for a gated layer (SwiGLU, GeGLU).
        select: ``"value"`` keeps the largest ``h`` (ReLU), ``"magnitude"`` the largest ``|h|``
            (GELU, SiLU, gated layers).
        b_in: ``None`` or ``[d_ff]``, the bias of ``W_in``.
        b_out: ``None`` or ``[d_out]``, the bias of ``W_out``.
        chunk_size: ``C``, tokens per chunk, a positive int; results do not depend on it.

    Returns:
        ``[..., d_out]``, the dtype of ``x``.

    Raises:
        TypeError: ``x``, ``w_in`` or ``w_out`` not a floating-point tensor; tensors of
            different dtypes; ``topk`` or ``chunk_size`` not an int (``bool`` included).
        ValueError: weights that are not ``[d_ff, d]`` / ``[d_out, d_ff]``, or a ``w_gate``,
            ``b_in``, ``b_out`` of another shape; tensors on different devices; ``topk`` or
            ``chunk_size`` < 1; an unknown ``activation`` or ``select``.

    Semantics:
        Exactly ``k`` entries are kept per token (no masks, no empty rows); ties at the k-th
        activation are broken by ``torch.topk``, which differs across devices.

    Backward:
        Saves ``x``, the weights, the kept indices (``[T, k]`` int32) and the kept
        pre-activations of ``W_in`` (and of ``W_gate``), ``[T, k]`` each; it recomputes ``f``
        on those and scatters into one ``[C, d_ff]`` buffer per chunk. The dense path
        (``topk=None`` or ``topk >= d_ff``) is plain autograd, which saves ``[T, d_ff]``.
        The top-k path's gradients are first order: differentiating them again
        (``create_graph=True``) raises a ``RuntimeError`` saying it is not supported.
    """
    _check(x, w_in, w_out, w_gate, b_in, b_out, topk, activation, select, chunk_size)
    if topk is None or topk >= w_in.shape[0]:
        act = ACTIVATIONS[activation]
        h = act(F.linear(x, w_gate)) * F.linear(x, w_in, b_in) if w_gate is not None else act(F.linear(x, w_in, b_in))
        return F.linear(h, w_out, b_out)
    return _TopkFeedForward.apply(x, w_in, w_out, w_gate, b_in, b_out, int(topk), activation, select, int(chunk_size))
