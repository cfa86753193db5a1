"""Layer sensitivity and per-head budgets on a tiny random Llama."""

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from topk_lib import use_topk
from topk_lib.analysis.budget import load_budget, per_head_budget, save_budget
from topk_lib.analysis.sensitivity import layer_sensitivity


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_layer_sensitivity(tiny_llama):
    ids = torch.randint(0, 50, (1, 24), generator=torch.Generator().manual_seed(0))
    small = layer_sensitivity(tiny_llama, ids, k=1)
    assert list(small.layer) == [0, 1, 2]
    assert (small.kl > 0).all() and small.top1_agreement.between(0, 1).all()
    exact = layer_sensitivity(tiny_llama, ids, k=24)  # k >= L: nothing changes
    assert exact.kl.abs().max() < 1e-6 and (exact.top1_agreement == 1).all()


def test_per_head_budget_and_scaling():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "value": [2.0, 6.0, 10.0, 30.0]})
    assert per_head_budget(table) == {(0, 0): 2, (0, 1): 6, (1, 0): 10, (1, 1): 30}
    scaled = per_head_budget(table, average_k=6)  # mean 12 -> factor 0.5
    assert scaled == {(0, 0): 1, (0, 1): 3, (1, 0): 5, (1, 1): 15}
    assert per_head_budget(table, average_k=6, min_k=2, max_k=10)[(1, 1)] == 10
    with pytest.raises(ValueError, match="columns"):
        per_head_budget(table.drop(columns="head"))
    with pytest.raises(ValueError, match="several rows"):
        per_head_budget(pd.concat([table, table]))


def test_budget_round_trip_and_use(tmp_path, tiny_llama):
    budget = {(0, 0): 1, (0, 3): 2, (2, 1): 5}
    path = save_budget(budget, tmp_path / "budget.json", model="tiny")
    assert load_budget(path) == budget
    with pytest.raises(FileExistsError, match="overwrite"):
        save_budget(budget, path)
    save_budget({(0, 0): 3}, path, overwrite=True)
    assert load_budget(path) == {(0, 0): 3}
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_llama(ids).logits
        with use_topk(tiny_llama, attn_k=load_budget(path)):
            changed = tiny_llama(ids).logits
    assert not torch.allclose(base, changed)


def test_analysis_inputs_quick_uses_the_offline_text(tok):
    from topk_lib.experiments.inputs import analysis_inputs

    text_name, text, ids, encoder_name, encoder_ids = analysis_inputs(tok, tok, length=32, encoder_length=20, quick=True)
    assert (text_name, encoder_name) == ("pydoc", "pydoc") and len(text) > 1000
    assert ids.shape == (1, 32) and encoder_ids.shape == (1, 20)
    assert ids[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:32]


def test_save_budget_writes_sorted_json_atomically(tmp_path):
    path = save_budget({(1, 0): 4, (0, 2): 2}, tmp_path / "b.json", model="tiny")
    assert path.read_text() == ('{\n "average_k": 3.0,\n "budget": {\n  "0,2": 2,\n  "1,0": 4\n },\n'
                                ' "model": "tiny"\n}\n')
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # no temporary file left


def test_scaled_budgets_and_summary():
    from topk_lib.analysis.budget import budget_summary, scaled_budgets

    budget = {(0, 0): 10, (0, 1): 30, (1, 0): 20, (1, 1): 40}
    scaled = scaled_budgets(budget, [5, 50])
    assert list(scaled) == [5, 50] and scaled[5] == {(0, 0): 2, (0, 1): 6, (1, 0): 4, (1, 1): 8}
    assert scaled[50] == {(0, 0): 20, (0, 1): 60, (1, 0): 40, (1, 1): 80}
    assert budget_summary(budget) == "4 heads, k from 10 to 40, median 25, mean 25.0"


def test_head_budget_prefers_the_given_file_then_its_own_then_measures(tok, tmp_path, monkeypatch):
    from topk_lib.experiments.inputs import head_budget

    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    from tiny_models import small_llama

    model, tokens = small_llama(tok), 64  # a tokenizing model: the budget is measured on real pydoc text
    kw = dict(model_name="tiny", budget_file="given.json", tokens=tokens, progress=False)
    budget, source = head_budget(model, tok, **kw)
    own = tmp_path / "accuracy" / "tiny_head_budget_k99_pydoc64.json"
    assert source == "measured now on 64 pydoc tokens" and load_budget(own) == budget
    assert all(1 <= k <= tokens for k in budget.values())
    assert head_budget(model, tok, **kw) == (budget, "measured earlier here (tiny_head_budget_k99_pydoc64.json)")
    save_budget({(0, 0): 7}, tmp_path / "given.json", tokens=1024, text="moby_dick", statistic="k99 median")
    assert head_budget(model, tok, **kw) == (
        {(0, 0): 7}, "notebook 02 (given.json: 1024 tokens of moby_dick, k99 median)")
