"""The interactive k explorer behind notebook 06 (Gupta et al. 2021, section 3.1 and the analysis of section 4).

Top-k attention keeps, per query, the k largest scores. To *see* what that keeps, the
explorer runs one exact forward pass of a (model, text) pair, keeps every layer's
queries, keys and values, and then answers "what does top-k keep at layer l, head h,
k?" by re-thresholding only, without running the model again:

* :class:`AttentionExplorer` holds one (model, text). At construction it records Q/K/V of
  all layers in one forward (:func:`~topk_lib.analysis.approximations.record_qkv`) and reduces each
  layer's probabilities to a table of the mean top-j mass for every j = 1..L
  (``[layers, heads, L]``, a few hundred kB), so the per-layer mass-kept profile at any k
  is an index lookup. :meth:`AttentionExplorer.view` returns one head's attention map, the
  entries top-k keeps, the mass they hold and the head's output relative error
  ``‖o_k − o‖/‖o‖`` (``o_k`` from :func:`~topk_lib.kernels.attention.topk_attention`, the same
  kernel ``use_topk`` runs). One head's probabilities ``[L, L]`` are recomputed from its
  Q/K on demand (one small matmul; a layer slider move needs one head, not the layer) and
  the most recent heads are kept in an LRU cache.
* :func:`log_k_steps`: the k values of the k slider, dense where small k changes most.

Continuations (exact vs top-k generation) live in :mod:`topk_lib.app.continuations`; the
widgets of the notebook in :mod:`topk_lib.app.widgets`, over
:class:`topk_lib.app.session.ExplorerSession`, which keeps the explorers of recent (model, text)
pairs within a memory budget.

Memory, SmolLM2-135M (30 layers, 9 query / 3 KV heads, d = 64) at 512 tokens, float32:
Q/K/V of all layers take 30 × (9 + 3 + 3) × 512 × 64 × 4 B ≈ 59 MB, the mass table 0.55 MB,
one head's probabilities 1 MB (the LRU holds 4 layers' worth, 36 heads: 38 MB), instead of
283 MB for the probabilities of all layers; :attr:`AttentionExplorer.nbytes` is that sum.

Measured: ``python -m topk_lib.app.explorer --tokens 512 --repeats 7`` (SmolLM2 on the start of
Moby Dick, float32, torch 2.13 CPU, a 2-core machine shared with other jobs, load ~3; medians
over random (layer, head, k)): building the explorer 11 s with 2 threads (3.2 s with 1); a view
5 ms on a cached head, 12 ms with the head's probabilities recomputed; updating the live figure
and encoding its PNG 64 ms; a whole widget slider move (control value to the Image's new PNG,
:func:`simulate_slider_moves`) 70-75 ms for k, layer and head alike, at most 86 ms. Where the
time of a move goes (load ~6): view 12 ms, artists updated 8 ms, Agg paint over the kept
background 73 ms, PNG encode (PIL, zlib level 1, ~180 kB) 22 ms, base64 0.2 ms. The figure used
to be rebuilt and saved with ``bbox_inches="tight"`` per move: 0.1 s + 0.45 s at that load
(0.6-0.9 s + 1.7-2.1 s on a busier machine). A view runs in one torch thread: two threads
competing with other processes for two cores made it ~20x slower (99 ms against 5 ms).

Scale: attention is ``softmax(q·kᵀ / sqrt(d))`` with the causal mask where the model's
attention module is causal (decoders), none otherwise (encoders, one text without padding).
Models whose attention scale is not ``1/sqrt(d)`` (e.g. Gemma's ``query_pre_attn_scalar``)
would need the scale passed through.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from topk_lib._validate import index, int_at_least, non_empty_text, positive_int
from topk_lib.analysis.approximations import allowed_keys, attention_probs, record_qkv
from topk_lib.analysis.metrics import relative_error
from topk_lib.hf.layers import describe_layers
from topk_lib.kernels.attention import topk_attention

__all__ = [
    "AttentionExplorer",
    "HeadView",
    "kept_mask",
    "log_k_steps",
    "measure_latency",
    "simulate_slider_moves",
]


def kept_mask(probs: torch.Tensor, k: int, *, causal: bool, window: int | None = None) -> torch.Tensor:
    """Which entries of attention probabilities ``probs [..., L, L]`` top-``k`` keeps: bool, same shape.

    Each query row keeps its ``min(k, L)`` largest probabilities among the keys it may attend
    (``causal``: key j <= query i; ``window``: and within a sliding window, see
    :func:`~topk_lib.analysis.approximations.allowed_keys`), so a masked key is never marked kept.
    """
    k = positive_int(k, "k")
    n = probs.shape[-1]
    allowed = allowed_keys(n, n, causal=causal, window=window, device=probs.device)  # [L, L]
    top = probs.topk(min(k, n), dim=-1).indices  # [..., L, k]
    return torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, top, True) & allowed  # [..., L, L]


def log_k_steps(length: int) -> list[int]:
    """k values for a slider over ``1..length``: 1, 2, 3, 4, 6, 8, 12, 16, ... (2^i and 1.5 * 2^i), then ``length``.

    About two steps per doubling, so k = 1..8 take five of the ~17 steps at 512 tokens where a
    linear slider gives them 1.5 % of its width.
    """
    length = positive_int(length, "length")
    steps, power = [1], 2
    while power < length:
        steps += [v for v in (power, power * 3 // 2) if v < length]
        power *= 2
    return sorted(set(steps + [length]))


@contextlib.contextmanager
def _one_thread():
    """Run a slider's small ops ([L, L] matrices) in one torch thread, then restore the setting.

    Two threads fighting other processes for two cores made a view 20x slower (99 ms against
    5 ms at 512 tokens, load ~3); on tensors this small a second thread buys nothing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _token_label(tokenizer, token_id):
    return tokenizer.decode([int(token_id)]).replace("\n", "⏎")


@dataclass
class HeadView:
    """What top-k keeps of one head at one k (all tensors on CPU, float32)."""

    layer: int
    head: int
    k: int  # the k asked for
    effective_k: int  # min(k, L): k >= L keeps every key
    probs: torch.Tensor  # [L, L] exact attention probabilities
    kept: torch.Tensor  # [L, L] bool, True = among the row's top k (only keys the query may attend)
    row_mass: torch.Tensor  # [L] mass kept per query row
    mass_kept: float  # mean of row_mass
    relative_error: float  # ‖o_k − o‖ / ‖o‖ over all rows and features of this head
    profile: torch.Tensor  # [layers] mass kept at k, mean over heads and rows, per layer
    head_profile: torch.Tensor  # [layers, H] mass kept at k, mean over rows, per layer and head
    causal: bool


class AttentionExplorer:
    """Scores of one (model, text), computed once; :meth:`view` only re-thresholds.

    ``max_tokens``: the text is cut to this many tokens (after the tokenizer's special
    tokens). ``cache_layers``: how many layers' worth of single-head probabilities
    ``[L, L]`` to keep (``cache_layers × heads`` maps).
    """

    def __init__(self, model, tokenizer, text, *, max_tokens: int = 512, cache_layers: int = 4):
        max_tokens = positive_int(max_tokens, "max_tokens")
        self.cache_layers = positive_int(cache_layers, "cache_layers")
        non_empty_text(text, "text")
        ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids  # [1, L]
        if ids.shape[1] < 2:
            raise ValueError(f"text gives {ids.shape[1]} token(s); use a longer text (at least 2 tokens)")
        infos = [info for info in describe_layers(model) if info.attention]
        self.layers = [info.layer for info in infos]
        # Decoders' attention modules say is_causal=True, BERT's say False (transformers' own rule).
        self.causal = bool(getattr(model.get_submodule(infos[0].attention[0]), "is_causal", True))
        # local layers' sliding windows, so their maps show the keys the model lets them see
        self.windows = {info.layer: w for info in infos
                        if isinstance(w := getattr(model.get_submodule(info.attention[0]), "sliding_window", None), int)
                        and not isinstance(w, bool) and w > 0}
        self.input_ids = ids
        self.tokens = [_token_label(tokenizer, t) for t in ids[0]]
        qkv = record_qkv(model, ids, layers=self.layers)
        # [H, L, d] per layer, float32: the only per-layer state kept besides the mass table.
        self._q = {layer: q[0].float() for layer, (q, _, _) in qkv.items()}  # [Hq, L, d]
        self._k = {layer: k[0].float() for layer, (_, k, _) in qkv.items()}  # [Hkv, L, d]
        self._v = {layer: v[0].float() for layer, (_, _, v) in qkv.items()}  # [Hkv, L, dv]
        self.n_heads = self._q[self.layers[0]].shape[0]
        self.length = ids.shape[1]
        self._heads: collections.OrderedDict = collections.OrderedDict()  # (layer, head) -> [L, L], LRU
        curves = []
        for layer in self.layers:
            srt = self.probs(layer).sort(dim=-1, descending=True).values  # [H, L, L]
            curves.append(srt.cumsum(dim=-1).clamp_(max=1.0).mean(dim=-2))  # [H, L]: mean top-j mass, j = 1..L
        self._curves = torch.stack(curves)  # [layers, H, L]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes this explorer may hold: Q/K/V, the mass table and a full head cache."""
        tensors = [*self._q.values(), *self._k.values(), *self._v.values(), self._curves, self.input_ids]
        held = sum(t.numel() * t.element_size() for t in tensors)
        return held + self.cache_layers * self.n_heads * self.length**2 * 4  # float32 [L, L] per cached head

    def probs(self, layer: int) -> torch.Tensor:
        """Exact attention probabilities of every head of ``layer``: ``[H, L, L]`` (not cached)."""
        layer = self._layer(layer)
        return attention_probs(self._q[layer], self._k[layer], causal=self.causal,
                               window=self.windows.get(layer))  # [H, L, L]

    def head_probs(self, layer: int, head: int) -> torch.Tensor:
        """Exact attention probabilities of one head: ``[L, L]``, kept in an LRU of recent heads."""
        layer = self._layer(layer)
        head = index(head, "head", self.n_heads, "heads")
        key = (layer, head)
        if key in self._heads:
            self._heads.move_to_end(key)
            return self._heads[key]
        kv = head // (self.n_heads // self._k[layer].shape[0])  # GQA: the KV head this query head reads
        p = attention_probs(self._q[layer][head:head + 1], self._k[layer][kv:kv + 1], causal=self.causal,
                            window=self.windows.get(layer))[0]  # [L, L]
        self._heads[key] = p
        while len(self._heads) > self.cache_layers * self.n_heads:
            self._heads.popitem(last=False)
        return p

    def profile(self, *, k: int) -> torch.Tensor:
        """Mass kept at ``k`` per layer, mean over heads and query rows: ``[layers]``."""
        k = positive_int(k, "k")
        return self._curves[:, :, min(k, self.length) - 1].mean(dim=1)  # [layers]

    def head_profile(self, *, k: int) -> torch.Tensor:
        """Mass kept at ``k`` per layer and head, mean over query rows: ``[layers, H]``."""
        k = positive_int(k, "k")
        return self._curves[:, :, min(k, self.length) - 1]  # [layers, H]

    def view(self, *, layer: int, head: int, k: int) -> HeadView:
        """One head at one k: map, kept entries, mass kept, output error, per-layer profile."""
        with _one_thread():
            return self._view(layer=layer, head=head, k=k)

    def _view(self, *, layer, head, k):
        layer = self._layer(layer)
        head = index(head, "head", self.n_heads, "heads")
        k = positive_int(k, "k")
        kk = min(k, self.length)
        probs = self.head_probs(layer, head)  # [L, L]
        window = self.windows.get(layer)
        kept = kept_mask(probs, kk, causal=self.causal, window=window)  # [L, L]; never a masked key
        row_mass = (probs * kept).sum(dim=-1)  # [L]
        group = self.n_heads // self._k[layer].shape[0]  # query heads per KV head (GQA)
        q = self._q[layer][head][None, None]  # [1, 1, L, d]
        key = self._k[layer][head // group][None, None]  # [1, 1, L, d]
        value = self._v[layer][head // group][None, None]  # [1, 1, L, dv]
        exact = probs @ value[0, 0]  # [L, dv]
        mask = None if window is None else allowed_keys(self.length, self.length, window=window)  # [L, L]
        approx = topk_attention(q, key, value, topk=kk, is_causal=self.causal, attn_mask=mask)[0, 0]  # [L, dv]
        error = relative_error(approx, exact, dim=(-2, -1)).item()
        return HeadView(layer=layer, head=head, k=k, effective_k=kk, probs=probs, kept=kept, row_mass=row_mass,
                        mass_kept=row_mass.mean().item(), relative_error=error, profile=self.profile(k=kk),
                        head_profile=self.head_profile(k=kk), causal=self.causal)

    def figure(self, *, layer: int, head: int, k: int, rows=None, title: str | None = None):
        """The explorer figure (map with kept entries, per-layer profile) for one view."""
        from topk_lib.plots.explorer import plot_explorer_view

        return plot_explorer_view(self.view(layer=layer, head=head, k=k), tokens=self.tokens, rows=rows, title=title)

    def _layer(self, layer):
        layer = int_at_least(layer, "layer", 0)
        if layer not in self._q:
            raise ValueError(f"layer must be one of the attention layers {self.layers[0]}..{self.layers[-1]}, got {layer!r}")
        return layer


# --------------------------------------------------------------------------- latency measurement


def measure_latency(explorer: AttentionExplorer, *, repeats: int = 5, draw: bool = True, seed: int = 0) -> dict:
    """Median seconds of the parts of a slider move, over random (layer, head, k).

    ``view_cached_s``: :meth:`AttentionExplorer.view` of a head in the cache (a k move);
    ``view_new_head_s``: the same with the head's probabilities recomputed (a layer or head
    move); with ``draw``, ``render_s``: updating the live figure in place and encoding its PNG
    (:class:`~topk_lib.plots.explorer.ExplorerFigure`), and ``first_render_s``: building it.
    """
    import random

    from topk_lib.plots.explorer import ExplorerFigure

    rng = random.Random(seed)
    ks = log_k_steps(explorer.length)
    cached, new_head, rendering = [], [], []
    figure = None
    for _ in range(repeats):
        layer, head = rng.choice(explorer.layers), rng.randrange(explorer.n_heads)
        explorer._heads.pop((layer, head), None)  # force an LRU miss: the layer-slider case
        start = time.perf_counter()
        explorer.view(layer=layer, head=head, k=rng.choice(ks))
        new_head.append(time.perf_counter() - start)
        start = time.perf_counter()
        view = explorer.view(layer=layer, head=head, k=rng.choice(ks))
        cached.append(time.perf_counter() - start)
        if draw:
            start = time.perf_counter()
            if figure is None:
                figure = ExplorerFigure(view, tokens=explorer.tokens)
                figure.png()
                first = time.perf_counter() - start
                continue
            figure.update(view)
            figure.png()
            rendering.append(time.perf_counter() - start)
    out = {"view_cached_s": statistics.median(cached), "view_new_head_s": statistics.median(new_head)}
    if draw:
        out["first_render_s"] = first
        if rendering:
            out["render_s"] = statistics.median(rendering)
    return out


def simulate_slider_moves(panel, *, repeats: int = 5, seed: int = 0) -> dict:
    """Move an :class:`~topk_lib.app.widgets.ExplorerPanel`'s k, layer and head controls as a user would.

    Returns per kind of move the median and the largest seconds from the control's new value
    to the Image's new value, over new views only (kept PNGs would answer at once).
    """
    import random

    rng = random.Random(seed)
    ex = panel.session.explorer(panel.model_w.value, panel.text_w.value, panel.custom_w.value)
    out = {}
    for kind, control, values in [("k", panel.k_w, list(panel.k_w.options)), ("layer", panel.layer_w, ex.layers),
                                  ("head", panel.head_w, list(range(ex.n_heads)))]:
        times = []
        for _ in range(repeats):
            panel._pngs.clear()
            value = rng.choice([v for v in values if v != control.value])
            panel.timings.clear()
            control.value = value
            times += panel.timings
        out[f"{kind}_move_median_s"], out[f"{kind}_move_max_s"] = statistics.median(times), max(times)
    return out


def main(argv=None) -> int:
    """``python -m topk_lib.app.explorer``: build an explorer and print slider-update latencies."""
    parser = argparse.ArgumentParser(prog="python -m topk_lib.app.explorer", description=main.__doc__.split(":")[1])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from topk_lib.data import is_fetched, moby_dick_text, pydoc_text
    from topk_lib.hf.loading import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text = moby_dick_text() if is_fetched("moby-dick") else pydoc_text()
    start = time.perf_counter()
    explorer = AttentionExplorer(model, tokenizer, text[: args.tokens * 8], max_tokens=args.tokens)
    built = time.perf_counter() - start
    times = measure_latency(explorer, repeats=args.repeats)
    from topk_lib.app.session import ExplorerSession
    from topk_lib.app.widgets import ExplorerPanel

    session = ExplorerSession(models={args.model: args.model}, texts={"text": text[: args.tokens * 8]},
                              max_tokens=args.tokens, loader=lambda name: (model, tokenizer))
    session._explorers[(args.model, text[: args.tokens * 8])] = explorer  # the one built above
    panel = ExplorerPanel(session, model=args.model, text="text", layer=explorer.layers[len(explorer.layers) // 2],
                          head=0, k=16)
    moves = simulate_slider_moves(panel, repeats=args.repeats)
    print(f"{args.model}, {explorer.length} tokens, {explorer.n_layers} layers x {explorer.n_heads} heads, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
    print(f"build {built:.2f} s; " + "; ".join(f"{name} {value * 1000:.0f} ms" for name, value in times.items()))
    print("widget slider moves: " + "; ".join(f"{name} {value * 1000:.0f} ms" for name, value in moves.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
