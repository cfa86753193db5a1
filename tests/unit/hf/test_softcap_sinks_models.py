"""use_topk on models with soft-capping (Gemma-2) and attention sinks (GPT-OSS), tiny random configs.

The untouched models run transformers' eager attention (they reject sdpa). The top-k reference
is the model's own ``eager_attention_forward`` with a dense top-k mask added to its scores,
registered in transformers' attention interface by :func:`eager_topk`; the suite's kernels are
never used to build it.
"""

import sys

import pytest
import torch
from transformers import AttentionInterface, Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from reference import dense_capped_sink_attention
from topk_lib.hf.patching import ATTN_IMPLEMENTATION, use_topk

L = 10  # tokens per sequence
TOL = 1e-5


# --------------------------------------------------------------------------- tiny models


def tiny_gemma2(softcap):
    torch.manual_seed(0)
    cfg = Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=101, attn_logit_softcapping=softcap, query_pre_attn_scalar=8, sliding_window=4,
        pad_token_id=0, attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).eval()
    _sharpen(model, 4.0)  # scores well beyond a cap of 2, so the cap changes them
    return model


def tiny_gpt_oss():
    torch.manual_seed(0)
    cfg = GptOssConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=101, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, pad_token_id=0,
        attn_implementation="eager",
    )
    model = GptOssForCausalLM(cfg).eval()
    _sharpen(model, 2.0)
    with torch.no_grad():  # the default init puts every sink near 0; spread them so each head differs
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 2.0, 4))
    return model


def _sharpen(model, gain):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(gain)


MODELS = {
    "gemma2-cap50": lambda: tiny_gemma2(50.0),
    "gemma2-cap2": lambda: tiny_gemma2(2.0),
    "gpt-oss": tiny_gpt_oss,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def inputs(padded, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (2, L), generator=g)  # [B, L]
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch):
    """Logits at the real tokens ``[tokens, vocab]``: a padding query has no key to attend to, and
    what it outputs is a convention (eager: uniform weights; the kernels: zeros)."""
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


# --------------------------------------------------------------------------- the independent reference


def eager_topk(model, k_of):
    """Register the model's eager attention with a dense top-k mask; ``k_of(layer, head)`` gives k or None.

    The scores are formed as the model's eager function forms them (scaled, soft-capped, plus the
    mask); per head, keys outside the k largest get -inf added to the mask, and the model's own
    ``eager_attention_forward`` runs with that mask. Returns the registered name.
    """
    eager = sys.modules[type(model).__module__].eager_attention_forward

    def forward(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        rep = query.shape[1] // key.shape[1]
        s = query @ key.repeat_interleave(rep, 1).transpose(-1, -2) * scaling  # [B, Hq, Lq, Lk]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if attention_mask is not None:
            s = s + attention_mask
        extra = torch.zeros_like(s)
        for h in range(query.shape[1]):
            k = k_of(module.layer_idx, h)
            if k is not None and k < s.shape[-1]:
                keep = torch.zeros_like(s[:, h], dtype=torch.bool).scatter_(-1, s[:, h].topk(k, dim=-1).indices, True)
                extra[:, h] = torch.where(keep, 0.0, float("-inf"))
        mask = extra if attention_mask is None else attention_mask + extra
        return eager(module, query, key, value, mask, scaling=scaling, softcap=softcap, **kwargs)

    name = "kern_test_eager_topk"
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, eager_mask)
    return name


def reference(model, batch, k_of):
    name = eager_topk(model, k_of)
    model.set_attn_implementation(name)
    try:
        return logits(model, batch)
    finally:
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("padded", [False, True])
def test_large_k_equals_the_eager_model(model, padded):
    batch = inputs(padded)
    ref = logits(model, batch)
    with use_topk(model, attn_k=L):
        out = logits(model, batch)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("padded", [False, True])
def test_small_k_equals_eager_with_a_dense_topk_mask(model, padded):
    batch = inputs(padded)
    with use_topk(model, attn_k=2):
        out = logits(model, batch)
    torch.testing.assert_close(out, reference(model, batch, lambda layer, head: 2), atol=TOL, rtol=0)
    assert (out - logits(model, batch)).abs().max() > 1e-3  # k = 2 does change the model


@pytest.mark.parametrize("spec, k_of", [
    ({0: None}, lambda layer, head: None),
    ({1: 2}, lambda layer, head: 2 if layer == 1 else None),
    ({0: 3, 1: None}, lambda layer, head: 3 if layer == 0 else None),
])
def test_a_layer_left_exact_runs_exactly(model, spec, k_of):
    """Exact layers keep their soft-cap and sinks (transformers' SDPA refuses the one and drops the other)."""
    batch = inputs(padded=True)
    with use_topk(model, attn_k=spec):
        out = logits(model, batch)
    torch.testing.assert_close(out, reference(model, batch, k_of), atol=TOL, rtol=0)


def test_per_head_ks_slice_the_sinks_per_head(model):
    batch = inputs(padded=True)
    ks = {(0, 1): 2, (0, 3): 1, (1, 0): 3}
    with use_topk(model, attn_k=ks):
        out = logits(model, batch)
    torch.testing.assert_close(out, reference(model, batch, lambda layer, head: ks.get((layer, head))), atol=TOL, rtol=0)


def test_the_cap_and_the_sinks_matter():
    """Dropping the cap or the sinks changes the logits by far more than the tests' tolerance."""
    batch = inputs(padded=False)
    gemma = tiny_gemma2(2.0)
    ref = logits(gemma, batch)
    for layer in gemma.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (logits(gemma, batch) - ref).abs().max() > 100 * TOL
    oss = tiny_gpt_oss()
    ref = logits(oss, batch)
    with torch.no_grad():
        for layer in oss.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert (logits(oss, batch) - ref).abs().max() > 100 * TOL


def test_gradients_flow_at_small_k(model):
    batch = inputs(padded=True)
    model.zero_grad()
    with use_topk(model, attn_k={0: 2, 1: None}):
        model(**batch).logits[batch["attention_mask"].bool()].square().mean().backward()
    params = dict(model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    for name, p in params.items():
        if name.endswith("sinks"):
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    model.zero_grad()


def test_gradients_equal_the_eager_model_at_large_k(model):
    batch = inputs(padded=True)

    def grads():
        model.zero_grad()
        model(**batch).logits[batch["attention_mask"].bool()].square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n and p.grad is not None}

    ref = grads()
    with use_topk(model, attn_k=L):
        out = grads()
    model.zero_grad()
    assert ref.keys() == out.keys() and any(n.endswith("sinks") for n in ref) == hasattr(model.model.layers[0].self_attn, "sinks")
    for n in ref:
        torch.testing.assert_close(out[n], ref[n], atol=1e-5, rtol=1e-4)


def test_generate_at_large_k_equals_greedy(model):
    batch = inputs(padded=False)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**batch, **kw)
        with use_topk(model, attn_k=L + 4):
            out = model.generate(**batch, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kwarg", ["sinks", "s_aux"])
def test_sinks_of_any_shape_and_dtype_reach_the_kernel_per_head(kwarg):
    """Inkling-2 passes ``sinks=[B, Hq, Lq, 1]`` (one per token), DeepSeek-V4 float32 ``s_aux`` whatever the
    model's dtype; per-head ks slice them with the heads."""
    model = tiny_gpt_oss()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)  # [B, Hq, L, d]
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))  # [B, Hkv, L, d]
    sinks = torch.randn(2, 4, 6, 1, generator=g)  # float32, [B, Hq, L, 1]
    ks = [2, None, 3, 1]
    with use_topk(model, attn_k={(0, h): kh for h, kh in enumerate(ks)}):
        out, _ = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION](
            model.model.layers[0].self_attn, q, k, v, None, scaling=0.7, softcap=3.0, is_causal=True,
            **{kwarg: sinks},
        )  # [B, L, Hq, d]
    for h, kh in enumerate(ks):
        ref = dense_capped_sink_attention(
            q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], kh or L, is_causal=True, scale=0.7,
            softcap=3.0, sinks=sinks[:, h : h + 1].double(),
        )  # [B, 1, L, d]
        torch.testing.assert_close(out[:, :, h], ref[:, 0])


def test_dropout_skipped_by_an_exact_sink_layer_in_training_mode_warns():
    model = tiny_gpt_oss()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with use_topk(model, attn_k={0: None}), pytest.warns(UserWarning, match="applies no dropout"):
        model(**inputs(padded=False))
