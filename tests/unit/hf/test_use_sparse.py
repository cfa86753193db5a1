"""use_sparse: any selector inside a real model, prefill and decoding under generate, restored on exit."""

import pytest
import torch

from tiny_models import sharpen, tiny_llama
from topk_lib.analysis.approximations import record_qkv
from topk_lib.hf.patching import use_sparse, use_topk
from topk_lib.selectors.adaptive import Threshold, TopP
from topk_lib.selectors.base import SelectionLog
from topk_lib.selectors.estimated import DoubleSparsity, Loki, Quest
from topk_lib.selectors.heavy import H2O, SnapKV
from topk_lib.selectors.static import Oracle, RandomKeys, SinkWindow


@pytest.fixture(scope="module")
def model():
    return sharpen(tiny_llama(), 3.0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))


def all_selectors(model, ids):
    rec = record_qkv(model, ids, layers=[0, 1])
    return [Oracle(), SinkWindow(), RandomKeys(), H2O(), SnapKV(window=4), Quest(page_size=4),
            Loki(rank=4).calibrate(rec), DoubleSparsity(channels=4).calibrate(rec), TopP(0.9),
            Threshold().calibrate(rec, [8])]


@torch.no_grad()
def test_oracle_equals_use_topk(model, ids):
    with use_topk(model, attn_k=8):
        ref = model(ids).logits
    with use_sparse(model, Oracle(), 8):
        out = model(ids).logits
    torch.testing.assert_close(out, ref)
    with use_topk(model, attn_k=8):
        ref = model.generate(ids[:, :30], max_new_tokens=6, do_sample=False)
    with use_sparse(model, Oracle(), 8):
        out = model.generate(ids[:, :30], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_generate_works_with_every_selector_and_state_is_reset(model, ids):
    exact = model(ids).logits
    for sel in all_selectors(model, ids):
        log = SelectionLog()
        with use_sparse(model, sel, 8, log=log):
            out = model.generate(ids[:, :30], max_new_tokens=5, do_sample=False)
            logits = model(ids).logits
        assert out.shape == (2, 35), sel
        assert torch.isfinite(logits).all() and sel.state == {}, sel
        assert 0 < log.mean_budget <= (40 if isinstance(sel, SnapKV) else 32 if isinstance(sel, Threshold) else 8), sel
    torch.testing.assert_close(model(ids).logits, exact)  # restored


@torch.no_grad()
def test_a_budget_covering_every_key_is_exact_and_layers_limit_the_switch(model, ids):
    exact = model(ids).logits
    with use_sparse(model, SinkWindow(), 64):
        torch.testing.assert_close(model(ids).logits, exact)
    with use_topk(model, attn_k={1: 4}):
        ref = model(ids).logits
    with use_sparse(model, Oracle(), 4, layers=[1]):
        torch.testing.assert_close(model(ids).logits, ref)


@torch.no_grad()
def test_observe_sees_every_layer_and_decoding_call(model, ids):
    seen = []
    with use_sparse(model, Oracle(), 4, layers=[], observe=lambda layer, q, k, v: seen.append((layer, q.shape[2], k.shape[2]))):
        model.generate(ids[:1, :10], max_new_tokens=3, do_sample=False)
    assert seen[:2] == [(0, 10, 10), (1, 10, 10)] and seen[-1] == (1, 1, 12) and len(seen) == 6


def test_bad_arguments_raise(model):
    with pytest.raises(TypeError, match="Selector"):
        with use_sparse(model, "oracle", 8):
            pass
    with pytest.raises(ValueError, match="budget"):
        with use_sparse(model, Oracle(), 0):
            pass
    with pytest.raises(ValueError, match="output_attentions"), torch.no_grad():
        with use_sparse(model, Oracle(), 4):
            model(torch.tensor([[3, 4, 5]]), output_attentions=True)
