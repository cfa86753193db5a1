"""Tiny randomly initialised Llama (GQA), BERT and T5 models shared by the patching and capture tests."""

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

D_FF = 96  # feed-forward width of every tiny model


def tiny_llama(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=48,
        intermediate_size=D_FF,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA: 3 query heads per KV head
        head_dim=8,
        vocab_size=101,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(attn="sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=48,
        intermediate_size=D_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=101,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return BertModel(cfg).eval()


def tiny_t5(cls=T5ForConditionalGeneration, ff="relu", attn="sdpa"):
    torch.manual_seed(0)
    cfg = T5Config(d_model=48, d_ff=D_FF, d_kv=12, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=101,
                   feed_forward_proj=ff, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   attn_implementation=attn)
    model = cls(cfg).eval()
    with torch.no_grad():  # the default init gives tiny random T5s near-constant outputs and near-uniform attention
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def sharpen(model, gain):
    """Random init gives near-uniform attention; larger q/k weights give peaked rows that tell metrics apart."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "query.weight", "key.weight")):
                p.mul_(gain)
    return model


# Small models with a real vocabulary, for sweeps that tokenize text (accuracy, zero-shot).

TEXT = " ".join(f"the {w} sat on the {v} mat number {i}." for i, (w, v) in
                enumerate(zip(["cat", "dog", "whale", "ship"] * 40, ["red", "old", "wet", "big", "new"] * 32)))


def bert_tokenizer():
    from transformers import AutoTokenizer

    from topk_lib.hf import loading as models

    return AutoTokenizer.from_pretrained(models._package_file("minilm-l6"))  # a real offline tokenizer


def small_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=102, bos_token_id=101)
    return LlamaForCausalLM(cfg).eval()


def small_bert(tok):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=tok.vocab_size, max_position_embeddings=256)
    return BertModel(cfg).eval()
