"""Selections at a fixed budget of keys per query, and the Performer baseline."""

import pytest
import torch

from topk_lib.analysis.approximations import METHODS, approximate, approximation_errors, head_errors, selection_mask
from topk_lib.kernels.attention import chunked_attention


def qkv(lq=12, lk=12, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for n in (lq, lk, lk)]


@pytest.mark.parametrize("method", ["window", "random", "sink_window"])
@pytest.mark.parametrize("budget", [1, 3, 6])
def test_masks_keep_budget_causal_keys(method, budget):
    lq, lk = 7, 10
    mask = selection_mask(lq, lk, method=method, budget=budget, generator=torch.Generator().manual_seed(0))
    allowed = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    assert not (mask & ~allowed).any()
    assert torch.equal(mask.sum(-1), allowed.sum(-1).clamp(max=budget))


def test_window_and_sink_window_contents():
    window = selection_mask(1, 10, method="window", budget=3)
    assert window[0].nonzero().flatten().tolist() == [7, 8, 9]
    sink = selection_mask(1, 10, method="sink_window", budget=5, n_sink=2)
    assert sink[0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]


def test_random_is_seeded():
    a = selection_mask(5, 9, method="random", budget=3, generator=torch.Generator().manual_seed(1))
    b = selection_mask(5, 9, method="random", budget=3, generator=torch.Generator().manual_seed(1))
    c = selection_mask(5, 9, method="random", budget=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["topk", "window", "random", "sink_window"])
def test_full_budget_is_exact(method):
    q, k, v = qkv()
    exact = chunked_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(approximate(q, k, v, method=method, budget=12), exact)
    assert (approximate(q, k, v, method=method, budget=2) - exact).abs().max() > 1e-3


def test_topk_keeps_more_mass_and_beats_selections_on_peaked_attention():
    q, k, v = qkv(lq=64, lk=64, h=4, d=16)
    q = q * 3  # peakier scores, as in trained heads
    rows = head_errors(q, k, v, methods=("topk", "window", "random", "sink_window"), budgets=(8,))
    mean = {m: sum(r["relative_error"] for r in rows if r["method"] == m) / 4 for m in ("topk", "window", "random")}
    assert mean["topk"] < mean["window"] and mean["topk"] < mean["random"]


def test_performer_approximates_with_many_features():
    q, k, v = (t.float() * 0.5 for t in qkv(lq=16, lk=16, h=1, d=4))
    exact = chunked_attention(q, k, v, is_causal=True)
    few = approximate(q, k, v, method="performer", budget=2)
    many = approximate(q, k, v, method="performer", budget=2048)
    err = lambda o: ((o - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(many) < 0.15 and err(many) < err(few)


def test_bad_method():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="method"):
        approximate(q, k, v, method="lsh", budget=4)
    assert "topk" in METHODS


def test_record_qkv_reproduces_the_layer_output():
    from transformers import LlamaConfig, LlamaForCausalLM

    from topk_lib.analysis.approximations import record_qkv

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 10))
    before = model(ids).logits
    qkv_by_layer = record_qkv(model, ids, layers=[1])
    q, k, v = qkv_by_layer[1]
    assert q.shape == (1, 4, 10, 8) and k.shape == (1, 2, 10, 8)
    seen = []
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(ids)
    hook.remove()
    out = chunked_attention(q, k, v, is_causal=True)  # [1, Hq, L, d]
    torch.testing.assert_close(out.transpose(1, 2).reshape(1, 10, 32), seen[0], atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, before)
    with pytest.raises(ValueError, match="layers"):
        record_qkv(model, ids, layers=[5])


def test_approximation_errors_stack_the_layers_head_errors():
    torch.manual_seed(0)
    records = {layer: (torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)) for layer in (3, 1)}
    frame = approximation_errors(records, methods=("topk", "window"), budgets=(4,))
    assert list(frame.columns) == ["layer", "method", "budget", "head", "relative_error"]
    assert frame.layer.tolist() == [3] * 4 + [1] * 4
    for layer, (q, k, v) in records.items():
        rows = head_errors(q, k, v, methods=("topk", "window"), budgets=(4,))
        assert frame[frame.layer == layer].drop(columns="layer").to_dict("records") == rows
