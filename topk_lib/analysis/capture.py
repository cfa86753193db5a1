"""Per-layer, per-head sparsity statistics from one forward pass (Gupta et al. 2021, sections 3-4).

Top-k attention (section 3.1) and top-k feed-forward layers (section 3.2) work as drop-ins
because attention rows and feed-forward activations of pretrained models are concentrated.
This module measures how concentrated, on real activations, for every layer and head::

    df = capture_attention_stats(model, ids, ks=(1, 4, 16, 64))      # tidy DataFrame
    mlp = capture_mlp_stats(model, ids)                               # MLPStats: .frame, .counts

Attention
---------
The model runs once with exact attention: a function registered as ``"topk_lab_capture"``
in transformers' ``AttentionInterface`` (with ``sdpa_mask`` in ``AttentionMaskInterface``;
without the mask function the causal/padding mask silently disappears) returns exactly what
``attn_implementation="sdpa"`` returns, so every layer sees vanilla activations. Beside
that, it recomputes the layer's scores ``chunk_size`` query rows at a time (the kernels'
``_chunk_scores``: scaled, masked, grouped-query heads read their KV head without repeating
K/V, causal rows skip future keys), turns each chunk into probabilities, reduces them to
per-row numbers and drops the chunk. Memory is O(chunk_size x Lk) per layer plus
O(Lq x stats) per-row numbers, never the Lq x Lk matrix of a layer, let alone all layers.

Per query row (one query of one head), with ``p`` its attention distribution, ``S_k`` its k
largest entries and ``M_k = sum(p[S_k])``:

* ``mass_kept`` (per k): ``M_k``, as :func:`topk_lib.analysis.metrics.mass_kept`;
* ``kl`` (per k): ``KL(p_k || p) = -log M_k`` in nats, as :func:`topk_lib.analysis.metrics.kl_to_topk`;
* ``entropy``: nats, :func:`topk_lib.analysis.metrics.entropy`;
* ``k90``/``k99`` (one per ``fracs`` entry, named ``k{100 f:g}``): the smallest k with
  ``M_k >= f``, as :func:`topk_lib.analysis.metrics.k_for_mass`;
* ``sink_mass``: the mass on the first key of the sequence (the first non-padding key when
  an ``attention_mask`` is given), as :func:`topk_lib.analysis.metrics.sink_mass`;
* the head's output ``o = p V`` and the top-k output ``o_k = p[S_k] V[S_k] / M_k`` (what
  top-k attention computes), from the same chunk of scores.

Mass and k-for-mass come from one sort per row rather than from the ``metrics`` functions
themselves (which would sort or ``topk`` each chunk three times; numpy's SIMD sort is also
~25x faster than ``torch.sort`` on CPU); the tests check every number against ``metrics``
applied to the full eager attention matrices. ``o_k`` keeps every key whose probability is
>= the k-th largest, so an exact tie at the k-th value keeps all tied keys (ties of positive
probabilities do not occur in practice; the kernel would keep an arbitrary one). For
k <= 64 it gathers the kept keys' values; for larger k it multiplies the masked chunk by V,
one dense product per k, which is most of the run time.

Cost, SmolLM2-135M (30 layers, 9/3 heads), 4096 tokens, default ks (1 ... 4096) and
chunk_size=512, float32: on the project's 2-core CPU (shared, load ~4) 293 s wall, 239 s
CPU, peak RSS 2.09 GiB (1.16 GiB after loading the model and one plain forward); on one
H200 1.6 s and 2.2 GiB of CUDA memory (random weights of the same shape). Time grows with
L^2 x len(ks above 64); memory with chunk_size x L.

Aggregation, per (layer, head, bucket) over the query rows in the bucket: **mean** over rows
for every per-row number (``mass_kept``, ``kl``, ``entropy``, ``sink_mass``, ``k90_mean`` ...),
plus the **median** for k-for-mass (``k90_median``; numpy convention, the mean of the two
middle values for an even count). The relative output error is given two ways:
``rel_error = sqrt(sum_rows ||o_k - o||^2 / sum_rows ||o||^2)``, the ratio of norms over the
bucket's rows (the head's error, robust to rows with small ``||o||``), and
``rel_error_row_mean``, the mean over rows of ``||o_k - o|| / ||o||``. ``n_rows`` is the
number of rows aggregated. Rows excluded: padding queries (``attention_mask == 0``) and
queries that may attend to no key.

Buckets are ranges of query position (counted in non-padding tokens from 0): by default
log2-spaced, ``"0"``, ``"1"``, ``"2-3"``, ``"4-7"``, ..., plus ``"all"``; the last bucket of an
explicit edge list is open (``"512+"``). :func:`bucket_bounds` turns a label into numbers.

Feed-forward
------------
A forward pre-hook on the MLP's output projection sees the hidden activation ``h`` (Llama:
``act(gate) * up``, the input of ``down_proj``; BERT: the output of ``intermediate``, the
input of ``output.dense``; T5: the input of ``wo``). Per token: the k needed for each
``frac`` of ``sum |h|`` (:func:`topk_lib.analysis.metrics.k_for_abs_mass`) and the |activation| mass
kept by the top k; per neuron and k: on how many tokens it is among the k largest ``|h|``
(zero activations never count as selected). :class:`NeuronUsage` sums these counts over a
corpus of inputs; ``neuron_usage`` is the fraction of neurons selected at least once.

The result is a tidy DataFrame with columns ``layer, head, bucket, k, metric, value``
(``head`` and ``k`` are pandas nullable ``Int64``: ``<NA>`` where the metric has no head,
e.g. MLPs, or does not depend on k). Layers are numbered as :func:`describe_layers` does.

Not covered: encoder-decoder models as a whole (pass ``model.get_encoder()``), KV caches
(inputs run with ``use_cache=False``), soft-capping and attention sinks. Inside a
:func:`record_attention_stats` context every attention layer runs exact SDPA, also layers
that an enclosing ``use_topk`` switched to top-k.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import re
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from topk_lib.kernels.chunking import causal_end as _causal_end, chunk_scores as _chunk_scores, grouped_mask as _grouped_mask
from topk_lib.analysis.metrics import entropy
from topk_lib.hf.patching import _configs, describe_layers, register_attention

__all__ = [
    "capture_attention_stats",
    "record_attention_stats",
    "AttentionRecorder",
    "capture_mlp_stats",
    "record_mlp_stats",
    "MLPRecorder",
    "MLPStats",
    "NeuronUsage",
    "bucket_bounds",
    "COLUMNS",
    "DEFAULT_KS",
    "DEFAULT_FRACS",
    "CAPTURE_IMPLEMENTATION",
]

#: Name of the capturing attention function in transformers' registries.
CAPTURE_IMPLEMENTATION = "topk_lab_capture"
#: Columns of every frame this module returns.
COLUMNS = ["layer", "head", "bucket", "k", "metric", "value"]
DEFAULT_KS = tuple(2**i for i in range(13))  # 1, 2, 4, ..., 4096
DEFAULT_FRACS = (0.9, 0.99)
ALL = "all"
_GATHER_K = 64  # o_k for k up to this gathers the top keys' values; larger k use a dense masked product

# attention module -> (recorder, layer) while a record_attention_stats context is open
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_MISSING = object()


# --------------------------------------------------------------------------- argument checks


def _check_ks(ks, arg="ks"):
    seq = list(ks) if isinstance(ks, (list, tuple)) else None
    if not seq or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in seq):
        raise ValueError(f"{arg} must be a non-empty list/tuple of ints >= 1, e.g. (1, 4, 16, 64); got {ks!r}")
    return tuple(sorted({int(k) for k in seq}))


def _check_fracs(fracs):
    seq = list(fracs) if isinstance(fracs, (list, tuple)) else None
    if not seq or any(isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f <= 1 for f in seq):
        raise ValueError(f"fracs must be a non-empty list/tuple of floats in (0, 1], e.g. (0.9, 0.99); got {fracs!r}")
    out = tuple(dict.fromkeys(float(f) for f in seq))
    names = [_frac_name(f) for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"fracs {fracs!r} give clashing metric names {names}; use fracs that differ in percent")
    return out


def _frac_name(f):
    return f"k{100 * f:g}"  # 0.9 -> "k90", 0.99 -> "k99", 0.999 -> "k99.9"


def _positive_int(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


def _bucket_edges(position_buckets):
    """``"log2"`` -> 0, 1, 2, 4, ...; a sequence -> its ints; None -> no buckets (only "all")."""
    if position_buckets is None:
        return None
    if isinstance(position_buckets, str):
        if position_buckets != "log2":
            raise ValueError(f'position_buckets must be "log2", None or a list of edges, got {position_buckets!r}')
        return (0,) + tuple(2**i for i in range(40))
    seq = list(position_buckets) if isinstance(position_buckets, (list, tuple)) else None
    if (
        not seq
        or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) for e in seq)
        or seq[0] != 0
        or any(b <= a for a, b in zip(seq, seq[1:]))
    ):
        raise ValueError(
            "position_buckets must be \"log2\", None, or strictly increasing int edges starting at 0 "
            f"(e.g. [0, 64, 256]: buckets 0-63, 64-255, 256+); got {position_buckets!r}"
        )
    return tuple(int(e) for e in seq)


def _bucket_labels(edges):
    labels = []
    for i, lo in enumerate(edges):
        if i + 1 == len(edges):
            labels.append(f"{lo}+")
        else:
            hi = edges[i + 1] - 1
            labels.append(f"{lo}" if hi == lo else f"{lo}-{hi}")
    return labels


def bucket_bounds(label):
    """``(first, last)`` query position of a bucket label, inclusive; ``"all"`` and ``"512+"`` end at inf."""
    if label == ALL:
        return 0, math.inf
    m = re.fullmatch(r"(\d+)(?:-(\d+)|(\+))?", str(label))
    if m is None:
        raise ValueError(f'label must be "all", "N", "N-M" or "N+" as in the bucket column, got {label!r}')
    lo = int(m.group(1))
    return lo, (int(m.group(2)) if m.group(2) else math.inf if m.group(3) else lo)


def _check_inputs(model, input_ids, attention_mask):
    """``input_ids`` / ``attention_mask`` as ``[B, L]`` tensors on the model's device."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer torch.Tensor [B, L] or [L], got {input_ids!r:.80}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)  # [1, L]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, L] or [L] with L >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask must be a torch.Tensor [B, L] of 0/1 or None, got {type(attention_mask).__name__}"
            )
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    device = next(model.parameters()).device
    return input_ids.to(device), None if attention_mask is None else attention_mask.to(device)


def _run_model(model, input_ids, attention_mask, model_kwargs, *, last_logit_only):
    """One forward without a KV cache (and, when asked, without the full [B, L, vocab] logits)."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if last_logit_only and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # a 4k-token SmolLM2 input would otherwise make 800 MB of logits
    kwargs.update(model_kwargs)
    with torch.inference_mode():
        return model(**kwargs)


# --------------------------------------------------------------------------- sorted rows


class _Scratch:
    """Reusable chunk-sized buffers. On CPU a fresh 100 MB tensor per operation costs more in
    page faults than the arithmetic on it, so the per-chunk work writes into these."""

    def __init__(self):
        self._bufs = {}

    def get(self, name, shape, dtype, device):
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            with torch.inference_mode(False):  # a normal tensor: reusable inside and outside inference mode
                buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def clear(self):
        self._bufs.clear()


def _sorted_cumsum(x, kidx, scratch):
    """Rows sorted in descending order: their running sum ``[..., n]`` and the values at ``kidx`` ``[..., len(kidx)]``.

    The running sum lives in ``scratch`` (valid until the next call).
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        # numpy's SIMD sort is ~25x faster than torch.sort on CPU; the ranks are not needed.
        srt = scratch.get("sort", x.shape, x.dtype, x.device)
        srt.copy_(x)
        asc = srt.numpy()
        asc.sort(axis=-1)  # in place
        desc = asc[..., ::-1]  # a reversed view, no copy
        cum = scratch.get("cum", x.shape, x.dtype, x.device)
        np.cumsum(desc, axis=-1, out=cum.numpy())
        return cum, torch.from_numpy(np.ascontiguousarray(desc[..., kidx]))
    desc = torch.sort(x, dim=-1, descending=True).values  # [..., n]
    return torch.cumsum(desc, dim=-1), desc[..., kidx]


def _keep_above(p, thr, scratch):
    """``p`` where ``p >= thr`` (thr ``[..., 1]``, one per row), else 0: ``[..., n]`` in ``scratch``."""
    kept = scratch.get("kept", p.shape, p.dtype, p.device)
    if p.device.type == "cpu":
        # numpy into preallocated buffers: ~5x less time than torch.where with fresh outputs
        flag = scratch.get("flag", p.shape, torch.bool, p.device)
        a = p.numpy()
        np.greater_equal(a, thr.numpy(), out=flag.numpy())
        np.multiply(a, flag.numpy(), out=kept.numpy())
        return kept
    return torch.where(p >= thr, p, p.new_zeros(()), out=kept)


def _softmax_(scores):
    """Softmax over the last dim, in place; rows of all ``-inf`` give zeros (as ``metrics.probs_from_scores``)."""
    m = scores.amax(-1, keepdim=True)  # [..., 1]
    m.masked_fill_(torch.isneginf(m), 0.0)
    p = scores.sub_(m).exp_()  # in place: the chunk is the largest buffer of the run
    z = p.sum(-1, keepdim=True)  # [..., 1]
    return p.div_(z.masked_fill_(z == 0, 1.0))


def _k_for_frac(cum, fracs):
    """Smallest k with ``cum[k-1] >= frac * total`` (the rule of ``metrics.k_for_mass``): ``[..., n_f]``."""
    total = cum[..., -1:]  # [..., 1]
    target = total * torch.tensor(fracs, dtype=cum.dtype, device=cum.device)  # [..., n_f]
    k = torch.searchsorted(cum, target.contiguous(), side="left") + 1  # [..., n_f]
    return k.clamp(max=cum.shape[-1]).masked_fill(total == 0, 0)


# --------------------------------------------------------------------------- attention


def _capture_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None, **kwargs
):
    """The registered function: exact SDPA output, plus statistics for the recorder watching ``module``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        position_bias=position_bias,
        **kwargs,
    )
    entry = _ACTIVE.get(module)
    if entry is not None:
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise ValueError("capture: attention soft-capping and attention sinks are not supported")
        recorder, layer = entry
        with torch.no_grad():
            recorder._record(layer, module, query, key, value, attention_mask, scaling, is_causal, position_bias)
    return out


def _compact_mask(mask):
    """Shrink broadcast (stride-0) dims of an expanded mask to size 1, so no copy is made."""
    if mask is None:
        return None
    for dim in range(mask.dim()):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


class _Runner:
    """``run()`` for the recorders: one forward with its padding mask made visible to the hooks."""

    model: nn.Module
    _rows = None  # attention_mask [B, L] of the forward in progress, or None
    _bar = None  # tqdm bar advanced once per layer, or None

    def run(self, input_ids, *, attention_mask=None, **model_kwargs):
        """Run the model on ``input_ids [B, L]`` (no KV cache), return its output; padding (mask 0) is not counted."""
        return self._run(input_ids, attention_mask, model_kwargs, last_logit_only=False)

    def _run(self, input_ids, attention_mask, model_kwargs, *, last_logit_only):
        input_ids, attention_mask = _check_inputs(self.model, input_ids, attention_mask)
        if self._bar is not None:
            self._bar.reset()  # the bar counts the layers of one forward
        self._rows = attention_mask
        try:
            return _run_model(self.model, input_ids, attention_mask, model_kwargs, last_logit_only=last_logit_only)
        finally:
            self._rows = None


class AttentionRecorder(_Runner):
    """Accumulates attention statistics over every forward run inside :func:`record_attention_stats`.

    Use :meth:`run` for each input (it passes the padding mask on, so padding rows are
    excluded); a plain ``model(...)`` call inside the context is recorded too, with every
    query row counted. :meth:`frame` returns the tidy DataFrame over all forwards so far.
    """

    def __init__(self, model, *, ks, fracs, edges, chunk_size, n_layers):
        self.model = model
        self.ks, self.fracs, self.edges, self.chunk_size = ks, fracs, edges, chunk_size
        self.labels = _bucket_labels(edges) if edges is not None else [ALL]
        self.n_layers = n_layers
        nk, nf = len(ks), len(fracs)
        # Per-row stats layout: mass, kl, err^2, row rel. error (nk each), ||o||^2, entropy, sink, k-for-frac (nf).
        self._mass, self._kl, self._err2, self._rel = (slice(i * nk, (i + 1) * nk) for i in range(4))
        self._onorm2, self._ent, self._sink = 4 * nk, 4 * nk + 1, 4 * nk + 2
        self._kf = slice(4 * nk + 3, 4 * nk + 3 + nf)
        self._width = 4 * nk + 3 + nf
        self._sums, self._counts, self._kvals = {}, {}, {}  # layer -> [n_b, Hq, S], [n_b, Hq], list
        self._scratch = _Scratch()  # released when the context exits
        self._bar = None

    # ----------------------------------------------------------------- running

    def _query_rows(self, b, lq, lk, device):
        """Valid query rows ``[B, Lq]``, their positions ``[B, Lq]`` and each sequence's first key ``[B]``."""
        mask = self._rows
        if mask is None:
            pos = torch.arange(lk - lq, lk, device=device).clamp(min=0).expand(b, lq)  # a query sits at Lk - Lq + i
            valid = torch.ones(b, lq, dtype=torch.bool, device=device)
            return valid, pos, torch.zeros(b, dtype=torch.long, device=device)
        if mask.shape != (b, lq) or lq != lk:
            raise RuntimeError(
                f"capture: an attention layer saw {b} x {lq} queries over {lk} keys but attention_mask has shape "
                f"{tuple(mask.shape)}; record one forward per run() call, without a KV cache"
            )
        valid = mask.bool()  # [B, L]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # position among the non-padding tokens
        first = valid.long().argmax(-1)  # first non-padding key (0 for an all-padding row)
        return valid, pos, first

    def _record(self, layer, module, query, key, value, attention_mask, scaling, is_causal, position_bias):
        b, hq, lq, d = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        # Same rules as transformers' SDPA integration: None means causal during prefill for decoders.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and lq > 1 and attention_mask is None
        if causal and lk > lq:  # prefill into an empty static cache: unused slots
            key, value = key[:, :, :lq], value[:, :, :lq]  # [B, Hkv, Lq, d]
            position_bias = position_bias[..., :lq] if position_bias is not None else None
            lk = lq
        work = torch.float64 if query.dtype == torch.float64 else torch.float32  # statistics in float32 at least
        query, key, value = query.to(work), key.to(work), value.to(work)
        mask = _compact_mask(attention_mask)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(work)
        if position_bias is not None:  # T5: the relative position bias is part of the scores
            bias = position_bias.to(work)  # [1|B, H, Lq, Lk]
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, bias, -math.inf)  # [B|1, H, Lq, Lk]
            else:
                mask = bias + mask
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        valid, pos, first = self._query_rows(b, lq, lk, query.device)

        g = hq // hkv
        q5 = query.unflatten(1, (hkv, g))  # [B, Hkv, G, Lq, d]
        mask5 = _grouped_mask(mask, query, hkv)
        rows = query.new_full((b, hkv, g, lq, self._width), math.nan)  # [B, Hkv, G, Lq, S]
        for r0 in range(0, lq, self.chunk_size):
            r1 = min(r0 + self.chunk_size, lq)
            kend = _causal_end(causal, lq, lk, r1)
            if kend == 0:
                continue
            scores = _chunk_scores(q5, key, mask5, r0, r1, kend, lq, lk, causal, scale)  # [B, Hkv, G, c, kend]
            p = _softmax_(scores)  # [B, Hkv, G, c, kend], in the scores' buffer
            rows[..., r0:r1, :] = self._row_stats(p, value, first.clamp(max=kend - 1))
            del p
        self._reduce(layer, rows.flatten(1, 2), valid, pos)  # [B, Hq, Lq, S]
        if self._bar is not None:
            self._bar.update(1)

    def _row_stats(self, p, value, first):
        """Per-row statistics ``[B, Hkv, G, c, S]`` of one chunk ``p [B, Hkv, G, c, n]``; ``value [B, Hkv, Lk, dv]``."""
        b, hkv, g, c, n = p.shape
        ks, scratch = self.ks, self._scratch
        out = p.new_empty(b, hkv, g, c, self._width)  # [B, Hkv, G, c, S]
        kidx = [min(k, n) - 1 for k in ks]
        cum, thr = _sorted_cumsum(p, kidx, scratch)  # [B, Hkv, G, c, n], [B, Hkv, G, c, nk]
        total = cum[..., -1:].clone()  # [B, Hkv, G, c, 1], 0 for a row that attends nothing
        mass = (cum[..., kidx] / total).clamp(max=1.0)  # [.., c, nk]; NaN for empty rows
        out[..., self._mass] = mass
        out[..., self._kl] = -torch.log(mass) + 0.0  # KL(p_k || p) = -log M_k; + 0.0 turns -0.0 into 0.0
        out[..., self._kf] = _k_for_frac(cum, self.fracs).to(p.dtype)  # [.., c, nf]
        out[..., self._ent] = entropy(p)  # [.., c]
        sink = p.gather(-1, first.view(b, 1, 1, 1, 1).expand(b, hkv, g, c, 1))  # [.., c, 1]
        out[..., self._sink] = (sink / total).clamp(max=1.0).squeeze(-1)

        v = value[:, :, :n]  # [B, Hkv, n, dv]
        o = torch.matmul(p.flatten(2, 3), v).view(b, hkv, g, c, -1)  # [B, Hkv, G, c, dv]; rows of p sum to 1
        onorm2 = o.square().sum(-1)  # [B, Hkv, G, c]
        out[..., self._onorm2] = onorm2
        err2 = out[..., self._err2]  # [B, Hkv, G, c, nk], a view to write into
        err2[..., [i for i, k in enumerate(ks) if k >= n]] = 0.0  # every key kept: o_k = o
        # o_k keeps the keys with p >= the k-th largest p (thr). Small k: gather the values of the
        # top keys, O(c k dv); a dense masked product costs a full pass over the chunk per k.
        small = [i for i, k in enumerate(ks) if k < n and k <= _GATHER_K]
        if small:
            kg, dv = ks[small[-1]], value.shape[-1]
            vals, idx = torch.topk(p, kg, dim=-1, sorted=False)  # [B, Hkv, G, c, kg]
            base = torch.arange(b * hkv, device=p.device).view(b, hkv, 1, 1, 1) * value.shape[2]
            picked = scratch.get("picked", (idx.numel(), dv), value.dtype, p.device)  # [B*Hkv*G*c*kg, dv]
            torch.index_select(value.reshape(-1, dv), 0, (idx + base).reshape(-1), out=picked)
            within = vals.unsqueeze(-2) >= thr[..., small].unsqueeze(-1)  # [B, Hkv, G, c, ns, kg]
            w = vals.unsqueeze(-2) * within  # [B, Hkv, G, c, ns, kg]
            num = torch.matmul(w, picked.view(b, hkv, g, c, kg, dv))  # [B, Hkv, G, c, ns, dv]
            o_k = num / w.sum(-1, keepdim=True)  # [B, Hkv, G, c, ns, dv]
            err2[..., small] = (o_k - o.unsqueeze(-2)).square().sum(-1)
        for i, k in enumerate(ks):
            if k >= n or i in small:
                continue
            kept = _keep_above(p, thr[..., i : i + 1], scratch)  # [B, Hkv, G, c, n]
            # (no ones column on V for the row sums: a 65-wide product is ~40 % slower than 64)
            num = torch.matmul(kept.flatten(2, 3), v).view(b, hkv, g, c, -1)  # [B, Hkv, G, c, dv]
            o_k = num / kept.sum(-1, keepdim=True)  # [B, Hkv, G, c, dv]
            err2[..., i] = (o_k - o).square().sum(-1)
        out[..., self._rel] = (err2 / onorm2.unsqueeze(-1)).sqrt()
        return out

    def _bucket_ids(self, pos):
        if self.edges is None:
            return torch.zeros_like(pos)
        edges = torch.tensor(self.edges, device=pos.device)
        return torch.searchsorted(edges, pos.contiguous(), right=True) - 1  # [B, Lq]

    def _reduce(self, layer, rows, valid, pos):
        """Fold one layer's per-row stats ``[B, Hq, Lq, S]`` into per-bucket sums; keep k-for-frac for medians."""
        valid = valid.unsqueeze(1) & ~torch.isnan(rows[..., self._mass.start])  # [B, Hq, Lq]
        ids = self._bucket_ids(pos)  # [B, Lq]
        onehot = torch.nn.functional.one_hot(ids, len(self.labels)).double()  # [B, Lq, n_b]
        x = torch.where(valid.unsqueeze(-1), rows, 0.0).double()  # [B, Hq, Lq, S]
        sums = torch.einsum("bqj,bhqs->jhs", onehot, x)  # [n_b, Hq, S]
        counts = torch.einsum("bqj,bhq->jh", onehot, valid.double())  # [n_b, Hq]
        # Accumulators are numpy arrays: tensors made under inference_mode cannot be updated outside it.
        sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
        if layer in self._sums:
            if self._sums[layer].shape != sums.shape:
                raise RuntimeError(f"capture: layer {layer} changed its number of heads between forwards")
            self._sums[layer] += sums
            self._counts[layer] += counts
        else:
            self._sums[layer], self._counts[layer] = sums, counts
        kf = torch.where(valid.unsqueeze(-1), rows[..., self._kf], math.nan)  # [B, Hq, Lq, nf]
        kf = kf.permute(1, 0, 2, 3).flatten(1, 2).float().cpu().numpy()  # [Hq, B*Lq, nf]
        self._kvals.setdefault(layer, []).append((ids.flatten().cpu().numpy(), kf))

    # ----------------------------------------------------------------- results

    def frame(self):
        """The tidy DataFrame (``COLUMNS``) over every forward recorded so far."""
        if not self._sums:
            raise RuntimeError("capture: nothing was recorded; run the model inside the context (recorder.run(ids))")
        out = _FrameBuilder()
        for layer in sorted(self._sums):
            sums, counts = self._sums[layer], self._counts[layer]  # [n_b, Hq, S], [n_b, Hq]
            ids = np.concatenate([i for i, _ in self._kvals[layer]])  # [N]
            kv = np.concatenate([v for _, v in self._kvals[layer]], axis=1)  # [Hq, N, nf]
            groups = [(ALL, sums.sum(0), counts.sum(0), kv)]
            if self.edges is not None:
                groups += [(lab, sums[j], counts[j], kv[:, ids == j]) for j, lab in enumerate(self.labels)]
            for label, s, n, kvals in groups:
                if n.sum() == 0:
                    continue
                self._emit(out, layer, label, s, n, kvals)
        return out.frame()

    def _emit(self, out, layer, label, s, n, kvals):
        """Rows of one (layer, bucket): ``s [Hq, S]`` sums, ``n [Hq]`` counts, ``kvals [Hq, N, nf]``."""
        heads = np.arange(s.shape[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n[:, None]  # [Hq, S]; NaN for a head with no rows
            rel = np.sqrt(s[:, self._err2] / s[:, self._onorm2 : self._onorm2 + 1])  # [Hq, nk], ratio of norms
        with warnings.catch_warnings():  # an all-NaN head gives NaN, as it should
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(kvals, axis=1)  # [Hq, nf]
        add = lambda metric, values, k=None: out.add(layer, heads, label, k, metric, values)  # noqa: E731
        for i, k in enumerate(self.ks):
            add("mass_kept", mean[:, self._mass.start + i], k)
            add("kl", mean[:, self._kl.start + i], k)
            add("rel_error", rel[:, i], k)
            add("rel_error_row_mean", mean[:, self._rel.start + i], k)
        add("entropy", mean[:, self._ent])
        add("sink_mass", mean[:, self._sink])
        for i, f in enumerate(self.fracs):
            add(f"{_frac_name(f)}_mean", mean[:, self._kf.start + i])
            add(f"{_frac_name(f)}_median", median[:, i])
        add("n_rows", n)


class _FrameBuilder:
    """Collects column blocks and builds the tidy frame once."""

    def __init__(self):
        self.cols = {c: [] for c in COLUMNS}

    def add(self, layer, heads, bucket, k, metric, values):
        n = len(values)
        self.cols["layer"].append(np.full(n, layer, dtype=np.int64))
        self.cols["head"].append(np.full(n, -1, dtype=np.int64) if heads is None else np.asarray(heads, dtype=np.int64))
        self.cols["bucket"].append(np.full(n, bucket, dtype=object))
        self.cols["k"].append(np.full(n, -1 if k is None else k, dtype=np.int64))
        self.cols["metric"].append(np.full(n, metric, dtype=object))
        self.cols["value"].append(np.asarray(values, dtype=np.float64))

    def frame(self):
        data = {c: np.concatenate(v) if v else np.empty(0) for c, v in self.cols.items()}
        for c in ("head", "k"):  # -1 marks "no head" / "does not depend on k": <NA>
            ints = data[c].astype(np.int64)
            data[c] = pd.arrays.IntegerArray(np.where(ints < 0, 0, ints), ints < 0)
        data["layer"] = data["layer"].astype(np.int64)
        data["value"] = data["value"].astype(np.float64)
        return pd.DataFrame(data, columns=COLUMNS)


@contextlib.contextmanager
def record_attention_stats(
    model, *, ks=DEFAULT_KS, fracs=DEFAULT_FRACS, position_buckets="log2", chunk_size=512, progress=False
):
    """Record attention statistics of every forward inside the ``with`` block; yields an :class:`AttentionRecorder`.

    The model computes exact attention (PyTorch SDPA) throughout. Its configs are switched
    to ``"topk_lab_capture"`` and restored on exit, also when the block raises. ``progress``
    shows a bar that advances once per attention layer. See the module docstring for
    ``ks``, ``fracs`` and ``position_buckets``; ``chunk_size`` query rows are scored at once.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    ks, fracs = _check_ks(ks), _check_fracs(fracs)
    edges = _bucket_edges(position_buckets)
    chunk_size = _positive_int(chunk_size, "chunk_size")
    modules = []
    for info in describe_layers(model):
        if len(info.attention) > 1:
            raise ValueError(
                f"model: layer {info.layer} ({info.block}) has several attention modules {info.attention}; "
                "encoder-decoder models are not supported, capture the encoder (model.get_encoder()) instead"
            )
        modules += [(info.layer, model.get_submodule(name)) for name in info.attention]
    if not modules:
        raise ValueError(
            f"model: {type(model).__name__} has no attention modules that dispatch through the transformers "
            "attention registry (ALL_ATTENTION_FUNCTIONS), so nothing can be captured"
        )
    recorder = AttentionRecorder(model, ks=ks, fracs=fracs, edges=edges, chunk_size=chunk_size, n_layers=len(modules))
    register_attention(CAPTURE_IMPLEMENTATION, _capture_forward)
    configs = _configs(model)
    saved_configs = [(c, c.__dict__.get("_attn_implementation_internal", _MISSING)) for c in configs]
    saved_active = [(m, _ACTIVE.get(m, _MISSING)) for _, m in modules]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = recorder._bar = tqdm(desc="attention stats", unit="layer", total=len(modules))
    try:
        for config in configs:
            object.__setattr__(config, "_attn_implementation_internal", CAPTURE_IMPLEMENTATION)
        for layer, module in modules:
            _ACTIVE[module] = (recorder, layer)
        yield recorder
    finally:
        for module, old in reversed(saved_active):
            if old is _MISSING:
                _ACTIVE.pop(module, None)
            else:
                _ACTIVE[module] = old
        for config, old in reversed(saved_configs):
            if old is _MISSING:
                config.__dict__.pop("_attn_implementation_internal", None)
            else:
                object.__setattr__(config, "_attn_implementation_internal", old)
        if bar is not None:
            bar.close()
        recorder._bar = None
        recorder._scratch.clear()


def capture_attention_stats(
    model,
    input_ids,
    *,
    ks=DEFAULT_KS,
    fracs=DEFAULT_FRACS,
    position_buckets="log2",
    chunk_size=512,
    attention_mask=None,
    progress=True,
):
    """Attention statistics per (layer, head, position bucket) from one forward pass: a tidy DataFrame.

    ``input_ids`` ``[B, L]`` or ``[L]``; ``attention_mask`` ``[B, L]`` of 0/1 (padding rows are
    excluded, positions count non-padding tokens). Columns ``layer, head, bucket, k, metric,
    value``; metrics ``mass_kept, kl, rel_error, rel_error_row_mean`` (per k), ``entropy,
    sink_mass, k90_mean, k90_median, k99_mean, k99_median, n_rows`` (k is ``<NA>``). See the
    module docstring for definitions and aggregation. ``chunk_size`` bounds memory:
    O(chunk_size x L) scores at a time.
    """
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask)
    with record_attention_stats(
        model, ks=ks, fracs=fracs, position_buckets=position_buckets, chunk_size=chunk_size, progress=progress
    ) as rec:
        rec._run(input_ids, attention_mask, {}, last_logit_only=True)
    return rec.frame()


# --------------------------------------------------------------------------- feed-forward


def _down_projection(module):
    """The linear layer whose input is the MLP's hidden activation."""
    for path in ("down_proj", "wo", "output.dense"):
        try:
            sub = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(sub, nn.Linear):
            return sub
    raise ValueError(
        f"model: cannot find the output projection (down_proj / wo / output.dense) of {type(module).__name__}"
    )


@dataclass
class MLPStats:
    """What :func:`capture_mlp_stats` returns.

    ``frame``: tidy DataFrame (``COLUMNS``; ``head`` is ``<NA>``, ``bucket`` is ``"all"``) with
    ``k90_mean, k90_median, k99_mean, k99_median`` (k for that share of ``sum |h|``, over
    tokens), ``mass_kept`` and ``neuron_usage`` per k, and ``n_tokens``.
    ``counts``: ``{layer: numpy int64 [len(ks), d_ff]}``, on how many tokens each neuron was among
    the k largest ``|h|``. ``tokens``: non-padding tokens seen. ``ks``: the ks of ``counts``' rows.
    """

    frame: pd.DataFrame
    counts: dict
    tokens: int
    ks: tuple


class NeuronUsage:
    """Sums neuron-selection counts over a corpus: ``usage.update(capture_mlp_stats(model, ids))`` per input.

    :meth:`fraction` gives, per layer and k, the share of neurons that were among the k
    largest ``|h|`` for at least one token of any input seen.
    """

    def __init__(self):
        self.counts = {}  # layer -> numpy int64 [len(ks), d_ff]
        self.tokens = 0
        self.ks = None

    def update(self, stats):
        if not isinstance(stats, MLPStats):
            raise TypeError(f"stats must be the MLPStats that capture_mlp_stats returns, got {type(stats).__name__}")
        if self.ks is not None and stats.ks != self.ks:
            raise ValueError(f"stats were captured with ks={stats.ks} but this NeuronUsage holds ks={self.ks}")
        for layer, c in stats.counts.items():
            if layer in self.counts and self.counts[layer].shape != c.shape:
                raise ValueError(
                    f"stats: layer {layer} has {tuple(c.shape)} counts, expected {tuple(self.counts[layer].shape)}"
                )
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c.copy()
        self.ks = stats.ks
        self.tokens += stats.tokens
        return self

    def fraction(self):
        """Tidy DataFrame: ``metric == "neuron_usage"``, one row per (layer, k)."""
        out = _FrameBuilder()
        for layer in sorted(self.counts):
            used = (self.counts[layer] > 0).mean(-1)  # [len(ks)]
            for i, k in enumerate(self.ks or ()):
                out.add(layer, None, ALL, k, "neuron_usage", used[i : i + 1])
        return out.frame()


class MLPRecorder(_Runner):
    """Accumulates feed-forward statistics over every forward inside :func:`record_mlp_stats`."""

    def __init__(self, model, *, ks, fracs, layers):
        self.model, self.ks, self.fracs = model, ks, fracs
        self.layers = layers  # [(layer, down projection)]
        self._counts, self._sums, self._tokens, self._seen, self._kvals = {}, {}, {}, {}, {}
        self._bar = None

    def _record(self, layer, h):
        """``h [B, L, d_ff]``: the input of the output projection."""
        d_ff = h.shape[-1]
        a = h.detach().abs().reshape(-1, d_ff)  # [B*L, d_ff]
        if self._rows is not None:
            if self._rows.numel() != a.shape[0]:
                raise RuntimeError(
                    f"capture: layer {layer}'s MLP saw {a.shape[0]} tokens but attention_mask has {self._rows.numel()}"
                )
            a = a[self._rows.reshape(-1).bool()]  # [N, d_ff], padding tokens dropped
        a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
        ks = self.ks
        kidx = [min(k, d_ff) - 1 for k in ks]
        cum, thr = _sorted_cumsum(a, kidx, _Scratch())  # [N, d_ff], [N, nk]
        total = cum[:, -1:]  # [N, 1]
        live = total.squeeze(-1) > 0  # an all-zero token has no top k
        mass = (cum[:, kidx] / total).clamp(max=1.0)  # [N, nk]
        kf = _k_for_frac(cum, self.fracs).to(a.dtype)  # [N, nf]
        del cum
        # a zero activation is never "selected": a >= max(thr, smallest positive float) <=> a >= thr and a > 0
        thr = thr.clamp(min=torch.nextafter(torch.zeros((), dtype=a.dtype), torch.ones((), dtype=a.dtype)).item())
        counts = torch.stack([(a >= thr[:, i : i + 1]).sum(0) for i in range(len(ks))])  # [nk, d_ff]
        # numpy accumulators: tensors made under inference_mode cannot be updated outside it
        counts = counts.cpu().numpy().astype(np.int64)
        sums = torch.cat([mass[live].sum(0), kf[live].sum(0)]).double().cpu().numpy()  # [nk + nf]
        if layer in self._counts:
            self._counts[layer] += counts
            self._sums[layer] += sums
        else:
            self._counts[layer], self._sums[layer] = counts, sums
        self._tokens[layer] = self._tokens.get(layer, 0) + int(live.sum())
        self._seen[layer] = self._seen.get(layer, 0) + a.shape[0]
        self._kvals.setdefault(layer, []).append(kf[live].float().cpu().numpy())
        if self._bar is not None:
            self._bar.update(1)

    def stats(self):
        """:class:`MLPStats` over every forward recorded so far."""
        missing = [layer for layer, _ in self.layers if layer not in self._counts]
        if missing:
            raise RuntimeError(
                f"capture: the MLPs of layers {missing} never ran their output projection; run the model inside "
                "the context (recorder.run(ids)), and not inside use_topk(ff_k=...), whose top-k feed-forward "
                "bypasses that projection"
            )
        nk = len(self.ks)
        out = _FrameBuilder()
        for layer, _ in self.layers:
            n = self._tokens[layer]
            kv = np.concatenate(self._kvals[layer])  # [N, nf]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = self._sums[layer] / n  # [nk + nf]; NaN when no token had a nonzero activation
            median = np.median(kv, axis=0) if n else np.full(len(self.fracs), np.nan)  # [nf]
            used = (self._counts[layer] > 0).mean(-1)  # [nk]
            add = lambda metric, value, k=None: out.add(layer, None, ALL, k, metric, [value])  # noqa: E731
            for i, f in enumerate(self.fracs):
                add(f"{_frac_name(f)}_mean", mean[nk + i])
                add(f"{_frac_name(f)}_median", median[i])
            for i, k in enumerate(self.ks):
                add("mass_kept", mean[i], k)
                add("neuron_usage", used[i], k)
            add("n_tokens", float(n))
        return MLPStats(
            frame=out.frame(),
            counts={layer: c.copy() for layer, c in self._counts.items()},
            tokens=min(self._seen.values()),
            ks=self.ks,
        )


@contextlib.contextmanager
def record_mlp_stats(model, *, ks=DEFAULT_KS, fracs=DEFAULT_FRACS, progress=False):
    """Record feed-forward statistics of every forward inside the ``with`` block; yields an :class:`MLPRecorder`.

    Forward pre-hooks on each MLP's output projection read its input; they are removed on exit.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    ks, fracs = _check_ks(ks), _check_fracs(fracs)
    layers = [
        (info.layer, _down_projection(model.get_submodule(info.mlp))) for info in describe_layers(model) if info.mlp
    ]
    if not layers:
        raise ValueError(f"model: found no supported feed-forward modules in {type(model).__name__}")
    recorder = MLPRecorder(model, ks=ks, fracs=fracs, layers=layers)
    handles = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = recorder._bar = tqdm(desc="MLP stats", unit="layer", total=len(layers))
    try:
        for layer, down in layers:
            hook = lambda mod, args, layer=layer: recorder._record(layer, args[0])  # noqa: E731
            handles.append(down.register_forward_pre_hook(hook))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
        recorder._bar = None


def capture_mlp_stats(model, input_ids, *, ks=DEFAULT_KS, fracs=DEFAULT_FRACS, attention_mask=None, progress=True):
    """Feed-forward sparsity per layer from one forward pass: an :class:`MLPStats`.

    Per token, the k needed for each ``frac`` of ``sum |h|`` of the MLP's hidden activation
    (mean and median over non-padding tokens) and the mass the top k keep; per k, the share of
    neurons selected for at least one token (``counts`` keeps the per-neuron tallies; sum them
    over a corpus with :class:`NeuronUsage`).
    """
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask)
    with record_mlp_stats(model, ks=ks, fracs=fracs, progress=progress) as rec:
        rec._run(input_ids, attention_mask, {}, last_logit_only=True)
    return rec.stats()
