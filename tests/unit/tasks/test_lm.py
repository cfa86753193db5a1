"""Perplexity and next-token accuracy under use_topk, on a tiny random Llama."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from topk_lib.hf import loading as models
from topk_lib.experiments.perplexity import perplexity_sweep
from topk_lib.experiments.settings import Setting
from topk_lib.tasks.lm import perplexity, token_windows

TEXT = " ".join(f"the {w} sat on the {v} mat number {i}." for i, (w, v) in
                enumerate(zip(["cat", "dog", "whale", "ship"] * 40, ["red", "old", "wet", "big", "new"] * 32)))


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models._package_file("minilm-l6"))  # a real offline tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval(), tok


def test_windows_are_even_and_disjoint(lm):
    _, tok = lm
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    w = token_windows(tok, TEXT, window=32, n_windows=3)
    assert w.shape == (3, 32)
    assert w[0].tolist() == ids[:32] and w[-1].tolist() == ids[-32:]
    no_bos = token_windows(tok, TEXT, window=32, n_windows=3, bos=False)
    assert torch.equal(no_bos, w)  # BERT's tokenizer has no BOS: the default adds none


def test_perplexity_matches_manual_cross_entropy(lm):
    model, tok = lm
    r = perplexity(model, tok, TEXT, window=40, n_windows=2)
    w = token_windows(tok, TEXT, window=40, n_windows=2)
    with torch.no_grad():
        logits = model(w).logits[:, :-1]  # [2, 39, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    acc = (logits.argmax(-1) == w[:, 1:]).float().mean()
    assert r["tokens"] == 2 * 39 and r["windows"] == 2
    assert math.isclose(r["nll"], ce.item(), rel_tol=1e-5)
    assert math.isclose(r["perplexity"], math.exp(ce.item()), rel_tol=1e-5)
    assert math.isclose(r["accuracy"], acc.item(), abs_tol=1e-9)


def test_large_k_equals_vanilla_and_small_k_differs(lm):
    model, tok = lm
    ref = perplexity(model, tok, TEXT, window=40, n_windows=2)
    full = perplexity(model, tok, TEXT, window=40, n_windows=2, attn_k=40, ff_k=64)
    small = perplexity(model, tok, TEXT, window=40, n_windows=2, attn_k=1, ff_k=2)
    assert math.isclose(full["nll"], ref["nll"], rel_tol=1e-5)
    assert abs(small["nll"] - ref["nll"]) > 1e-3


def test_sweep_rows(lm):
    model, tok = lm
    df = perplexity_sweep(model, tok, TEXT, settings=[Setting.of(), Setting.of(2, None), Setting.of(None, 8)], window=24,
                          n_windows=2, progress=False)
    assert list(df.columns[:3]) == ["attn_k", "ff_k", "perplexity"]
    assert len(df) == 3 and df["tokens"].eq(46).all()
    assert math.isclose(df["nll"][0], perplexity(model, tok, TEXT, window=24, n_windows=2)["nll"], rel_tol=1e-6)


@pytest.mark.parametrize("kw, arg", [({"window": 0}, "window"), ({"n_windows": -1}, "n_windows"),
                                     ({"window": 10**6}, "window")])
def test_bad_arguments(lm, kw, arg):
    model, tok = lm
    with pytest.raises(ValueError, match=arg):
        perplexity(model, tok, TEXT, **kw)


def test_sweep_takes_settings_only(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="Setting"):
        perplexity_sweep(model, tok, TEXT, settings=[(None, None)], window=24, n_windows=2, progress=False)


def test_wrong_type_is_a_type_error(lm):
    _, tok = lm
    with pytest.raises(TypeError, match="window"):
        token_windows(tok, TEXT, window="32")


def test_sweep_settings():
    from topk_lib.experiments.perplexity import sweep_settings

    s = [(setting.attn_k, setting.ff_k) for setting in sweep_settings()]
    assert s[0] == (None, None) and len(s) == 17 and len(set(s)) == 17
    assert (8, None) in s and (None, 48) in s and (16, 48) in s


def test_cli_settings_for_a_model_of_another_width():
    from topk_lib.experiments.perplexity import cli_settings, sweep_settings

    s = [(x.attn_k, x.ff_k) for x in cli_settings("128,64,32", "1024,512,256")]
    assert s == [(None, None), (128, None), (64, None), (32, None), (None, 1024), (None, 512), (None, 256)]
    assert [(x.attn_k, x.ff_k) for x in cli_settings(None, "8")] == [(None, None), (None, 8)]
    assert cli_settings() == sweep_settings() and len(cli_settings(quick=True)) == 2
    with pytest.raises(ValueError, match="comma-separated ints"):
        cli_settings("128,x")
