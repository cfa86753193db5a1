"""What one benchmark point runs: the inputs and the call of each kind, built inside the point's process.

Kinds: ``attention`` (one causal layer ``[B, H, L, d]``: vanilla, SDPA, Performer, chunked, top-k),
``ff`` (one ReLU feed-forward layer over ``L`` tokens: dense, token-chunked, top-k), ``model12``
(the causal pre-LN transformer of :mod:`topk_lib.nn`, forward+backward with parameter gradients),
``product`` (one chunk's sparse weights times V, and ``torch.topk`` against Q.K^T) and
``calibrate`` (known allocations and sleeps that check the harness itself). A pass is ``fwd``
under ``torch.no_grad``, or ``fwd+bwd``: forward, then ``backward`` with a fixed random output
gradient.

Baselines, honestly: SDPA is PyTorch's fused exact attention (on CPU a flash-style kernel, linear
memory). Performer is ``performer_pytorch.FastAttention(causal=True, nb_features=256)``; without
the ``fast_transformers`` CUDA extension it falls back to the package's reference causal code,
whose autograd keeps an [L, m, d] context per head (O(L*m*d) memory, 128 sequential chunks); the
rows measure that implementation, not linear attention at its best.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.baselines import PRODUCT_METHODS, chunked_dense_feedforward, sparse_weights_times_v
from topk_lib.kernels.feedforward import topk_feedforward
from topk_lib.nn import Transformer, TransformerConfig

__all__ = ["KINDS", "build", "model_config"]


def _runner(op, grad_out, leaves):
    """One call of the pass: ``fwd`` under no_grad, or forward then backward with ``grad_out``."""
    if grad_out is None:

        def run():
            with torch.no_grad():
                out = op()
            del out

    else:

        def run():
            out = op()
            out.backward(grad_out)
            del out
            for t in leaves:
                t.grad = None  # gradients count in this call's peak, then go

    return run


def _build_attention(spec, device, dtype):
    b, h, n, d = spec["B"], spec["H"], spec["L"], spec["d"]
    grad = spec["pass"] == "fwd+bwd"
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    go = torch.randn(b, h, n, d, device=device, dtype=dtype) if grad else None  # [B, H, L, d]
    method, c, kk = spec["method"], spec.get("C"), spec.get("k")
    if method == "vanilla":
        op = lambda: vanilla_attention(q, k, v, is_causal=True)  # noqa: E731
    elif method == "sdpa":
        op = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif method == "chunked":
        op = lambda: chunked_attention(q, k, v, chunk_size=c, is_causal=True)  # noqa: E731
    elif method == "topk":
        op = lambda: topk_attention(q, k, v, topk=kk, chunk_size=c, is_causal=True)  # noqa: E731
    elif method == "performer":
        import io

        from performer_pytorch import FastAttention

        with contextlib.redirect_stdout(io.StringIO()):  # it prints that the CUDA causal kernel is missing
            fast = FastAttention(dim_heads=d, nb_features=spec.get("nb_features", 256), causal=True)
        fast = fast.to(device=device, dtype=dtype)
        op = lambda: fast(q, k, v)  # noqa: E731
    else:
        raise ValueError(f"unknown attention method {method!r}")
    return _runner(op, go, [q, k, v])


def _build_ff(spec, device, dtype):

    n, d, d_ff = spec["L"], spec["d"], spec["d_ff"]  # L = number of tokens
    grad = spec["pass"] == "fwd+bwd"
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=grad)  # [T, d]
    w_in = (torch.randn(d_ff, d, device=device, dtype=dtype) * d**-0.5).requires_grad_(grad)
    w_out = (torch.randn(d, d_ff, device=device, dtype=dtype) * d_ff**-0.5).requires_grad_(grad)
    go = torch.randn(n, d, device=device, dtype=dtype) if grad else None
    method, c = spec["method"], spec.get("C")
    if method == "dense":
        op = lambda: topk_feedforward(x, w_in, w_out, topk=None)  # noqa: E731
    elif method == "chunked":
        op = lambda: chunked_dense_feedforward(x, w_in, w_out, chunk_size=c)  # noqa: E731
    elif method == "topk":
        op = lambda: topk_feedforward(x, w_in, w_out, topk=spec["k"], chunk_size=c)  # noqa: E731
    else:
        raise ValueError(f"unknown feed-forward method {method!r}")
    return _runner(op, go, [x, w_in, w_out])


def model_config(spec) -> TransformerConfig:
    """The ``model12`` model of a spec: a causal pre-LN stack with ReLU feed-forward layers and
    PyTorch's default initialisation; ``method`` picks the attention, ``ff_k`` the feed-forward top-k."""
    return TransformerConfig(
        n_layers=spec["n_layers"], d_model=spec["d"], n_heads=spec["H"], d_ff=spec["d_ff"], activation="relu",
        attention=spec["method"], topk=spec.get("k") or 64, ff_k=spec.get("ff_k") or None,
        chunk_size=spec.get("C") or 1024, causal=True, init_std=None,
    )


def _build_model(spec, device, dtype):
    model = Transformer(model_config(spec)).to(device=device, dtype=dtype)
    grad = spec["pass"] == "fwd+bwd"
    model.requires_grad_(grad)
    x = torch.randn(spec["B"], spec["L"], spec["d"], device=device, dtype=dtype)  # [B, L, d] embeddings
    go = torch.randn_like(x) if grad else None
    return _runner(lambda: model(x), go, list(model.parameters()))


def _build_product(spec, device, dtype):
    """One chunk of 12 heads x C queries against Lk keys (``L``), k kept per query, d=64."""

    h, c, lk, d, kk = spec["H"], spec["C"], spec["L"], spec["d"], spec["k"]
    method = spec["method"]
    kw = dict(device=device, dtype=dtype)
    if method in ("qk_matmul", "topk_sorted", "topk_unsorted"):
        q = torch.randn(h, c, d, **kw)
        key = torch.randn(h, lk, d, **kw)
        if method == "qk_matmul":
            op = lambda: torch.matmul(q, key.transpose(-1, -2))  # noqa: E731  [H, C, Lk]
        else:
            s = torch.matmul(q, key.transpose(-1, -2))  # [H, C, Lk], built before the baseline
            srt = method == "topk_sorted"
            op = lambda: s.topk(kk, dim=-1, sorted=srt)  # noqa: E731
        return _runner(op, None, [])
    v = torch.randn(h, lk, d, **kw)  # [H, Lk, d]
    idx = torch.stack([torch.rand(c, lk, device=device).topk(kk, dim=-1).indices for _ in range(h)])  # [H, C, k]
    p = torch.softmax(torch.randn(h, c, kk, **kw), -1)  # [H, C, k] kept probabilities
    if method not in PRODUCT_METHODS:
        raise ValueError(f"unknown product method {method!r}")
    return _runner(lambda: sparse_weights_times_v(p, idx, v, method=method), None, [])


def _build_calibrate(spec, device, dtype):
    """Known workloads for checking the harness: allocate ``alloc_bytes`` or sleep ``sleep_s``."""
    method = spec["method"]
    if method == "alloc":
        n = int(spec["alloc_bytes"]) // torch.tensor([], dtype=dtype).element_size()
        return _runner(lambda: torch.ones(n, device=device, dtype=dtype), None, [])
    if method == "sleep":
        return _runner(lambda: time.sleep(float(spec["sleep_s"])), None, [])
    raise ValueError(f"unknown calibrate method {method!r}")


_BUILDERS = {
    "attention": _build_attention,
    "ff": _build_ff,
    "model12": _build_model,
    "product": _build_product,
    "calibrate": _build_calibrate,
}
KINDS = tuple(_BUILDERS)


def build(spec: dict, device: torch.device, dtype: torch.dtype):
    """The inputs of ``spec`` on ``device``, and a function that runs its pass once."""
    return _BUILDERS[spec["kind"]](spec, device, dtype)
