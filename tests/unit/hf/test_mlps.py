"""ff_k on every supported MLP shape, mixture-of-experts layers and the switch-on probe, on tiny random models.

The reference for a small k is the untouched model with a dense top-k mask applied to the
hidden activation ``h`` where the model itself forms it: a forward pre-hook on the module
that consumes ``h`` (``down_proj``, ``c_proj``, ``fc2``, ...) keeps the k largest ``|h|``
(largest ``h`` for a plain ReLU MLP) per token and zeroes the rest; routed experts get a
per-token, per-expert loop written here. Outputs are compared, never indices.
"""

import contextlib

import pytest
import torch
import transformers as T
from tiny_models import tiny_bert, tiny_llama, tiny_t5

from topk_lib import use_topk
from topk_lib.hf.layers import describe_layers, find_layers
from topk_lib.hf.mlps import MLP_LAYOUTS, ff_forwards
from reference import keep_topk, routed_experts_reference

V = 101  # vocabulary of every tiny model
TOL = 2e-5
H = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MOE = dict(H, num_key_value_heads=2, moe_intermediate_size=32)


def _model(cfg_cls, model_cls, **kw):
    def make():
        torch.manual_seed(0)
        cfg = cfg_cls(vocab_size=V, **kw)
        cfg._attn_implementation = "sdpa"
        return getattr(T, model_cls)(cfg).eval()

    return make


# name: (factory, paths of the modules whose input is h, by layer; selection by "value" or "magnitude")
ARCHS = {
    "llama": (tiny_llama, ["model.layers.{}.mlp.down_proj"], "magnitude"),
    "bert": (tiny_bert, ["encoder.layer.{}.output.dense"], "magnitude"),
    "t5": (tiny_t5, [f"{stack}.block.{i}.layer.{j}.DenseReluDense.wo" for stack, j in (("encoder", 1), ("decoder", 2))
                     for i in range(2)], "value"),
    "gpt2": (_model(T.GPT2Config, "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                    bos_token_id=1, eos_token_id=2), ["transformer.h.{}.mlp.c_proj"], "magnitude"),
    "gpt_neox": (_model(T.GPTNeoXConfig, "GPTNeoXForCausalLM", **H, max_position_embeddings=64),
                 ["gpt_neox.layers.{}.mlp.dense_4h_to_h"], "magnitude"),
    "gptj": (_model(T.GPTJConfig, "GPTJForCausalLM", n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4,
                    n_positions=64, bos_token_id=1, eos_token_id=2), ["transformer.h.{}.mlp.fc_out"], "magnitude"),
    "opt": (_model(T.OPTConfig, "OPTForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
            ["model.decoder.layers.{}.fc2"], "value"),  # OPT's MLP is ReLU
    "bart": (_model(T.BartConfig, "BartForConditionalGeneration", d_model=32, encoder_layers=1, decoder_layers=1,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=64), ["model.encoder.layers.0.fc2", "model.decoder.layers.0.fc2"],
             "magnitude"),
    "whisper": (_model(T.WhisperConfig, "WhisperForConditionalGeneration", d_model=32, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                ["model.encoder.layers.0.fc2", "model.decoder.layers.0.fc2"], "magnitude"),
    "phi": (_model(T.PhiConfig, "PhiForCausalLM", **H), ["model.layers.{}.mlp.fc2"], "magnitude"),
    "phi3": (_model(T.Phi3Config, "Phi3ForCausalLM", **H, num_key_value_heads=2, pad_token_id=0, eos_token_id=2),
             ["model.layers.{}.mlp.down_proj"], "magnitude"),
    "starcoder2": (_model(T.Starcoder2Config, "Starcoder2ForCausalLM", **H, num_key_value_heads=2),
                   ["model.layers.{}.mlp.c_proj"], "magnitude"),
    "distilbert": (_model(T.DistilBertConfig, "DistilBertModel", dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                          max_position_embeddings=64), ["transformer.layer.{}.ffn.lin2"], "magnitude"),
    "modernbert": (_model(T.ModernBertConfig, "ModernBertModel", **H, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          cls_token_id=1, sep_token_id=2), ["layers.{}.mlp.Wo"], "magnitude"),
    "vit": (_model(T.ViTConfig, "ViTModel", **H, image_size=8, patch_size=4), ["layers.{}.mlp.fc2"], "magnitude"),
    "falcon_h1": (_model(T.FalconH1Config, "FalconH1ForCausalLM", **H, num_key_value_heads=2,
                         mlp_multipliers=[0.7, 1.3], mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                         mamba_d_state=8, mamba_chunk_size=8, head_dim=8),
                  ["model.layers.{}.feed_forward.down_proj"], "magnitude"),
    "gemma3n": (_model(T.Gemma3nTextConfig, "Gemma3nForCausalLM", **H, num_key_value_heads=2, head_dim=8,
                       activation_sparsity_pattern=[0.95, 0.0], laurel_rank=4, hidden_size_per_layer_input=8,
                       vocab_size_per_layer_input=V, num_kv_shared_layers=0, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"]),
                ["model.layers.{}.mlp.down_proj"], "magnitude"),
    # mixture of experts: the shared expert's down_proj consumes h; routed experts get the loop below
    "qwen2_moe": (_model(T.Qwen2MoeConfig, "Qwen2MoeForCausalLM", **MOE, shared_expert_intermediate_size=64,
                         num_experts=4, num_experts_per_tok=2), ["model.layers.{}.mlp.shared_expert.down_proj"],
                  "magnitude"),
    "aria_text": (_model(T.AriaTextConfig, "AriaTextForCausalLM", **dict(H, num_key_value_heads=2), moe_num_experts=4,
                         moe_topk=2, moe_num_shared_experts=1), ["model.layers.{}.mlp.shared_experts.down_proj"],
                  "magnitude"),
    "qwen3_moe": (_model(T.Qwen3MoeConfig, "Qwen3MoeForCausalLM", **MOE, num_experts=4, num_experts_per_tok=2,
                         head_dim=8), [], "magnitude"),
    "mixtral": (_model(T.MixtralConfig, "MixtralForCausalLM", **dict(H, num_key_value_heads=2), num_local_experts=4,
                       num_experts_per_tok=2), [], "magnitude"),
    "deepseek_v3": (_model(T.DeepseekV3Config, "DeepseekV3ForCausalLM", **dict(MOE, num_key_value_heads=4),
                           n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
                           qk_nope_head_dim=4, v_head_dim=8),
                    ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.down_proj"], "magnitude"),
}

_MODELS = {}


def model_of(name):
    if name not in _MODELS:
        _MODELS[name] = ARCHS[name][0]()
    return _MODELS[name]


def inputs(name):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    if name == "whisper":
        return {"input_features": torch.randn(2, 8, 16, generator=g),
                "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}
    batch = {"input_ids": torch.randint(3, V, (2, 8), generator=g)}
    if name in ("bart", "t5"):
        batch["decoder_input_ids"] = torch.randint(3, V, (2, 5), generator=g)
    return batch


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def n_layers(model):
    return len(describe_layers(model))


# --------------------------------------------------------------------------- the dense reference


@contextlib.contextmanager
def reference(model, name, k, layers):
    """The model with the dense top-k mask on h in ``layers`` (and the reference loop in their routed experts)."""
    paths = ARCHS[name][1]
    if len(paths) == 1 and "{}" in paths[0]:
        paths = [paths[0].format(i) for i in range(n_layers(model))]
    handles, patched = [], []
    by = ARCHS[name][2]
    for layer in layers:
        if layer < len(paths):
            mask = lambda m, args: (keep_topk(args[0], k, by_magnitude=by == "magnitude"),)  # noqa: E731
            handles.append(model.get_submodule(paths[layer]).register_forward_pre_hook(mask))
        for mlp in describe_layers(model)[layer].mlps:
            experts = model.get_submodule(mlp)
            if isinstance(getattr(experts, "gate_up_proj", None), torch.nn.Parameter):
                experts.forward = routed_experts_reference(experts, k)
                patched.append(experts)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_layer_is_found(name):
    model = model_of(name)
    infos = describe_layers(model)
    assert all(info.mlps and not info.dense_ff for info in infos), [(i.layer, i.mlps, i.dense_ff) for i in infos]
    if name in ("qwen2_moe", "deepseek_v3", "aria_text"):  # the shared and the routed experts of a MoE layer
        assert len(infos[1].mlps) == 2


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_k_at_least_d_ff_equals_the_model_and_leaves_it_bit_identical(name):
    model = model_of(name)
    batch = inputs(name)
    before, ref = snapshot(model), run(model, batch)
    d_ff = max(info.d_ff for info in describe_layers(model))
    with use_topk(model, ff_k=d_ff):
        out = run(model, batch)
    assert torch.allclose(out, ref, atol=TOL, rtol=0), (out - ref).abs().max()
    assert torch.equal(run(model, batch), ref)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("spec", ["all", "first", "last"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_small_k_equals_the_dense_topk_reference(name, spec):
    model = model_of(name)
    batch, k, last = inputs(name), 3, n_layers(model) - 1
    ff_k, layers = {"all": (k, range(last + 1)), "first": ({0: k}, [0]), "last": ({last: k}, [last])}[spec]
    with reference(model, name, k, layers):
        expected = run(model, batch)
    with use_topk(model, ff_k=ff_k):
        out = run(model, batch)
    assert torch.allclose(out, expected, atol=TOL, rtol=0), (out - expected).abs().max()
    if spec != "all":  # a dict changes exactly the layer it names: the reference masks only that one
        assert (out - run(model, batch)).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["gpt2", "phi3", "modernbert", "qwen2_moe", "falcon_h1", "opt"])
def test_gradients_reach_the_weights_as_in_the_reference(name):
    """Views, slices and scaled copies of the weights pass gradients back to the model's parameters."""
    model = model_of(name)
    batch, k = inputs(name), 3
    grads = []
    for ctx in (lambda: reference(model, name, k, range(n_layers(model))), lambda: use_topk(model, ff_k=k)):
        model.zero_grad()
        with ctx():
            out = model(**batch)
            (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4), n


# --------------------------------------------------------------------------- mixture of experts


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_routed_experts_are_switched_not_only_the_shared_expert(name):
    torch.manual_seed(0)
    model = ARCHS[name][0]()
    shared = "shared_expert" if name == "qwen2_moe" else "shared_experts"
    with torch.no_grad():
        model.get_submodule(f"model.layers.1.mlp.{shared}.down_proj").weight.zero_()
    batch = inputs(name)
    dense = run(model, batch)
    with use_topk(model, ff_k={1: 1}):
        out = run(model, batch)
    with reference(model, name, 1, [1]):
        expected = run(model, batch)
    assert (out - dense).abs().max() > 1e-4  # only the routed experts can have changed it
    assert torch.allclose(out, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("cfg_cls, model_cls, experts, kw", [
    # interleaved gate/up, clamping and a GLU with biases
    (T.GptOssConfig, "GptOssForCausalLM", "GptOssExperts", dict(num_local_experts=4, num_experts_per_tok=2)),
    # batched experts [E, d, 2 d_ff] called on every token; the shared expert alone would be switched
    (T.Llama4TextConfig, "Llama4ForCausalLM", "Llama4TextExperts",
     dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64)),
])
def test_moe_experts_of_another_layout_are_refused_by_name(cfg_cls, model_cls, experts, kw):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                  num_attention_heads=4, num_key_value_heads=2, **kw)
    model = getattr(T, model_cls)(cfg).eval()
    assert any(experts in d for d in describe_layers(model)[0].dense_ff)
    for ff_k in ({0: 4}, 4):
        with pytest.raises(ValueError, match=rf"(stay dense|no supported shape): .*\({experts}\)"):
            with use_topk(model, ff_k=ff_k):
                pass
    assert not any("forward" in m.__dict__ for m in model.modules())


# --------------------------------------------------------------------------- the probe


class DoubledMLP(T.models.llama.modeling_llama.LlamaMLP):
    def forward(self, x):
        return 2 * super().forward(x)


def test_the_probe_refuses_an_mlp_whose_forward_does_more():
    model = tiny_llama()
    model.model.layers[0].mlp.__class__ = DoubledMLP
    batch = inputs("llama")
    ref = run(model, batch)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(DoubledMLP\) does more than act\(gate\)\*up"):
        with use_topk(model, ff_k=4):
            pass
    assert torch.equal(run(model, batch), ref)  # refused before anything was touched
    with use_topk(model, ff_k={1: 4}):  # a layer left out of ff_k is not probed
        pass


@pytest.mark.parametrize("name, module", [("falcon_h1", "model.layers.0.feed_forward"),
                                          ("gemma3n", "model.layers.0.mlp")])
def test_the_probe_would_catch_the_plain_gated_replacement(name, module):
    """Without their own layouts (multipliers, activation sparsity) the plain gated one is refused."""
    mlp = model_of(name).get_submodule(module)
    gated = next(layout for layout in MLP_LAYOUTS if layout.kind == "gated")
    assert gated.matches(mlp)
    with pytest.raises(ValueError, match=type(mlp).__name__):
        ff_forwards(mlp, gated, 4, 1024, name=module)
    assert find_layers(model_of(name)).mlps[0][3].kind != "gated"


def test_the_probe_leaves_the_global_rng_and_training_flags_alone():
    model = tiny_t5().train()  # T5's DenseReluDense has a dropout the probe must not run
    state = torch.get_rng_state()
    with use_topk(model, ff_k=4):
        assert torch.equal(torch.get_rng_state(), state)
        assert all(m.training for m in model.modules())


def test_unknown_mlp_is_refused_naming_its_class():
    class OddMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(48, 48)

        def forward(self, x):
            return self.w(x)

    model = tiny_llama()
    model.model.layers[1].mlp = OddMLP()
    assert describe_layers(model)[1].dense_ff == ["model.layers.1.mlp (OddMLP)"]
    with pytest.raises(ValueError, match=r"layer 1 .*model\.layers\.1\.mlp \(OddMLP\)"):
        with use_topk(model, ff_k=4):
            pass
    with use_topk(model, ff_k={0: 4}):
        pass


def test_t5_gated_still_switches():
    model = tiny_t5(ff="gated-gelu")
    batch = inputs("t5")
    ref = run(model, batch)
    with use_topk(model, ff_k=96):
        assert torch.allclose(run(model, batch), ref, atol=TOL, rtol=0)
