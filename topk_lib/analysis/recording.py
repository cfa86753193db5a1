"""What the attention and MLP statistics captures share: arguments, one forward per run, sorted rows, the frame.

Both captures (:mod:`topk_lib.analysis.capture`, :mod:`topk_lib.analysis.mlp`) reduce
rows of non-negative numbers (attention probabilities, ``|h|`` of a feed-forward layer)
by sorting each row once: its running sum gives the mass kept by the top k and the k
needed for a share of the mass. Both return a tidy frame with columns ``layer, head,
bucket, k, metric, value`` (``head`` and ``k`` are pandas nullable ``Int64``: ``<NA>``
where the metric has no head, e.g. MLPs, or does not depend on k).

Dimensions: ``B`` batch, ``L`` tokens, ``n`` entries per row, ``nk`` = ``len(ks)``,
``nf`` = ``len(fracs)``.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from topk_lib._validate import fraction_sequence, int_sequence

__all__ = [
    "COLUMNS",
    "DEFAULT_KS",
    "DEFAULT_FRACS",
    "ALL",
    "check_ks",
    "check_fracs",
    "frac_name",
    "check_inputs",
    "Runner",
    "Scratch",
    "sorted_cumsum",
    "k_for_frac",
    "FrameBuilder",
]

#: Columns of every frame the captures return.
COLUMNS = ["layer", "head", "bucket", "k", "metric", "value"]
DEFAULT_KS = tuple(2**i for i in range(13))  # 1, 2, 4, ..., 4096
DEFAULT_FRACS = (0.9, 0.99)
#: The bucket label of statistics over every row.
ALL = "all"


# --------------------------------------------------------------------------- arguments


def check_ks(ks, arg="ks"):
    """``ks`` as sorted distinct ints >= 1."""
    return tuple(sorted(set(int_sequence(ks, arg))))


def check_fracs(fracs):
    """``fracs`` in (0, 1], duplicates dropped, in the order given; each must give its own metric name."""
    out = tuple(dict.fromkeys(fraction_sequence(fracs, "fracs")))
    names = [frac_name(f) for f in out]
    if len(set(names)) != len(names):
        raise ValueError(f"fracs {fracs!r} give clashing metric names {names}; use fracs that differ in percent")
    return out


def frac_name(f):
    """The metric name of a share of the mass: 0.9 -> "k90", 0.99 -> "k99", 0.999 -> "k99.9"."""
    return f"k{100 * f:g}"


# --------------------------------------------------------------------------- inputs and runs


def check_inputs(model, input_ids, attention_mask):
    """``input_ids`` / ``attention_mask`` as ``[B, L]`` tensors on the model's device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
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


class Runner:
    """Base of the recorders: ``run()`` makes one forward with its padding mask visible to the recording code."""

    model: nn.Module
    rows = None  # attention_mask [B, L] of the forward in progress, or None
    bar = None  # tqdm bar advanced once per layer, or None

    def run(self, input_ids, *, attention_mask=None, **model_kwargs):
        """Run the model on ``input_ids [B, L]`` (no KV cache), return its output; padding (mask 0) is not counted."""
        return self.forward_once(input_ids, attention_mask, model_kwargs, last_logit_only=False)

    def forward_once(self, input_ids, attention_mask, model_kwargs, *, last_logit_only):
        """:meth:`run`, optionally without the full ``[B, L, vocab]`` logits."""
        input_ids, attention_mask = check_inputs(self.model, input_ids, attention_mask)
        if self.bar is not None:
            self.bar.reset()  # the bar counts the layers of one forward
        self.rows = attention_mask
        try:
            return _run_model(self.model, input_ids, attention_mask, model_kwargs, last_logit_only=last_logit_only)
        finally:
            self.rows = None

    def show_progress(self, desc, total):
        """A bar that the recording code advances once per layer."""
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit="layer", total=total)

    def close_progress(self):
        if self.bar is not None:
            self.bar.close()
        self.bar = None


# --------------------------------------------------------------------------- sorted rows


class Scratch:
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


def sorted_cumsum(x, k_index, scratch):
    """Rows sorted in descending order: their running sum ``[..., n]`` and the values at ``k_index``
    ``[..., len(k_index)]``.

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
        return cum, torch.from_numpy(np.ascontiguousarray(desc[..., k_index]))
    desc = torch.sort(x, dim=-1, descending=True).values  # [..., n]
    return torch.cumsum(desc, dim=-1), desc[..., k_index]


def k_for_frac(cum, fracs):
    """Smallest k with ``cum[k-1] >= frac * total`` (the rule of ``metrics.k_for_mass``): ``[..., n_f]``."""
    total = cum[..., -1:]  # [..., 1]
    target = total * torch.tensor(fracs, dtype=cum.dtype, device=cum.device)  # [..., n_f]
    k = torch.searchsorted(cum, target.contiguous(), side="left") + 1  # [..., n_f]
    return k.clamp(max=cum.shape[-1]).masked_fill(total == 0, 0)


# --------------------------------------------------------------------------- the frame


class FrameBuilder:
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

