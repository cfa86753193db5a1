"""Selector metrics, decoding dynamics and the layer cascade against dense recomputations."""

import pytest
import torch

from reference import causal_mask, dense_topk_attention, grouped_scores
from tiny_models import sharpen, tiny_llama
from topk_lib.analysis.approximations import record_qkv
from topk_lib.analysis.selection import decode_dynamics, frontier, layer_cascade, selection_scores, selector_metrics
from topk_lib.selectors.heavy import H2O
from topk_lib.selectors.static import Oracle, SinkWindow


@pytest.fixture(scope="module")
def model():
    return sharpen(tiny_llama(), 3.0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 100, (1, 48), generator=torch.Generator().manual_seed(1))


def test_selection_scores_by_hand():
    probs = torch.tensor([[[[0.5, 0.3, 0.2, 0.0]]]])
    kept = torch.tensor([[[[True, False, True, False]]]])
    out, exact = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 2.0]]]])
    s = selection_scores(probs, kept, out, exact)
    assert s["recall"][0] == pytest.approx(0.5) and s["mass"][0] == pytest.approx(0.7)
    assert s["kept"][0] == 2 and s["rel_error"][0] == pytest.approx(5 ** 0.5 / 2)


@torch.no_grad()
def test_oracle_and_window_metrics_match_dense_recomputation(model, ids):
    rec = record_qkv(model, ids, layers=[0, 1])
    steps, budget = 8, 6
    df = selector_metrics(rec, [("oracle", Oracle(), budget), ("window", SinkWindow(n_sink=2), budget),
                                ("h2o", H2O(), budget)], steps=steps, progress=False)
    assert len(df) == 3 * 2 * 6 and set(frontier(df).selector) == {"oracle", "window", "h2o"}
    q, k, v = rec[1]
    n = k.shape[-2]
    s = grouped_scores(q, k).masked_fill(~causal_mask(n, n), float("-inf"))[:, :, -steps:]
    p = torch.softmax(s, -1)
    oracle = df[(df.selector == "oracle") & (df.layer == 1)]
    assert (oracle.recall == 1).all() and (oracle.kept == budget).all()
    torch.testing.assert_close(torch.tensor(oracle.mass.values), p.topk(budget, -1).values.sum(-1).mean((0, 2)).double(),
                               rtol=1e-5, atol=1e-6)
    exact = torch.softmax(s, -1) @ v.repeat_interleave(3, 1)
    top = dense_topk_attention(q, k, v, budget, is_causal=True)[:, :, -steps:]
    err = ((top - exact).pow(2).sum((-1, -2)) / exact.pow(2).sum((-1, -2))).sqrt()[0]
    torch.testing.assert_close(torch.tensor(oracle.rel_error.values), err.double(), rtol=1e-4, atol=1e-6)
    window = df[(df.selector == "window") & (df.layer == 1)]
    j, pos = torch.arange(n)[None, :], torch.arange(n - steps, n)[:, None]
    keep = (j < 2) | ((j > pos - 4) & (j <= pos))
    torch.testing.assert_close(torch.tensor(window.mass.values), (p * keep).sum(-1).mean((0, 2)).double(), rtol=1e-5,
                               atol=1e-6)
    assert (df[df.selector == "h2o"].kept == budget).all()


@torch.no_grad()
def test_decode_dynamics_match_a_teacher_forced_forward_of_the_generated_text(model, ids):
    prompt, steps, k = ids[:, :30], 6, 5
    df = decode_dynamics(model, prompt, k=k, steps=steps, blocks=(4,))
    full = model.generate(prompt, max_new_tokens=steps + 1, do_sample=False, min_new_tokens=steps + 1)
    q, keys, _ = record_qkv(model, full[:, :-1], layers=[1])[1]
    n = keys.shape[-2]
    s = grouped_scores(q, keys).masked_fill(~causal_mask(n, n), float("-inf"))[:, :, 30:]  # the decoded queries
    p = torch.softmax(s, -1)  # [1, Hq, steps, n]
    own = p.topk(k, -1).values.sum(-1).mean((0, 2))
    got = df[(df.layer == 1) & (df.metric == "mass_own")].sort_values("head").value
    torch.testing.assert_close(torch.tensor(got.values), own.double(), rtol=1e-4, atol=1e-5)
    wide = df.pivot_table(index=["layer", "head"], columns="metric", values="value")
    assert (wide.mass_shared <= wide.mass_own + 1e-6).all() and (wide.mass_block4 <= wide.mass_own + 1e-6).all()
    assert wide.overlap.between(0, 1).all() and wide.group_overlap.between(0, 1).all()


@torch.no_grad()
def test_layer_cascade(model, ids):
    df = layer_cascade(model, ids, selector=Oracle(), budget=64, layers=[0])  # the budget covers every key: exact
    wide = df.set_index(["layer_j", "metric"]).value
    assert wide[(1, "output_error")] < 1e-5 and wide[(1, "topk_overlap")] == 1 and abs(wide[(-1, "logits_kl")]) < 1e-6
    df = layer_cascade(model, ids, selector=Oracle(), budget=2, layers=[0, 1])
    assert set(df[df.layer_i == 1].metric) == {"logits_kl"}
    assert df[(df.layer_i == 0) & (df.metric == "output_error")].value.iloc[0] > 1e-3
