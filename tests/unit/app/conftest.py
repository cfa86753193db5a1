"""Tiny models and explorers for the explorer's tests (real MiniLM tokenizer, random weights)."""

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from topk_lib.app.explorer import AttentionExplorer
from topk_lib.hf import loading as models

TEXT = " ".join(f"the {w} sat on the {v} mat number {i}." for i, (w, v) in
                enumerate(zip(["cat", "dog", "whale", "ship"] * 40, ["red", "old", "wet", "big", "new"] * 32)))


def _sharpen(model, factor):
    # Random weights give near-uniform attention; trained heads are peaky.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "query.weight")):
                param.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models._package_file("minilm-l6"))  # a real offline tokenizer


def tiny_llama(tok, *, layers=2, hidden=32, heads=4, kv_heads=2, head_dim=None, d_ff=64):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads, vocab_size=tok.vocab_size,
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=102, bos_token_id=101,
                      attn_implementation="eager")
    return _sharpen(LlamaForCausalLM(cfg).eval(), 6.0)


@pytest.fixture(scope="module")
def make_llama(tok):
    return lambda **kw: tiny_llama(tok, **kw)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def bert(tok):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=tok.vocab_size, max_position_embeddings=256, attn_implementation="eager")
    return _sharpen(BertModel(cfg).eval(), 6.0)


@pytest.fixture(scope="module")
def llama_ex(llama, tok):
    return AttentionExplorer(llama, tok, TEXT, max_tokens=40)


@pytest.fixture(scope="module")
def bert_ex(bert, tok):
    return AttentionExplorer(bert, tok, TEXT, max_tokens=30)


@pytest.fixture(scope="module")
def text():
    return TEXT
