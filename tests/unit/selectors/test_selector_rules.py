"""Each selector against a dense reference of its rule; the selector API's contract (widths, duplicates, masks)."""

import pytest
import torch

from reference import (
    causal_mask, dense_selected_attention, dense_topk_attention, grouped_scores, ref_h2o_prefill, ref_quest,
    ref_sink_window, ref_svd_basis, ref_topp, top_set,
)
from topk_lib.kernels.attention import chunked_attention
from topk_lib.selectors.adaptive import Threshold, TopP
from topk_lib.selectors.base import SelectionLog, Selector, sparse_attention
from topk_lib.selectors.estimated import DoubleSparsity, Loki, Quest
from topk_lib.selectors.heavy import H2O, SnapKV
from topk_lib.selectors.static import Oracle, RandomKeys, SinkWindow, hash_noise

CHUNKS = (1, 5, 64)


def qkv(lq=24, lk=24, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, lq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(1, hkv, lk, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(1, hkv, lk, d, generator=g, dtype=torch.float64)
    return q, k, v


def prefill(selector, q, k, v, budget, chunk):
    return sparse_attention(q, k, v, selector=selector, budget=budget, is_causal=True, chunk_size=chunk)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("budget", [1, 5, 30])
def test_oracle_is_topk_attention(chunk, budget):
    q, k, v = qkv()
    torch.testing.assert_close(prefill(Oracle(), q, k, v, budget, chunk), dense_topk_attention(q, k, v, budget, is_causal=True))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("budget, n_sink", [(6, 2), (3, 4), (10, 1), (5, 0)])
def test_sink_window(chunk, budget, n_sink):
    q, k, v = qkv()
    keep = ref_sink_window(24, 24, budget, n_sink)
    torch.testing.assert_close(prefill(SinkWindow(n_sink), q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_random_keeps_the_top_of_its_noise_and_does_not_depend_on_chunks(chunk):
    q, k, v = qkv()
    noise = (hash_noise(3, 4, torch.arange(24), 24) >> 8).float()[None]  # [1, Hq, L, L]
    keep = top_set(noise, causal_mask(24, 24).expand(1, 4, 24, 24), 5)
    assert (keep.sum(-1) == torch.arange(1, 25).clamp(max=5)).all()
    torch.testing.assert_close(prefill(RandomKeys(seed=3), q, k, v, 5, chunk), dense_selected_attention(q, k, v, keep))


def test_random_draws_are_spread_over_the_allowed_keys():
    counts = torch.zeros(200)
    keep = top_set((hash_noise(0, 1, torch.tensor([199] * 1), 200) >> 8).float(), torch.ones(1, 1, 200, dtype=torch.bool), 20)
    for s in range(50):
        noise = (hash_noise(s, 1, torch.tensor([199]), 200) >> 8).float()
        counts += top_set(noise, torch.ones(1, 1, 200, dtype=torch.bool), 20)[0, 0].float()
    assert keep.sum() == 20 and counts.max() < 20 and (counts[:100].sum() / counts.sum() - 0.5).abs() < 0.1


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("budget", [4, 7])
def test_h2o_prefill(chunk, budget):
    q, k, v = qkv()
    keep = ref_h2o_prefill(q, k, budget)
    torch.testing.assert_close(prefill(H2O(), q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


def test_h2o_decoding_evicts_greedily():
    q, k, v = qkv(lq=20, lk=20)
    budget, recent, g = 6, 3, 2
    sel = H2O()
    prefill(sel, q[:, :, :14], k[:, :, :14], v[:, :, :14], budget, 4)
    # the dense rule, step by step: acc from exact prefill attention, then the kept attention of each step
    probs = torch.softmax(grouped_scores(q[:, :, :14], k[:, :, :14]).masked_fill(~causal_mask(14, 14), float("-inf")), -1)
    acc = probs.unflatten(1, (2, g)).sum(2).sum(-2)[0]  # [Hkv, 14]
    keep_last = ref_h2o_prefill(q[:, :, :14], k[:, :, :14], budget)[0, ::g, -1]  # [Hkv, 14]
    alive = [set(torch.nonzero(keep_last[h]).flatten().tolist()) for h in range(2)]
    for t in range(14, 20):
        out = sparse_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], selector=sel, budget=budget)
        acc = torch.nn.functional.pad(acc, (0, 1))
        keep = torch.zeros(1, 4, 1, t + 1, dtype=torch.bool)
        for h in range(2):
            window = set(range(t - recent + 1, t + 1))
            old = sorted((j for j in alive[h] | window if j <= t - recent), key=lambda j: -float(acc[h, j]))
            kept = window | set(old[: budget - recent])
            alive[h] = kept
            keep[0, h * g : (h + 1) * g, 0, sorted(kept)] = True
        ref = dense_selected_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], keep)
        torch.testing.assert_close(out, ref)
        p = torch.softmax(grouped_scores(q[:, :, t : t + 1], k[:, :, : t + 1]).masked_fill(~keep, float("-inf")), -1)
        acc = acc + p.unflatten(1, (2, g)).sum(2)[0, :, 0]


def test_snapkv_prefill_is_exact_and_decoding_uses_the_votes_of_the_window():
    q, k, v = qkv(lq=30, lk=30)
    budget, w, kernel, n, g = 10, 4, 3, 26, 2
    sel = SnapKV(window=w, kernel=kernel)
    out = prefill(sel, q[:, :, :n], k[:, :, :n], v[:, :, :n], budget, 7)
    torch.testing.assert_close(out, chunked_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True))
    probs = torch.softmax(grouped_scores(q[:, :, :n], k[:, :, :n]).masked_fill(~causal_mask(n, n), float("-inf")), -1)
    votes = probs[0, :, n - w :].sum(-2).unflatten(0, (2, g)).sum(1)  # [Hkv, n]
    keep_prompt = torch.zeros(2, n, dtype=torch.bool)
    for h in range(2):
        pooled = [float(votes[h, max(0, j - 1) : j + 2].mean()) for j in range(n)]
        best = sorted(range(n - w), key=lambda j: -pooled[j])[: budget - w]
        keep_prompt[h, best] = True
        keep_prompt[h, n - w :] = True
    for t in range(n, 30):
        out = sparse_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], selector=sel, budget=budget)
        keep = torch.nn.functional.pad(keep_prompt, (0, t + 1 - n), value=True).repeat_interleave(g, 0)[None, :, None]
        torch.testing.assert_close(out, dense_selected_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], keep))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("budget, page", [(8, 4), (12, 4), (16, 16)])
def test_quest(chunk, budget, page):
    q, k, v = qkv(lk=26, lq=26)
    keep = ref_quest(q, k, budget, page)
    torch.testing.assert_close(prefill(Quest(page), q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


def test_quest_refuses_a_budget_under_one_page():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="page_size"):
        prefill(Quest(16), q, k, v, 8, 4)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_loki_ranks_by_scores_in_the_calibrated_key_subspace(chunk):
    q, k, v = qkv()
    cq, ck, cv = qkv(seed=1)
    rank, budget = 3, 6
    sel = Loki(rank=rank).calibrate({0: (cq, ck, cv)})
    basis = torch.stack([ref_svd_basis(ck[0, h], rank) for h in range(2)]).double()  # [Hkv, d, r]
    qb = q @ basis.repeat_interleave(2, 0)
    kb = k @ basis
    approx = qb @ kb.repeat_interleave(2, 1).transpose(-1, -2)
    keep = top_set(approx, causal_mask(24, 24).expand_as(approx), budget)
    torch.testing.assert_close(prefill(sel, q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_double_sparsity_ranks_by_the_calibrated_channels(chunk):
    q, k, v = qkv()
    cq, ck, cv = qkv(seed=2)
    r, budget = 3, 6
    sel = DoubleSparsity(channels=r).calibrate({0: (cq, ck, cv)})
    approx = torch.zeros(1, 4, 24, 24, dtype=torch.float64)
    for h in range(2):
        importance = [float(cq[0, 2 * h : 2 * h + 2, :, c].abs().sum() * ck[0, h, :, c].abs().sum()) for c in range(8)]
        chans = sorted(range(8), key=lambda c: -importance[c])[:r]
        for hq in (2 * h, 2 * h + 1):
            approx[0, hq] = q[0, hq][:, chans] @ k[0, h][:, chans].T
    keep = top_set(approx, causal_mask(24, 24).expand_as(approx), budget)
    torch.testing.assert_close(prefill(sel, q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_top_p(chunk, p):
    q, k, v = qkv()
    log = SelectionLog()
    out = sparse_attention(q, k, v, selector=TopP(p), budget=24, is_causal=True, chunk_size=chunk, log=log)
    keep = ref_topp(q, k, p)
    torch.testing.assert_close(out, dense_selected_attention(q, k, v, keep))
    assert log.mean_budget == pytest.approx(keep.sum().item() / keep[..., 0].numel())


@pytest.mark.parametrize("chunk", CHUNKS)
def test_threshold_keeps_scores_over_the_calibrated_head_threshold(chunk):
    q, k, v = qkv()
    cq, ck, cv = qkv(seed=3)
    budget = 4
    sel = Threshold(cap=3).calibrate({0: (cq, ck, cv)}, budgets=[budget])
    cs = grouped_scores(cq, ck).masked_fill(~causal_mask(24, 24), float("-inf"))[0]  # [Hq, L, L]
    theta = torch.stack([cs[h, budget - 1 :].sort(-1, descending=True).values[:, budget - 1].mean() for h in range(4)])
    s = grouped_scores(q, k).masked_fill(~causal_mask(24, 24), float("-inf"))
    keep = top_set(s, s >= theta.view(1, 4, 1, 1), 3 * budget)
    torch.testing.assert_close(prefill(sel, q, k, v, budget, chunk), dense_selected_attention(q, k, v, keep))


def test_uncalibrated_layers_raise_naming_calibrate():
    q, k, v = qkv()
    for sel in (Loki(), DoubleSparsity(), Threshold()):
        with pytest.raises(RuntimeError, match="calibrate"):
            prefill(sel, q, k, v, 4, 8)


class Fixed(Selector):
    """Returns the positions it was given, for every query."""

    def __init__(self, positions):
        super().__init__()
        self.positions = torch.tensor(positions)

    def select(self, call, chunk, budget):
        return self.positions.view(*(1,) * (chunk.scores.dim() - 1), -1).expand(*chunk.scores.shape[:-1], -1)


def test_duplicates_count_once_and_forbidden_positions_are_dropped():
    q, k, v = qkv(lq=1, lk=10)
    out = sparse_attention(q, k, v, selector=Fixed([3, 3, -1, 7, 25]), budget=5)
    keep = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    keep[..., [3, 7]] = True
    torch.testing.assert_close(out, dense_selected_attention(q, k, v, keep))
    q, k, v = qkv(lq=10, lk=10)  # causal: a query never gets a later key
    out = sparse_attention(q, k, v, selector=Fixed([0, 9]), budget=2, is_causal=True)
    keep = torch.zeros(10, 10, dtype=torch.bool)
    keep[:, 0] = True
    keep[9, 9] = True
    torch.testing.assert_close(out, dense_selected_attention(q, k, v, keep))


def test_a_selection_wider_than_the_budget_raises():
    q, k, v = qkv(lq=1, lk=10)
    with pytest.raises(ValueError, match="more than its width"):
        sparse_attention(q, k, v, selector=Fixed([1, 2, 3]), budget=2)


def test_the_mask_applies_to_every_selector_and_gradients_flow():
    q, k, v = qkv(lq=6, lk=12)
    mask = torch.rand(1, 1, 6, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    keep = mask & torch.zeros(6, 12, dtype=torch.bool).index_fill(1, torch.tensor([0, 1, 2, 3, 4, 11]), True)
    q.requires_grad_(True)
    out = sparse_attention(q, k, v, selector=Fixed([0, 1, 2, 3, 4, 11]), budget=6, attn_mask=mask)
    torch.testing.assert_close(out, dense_selected_attention(q, k, v, keep))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [H2O, lambda: SnapKV(window=2, kernel=3)])
def test_a_sliding_window_cache_decodes_as_the_full_cache_under_the_window_mask(make):
    q, k, v = qkv(lq=30, lk=30)
    prompt, window, budget = 18, 10, 6
    pos = torch.arange(30)
    slide = (pos[None, :] > pos[:, None] - window) & causal_mask(30, 30)  # [30, 30]: the last `window` keys
    full, sliding = make(), make()
    for sel in (full, sliding):
        sparse_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], selector=sel, budget=budget,
                         attn_mask=slide[:prompt, :prompt])
    for t in range(prompt, 30):
        a = sparse_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], selector=full, budget=budget,
                             attn_mask=slide[t : t + 1, : t + 1])
        lo = t + 1 - window  # the cache holds the last `window` keys
        b = sparse_attention(q[:, :, t : t + 1], k[:, :, lo : t + 1], v[:, :, lo : t + 1], selector=sliding,
                             budget=budget)
        torch.testing.assert_close(a, b)
