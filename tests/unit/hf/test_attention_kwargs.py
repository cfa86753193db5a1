"""Keyword arguments of attention calls that change the result: selection indices, unknown tensors.

DeepSeek-V3.2-style sparse attention (DSA: DeepSeek-V3.2, GLM-MoE-DSA, AXK2, dots3; MiniMax-M3
with block indices) folds its indexer's selection into the mask only
under "eager"/"sdpa" and passes ``indices=`` under any other implementation name, so the
suite must turn them into the same mask. The references are the models' own eager
attention (a dense top-k mask applied to its scores for small k), never the kernel.
"""

import pytest
import torch
import transformers
from transformers.models.axk2 import modeling_axk2
from transformers.models.deepseek_v32 import modeling_deepseek_v32
from transformers.models.dots3_note import modeling_dots3_note
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl
from reference import dense_topk_attention
from tiny_models import tiny_llama

from topk_lib import use_topk
from topk_lib.hf.call_kwargs import resolve_selection

L = 10
_MLA = dict(
    vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=4, n_group=1, topk_group=1,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_deepseek_v32():
    torch.manual_seed(0)
    return transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**_MLA)).eval()


def tiny_glm_moe_dsa():
    torch.manual_seed(0)
    return transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**_MLA)).eval()


def tiny_axk2():
    torch.manual_seed(0)
    return transformers.AXK2ForCausalLM(transformers.AXK2Config(**_MLA)).eval()


def tiny_dots3():
    torch.manual_seed(0)
    return transformers.Dots3NoteForCausalLM(transformers.Dots3NoteTextConfig(**_MLA)).eval()


def tiny_minimax_m3():
    torch.manual_seed(0)
    cfg = transformers.MiniMaxM3VLTextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2,
        dense_intermediate_size=64, shared_intermediate_size=32, index_n_heads=2, index_head_dim=8,
        index_block_size=2, index_topk_blocks=2, index_local_blocks=1,
        layer_types=["minimax_m3_sparse"] * 2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.MiniMaxM3VLForCausalLM(cfg).eval()


# (builder, the modeling module whose eager_attention_forward the reference replaces)
MODELS = {
    "axk2": (tiny_axk2, modeling_axk2),
    "deepseek_v32": (tiny_deepseek_v32, modeling_deepseek_v32),
    "dots3": (tiny_dots3, modeling_dots3_note),
    "glm_moe_dsa": (tiny_glm_moe_dsa, modeling_glm_moe_dsa),
    "minimax_m3": (tiny_minimax_m3, modeling_minimax_m3_vl),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def sparse_model(request):
    build, modeling = MODELS[request.param]
    return build(), modeling


def batch(padded):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 101, (2, L), generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, L - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs, impl=None):
    old = model.config._attn_implementation
    if impl is not None:
        model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        model.set_attn_implementation(old)


def eager_with_dense_topk(k):
    """The model's eager attention with a dense top-k mask on its (already index-masked) scores."""

    def forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out = dense_topk_attention(query, key, value, k, attn_mask=attention_mask, scale=scaling)  # [B, H, Lq, dv]
        return out.transpose(1, 2).contiguous(), None

    return forward


@pytest.mark.parametrize("padded", [False, True])
def test_large_k_equals_the_models_eager_attention(sparse_model, padded):
    model, _ = sparse_model
    inputs = batch(padded)
    ref = logits(model, inputs, "eager")
    with use_topk(model, attn_k=4 * L):
        out = logits(model, inputs)
    assert (out - ref).abs().max() < 1e-5
    with use_topk(model, attn_k={0: 4 * L}):  # layer 1 runs the exact fallback, which must honour them too
        out = logits(model, inputs)
    assert (out - ref).abs().max() < 1e-5
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("k", [1, 2])
def test_small_k_selects_within_the_models_own_selection(sparse_model, k, monkeypatch):
    model, modeling = sparse_model
    inputs = batch(padded=True)
    vanilla = logits(model, inputs, "eager")
    monkeypatch.setattr(modeling, "eager_attention_forward", eager_with_dense_topk(k))
    ref = logits(model, inputs, "eager")
    with use_topk(model, attn_k=k):
        out = logits(model, inputs)
    assert (out - ref).abs().max() < 1e-5
    assert (out - vanilla).abs().max() > 1e-3  # k really selects


def test_the_selection_is_what_breaks_without_it(monkeypatch):
    """The top-k path ignoring indices differs from eager: the test above would catch a regression."""
    from topk_lib.hf import registry

    model = tiny_deepseek_v32()
    inputs = batch(padded=False)
    ref = logits(model, inputs, "eager")
    monkeypatch.setattr(registry, "resolve_selection", lambda m, q, k, mask, c, kw: (mask, {
        n: v for n, v in kw.items() if n != "indices"}))
    with use_topk(model, attn_k=4 * L):
        out = logits(model, inputs)
    assert (out - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------- the rules themselves


class _Module(torch.nn.Module):
    is_causal = True


def _reference_keep(indices, lk):
    """Dense: True where a key's position appears in the row's indices (entries outside [0, Lk) ignored)."""
    b, lq, _ = indices.shape
    keep = torch.zeros(b, 1, lq, lk, dtype=torch.bool)
    for i in range(b):
        for q in range(lq):
            for j in indices[i, q].tolist():
                if 0 <= j < lk:
                    keep[i, 0, q, j] = True
    return keep


def test_indices_intersect_bool_and_float_masks_and_keep_causality_without_one():
    b, lq, lk = 2, 4, 4
    q, k = torch.randn(b, 2, lq, 8), torch.randn(b, 2, lk, 8)
    indices = torch.tensor([[[0, -1], [1, 0], [3, 1], [2, 9]]] * b, dtype=torch.int32)  # [B, Lq, 2]
    keep = _reference_keep(indices, lk)
    causal = torch.ones(lq, lk, dtype=torch.bool).tril()
    pad = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    pad[1, ..., 0] = False

    mask, rest = resolve_selection(_Module(), q, k, pad & causal, None, {"indices": indices, "position_ids": None})
    assert rest == {"position_ids": None}
    assert torch.equal(mask, pad & causal & keep)
    additive = torch.zeros(b, 1, lq, lk).masked_fill(~(pad & causal), torch.finfo(torch.float32).min)
    mask, _ = resolve_selection(_Module(), q, k, additive, None, {"indices": indices})
    assert torch.equal(mask == 0, pad & causal & keep)
    shared = additive[:1]  # one mask row for the whole batch, as some models build it
    mask, _ = resolve_selection(_Module(), q, k, shared, None, {"indices": indices})
    assert mask.shape == (b, 1, lq, lk) and torch.equal(mask == 0, causal & keep)
    mask, _ = resolve_selection(_Module(), q, k, None, None, {"indices": indices})  # None stood for causal
    assert torch.equal(mask, (causal & keep).expand_as(mask))
    mask, _ = resolve_selection(_Module(), q, k, None, False, {"indices": indices})
    assert torch.equal(mask, keep)


@pytest.mark.parametrize(
    "indices, match",
    [(torch.zeros(2, 4, 2), "integer key positions"), (torch.zeros(2, 3, 2, dtype=torch.long), "Lq=4"),
     (torch.zeros(4, 2, dtype=torch.long), "integer key positions")],
)
def test_indices_in_a_form_the_suite_cannot_honour_raise(indices, match):
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match=match):
        resolve_selection(_Module(), q, q, None, None, {"indices": indices})


def test_block_indices_without_an_indexer_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"_Module passes block_indices= .*indexer\.build_block_mask"):
        resolve_selection(_Module(), q, q, None, None, {"block_indices": torch.zeros(1, 1, 4, 1, dtype=torch.long)})


def test_an_unknown_tensor_keyword_raises_naming_it_and_the_module():
    model = tiny_llama()
    ids = torch.randint(3, 101, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        with use_topk(model, attn_k=2):
            with pytest.raises(ValueError, match=r"LlamaAttention passes selection_bias= \(a tensor\)"):
                model(ids, selection_bias=torch.zeros(1, 6))
            model(ids, sliding_window=4, use_cache=False)  # known non-tensor keywords pass
        assert torch.equal(model(ids).logits, ref)  # and the model is restored after the error


def test_known_harmless_and_handled_tensors_pass():
    q = torch.randn(1, 2, 4, 8)
    kwargs = {"position_ids": torch.arange(4)[None], "s_aux": torch.zeros(2), "cu_seq_lens_q": torch.tensor([0, 4])}
    mask, rest = resolve_selection(_Module(), q, q, None, None, kwargs)
    assert mask is None and rest is not kwargs and set(rest) == set(kwargs)


def test_describe_layers_says_the_indexer_selects_first():
    from topk_lib.hf.layers import describe_layers

    table = str(describe_layers(tiny_deepseek_v32()))
    assert "DeepseekV32Attention, 4 query / 4 KV heads, indexer selection (top-k within it)" in table
