"""How close practical key selectors get to the exact top-k oracle, on real activations.

Three measurements, each a tidy frame:

* :func:`selector_metrics`: per selector, budget, layer and query head, on recorded
  activations (:func:`~topk_lib.analysis.approximations.record_qkv`) of one text whose first
  ``L - steps`` tokens are the prompt and whose last ``steps`` queries decode one at a time
  (teacher-forced): ``recall`` (the share of the oracle's top-|S| keys among the |S| the
  selector kept), ``mass`` (exact attention mass on the kept keys), ``rel_error``
  (``sqrt(sum ||o_S - o||^2 / sum ||o||^2)`` over the steps) and ``kept`` (mean |S|).
* :func:`decode_dynamics`: under ``generate`` with exact attention, how the oracle's top-k set
  of each head drifts from one step to the next, what one shared selection per KV head costs
  the query heads of its group, and the mass whole blocks of keys capture.
* :func:`layer_cascade`: with a selector in layer ``i`` only (teacher-forced), how the
  attention of the layers after ``i`` changes against the exact run.

The selectors run through :func:`topk_lib.selectors.base.sparse_attention` (their outputs are
the kernel's); the reference numbers here come from the dense ``[Hq, Lq, Lk]`` probabilities of
one layer, which these analyses use on inputs of a few thousand tokens at most.
"""

from __future__ import annotations

import pandas as pd
import torch

from topk_lib.analysis.approximations import attention_probs
from topk_lib.hf.patching import use_sparse
from topk_lib.kernels.attention import chunked_attention
from topk_lib.selectors.base import SelectionLog, positions_mask, sparse_attention
from topk_lib.selectors.static import Oracle

__all__ = ["selector_metrics", "selection_scores", "decode_dynamics", "layer_cascade", "frontier"]


def _kept_sets(selector, q, k, v, budget, prompt, layer):
    """Kept keys ``[B, Hq, steps, L]`` (bool) and outputs ``[B, Hq, steps, dv]`` of the decoded queries."""
    n = k.shape[-2]
    log = SelectionLog(keep_last=True)
    if selector.stateful or not selector.batched_decode:
        selector.reset()
        if selector.stateful:
            sparse_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], selector=selector, budget=budget,
                             layer=layer, is_causal=True)
        outs, sets = [], []
        for t in range(prompt, n):
            outs.append(sparse_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], selector=selector,
                                         budget=budget, layer=layer, log=log))
            sets.append(torch.nn.functional.pad(_as_set(log, q, t + 1, 1), (0, n - t - 1)))
        selector.reset()
        return torch.cat(sets, -2), torch.cat(outs, -2), log
    selector.reset()
    out = sparse_attention(q[:, :, prompt:], k, v, selector=selector, budget=budget, layer=layer, is_causal=True,
                           log=log)
    causal = torch.ones(n - prompt, n, dtype=torch.bool).tril(prompt)
    return _as_set(log, q, n, n - prompt) & causal, out, log


def _as_set(log, q, n, rows):
    """The last call's kept keys as bool ``[B, Hq, rows, n]`` (a call that ran exact kept every key)."""
    if not log.last:
        return torch.ones(*q.shape[:2], rows, n, dtype=torch.bool)
    idx = torch.cat(log.last, -2)  # [B, Hkv, G, rows, w]
    return positions_mask(idx, n).flatten(1, 2)  # [B, Hq, rows, n]


def selection_scores(probs, kept, out, exact):
    """Per-head ``recall, mass, rel_error, kept`` of kept sets against the exact attention.

    ``probs [B, Hq, R, L]`` exact probabilities of the rows, ``kept`` bool of the same shape,
    ``out``/``exact`` ``[B, Hq, R, dv]`` outputs. Recall compares with the oracle's top-|S| keys
    of each row (ties broken by position). Returns a dict of ``[Hq]`` arrays.
    """
    size = kept.sum(-1)  # [B, Hq, R]
    rank = probs.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [B, Hq, R, L] 0 = largest
    top = rank < size[..., None]
    hit = (kept & top).sum(-1).float() / size.clamp(min=1)  # [B, Hq, R]
    mass = (probs * kept).sum(-1)  # [B, Hq, R]
    err = ((out - exact).pow(2).sum(-1).sum((0, 2)) / exact.pow(2).sum(-1).sum((0, 2)).clamp_min(1e-30)).sqrt()
    mean = lambda t: t.float().mean((0, 2)).numpy()  # noqa: E731 (one line per metric)
    return {"recall": mean(hit), "mass": mean(mass), "rel_error": err.numpy(), "kept": mean(size)}


@torch.no_grad()
def selector_metrics(records, points, *, steps, progress=True):
    """Recall, mass, output error and keys kept per (selector, budget, layer, head).

    Arguments:
        records: ``{layer: (q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, dv])}`` of one text,
            as :func:`~topk_lib.analysis.approximations.record_qkv` returns (causal, scale
            ``1/sqrt(d)``).
        points: ``[(label, selector, budget), ...]``.
        steps: the last ``steps`` queries are measured, each decoding after all tokens before it.

    Returns:
        DataFrame ``selector, budget, layer, head, recall, mass, rel_error, kept`` (``kept``:
        mean keys per query, the x of a frontier).
    """
    from tqdm.auto import tqdm

    rows = []
    for layer, (q, k, v) in tqdm(list(records.items()), desc="layers", disable=not progress):
        q, k, v = q.float(), k.float(), v.float()
        n = k.shape[-2]
        if not 0 < steps < n:
            raise ValueError(f"steps must be in 1 .. {n - 1} (the text has {n} tokens), got {steps}")
        prompt = n - steps
        probs = attention_probs(q[:, :, prompt:], k)  # [B, Hq, steps, L]
        exact = chunked_attention(q[:, :, prompt:], k, v, is_causal=True)  # [B, Hq, steps, dv]
        for label, selector, budget in points:
            kept, out, _ = _kept_sets(selector, q, k, v, budget, prompt, layer)
            scores = selection_scores(probs, kept, out, exact)
            rows += [{"selector": label, "budget": budget, "layer": layer, "head": h,
                      **{m: float(a[h]) for m, a in scores.items()}} for h in range(q.shape[1])]
    return pd.DataFrame(rows)


def frontier(metrics):
    """Mean over layers and heads per (selector, param, budget): the points of an error-vs-budget frontier.

    ``param`` (the selector's ``repr``, when the frame has it) keeps apart the settings of one
    selector at one budget, as top-p's masses at one cap.
    """
    keys = ["selector", "param", "budget"] if "param" in metrics else ["selector", "budget"]
    return (metrics.groupby(keys, as_index=False, sort=False)[["recall", "mass", "rel_error", "kept"]].mean()
            .sort_values(keys, kind="stable"))


# --------------------------------------------------------------------------- decoding


class _DecodeRecorder:
    """Keeps, per layer, each decoding call's queries and the last call's keys (the whole cache)."""

    def __init__(self):
        self.queries, self.keys = {}, {}

    def __call__(self, layer, query, key, value):
        if query.shape[2] == key.shape[2]:  # the prompt
            self.queries[layer] = []
            return
        self.queries[layer].append(query.detach().float().clone())  # [B, Hq, 1, d]
        self.keys[layer] = key  # a later call's cache holds these keys first


def _overlap(a, b, k):
    return (a & b).sum(-1).float() / k


@torch.no_grad()
def decode_dynamics(model, input_ids, *, k, steps, blocks=(16, 32, 64, 128)):
    """Oracle top-k dynamics while ``model.generate`` decodes ``steps`` tokens greedily with exact attention.

    Per (layer, query head), means over the decoding steps: ``overlap`` (share of the top-k
    set of step t that was in the top-k of step t - 1, among keys both steps see), ``mass_own``
    (mass of the head's own top-k), ``mass_shared`` (mass of one top-k per KV head, chosen by
    the attention summed over its query heads), ``group_overlap`` (mean share of a head's top-k
    in each other head's of its group), and ``mass_block{b}`` for each block size ``b <= k``: the
    mass of the ``k // b`` blocks of ``b`` consecutive keys (from position 0) of most mass. Returns a tidy frame
    ``layer, head, metric, value``.
    """
    rec = _DecodeRecorder()
    with use_sparse(model, Oracle(), k, layers=[], observe=rec):
        model.generate(input_ids, max_new_tokens=steps + 1, do_sample=False, min_new_tokens=steps + 1)
    rows = []
    for layer, queries in rec.queries.items():
        keys = rec.keys[layer].float()  # [B, Hkv, N, d]
        hkv, g = keys.shape[1], queries[0].shape[1] // keys.shape[1]
        stats = {name: [] for name in ("overlap", "mass_own", "mass_shared", "group_overlap",
                                       *(f"mass_block{b}" for b in blocks))}
        prev = None
        for step, q in enumerate(queries):
            n = keys.shape[2] - (len(queries) - 1 - step)  # keys this step saw
            p = attention_probs(q, keys[:, :, :n], causal=False)[:, :, 0]  # [B, Hq, n]
            kk = min(k, n)
            own = positions_mask(p.topk(kk, -1).indices, n)  # [B, Hq, n]
            stats["mass_own"].append((p * own).sum(-1))
            group = p.unflatten(1, (hkv, g)).sum(2)  # [B, Hkv, n]
            shared = positions_mask(group.topk(kk, -1).indices, n).repeat_interleave(g, 1)  # [B, Hq, n]
            stats["mass_shared"].append((p * shared).sum(-1))
            sets = own.unflatten(1, (hkv, g)).float()  # [B, Hkv, G, n]
            pair = (sets @ sets.transpose(-1, -2)) / kk  # [B, Hkv, G, G]
            stats["group_overlap"].append(((pair.sum(-1) - 1) / max(g - 1, 1)).flatten(1, 2) if g > 1 else
                                          torch.ones_like(p[..., 0]))
            if prev is not None:
                stats["overlap"].append(_overlap(own[..., : n - 1], prev, kk))
            prev = own
            for b in (b for b in blocks if b <= k):  # equal budget: k // b whole blocks
                nb = -(-n // b)
                mass = torch.nn.functional.pad(p, (0, nb * b - n)).unflatten(-1, (nb, b)).sum(-1)  # [B, Hq, nb]
                stats[f"mass_block{b}"].append(mass.topk(min(k // b, nb), -1).values.sum(-1))
        for name, values in stats.items():
            if not values:
                continue
            per_head = torch.stack(values).mean((0, 1))  # [Hq]
            rows += [{"layer": layer, "head": h, "metric": name, "value": float(x)} for h, x in enumerate(per_head)]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cascade


class _CallRecorder:
    """Keeps each layer's (q, k, v) of one teacher-forced forward."""

    def __init__(self):
        self.calls = {}

    def __call__(self, layer, query, key, value):
        self.calls[layer] = (query.detach().float().clone(), key.detach().float().clone(),
                             value.detach().float().clone())


def _layer_stats(q, k, v, k_top):
    p = attention_probs(q, k)  # [B, Hq, L, L]
    top = positions_mask(p.topk(min(k_top, p.shape[-1]), -1).indices, p.shape[-1])
    out = chunked_attention(q, k, v, is_causal=True)  # [B, Hq, L, dv]
    return p, top, out


@torch.no_grad()
def layer_cascade(model, input_ids, *, selector, budget, layers, k=None):
    """With ``selector`` in one layer ``i`` at a time, how every later layer's attention changes.

    Teacher-forced on ``input_ids``. For each ``i`` in ``layers`` and each later layer ``j``,
    against the exact run, means over heads and queries: ``output_error`` (relative error of
    layer j's exact attention output on its new inputs, ``||o'_j - o_j|| / ||o_j||``),
    ``topk_overlap`` (share of the exact run's top-k keys, ``k`` defaulting to ``budget``, still
    in the top-k), ``mass_change`` (mean absolute change of the top-k mass), ``kl`` (mean
    KL(p_j || p'_j) of the attention rows); plus ``logits_kl``, KL of the next-token
    distributions, at ``j = -1``. Returns a tidy frame ``layer_i, layer_j, metric, value``.
    """
    k = budget if k is None else k
    base = _CallRecorder()
    with use_sparse(model, selector, budget, layers=[], observe=base):
        ref_logits = model(input_ids).logits.float().log_softmax(-1)
    ref = {j: _layer_stats(*qkv, k) for j, qkv in base.calls.items()}
    rows = []
    for i in layers:
        run = _CallRecorder()
        with use_sparse(model, selector, budget, layers=[i], observe=run):
            logits = model(input_ids).logits.float().log_softmax(-1)
        kl = (ref_logits.exp() * (ref_logits - logits)).sum(-1).mean()
        rows.append({"layer_i": i, "layer_j": -1, "metric": "logits_kl", "value": float(kl)})
        for j in sorted(run.calls):
            if j <= i:
                continue
            p, top, out = ref[j]
            p2, top2, out2 = _layer_stats(*run.calls[j], k)
            err = (out2 - out).norm() / out.norm().clamp_min(1e-30)
            rows += [
                {"layer_i": i, "layer_j": j, "metric": "output_error", "value": float(err)},
                {"layer_i": i, "layer_j": j, "metric": "topk_overlap",
                 "value": float(((top & top2).sum(-1).float() / top.sum(-1).clamp(min=1)).mean())},
                {"layer_i": i, "layer_j": j, "metric": "mass_change",
                 "value": float(((p * top).sum(-1) - (p2 * top2).sum(-1)).abs().mean())},
                {"layer_i": i, "layer_j": j, "metric": "kl", "value": float(
                    torch.where(p > 0, p * (p.clamp_min(1e-30).log() - p2.clamp_min(1e-30).log()), 0.0).sum(-1).mean())},
            ]
    return pd.DataFrame(rows)
