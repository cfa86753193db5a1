"""describe_layers: the list callers iterate, and the table a user reads before switching."""

from tiny_models import tiny_bert, tiny_llama, tiny_t5

from topk_lib.hf.layers import LayerInfo, describe_layers


def test_the_list_api_is_kept():
    layers = describe_layers(tiny_llama())
    assert isinstance(layers, list) and all(isinstance(info, LayerInfo) for info in layers)
    assert [info.layer for info in layers] == [0, 1] and layers.towers == []
    assert layers[0].attention == ["model.layers.0.self_attn"] and layers[0].mlp == "model.layers.0.mlp"


def test_the_table_names_every_module_and_how_it_is_switched():
    table = str(describe_layers(tiny_llama()))
    lines = table.splitlines()
    assert lines[0] == "LlamaForCausalLM: 2 layers an int attn_k/ff_k switches"
    assert lines[1] == "layer 0   model.layers.0"
    attn = "self_attn LlamaAttention, 6 query / 2 KV heads -> top-k attention kernel (attn_k)"
    assert lines[2].split() == attn.split()
    mlp = "mlp LlamaMLP, gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)), d_ff 96 -> topk_feedforward (ff_k)"
    assert lines[3].split() == mlp.split()
    assert len(lines) == 7
    assert describe_layers(tiny_llama()).table() == table


def test_the_table_marks_cross_attention_and_encoder_layers():
    table = str(describe_layers(tiny_t5()))
    assert "layer 2   decoder.block.0" in table
    assert "layer.1.EncDecAttention  T5Attention, 4 query / 4 KV heads, cross-attention" in table
    bert = str(describe_layers(tiny_bert()))
    assert "BertSelfAttention, 4 query / 4 KV heads -> top-k attention kernel (attn_k)" in bert


def test_the_table_names_softcap_sliding_windows_and_sinks():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    text = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, sliding_window=4)
    torch.manual_seed(0)
    gemma2 = str(describe_layers(Gemma2ForCausalLM(Gemma2Config(**text))))
    assert "Gemma2Attention, 4 query / 2 KV heads, sliding window 4, softcap 50 ->" in gemma2
    oss = str(describe_layers(GptOssForCausalLM(GptOssConfig(**text, num_local_experts=4, num_experts_per_tok=2))))
    assert "GptOssAttention, 4 query / 2 KV heads, sliding window 4, attention sinks ->" in oss
