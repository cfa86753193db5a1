"""Feed-forward sparsity statistics from one forward pass (Gupta et al. 2021, section 3.2).

Top-k feed-forward layers work as drop-ins because the hidden activations of pretrained
MLPs are concentrated: a few neurons carry most of ``sum |h|``. This module measures how
concentrated, per layer, on real activations::

    stats = capture_mlp_stats(model, ids)          # MLPStats: .frame, .counts

A forward pre-hook on the MLP's output projection sees the hidden activation ``h`` (Llama:
``act(gate) * up``, the input of ``down_proj``; BERT: the output of ``intermediate``, the
input of ``output.dense``; T5: the input of ``wo``). Per token: the k needed for each
``frac`` of ``sum |h|`` (:func:`topk_lib.analysis.metrics.k_for_abs_mass`) and the |activation| mass
kept by the top k; per neuron and k: on how many tokens it is among the k largest ``|h|``
(zero activations never count as selected). :class:`NeuronUsage` sums these counts over a
corpus of inputs; ``neuron_usage`` is the fraction of neurons selected at least once.

The frame has the columns of :data:`topk_lib.analysis.recording.COLUMNS` (``head`` is
``<NA>``, ``bucket`` is ``"all"``). Layers are numbered as
:func:`topk_lib.hf.layers.describe_layers` does.

Dimensions: ``B`` batch, ``L`` tokens, ``N`` non-padding tokens, ``d_ff`` hidden width,
``nk`` = ``len(ks)``, ``nf`` = ``len(fracs)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

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
from topk_lib.hf.layers import find_layers
from topk_lib.hf.registry import intercept

__all__ = ["capture_mlp_stats", "record_mlp_stats", "MLPRecorder", "MLPStats", "NeuronUsage"]


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
        out = FrameBuilder()
        for layer in sorted(self.counts):
            used = (self.counts[layer] > 0).mean(-1)  # [len(ks)]
            for i, k in enumerate(self.ks or ()):
                out.add(layer, None, ALL, k, "neuron_usage", used[i : i + 1])
        return out.frame()


class MLPRecorder(Runner):
    """Accumulates feed-forward statistics over every forward inside :func:`record_mlp_stats`."""

    def __init__(self, model, *, ks, fracs, layers):
        self.model, self.ks, self.fracs = model, ks, fracs
        self.layers = layers  # [(layer, down projection)]
        self._counts, self._sums, self._tokens, self._seen, self._kvals = {}, {}, {}, {}, {}

    def _record(self, layer, h):
        """``h [B, L, d_ff]``: the input of the output projection."""
        d_ff = h.shape[-1]
        a = h.detach().abs().reshape(-1, d_ff)  # [B*L, d_ff]
        if self.rows is not None:
            if self.rows.numel() != a.shape[0]:
                raise RuntimeError(
                    f"capture: layer {layer}'s MLP saw {a.shape[0]} tokens but attention_mask has {self.rows.numel()}"
                )
            a = a[self.rows.reshape(-1).bool()]  # [N, d_ff], padding tokens dropped
        a = a.to(torch.float64 if a.dtype == torch.float64 else torch.float32)
        ks = self.ks
        k_index = [min(k, d_ff) - 1 for k in ks]
        cum, thr = sorted_cumsum(a, k_index, Scratch())  # [N, d_ff], [N, nk]
        total = cum[:, -1:]  # [N, 1]
        live = total.squeeze(-1) > 0  # an all-zero token has no top k
        mass = (cum[:, k_index] / total).clamp(max=1.0)  # [N, nk]
        kf = k_for_frac(cum, self.fracs).to(a.dtype)  # [N, nf]
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
        if self.bar is not None:
            self.bar.update(1)

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
        out = FrameBuilder()
        for layer, _ in self.layers:
            n = self._tokens[layer]
            kv = np.concatenate(self._kvals[layer])  # [N, nf]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = self._sums[layer] / n  # [nk + nf]; NaN when no token had a nonzero activation
            median = np.median(kv, axis=0) if n else np.full(len(self.fracs), np.nan)  # [nf]
            used = (self._counts[layer] > 0).mean(-1)  # [nk]
            add = lambda metric, value, k=None: out.add(layer, None, ALL, k, metric, [value])  # noqa: E731
            for i, f in enumerate(self.fracs):
                add(f"{frac_name(f)}_mean", mean[nk + i])
                add(f"{frac_name(f)}_median", median[i])
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
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    ks, fracs = check_ks(ks), check_fracs(fracs)
    found = find_layers(model)
    towers = {info.layer for info in found.layers if info.tower}  # a vision tower never sees a text prompt
    layers = {}  # layer -> the module whose input is h (the first such per layer; 3D experts have none)
    for layer, _, mlp, layout in found.mlps:
        if layer not in towers and isinstance(down := layout.part(mlp, layout.w_out), nn.Module):
            layers.setdefault(layer, down)
    layers = list(layers.items())
    if not layers:
        raise ValueError(f"model: found no supported feed-forward modules in {type(model).__name__}")
    recorder = MLPRecorder(model, ks=ks, fracs=fracs, layers=layers)
    # The statistics need h itself, which no attention call sees: a pre-hook on the output projection reads it.
    hooks = {down: (lambda mod, args, layer=layer: recorder._record(layer, args[0])) for layer, down in layers}
    if progress:
        recorder.show_progress("MLP stats", len(layers))
    try:
        with intercept(model, pre_hooks=hooks):
            yield recorder
    finally:
        recorder.close_progress()


def capture_mlp_stats(model, input_ids, *, ks=DEFAULT_KS, fracs=DEFAULT_FRACS, attention_mask=None, progress=True):
    """Feed-forward sparsity per layer from one forward pass: an :class:`MLPStats`.

    Per token, the k needed for each ``frac`` of ``sum |h|`` of the MLP's hidden activation
    (mean and median over non-padding tokens) and the mass the top k keep; per k, the share of
    neurons selected for at least one token (``counts`` keeps the per-neuron tallies; sum them
    over a corpus with :class:`NeuronUsage`).
    """
    input_ids, attention_mask = check_inputs(model, input_ids, attention_mask)
    with record_mlp_stats(model, ks=ks, fracs=fracs, progress=progress) as rec:
        rec.forward_once(input_ids, attention_mask, {}, last_logit_only=True)
    return rec.stats()
