"""Layers, heads and ks that a notebook analyses, derived from the loaded model.

The notebooks take any transformers model, so none of them types in one model's layer
numbers, head numbers or feed-forward widths. Instead a notebook states a rule and this
module applies it to the model it loaded:

* layers at fractions of the depth (:func:`layer_at`) or evenly spread over it
  (:func:`spread_layers`), e.g. over the layers that attend to the whole input
  (:meth:`ModelShape.full_layers`);
* feed-forward ks as fractions of the model's d_ff (:func:`ff_ks`, :func:`lm_setups`);
* the head shown in detail: the head of a layer whose statistic is the median of that
  layer's heads (:func:`median_head`);
* the layers that attend within a sliding window, and how wide it is (:func:`ModelShape`),
  so figures can say that such a layer needs no k beyond its window.

:func:`model_tag` and :func:`model_label` name a model in figure file names and titles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from topk_lib.hf.layers import find_layers
from topk_lib.hf.loading import KNOWN_MODELS
from topk_lib.infra.outputs import model_folder

__all__ = ["ModelShape", "model_shape", "model_tag", "model_label", "layer_at", "spread_layers", "ff_ks",
           "lm_setups", "median_index", "median_head"]

_LABELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M", "minilm-l6": "MiniLM"}


def model_tag(name: str) -> str:
    """Short file-name tag: ``"smollm2"`` for ``"smollm2-135m"`` (the suite's own models), else a slug of ``name``.

    A local directory or hub id gives its output folder's name
    (:func:`topk_lib.infra.outputs.model_folder`: ``"meta-llama/Llama-3.2-1B"`` -> ``"Llama-3.2-1B"``).
    """
    name = str(name)
    return name.split("-")[0] if name in KNOWN_MODELS else model_folder(name)


def model_label(name: str) -> str:
    """Name for titles: ``"SmolLM2-135M"`` for the suite's models, the tag otherwise."""
    return _LABELS.get(str(name), model_tag(name))


@dataclass(frozen=True)
class ModelShape:
    """The language model's layer count, query heads, d_ff and sliding windows."""

    n_layers: int
    heads: int  # query heads (the most of any layer)
    d_ff: int | None  # widest feed-forward module; None when the model has none ff_k switches
    windows: dict = field(default_factory=dict)  # layer -> sliding window (tokens), for windowed layers only

    def full_layers(self, length: int, *, first: int = 1) -> list[int]:
        """Layers from ``first`` on whose queries see every earlier key of a ``length``-token input
        (no sliding window shorter than it)."""
        return [layer for layer in range(first, self.n_layers) if self.windows.get(layer, length) >= length]

    def window_note(self, length: int) -> str:
        """A sentence for figure titles when some layers attend within a window shorter than ``length``."""
        short = sorted(layer for layer, window in self.windows.items() if window < length)
        if not short:
            return ""
        widths = sorted({self.windows[layer] for layer in short})
        return (f"{len(short)} of {self.n_layers} layers attend within a {'/'.join(map(str, widths))}-token window "
                f"(no top-k beyond it)")


def _window(module) -> int | None:
    window = getattr(module, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def model_shape(model) -> ModelShape:
    """:class:`ModelShape` of ``model``'s language model (a vision tower is left out)."""
    found = find_layers(model)
    layers = [info for info in found.layers if info.tower is None]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention or feed-forward layers use_topk can switch")
    windows = {}
    for layer, _, module in found.attention:
        if (window := _window(module)) is not None:
            windows[layer] = window
    widths = [info.d_ff for info in layers if info.d_ff]
    return ModelShape(n_layers=len(layers), heads=max(info.heads or 0 for info in layers),
                      d_ff=max(widths) if widths else None, windows=windows)


def _fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must hold fractions between 0 and 1, got {value!r}")
    return float(value)


def layer_at(n_layers: int, depth: float) -> int:
    """The layer at ``depth`` (0: the first, 1: the last), rounded to the nearest."""
    return round(_fraction(depth, "depth") * (n_layers - 1))


def spread_layers(layers, count: int) -> list[int]:
    """``count`` of ``layers`` (a layer count, or a list of candidate layers) evenly spaced from the
    first to the last (rounded; duplicates dropped; all of them when there are fewer).

    An int ``n`` means layers ``1 .. n-1``: layer 0 is skipped, its attention mostly mixes the
    token embeddings.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    candidates = list(range(1, layers)) or [0] if isinstance(layers, int) else sorted(layers)
    if not candidates:
        raise ValueError("no candidate layers to choose from")
    if count == 1:
        return [candidates[-1]]
    step = (len(candidates) - 1) / (count - 1)
    return sorted({candidates[round(i * step)] for i in range(count)})


def ff_ks(fractions, d_ff: int) -> list[int]:
    """Feed-forward ks at ``fractions`` of ``d_ff`` (rounded, at least 1)."""
    if not d_ff:
        raise ValueError("the model has no feed-forward module ff_k switches (d_ff is None): leave the FF ks empty")
    return [max(1, round(_fraction(f, "the feed-forward fractions") * d_ff)) for f in fractions]


def lm_setups(setups: dict, d_ff: int) -> dict:
    """Notebook 03's language-modelling setups with feed-forward fractions turned into ks of ``d_ff``.

    ``setups`` maps a window length to ``{"windows": n, "attn": [k...], "ff": [fraction...],
    "both": [[attn_k, fraction]...]}``.
    """
    out = {}
    for window, setup in setups.items():
        setup = dict(setup)
        setup["ff"] = ff_ks(setup.get("ff", []), d_ff)
        setup["both"] = [[attn, ff_ks([frac], d_ff)[0]] for attn, frac in setup.get("both", [])]
        out[window] = setup
    return out


def median_index(values) -> int:
    """Position of the median of ``values`` (the lower middle one for an even count; ties: the first)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median_index needs at least one value")
    ordered = sorted(range(len(values)), key=lambda i: values[i])  # sorted() is stable: ties keep their order
    return ordered[(len(ordered) - 1) // 2]


def median_head(stats: pd.DataFrame, layer: int, metric: str = "k99_median") -> int:
    """The head of ``layer`` whose ``metric`` (bucket ``"all"``) is the median of that layer's heads.

    With an even number of heads, the lower of the two middle ones; ties go to the lower head
    number. ``stats`` is a frame of :func:`topk_lib.analysis.capture.capture_attention_stats`.
    """
    rows = stats[(stats.bucket == "all") & (stats.metric == metric) & (stats.layer == layer)]
    per_head = rows.groupby("head").value.first()  # sorted by head number
    if per_head.empty:
        raise ValueError(f"no {metric!r} statistics for layer {layer}: pick a layer the statistics cover")
    return int(per_head.index[median_index(per_head.tolist())])
