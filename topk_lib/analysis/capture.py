"""Per-layer, per-head attention sparsity statistics from one forward pass (Gupta et al. 2021, sections 3-4).

Top-k attention (section 3.1) works as a drop-in because attention rows of pretrained
models are concentrated. This module measures how concentrated, on real activations, for
every layer and head::

    df = capture_attention_stats(model, ids, ks=(1, 4, 16, 64))      # tidy DataFrame

(:mod:`topk_lib.analysis.mlp` does the same for feed-forward layers.)

Dimensions: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``G = Hq // Hkv``
query heads per KV head, ``Lq`` queries, ``Lk`` keys, ``C`` query rows per chunk
(``chunk_size``), ``n`` keys a chunk scores (``k_end``, fewer than ``Lk`` under the causal
rule), ``d``/``dv`` head dims, ``k`` a budget from ``ks``, ``nk = len(ks)``,
``nf = len(fracs)``, ``S`` per-row statistics, ``n_b`` position buckets.

The model runs once with exact attention: inside :func:`topk_lib.hf.registry.intercept`
under the name ``"topk_lab_capture"``, each attention module's handler returns exactly
what ``attn_implementation="sdpa"`` returns, so every layer sees vanilla activations.
Beside that, it recomputes the layer's scores ``chunk_size`` query rows at a time (the
kernels' chunk scores: scaled, masked, grouped-query heads read their KV head without
repeating K/V, causal rows skip future keys), turns each chunk into probabilities, reduces
them to per-row numbers and drops the chunk. Memory is O(chunk_size x Lk) per layer plus
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

The result is a tidy DataFrame with the columns of
:data:`topk_lib.analysis.recording.COLUMNS`: ``layer, head, bucket, k, metric, value``
(``k`` is ``<NA>`` where the metric does not depend on k). Layers are numbered as
:func:`topk_lib.hf.layers.describe_layers` does.

Not covered: encoder-decoder models as a whole (pass ``model.get_encoder()``), KV caches
(inputs run with ``use_cache=False``), soft-capping and attention sinks. Inside a
:func:`record_attention_stats` context every attention layer runs exact SDPA, also layers
that an enclosing ``use_topk`` switched to top-k.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings

import numpy as np
import torch
from torch import nn

from topk_lib._validate import positive_int
from topk_lib.kernels.chunking import causal_end, chunk_scores, grouped_mask
from topk_lib.analysis.metrics import entropy
from topk_lib.analysis.recording import (
    ALL,
    DEFAULT_FRACS,
    DEFAULT_KS,
    FrameBuilder,
    Runner,
    Scratch,
    check_fracs,
    check_inputs,
    check_ks,
    frac_name,
    k_for_frac,
    sorted_cumsum,
)
from topk_lib.hf.layers import describe_layers
from topk_lib.hf.registry import exact_attention, intercept, prepare_call

__all__ = [
    "capture_attention_stats",
    "record_attention_stats",
    "AttentionRecorder",
    "bucket_bounds",
    "CAPTURE_IMPLEMENTATION",
]

#: Name of the capturing attention function in transformers' registries.
CAPTURE_IMPLEMENTATION = "topk_lab_capture"
_GATHER_K = 64  # o_k for k up to this gathers the top keys' values; larger k use a dense masked product


# --------------------------------------------------------------------------- position buckets


def _bucket_edges(position_buckets):
    """``"log2"`` -> 0, 1, 2, 4, ...; a sequence -> its ints; None -> no buckets (only "all")."""
    if position_buckets is None:
        return None
    if isinstance(position_buckets, str):
        if position_buckets != "log2":
            raise ValueError(f'position_buckets must be "log2", None or a list of edges, got {position_buckets!r}')
        return (0,) + tuple(2**i for i in range(40))
    what = (
        "position_buckets must be \"log2\", None, or strictly increasing int edges starting at 0 "
        f"(e.g. [0, 64, 256]: buckets 0-63, 64-255, 256+); got {position_buckets!r}"
    )
    edges = position_buckets
    if not isinstance(edges, (list, tuple)) or any(
        isinstance(e, bool) or not isinstance(e, numbers.Integral) for e in edges
    ):
        raise TypeError(what)
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(what)
    return tuple(int(e) for e in edges)


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


# --------------------------------------------------------------------------- chunks of probabilities


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


# --------------------------------------------------------------------------- attention


class _CaptureCall:
    """The attention handler of one module: exact SDPA output, plus statistics for the recorder."""

    def __init__(self, recorder, layer):
        self.recorder, self.layer = recorder, layer

    # The signature of transformers' sdpa_attention_forward (see topk_lib.hf.registry).
    def __call__(
        self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None,
        **kwargs,
    ):
        out = exact_attention(
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
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise ValueError("capture: attention soft-capping and attention sinks are not supported")
        with torch.no_grad():
            self.recorder._record(
                self.layer, module, query, key, value, attention_mask, scaling, is_causal, position_bias
            )
        return out


class AttentionRecorder(Runner):
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
        self._scratch = Scratch()  # released when the context exits

    # ----------------------------------------------------------------- running

    def _query_rows(self, b, lq, lk, device):
        """Valid query rows ``[B, Lq]``, their positions ``[B, Lq]`` and each sequence's first key ``[B]``."""
        mask = self.rows
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
        work = torch.float64 if query.dtype == torch.float64 else torch.float32  # statistics in float32 at least
        call = prepare_call(
            module, query, key, value, attention_mask, is_causal=is_causal, position_bias=position_bias, dtype=work
        )
        query, key, value, mask, causal = query.to(work), call.key.to(work), call.value.to(work), call.mask, call.causal
        b, hq, lq, d = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        valid, pos, first = self._query_rows(b, lq, lk, query.device)

        group = hq // hkv
        q_grouped = query.unflatten(1, (hkv, group))  # [B, Hkv, G, Lq, d]
        mask_grouped = grouped_mask(mask, query, hkv)
        rows = query.new_full((b, hkv, group, lq, self._width), math.nan)  # [B, Hkv, G, Lq, S]
        for r0 in range(0, lq, self.chunk_size):
            r1 = min(r0 + self.chunk_size, lq)
            k_end = causal_end(causal, lq, lk, r1)  # keys past k_end are in every row's future
            if k_end == 0:
                continue
            scores = chunk_scores(
                q_grouped, key, mask_grouped, r0, r1, k_end, lq, lk, causal, scale
            )  # [B, Hkv, G, C, n]
            p = _softmax_(scores)  # [B, Hkv, G, C, n], in the scores' buffer
            rows[..., r0:r1, :] = self._row_stats(p, value, first.clamp(max=k_end - 1))
            del p
        self._reduce(layer, rows.flatten(1, 2), valid, pos)  # [B, Hq, Lq, S]
        if self.bar is not None:
            self.bar.update(1)

    def _row_stats(self, p, value, first):
        """Per-row statistics ``[B, Hkv, G, C, S]`` of one chunk ``p [B, Hkv, G, C, n]``; ``value [B, Hkv, Lk, dv]``."""
        b, hkv, group, c, n = p.shape
        ks, scratch = self.ks, self._scratch
        out = p.new_empty(b, hkv, group, c, self._width)  # [B, Hkv, G, C, S]
        k_index = [min(k, n) - 1 for k in ks]
        cum, thr = sorted_cumsum(p, k_index, scratch)  # [B, Hkv, G, C, n], [B, Hkv, G, C, nk]
        total = cum[..., -1:].clone()  # [B, Hkv, G, C, 1], 0 for a row that attends nothing
        mass = (cum[..., k_index] / total).clamp(max=1.0)  # [.., C, nk]; NaN for empty rows
        out[..., self._mass] = mass
        out[..., self._kl] = -torch.log(mass) + 0.0  # KL(p_k || p) = -log M_k; + 0.0 turns -0.0 into 0.0
        out[..., self._kf] = k_for_frac(cum, self.fracs).to(p.dtype)  # [.., C, nf]
        out[..., self._ent] = entropy(p)  # [.., C]
        sink = p.gather(-1, first.view(b, 1, 1, 1, 1).expand(b, hkv, group, c, 1))  # [.., C, 1]
        out[..., self._sink] = (sink / total).clamp(max=1.0).squeeze(-1)

        v = value[:, :, :n]  # [B, Hkv, n, dv]
        o = torch.matmul(p.flatten(2, 3), v).view(b, hkv, group, c, -1)  # [B, Hkv, G, C, dv]; rows of p sum to 1
        onorm2 = o.square().sum(-1)  # [B, Hkv, G, C]
        out[..., self._onorm2] = onorm2
        err2 = out[..., self._err2]  # [B, Hkv, G, C, nk], a view to write into
        err2[..., [i for i, k in enumerate(ks) if k >= n]] = 0.0  # every key kept: o_k = o
        # o_k keeps the keys with p >= the k-th largest p (thr). Small k: gather the values of the
        # top keys, O(c k dv); a dense masked product costs a full pass over the chunk per k.
        small = [i for i, k in enumerate(ks) if k < n and k <= _GATHER_K]
        if small:
            k_gather, dv = ks[small[-1]], value.shape[-1]
            vals, idx = torch.topk(p, k_gather, dim=-1, sorted=False)  # [B, Hkv, G, C, k_gather]
            base = torch.arange(b * hkv, device=p.device).view(b, hkv, 1, 1, 1) * value.shape[2]
            picked = scratch.get("picked", (idx.numel(), dv), value.dtype, p.device)  # [B*Hkv*G*c*k_gather, dv]
            torch.index_select(value.reshape(-1, dv), 0, (idx + base).reshape(-1), out=picked)
            within = vals.unsqueeze(-2) >= thr[..., small].unsqueeze(-1)  # [B, Hkv, G, C, ns, k_gather]
            w = vals.unsqueeze(-2) * within  # [B, Hkv, G, C, ns, k_gather]
            num = torch.matmul(w, picked.view(b, hkv, group, c, k_gather, dv))  # [B, Hkv, G, C, ns, dv]
            o_k = num / w.sum(-1, keepdim=True)  # [B, Hkv, G, C, ns, dv]
            err2[..., small] = (o_k - o.unsqueeze(-2)).square().sum(-1)
        for i, k in enumerate(ks):
            if k >= n or i in small:
                continue
            kept = _keep_above(p, thr[..., i : i + 1], scratch)  # [B, Hkv, G, C, n]
            # (no ones column on V for the row sums: a 65-wide product is ~40 % slower than 64)
            num = torch.matmul(kept.flatten(2, 3), v).view(b, hkv, group, c, -1)  # [B, Hkv, G, C, dv]
            o_k = num / kept.sum(-1, keepdim=True)  # [B, Hkv, G, C, dv]
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
        out = FrameBuilder()
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
            add(f"{frac_name(f)}_mean", mean[:, self._kf.start + i])
            add(f"{frac_name(f)}_median", median[:, i])
        add("n_rows", n)


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
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    ks, fracs = check_ks(ks), check_fracs(fracs)
    edges = _bucket_edges(position_buckets)
    chunk_size = positive_int(chunk_size, "chunk_size")
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
    handlers = {module: _CaptureCall(recorder, layer) for layer, module in modules}
    if progress:
        recorder.show_progress("attention stats", len(modules))
    try:
        with intercept(model, name=CAPTURE_IMPLEMENTATION, attention=handlers):
            yield recorder
    finally:
        recorder.close_progress()
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
    input_ids, attention_mask = check_inputs(model, input_ids, attention_mask)
    with record_attention_stats(
        model, ks=ks, fracs=fracs, position_buckets=position_buckets, chunk_size=chunk_size, progress=progress
    ) as rec:
        rec.forward_once(input_ids, attention_mask, {}, last_logit_only=True)
    return rec.frame()

