"""Top-k against other ways of spending a budget of k keys per query (Gupta et al. 2021, section 4).

Given one layer's queries, keys and values (real activations, recorded by
:func:`record_qkv`), each method keeps ``budget`` keys per query and
runs exact softmax attention over those only:

* ``"topk"``: the k highest-scoring keys (the oracle among selections);
* ``"window"``: the k most recent keys (a sliding window);
* ``"random"``: k keys drawn uniformly from those the query may attend;
* ``"sink_window"``: the first ``n_sink`` tokens plus the ``k - n_sink`` most recent
  (StreamingLLM's attention sinks);
* ``"performer"``: not a selection: FAVOR+ random features (``performer-pytorch``) with
  ``budget`` features, linear in length.

All methods are causal (queries sit at the last Lq of Lk positions, as in
:func:`topk_lib.topk_attention`) and use the scale ``1/sqrt(d)``. The window and sink + window
run as the selectors of :mod:`topk_lib.selectors` do (:class:`~topk_lib.selectors.static.SinkWindow`
through the top-k kernel); the random keys here are drawn with ``torch.rand`` from ``seed``.
"""

from __future__ import annotations

import inspect

import torch

from topk_lib.kernels.attention import chunked_attention, topk_attention
from topk_lib.hf.layers import describe_layers
from topk_lib.hf.registry import exact_attention, intercept
from topk_lib.kernels.baselines import performer_attention
from topk_lib.selectors.base import sparse_attention
from topk_lib.selectors.static import SinkWindow

METHODS = ("topk", "window", "random", "sink_window", "performer")

#: Registered in transformers' attention registry while :func:`record_qkv` runs.
QKV_IMPLEMENTATION = "topk_lab_qkv"


def _keep_inputs(sink):
    """An attention handler: exact SDPA, keeping a copy of the call's ``(q, k, v)`` in ``sink``."""

    # Takes the arguments of transformers' sdpa_attention_forward (see topk_lib.hf.registry).
    def handler(module, query, key, value, attention_mask, **kwargs):
        sink.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return exact_attention(module, query, key, value, attention_mask, **kwargs)

    return handler


@torch.no_grad()
def record_qkv(model, input_ids, *, layers) -> dict:
    """Queries, keys and values (after rotary embeddings, K/V not repeated) of ``layers``.

    Runs the model once with exact attention; returns ``{layer: (q [B, Hq, L, d],
    k [B, Hkv, L, d], v [B, Hkv, L, dv])}``. The model is restored on exit.
    """
    infos = {info.layer: info for info in describe_layers(model) if info.attention}
    missing = [layer for layer in layers if layer not in infos]
    if missing:
        raise ValueError(f"layers: {missing} have no attention module; the model has layers {sorted(infos)}")
    sinks = {layer: [] for layer in layers}
    handlers = {model.get_submodule(infos[layer].attention[0]): _keep_inputs(sinks[layer]) for layer in layers}
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with intercept(model, name=QKV_IMPLEMENTATION, attention=handlers):
        model(input_ids, **no_cache)
    return {layer: sinks[layer][0] for layer in layers}


def allowed_keys(lq: int, lk: int, *, causal: bool = True, window: int | None = None, device=None) -> torch.Tensor:
    """Bool ``[Lq, Lk]``: which keys each query may attend, queries at the last ``Lq`` of ``Lk`` positions.

    ``causal``: key j <= query i; ``window`` (with ``causal``): also ``i - j < window``, the
    sliding window of transformers' local layers (a query sees itself and the ``window - 1``
    keys before it).
    """
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        gap = torch.arange(lk - lq, lk, device=device)[:, None] - torch.arange(lk, device=device)[None, :]  # i - j
        allowed = gap >= 0
        if window is not None:
            allowed &= gap < window
    return allowed


def attention_probs(query, key, *, causal: bool = True, window: int | None = None):
    """Exact attention probabilities ``[..., Hq, Lq, Lk]`` (for short inputs: drill-down plots).

    ``window``: a sliding-window layer's width (see :func:`allowed_keys`).
    """
    rep = query.shape[-3] // key.shape[-3]
    key = key.repeat_interleave(rep, -3)  # [..., Hq, Lk, d]
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5  # [..., Hq, Lq, Lk]
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(~allowed_keys(lq, lk, window=window, device=scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def selection_mask(lq: int, lk: int, *, method: str, budget: int, n_sink: int = 4, generator=None, device=None):
    """Bool mask ``[Lq, Lk]`` (True = kept) with at most ``budget`` causal keys per query."""
    if method not in ("window", "random", "sink_window"):
        raise ValueError(f"method must be 'window', 'random' or 'sink_window' for a mask, got {method!r}")
    if budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget}")
    pos = torch.arange(lk - lq, lk, device=device)[:, None]  # absolute query positions [Lq, 1]
    key = torch.arange(lk, device=device)[None, :]  # [1, Lk]
    causal = key <= pos
    if method == "window":
        return causal & (key > pos - budget)
    if method == "sink_window":
        sinks = min(n_sink, budget)
        return causal & ((key < sinks) | (key > pos - (budget - sinks)))
    # random: rank causal keys by uniform noise and keep the `budget` best of each row
    noise = torch.rand(lq, lk, generator=generator, device=device).masked_fill_(~causal, -1.0)  # [Lq, Lk]
    kept = noise.topk(min(budget, lk), dim=-1).indices
    return torch.zeros(lq, lk, dtype=torch.bool, device=device).scatter_(-1, kept, True) & causal


def approximate(query, key, value, *, method: str, budget: int, n_sink: int = 4, seed: int = 0, chunk_size: int = 1024):
    """Output ``[..., Hq, Lq, dv]`` of causal attention under one approximation method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "topk":
        return topk_attention(query, key, value, topk=budget, is_causal=True, chunk_size=chunk_size)
    if method == "performer":
        return performer_attention(query, key, value, n_features=budget, seed=seed)
    if method in ("window", "sink_window"):
        selector = SinkWindow(n_sink=0 if method == "window" else n_sink)
        return sparse_attention(query, key, value, selector=selector, budget=budget, is_causal=True,
                                chunk_size=chunk_size)
    generator = torch.Generator(device=query.device).manual_seed(seed)
    mask = selection_mask(
        query.shape[-2], key.shape[-2], method=method, budget=budget, n_sink=n_sink, generator=generator, device=query.device
    )
    return chunked_attention(query, key, value, attn_mask=mask, chunk_size=chunk_size)


def head_errors(query, key, value, *, methods=METHODS, budgets=(16, 64), n_sink: int = 4, seed: int = 0):
    """Relative output error ‖o_m − o‖/‖o‖ per head (norms over all queries) for each method and budget.

    Returns rows ``{"method", "budget", "head", "relative_error"}`` for one layer's
    ``[1, Hq, L, d]`` activations.
    """
    exact = chunked_attention(query, key, value, is_causal=True)  # [1, Hq, L, dv]
    norm = exact.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(exact.dtype).tiny)  # [1, Hq]
    rows = []
    for budget in budgets:
        for method in methods:
            out = approximate(query, key, value, method=method, budget=budget, n_sink=n_sink, seed=seed)
            err = ((out - exact).flatten(-2).norm(dim=-1) / norm)[0]  # [Hq]
            rows += [
                {"method": method, "budget": budget, "head": h, "relative_error": e}
                for h, e in enumerate(err.tolist())
            ]
    return rows


def approximation_errors(records: dict, *, methods=METHODS, budgets=(16, 64), n_sink: int = 4, seed: int = 0):
    """:func:`head_errors` of every recorded layer as one frame.

    ``records`` is :func:`record_qkv`'s ``{layer: (q, k, v)}``; returns a DataFrame with columns
    ``layer, method, budget, head, relative_error``, layers in the order of ``records``.
    """
    import pandas as pd

    return pd.DataFrame([
        {"layer": layer, **row}
        for layer, (q, k, v) in records.items()
        for row in head_errors(q, k, v, methods=methods, budgets=budgets, n_sink=n_sink, seed=seed)
    ])
