"""Dense references the tests compare the library against, written independently of it.

Each builds the full Lq x Lk (or tokens x d_ff) matrix the library avoids, then applies the
definition directly: the top-k attention of Gupta et al. (2021, section 3.1), the top-k
feed-forward layer (section 3.2), and the per-head attention statistics of the capture from
eager attention with ``output_attentions=True``.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from topk_lib.analysis import metrics
from topk_lib.kernels.feedforward import ACTIVATIONS

KS = (1, 2, 3, 5, 8, 64)  # 64 > L: exact
FRACS = (0.5, 0.9, 0.99)


# --------------------------------------------------------------------------- top-k attention


def causal_mask(lq, lk):
    """SDPA's bool mask for queries sitting at the last lq of lk positions."""
    return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)


def dense_topk_attention(q, k, v, topk, attn_mask=None, is_causal=False, scale=None):
    """Dense reference: full scores, mask, top-k, softmax over kept, weighted sum."""
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    vals, idx = s.topk(min(topk, s.shape[-1]), dim=-1)
    kept = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)
    return torch.softmax(kept, -1).nan_to_num(0.0) @ v


def dense_topk_attention_empty_rows(q, k, v, topk, attn_mask=None, is_causal=False, scale=None):
    """:func:`dense_topk_attention` where a row with no allowed key gives zeros and zero gradients.

    Full scores, mask, ``torch.topk``, a softmax over the kept scores; a row whose kept scores are
    all -inf is cleared before the softmax (no NaN reaches autograd) and its weights set to 0.
    """
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)  # [..., Hq, Lk, d|dv]
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [..., Hq, Lq, Lk]
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    vals, idx = s.topk(min(topk, s.shape[-1]), dim=-1)
    kept = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)  # [..., Hq, Lq, Lk]
    empty = torch.isneginf(kept).all(-1, keepdim=True)  # [..., Hq, Lq, 1]
    return torch.softmax(kept.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ v


def dense_capped_sink_attention(q, k, v, topk, attn_mask=None, is_causal=False, scale=None, softcap=None, sinks=None):
    """Dense reference with Gemma-2 soft-capping and GPT-OSS attention sinks.

    Full scores, ``c * tanh(s / c)``, mask, top-k, then a softmax over the kept scores with the
    sink as one more column (``sinks`` ``[Hq]`` or broadcastable to ``[..., Hq, Lq, 1]``), the
    sink column dropped, times V. A row with nothing to attend to gives zeros.
    """
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [..., Hq, Lq, Lk]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if is_causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    vals, idx = s.topk(min(topk, s.shape[-1]), dim=-1)
    kept = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)  # [..., Hq, Lq, Lk]
    if sinks is not None:
        column = (sinks.view(-1, 1, 1) if sinks.dim() == 1 else sinks).expand(*s.shape[:-1], 1)
        kept = torch.cat([kept, column], dim=-1)  # [..., Hq, Lq, Lk + 1]
    work = kept.float() if kept.dtype in (torch.float16, torch.bfloat16) else kept
    p = torch.softmax(work, -1).nan_to_num(0.0).to(v.dtype)[..., : s.shape[-1]]  # the sink column dropped
    return p @ v


def dense_scores(q, k, attn_mask=None, is_causal=False, scale=None, softcap=None):
    """Full ``[..., Hq, Lq, Lk]`` scores in float64: scale, soft-cap, then the mask; masked keys -inf."""
    rep = q.shape[-3] // k.shape[-3]
    k = k.double().repeat_interleave(rep, -3)
    s = (q.double() @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    if is_causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]).to(s.device), float("-inf"))
    return s


def dense_threshold_attention(q, k, v, topk, attn_mask=None, is_causal=False, scale=None, softcap=None):
    """Dense reference of the keep-ties rule, in float64: every allowed score >= the row's k-th largest is kept
    (all keys tied with the k-th too), a softmax over the kept ones, times V; rows with no key give zeros."""
    s = dense_scores(q, k, attn_mask, is_causal, scale, softcap)  # [..., Hq, Lq, Lk]
    if topk is not None and topk < s.shape[-1]:
        kth = s.sort(-1, descending=True).values[..., topk - 1 : topk]  # [..., Hq, Lq, 1]
        s = s.masked_fill(s < kth, float("-inf"))
    v = v.double().repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


# --------------------------------------------------------------------------- top-k feed-forward


def dense_topk_feedforward(x, w_in, w_out, topk, activation="relu", w_gate=None, select="value", b_in=None, b_out=None):
    """Dense layer, then zero all but the top-k hidden units per token."""
    act = ACTIVATIONS[activation]
    h = act(F.linear(x, w_in, b_in))
    if w_gate is not None:
        h = act(F.linear(x, w_gate)) * F.linear(x, w_in, b_in)
    score = h.abs() if select == "magnitude" else h
    idx = score.topk(min(topk, h.shape[-1]), dim=-1).indices
    return F.linear(torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx)), w_out, b_out)


def keep_topk(h, k, *, by_magnitude):
    """``h`` with all but its ``k`` largest entries (``|h|`` or ``h``) per row set to zero."""
    score = h.abs() if by_magnitude else h
    keep = torch.zeros_like(h).scatter_(-1, score.topk(min(k, h.shape[-1]), dim=-1).indices, 1.0)
    return h * keep


def dense_topk_ff_mask(x, w_in, w_out, k, act, *, w_gate=None, by_magnitude, b_in=None, b_out=None):
    """Dense layer with activation ``act``; keeps the top-k hidden units by value or by magnitude."""
    h = act(x @ w_gate.T) * (x @ w_in.T) if w_gate is not None else act(x @ w_in.T + (0 if b_in is None else b_in))
    return keep_topk(h, k, by_magnitude=by_magnitude) @ w_out.T + (0 if b_out is None else b_out)


def routed_experts_reference(experts, k):
    """A forward for 3D routed experts, token by token: sum over slots of weight * down_e(topk(act(gate_e x) * up_e x)).

    Top-k keeps the largest ``|h|`` (a gated MLP); the router's choice and weights come in as the
    module's own forward gets them.
    """
    act = experts.act_fn

    def forward(x, top_k_index, top_k_weights):  # x [T, d], index/weights [T, K]
        rows = []
        for t in range(x.shape[0]):
            y = torch.zeros_like(x[t])
            for slot in range(top_k_index.shape[1]):
                e = int(top_k_index[t, slot])
                w_gate_up, w_down = experts.gate_up_proj[e], experts.down_proj[e]
                if getattr(experts, "is_transposed", False):  # stored [d, 2 d_ff] and [d_ff, d] (Aria)
                    w_gate_up, w_down = w_gate_up.T, w_down.T
                gate, up = (w_gate_up @ x[t]).chunk(2)  # [d_ff] each
                h = keep_topk(act(gate) * up, k, by_magnitude=True)
                y = y + top_k_weights[t, slot] * (w_down @ h)
            rows.append(y)
        return torch.stack(rows)

    return forward


# --------------------------------------------------------------------------- memory


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn()`` runs, by storage (inputs included)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# --------------------------------------------------------------------------- attention statistics of a model


def value_hooks(model):
    """Hooks that store each layer's value vectors ``[B, Hkv, L, d]``."""
    store, handles = {}, []
    for i, lin in enumerate(value_projections(model)):
        def hook(mod, args, out, i=i, d=head_dim(model.config)):
            b, length, _ = out.shape
            store[i] = out.detach().view(b, length, -1, d).transpose(1, 2)  # [B, Hkv, L, d]

        handles.append(lin.register_forward_hook(hook))
    return store, handles


def head_dim(cfg):
    return getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // cfg.num_attention_heads


def value_projections(model):
    if hasattr(model, "model"):  # Llama
        return [layer.self_attn.v_proj for layer in model.model.layers]
    if hasattr(model.encoder, "block"):  # T5 encoder
        return [block.layer[0].SelfAttention.v for block in model.encoder.block]
    return [layer.attention.self.value for layer in model.encoder.layer]  # BERT


def bucket_edges(position_buckets, length):
    if position_buckets is None:
        return None
    if position_buckets == "log2":
        return [0] + [2**i for i in range(int(math.log2(max(length, 1))) + 2)]
    return list(position_buckets)


def bucket_label(edges, j):
    lo = edges[j]
    if j + 1 == len(edges):
        return f"{lo}+"
    hi = edges[j + 1] - 1
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def dense_attention_stats(model, ids, mask=None, *, ks=KS, fracs=FRACS, position_buckets="log2"):
    """``{(layer, head, bucket, k or None, metric): value}`` from full eager attention and metrics.py."""
    store, handles = value_hooks(model)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    b, length = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    valid = mask.bool().numpy()  # [B, L]
    pos = (mask.cumsum(-1) - 1).clamp(min=0).numpy()  # [B, L]
    first = mask.argmax(-1)  # first non-padding key
    edges = bucket_edges(position_buckets, length)
    ref = {}
    for layer, p in enumerate(out.attentions):  # [B, Hq, L, L]
        p = p.detach()
        hq = p.shape[1]
        v = store[layer].repeat_interleave(hq // store[layer].shape[1], dim=1).to(p.dtype)  # [B, Hq, L, d]
        o = p @ v  # [B, Hq, L, d]
        per_row = {}
        for i, k in enumerate(ks):
            o_k = metrics.topk_probs(p, k) @ v  # [B, Hq, L, d]
            per_row[("mass_kept", k)] = metrics.mass_kept(p, k)
            per_row[("kl", k)] = metrics.kl_to_topk(p, k)
            per_row[("rel_error_row_mean", k)] = metrics.relative_error(o_k, o)
            per_row[("err2", k)] = (o_k - o).square().sum(-1)
        per_row[("onorm2", None)] = o.square().sum(-1)
        per_row[("entropy", None)] = metrics.entropy(p)
        per_row[("sink_mass", None)] = torch.stack(
            [metrics.sink_mass(p[j, ..., int(first[j]) :]) for j in range(b)]
        )  # [B, Hq, L]
        kf = metrics.k_for_mass(p, list(fracs)).double()  # [B, Hq, L, n_f]
        for i, f in enumerate(fracs):
            per_row[(f"k{100 * f:g}", None)] = kf[..., i]
        per_row = {key: val.double().numpy() for key, val in per_row.items()}  # [B, Hq, L] each

        groups = [("all", valid)]
        if edges is not None:
            ids_b = np.searchsorted(np.asarray(edges), pos, side="right") - 1
            groups += [(bucket_label(edges, j), valid & (ids_b == j)) for j in range(len(edges))]
        for label, sel in groups:
            if not sel.any():
                continue
            for h in range(hq):
                rows = lambda key: per_row[key][:, h][sel]  # noqa: E731
                for k in ks:
                    for metric in ("mass_kept", "kl", "rel_error_row_mean"):
                        ref[(layer, h, label, k, metric)] = rows((metric, k)).mean()
                    ratio = rows(("err2", k)).sum() / rows(("onorm2", None)).sum()  # ratio of norms over rows
                    ref[(layer, h, label, k, "rel_error")] = math.sqrt(ratio)
                for metric in ("entropy", "sink_mass"):
                    ref[(layer, h, label, None, metric)] = rows((metric, None)).mean()
                for f in fracs:
                    name = f"k{100 * f:g}"
                    ref[(layer, h, label, None, f"{name}_mean")] = rows((name, None)).mean()
                    ref[(layer, h, label, None, f"{name}_median")] = np.median(rows((name, None)))
                ref[(layer, h, label, None, "n_rows")] = float(sel.sum())
    return ref


# --------------------------------------------------------------------------- key selectors
# Each reference states a selector's rule on the full [B, Hq, Lq, Lk] matrices, for causal queries
# at the last Lq of Lk positions, and returns the bool set of kept keys (True = kept).


def grouped_scores(q, k, scale=None):
    """Full scaled scores [B, Hq, Lq, Lk], KV heads repeated."""
    rep = q.shape[-3] // k.shape[-3]
    return (q @ k.repeat_interleave(rep, -3).transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)


def dense_selected_attention(q, k, v, keep):
    """Softmax over the kept keys (``keep [B|1, Hq|1, Lq, Lk]``, causal applied by the caller), times V."""
    s = grouped_scores(q, k).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.repeat_interleave(q.shape[-3] // k.shape[-3], -3)


def top_set(values, allowed, n):
    """Bool set of the n largest ``values`` among ``allowed`` (fewer when fewer are allowed)."""
    out = torch.zeros_like(allowed)
    vals = values.masked_fill(~allowed, float("-inf"))
    order = vals.argsort(dim=-1, descending=True, stable=True)
    ranked_allowed = allowed.gather(-1, order)
    take = (torch.arange(values.shape[-1]) < n) & ranked_allowed
    return out.scatter(-1, order, take)


def ref_sink_window(lq, lk, budget, n_sink):
    pos = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    sinks = min(n_sink, budget)
    return causal_mask(lq, lk) & ((j < sinks) | (j > pos - (budget - sinks)))


def ref_topp(q, k, p):
    probs = torch.softmax(grouped_scores(q, k).masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf")), -1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for idx in np.ndindex(*probs.shape[:-1]):
        row = probs[idx]
        total = 0.0
        for j in row.argsort(descending=True).tolist():
            if total >= p or row[j] == 0:
                break
            keep[idx + (j,)] = True
            total += float(row[j])
    return keep


def ref_quest(q, k, budget, page):
    lq, lk = q.shape[-2], k.shape[-2]
    rep = q.shape[-3] // k.shape[-3]
    kr = k.repeat_interleave(rep, -3)
    causal = causal_mask(lq, lk)
    keep = torch.zeros(*q.shape[:-1], lk, dtype=torch.bool)
    for b, h, i in np.ndindex(*q.shape[:-1]):
        bounds, ok = [], []
        for p0 in range(0, lk, page):
            kp = kr[b, h, p0 : p0 + page]
            bounds.append(float(torch.maximum(q[b, h, i] * kp.max(0).values, q[b, h, i] * kp.min(0).values).sum()))
            ok.append(bool(causal[i, p0 : p0 + page].any()))
        ranked = [pg for pg in np.argsort(-np.array(bounds), kind="stable") if ok[pg]][: budget // page]
        for pg in ranked:
            keep[b, h, i, pg * page : (pg + 1) * page] = True
    return keep & causal


def ref_h2o_prefill(q, k, budget):
    """H2O in a prefill: window of budget//2 plus heavy hitters by the exact attention of earlier queries."""
    lq, lk = q.shape[-2], k.shape[-2]
    hkv, g = k.shape[-3], q.shape[-3] // k.shape[-3]
    recent = budget // 2
    causal = causal_mask(lq, lk)
    probs = torch.softmax(grouped_scores(q, k).masked_fill(~causal, float("-inf")), -1)  # [B, Hq, L, L]
    group = probs.unflatten(1, (hkv, g)).sum(2)  # [B, Hkv, L, L]
    acc = group.cumsum(-2) - group  # earlier queries only
    j = torch.arange(lk)[None, :]
    pos = torch.arange(lk - lq, lk)[:, None]
    window = (j > pos - recent) & causal
    old = (j <= pos - recent) & causal
    keep = window | top_set(acc, old.expand_as(acc), budget - recent)
    return keep.repeat_interleave(g, 1)


def ref_svd_basis(keys, rank):
    """Top-rank eigenvectors of K^T K (the right singular vectors of K), keys [N, d] -> [d, r]."""
    vals, vecs = torch.linalg.eigh(keys.T.double() @ keys.double())
    return vecs[:, vals.argsort(descending=True)[:rank]].float()
