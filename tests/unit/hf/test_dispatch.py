"""A model dispatched by accelerate (``load_model(device_map=...)``) with layers offloaded to disk.

accelerate puts an ``AlignDevicesHook`` on every module: it replaces ``module.forward`` on
the instance, loads offloaded weights (on ``meta`` between calls) before the call and drops
them after it. ``use_topk`` and the captures must give on it what they give on the same
weights loaded plainly, and leave accelerate's wrappers exactly as they were.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_models import bert_tokenizer, sharpen
from topk_lib import load_model
from topk_lib.analysis.capture import capture_attention_stats
from topk_lib.analysis.mlp import capture_mlp_stats
from topk_lib.hf.patching import use_topk

D_FF = 64
# Layer 0 on the CPU, layer 1 on disk, and in layer 2 only the MLP on disk (its own hook).
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2.self_attn": "cpu", "model.layers.2.input_layernorm": "cpu",
    "model.layers.2.post_attention_layernorm": "cpu", "model.layers.2.mlp": "disk", "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = bert_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=D_FF, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=102, bos_token_id=101, tie_word_embeddings=False)
    model = sharpen(LlamaForCausalLM(cfg).eval(), 4.0)  # peaked rows: a small k changes the output
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, tok


@pytest.fixture(scope="module")
def models(saved):
    directory, tok = saved
    plain, _ = load_model(str(directory))
    dispatched, _ = load_model(str(directory), device_map=DEVICE_MAP, offload_folder=directory / "offload")
    ids = tok("the whale sat on the old mat and the ship sailed on past the red cat", return_tensors="pt")["input_ids"]
    return plain, dispatched, ids


def _logits(model, ids, **topk):
    with torch.no_grad(), use_topk(model, **topk):
        return model(input_ids=ids).logits


def test_the_dispatch_offloads_to_disk(models):
    _, dispatched, _ = models
    assert dispatched.hf_device_map == DEVICE_MAP
    mlp = dispatched.model.layers[2].mlp
    assert mlp.gate_proj.weight.is_meta  # on disk between calls
    assert "forward" in mlp.__dict__ and hasattr(mlp, "_hf_hook")  # accelerate's instance wrapper
    assert mlp.gate_proj._hf_hook.offload and mlp.gate_proj._hf_hook.weights_map is not None


def test_use_topk_on_a_dispatched_model_equals_the_plain_model(models):
    plain, dispatched, ids = models
    L = ids.shape[1]
    untouched = _logits(plain, ids)
    assert torch.equal(_logits(dispatched, ids), untouched)
    # k >= L and k = d_ff keep everything: the untouched model
    torch.testing.assert_close(_logits(dispatched, ids, attn_k=L, ff_k=D_FF), untouched, rtol=1e-5, atol=1e-5)
    for topk in (dict(attn_k=3), dict(ff_k=8), dict(attn_k=3, ff_k=8)):
        small = _logits(dispatched, ids, **topk)
        assert (small - untouched).abs().max() > 1e-3  # the small k does change the model
        torch.testing.assert_close(small, _logits(plain, ids, **topk), rtol=1e-5, atol=1e-5)


def test_use_topk_restores_accelerates_wrapped_forwards_exactly(models):
    _, dispatched, ids = models
    before = {name: m.__dict__.get("forward") for name, m in dispatched.named_modules()}
    assert before["model.layers.1.mlp"] is not None and before["model.layers.2.mlp"] is not None
    with use_topk(dispatched, attn_k=3, ff_k=8):
        assert dispatched.model.layers[2].mlp.__dict__["forward"] is not before["model.layers.2.mlp"]
    after = {name: m.__dict__.get("forward") for name, m in dispatched.named_modules()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert dispatched.model.layers[1].mlp.gate_proj.weight.is_meta  # the weights went back to disk
    assert dispatched.model.layers[2].mlp.down_proj.weight.is_meta


def test_captures_on_a_dispatched_model_equal_the_plain_model(models):
    plain, dispatched, ids = models
    kw = dict(ks=(1, 4, 16), progress=False)
    a, b = capture_attention_stats(plain, ids, **kw), capture_attention_stats(dispatched, ids, **kw)
    assert len(a) and a.columns.equals(b.columns)
    num = a.select_dtypes("number").columns
    assert a.drop(columns=num).equals(b.drop(columns=num))
    assert (a[num] - b[num]).abs().max().max() <= 1e-6
    m_a = capture_mlp_stats(plain, ids, ks=(4, 16), progress=False)
    m_b = capture_mlp_stats(dispatched, ids, ks=(4, 16), progress=False)
    num = m_a.frame.select_dtypes("number").columns
    assert len(m_a.frame) == len(m_b.frame) > 0
    assert (m_a.frame[num] - m_b.frame[num]).abs().max().max() <= 1e-6


def test_device_map_auto_on_this_machine(saved):
    directory, tok = saved
    model, _ = load_model(str(directory), device_map="auto", offload_folder=directory / "offload-auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected and model.dtype == (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    ids = tok("the old ship", return_tensors="pt")["input_ids"].to(expected)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_block_level_layout_on_disk_bert(tmp_path):
    """BERT's feed-forward sits on the block (intermediate runs the product, output.dense becomes
    the identity): with layer 1 on disk, use_topk's ff_k and attn_k equal the plain model."""
    from transformers import BertConfig, BertModel

    tok = bert_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=D_FF, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=tok.vocab_size, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    device_map = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "disk", "pooler": "cpu"}
    plain, _ = load_model(str(tmp_path))
    dispatched, _ = load_model(str(tmp_path), device_map=device_map, offload_folder=tmp_path / "offload")
    assert dispatched.encoder.layer[1].intermediate.dense.weight.is_meta
    ids = tok("the whale sat on the old mat and the ship sailed on", return_tensors="pt")["input_ids"]

    def hidden(model, **topk):
        with torch.no_grad(), use_topk(model, **topk):
            return model(input_ids=ids).last_hidden_state

    before = {name: m.__dict__.get("forward") for name, m in dispatched.named_modules()}
    for topk in ({}, dict(ff_k=D_FF), dict(ff_k=8), dict(attn_k=3, ff_k=8)):
        torch.testing.assert_close(hidden(dispatched, **topk), hidden(plain, **topk), rtol=1e-5, atol=1e-5)
    assert all(m.__dict__.get("forward") is before[name] for name, m in dispatched.named_modules())
