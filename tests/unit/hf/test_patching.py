"""use_topk on tiny randomly initialised Llama (GQA), BERT and T5 models.

Every test compares model outputs, never top-k indices (ties differ across devices).
"""

import re

import pytest
import torch
from tiny_models import D_FF, tiny_bert, tiny_llama, tiny_t5

from topk_lib import use_topk
from topk_lib.hf.layers import describe_layers
from topk_lib.hf.patching import ATTN_IMPLEMENTATION
from topk_lib.hf.registry import attention_handler
from reference import dense_topk_ff_mask

L = 12  # tokens per test sequence
TOL = 1e-5


# --------------------------------------------------------------------------- tiny models


ARCHS = {"llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5, "t5-gated": lambda: tiny_t5(ff="gated-gelu")}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    return request.param, ARCHS[request.param]()


def inputs(name, *, padded=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (2, L), generator=g)  # [B, L]
    mask = torch.ones(2, L, dtype=torch.long)
    if padded:
        mask[1, L - 4 :] = 0  # right padding in the second row
    batch = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("t5"):
        batch["decoder_input_ids"] = torch.randint(3, 101, (2, L - 3), generator=g)
    return batch


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_restored(model):
    for module in model.modules():
        assert "forward" not in module.__dict__, f"{type(module).__name__}.forward left patched"
        assert attention_handler(module, ATTN_IMPLEMENTATION) is None
        cfg = getattr(module, "config", None)
        if cfg is not None:
            assert cfg._attn_implementation == "sdpa"


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("which", ["attn", "ff", "both"])
def test_large_k_equals_vanilla(arch, which):
    name, model = arch
    batch = inputs(name)
    ref = run(model, batch)
    kw = {"attn_k": 4 * L if which != "ff" else None, "ff_k": D_FF if which != "attn" else None}
    with use_topk(model, **kw):
        out = run(model, batch)
    assert torch.allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("which", ["attn", "ff"])
def test_small_k_changes_outputs(arch, which):
    name, model = arch
    batch = inputs(name)
    ref = run(model, batch)
    kw = {"attn_k": 1} if which == "attn" else {"ff_k": 2}
    with use_topk(model, **kw):
        out = run(model, batch)
    assert (out - ref).abs().max() > 1e-3


def test_chunk_size_does_not_change_outputs(arch):
    name, model = arch
    batch = inputs(name)
    with use_topk(model, attn_k=3, ff_k=5, chunk_size=1024):
        a = run(model, batch)
    with use_topk(model, attn_k=3, ff_k=5, chunk_size=5):
        b = run(model, batch)
    assert torch.allclose(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_ff_selection_rule(name):
    """Gated and GELU layers keep the largest |h|, ReLU layers the largest h: checked against a dense reference."""
    import torch.nn.functional as F

    model = ARCHS[name]()
    batch = inputs(name, padded=False)
    k = 5
    if name == "llama":
        mlp = model.model.layers[0].mlp
        entry, exit_ = mlp, mlp
        ref = lambda x: dense_topk_ff_mask(  # noqa: E731
            x, mlp.up_proj.weight, mlp.down_proj.weight, k, F.silu, w_gate=mlp.gate_proj.weight, by_magnitude=True
        )
    elif name == "bert":
        layer = model.encoder.layer[0]
        entry, exit_ = layer.intermediate, layer.output.dense
        ref = lambda x: dense_topk_ff_mask(  # noqa: E731
            x, layer.intermediate.dense.weight, exit_.weight, k, F.gelu, by_magnitude=True,
            b_in=layer.intermediate.dense.bias, b_out=exit_.bias,
        )
    elif name == "t5":
        mlp = model.encoder.block[0].layer[1].DenseReluDense
        entry, exit_ = mlp, mlp
        ref = lambda x: dense_topk_ff_mask(x, mlp.wi.weight, mlp.wo.weight, k, F.relu, by_magnitude=False)  # noqa: E731
    else:
        mlp = model.encoder.block[0].layer[1].DenseReluDense
        entry, exit_ = mlp, mlp
        gelu_tanh = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
        ref = lambda x: dense_topk_ff_mask(  # noqa: E731
            x, mlp.wi_1.weight, mlp.wo.weight, k, gelu_tanh, w_gate=mlp.wi_0.weight, by_magnitude=True
        )
    seen = {}
    h1 = entry.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    h2 = exit_.register_forward_hook(lambda m, a, out: seen.setdefault("y", out.detach().clone()))
    try:
        with use_topk(model, ff_k={0: k}):
            run(model, batch)
    finally:
        h1.remove()
        h2.remove()
    with torch.no_grad():
        expected = ref(seen["x"])
    assert torch.allclose(seen["y"], expected, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- restore, nesting


def test_restored_on_exit_and_on_exception(arch):
    name, model = arch
    batch = inputs(name)
    ref = run(model, batch)
    with use_topk(model, attn_k={0: 1, (1, 0): 2}, ff_k=3):
        assert (run(model, batch) - ref).abs().max() > 1e-3
    assert_restored(model)
    assert torch.equal(run(model, batch), ref)
    with pytest.raises(RuntimeError, match="boom"):
        with use_topk(model, attn_k=1, ff_k=1):
            raise RuntimeError("boom")
    assert_restored(model)
    assert torch.equal(run(model, batch), ref)


def test_nesting_and_switching_k(arch):
    name, model = arch
    batch = inputs(name)
    ref = run(model, batch)
    with use_topk(model, attn_k=2, ff_k=4):
        both = run(model, batch)
    with use_topk(model, attn_k=2):
        attn_only = run(model, batch)
        with use_topk(model, ff_k=4):  # the inner context adds FF top-k to the outer attention top-k
            assert torch.allclose(run(model, batch), both, atol=TOL, rtol=0)
        assert torch.allclose(run(model, batch), attn_only, atol=TOL, rtol=0)
        exact = {x.layer: None for x in describe_layers(model)}
        with use_topk(model, attn_k=exact):  # None = exact: the inner context switches top-k off
            assert torch.allclose(run(model, batch), ref, atol=TOL, rtol=0)
    outs = {}
    for k in (1, 2, 4 * L, 2):  # switching k in a loop, no reload
        with use_topk(model, attn_k=k):
            outs.setdefault(k, []).append(run(model, batch))
    assert torch.allclose(outs[4 * L][0], ref, atol=TOL, rtol=0)
    assert torch.equal(outs[2][0], outs[2][1])
    assert_restored(model)


# --------------------------------------------------------------------------- one interception mechanism


def model_state(model):
    """Everything an intercept may change: instance attributes, forwards, handlers, hooks, configs."""
    from topk_lib.analysis.approximations import QKV_IMPLEMENTATION
    from topk_lib.analysis.capture import CAPTURE_IMPLEMENTATION

    names = (ATTN_IMPLEMENTATION, CAPTURE_IMPLEMENTATION, QKV_IMPLEMENTATION)
    modules = [
        (name, sorted(m.__dict__), m.__dict__.get("forward"), [attention_handler(m, n) for n in names],
         len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]
    configs = {id(c): c._attn_implementation for m in model.modules() if (c := getattr(m, "config", None))}
    return modules, sorted(configs.values())


def test_nested_intercepts_restore_the_model_exactly():
    """Capture, MLP capture and Q/K/V recording inside use_topk: each restores what it changed, no more."""
    from topk_lib.analysis.approximations import record_qkv
    from topk_lib.analysis.capture import record_attention_stats
    from topk_lib.analysis.mlp import record_mlp_stats

    model = tiny_llama()
    batch = inputs("llama")
    ref = run(model, batch)
    before = model_state(model)
    with use_topk(model, attn_k=2):
        topk = run(model, batch)
        inside = model_state(model)
        with record_attention_stats(model, ks=(1,)) as rec:
            assert torch.allclose(run(model, batch), ref, atol=TOL, rtol=0)  # the capture runs exact attention
        assert set(rec.frame()["layer"]) == {0, 1}
        assert model_state(model) == inside
        qkv = record_qkv(model, batch["input_ids"], layers=[0, 1])
        assert set(qkv) == {0, 1}
        assert model_state(model) == inside
        with record_mlp_stats(model, ks=(1,)), use_topk(model, attn_k={0: 1}):
            run(model, batch)
        assert model_state(model) == inside
        assert torch.equal(run(model, batch), topk)
    assert model_state(model) == before
    assert torch.equal(run(model, batch), ref)


def test_an_exception_inside_nested_intercepts_restores_the_model():
    from topk_lib.analysis.capture import record_attention_stats

    model = tiny_llama()
    batch = inputs("llama")
    ref = run(model, batch)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with use_topk(model, attn_k=2, ff_k=4), record_attention_stats(model):
            assert model_state(model) != before
            raise RuntimeError("boom")
    assert model_state(model) == before
    assert torch.equal(run(model, batch), ref)


def _inner_context(kind, model):
    from topk_lib.analysis.capture import record_attention_stats

    if kind == "use_topk":
        return use_topk(model, attn_k=1, ff_k=3)
    if kind == "capture":
        return record_attention_stats(model, ks=(1,), progress=False)
    return use_topk(model.get_encoder(), attn_k=1)  # a submodule's context: it shares the encoder's config


@pytest.mark.parametrize("raised", [False, True])
@pytest.mark.parametrize("inner", ["use_topk", "capture"])
def test_nested_contexts_exit_in_reverse_order_restore_the_model(inner, raised):
    model = tiny_llama()
    batch = inputs("llama")
    ref, before = run(model, batch), model_state(model)
    outer, nested = use_topk(model, attn_k=2), _inner_context(inner, model)
    outer.__enter__()
    inside = model_state(model)
    nested.__enter__()
    error = (RuntimeError, RuntimeError("boom"), None) if raised else (None, None, None)
    assert not nested.__exit__(*error)
    assert model_state(model) == inside
    assert not outer.__exit__(*error)
    assert model_state(model) == before
    assert torch.equal(run(model, batch), ref)


@pytest.mark.parametrize("raised", [False, True])
@pytest.mark.parametrize("inner", ["use_topk", "capture"])
def test_an_out_of_order_exit_raises_and_leaves_the_model_restored(inner, raised):
    """Enter c1, enter c2, exit c1, exit c2: c1's exit closes c2 too and says so; nothing stays patched."""
    model = tiny_llama()
    batch = inputs("llama")
    ref, before = run(model, batch), model_state(model)
    outer, nested = use_topk(model, attn_k=2), _inner_context(inner, model)
    outer.__enter__()
    nested.__enter__()
    if raised:  # the block's own exception goes on; the out-of-order exit is a warning beside it
        boom = RuntimeError("boom")
        with pytest.warns(RuntimeWarning, match="reverse order"):
            assert not outer.__exit__(RuntimeError, boom, None)
    else:
        with pytest.raises(RuntimeError, match="exited before 1 context.*reverse order"):
            outer.__exit__(None, None, None)
    assert model_state(model) == before  # restored at once, not only after the last exit
    assert torch.equal(run(model, batch), ref)
    assert not nested.__exit__(*((RuntimeError, boom, None) if raised else (None, None, None)))
    assert model_state(model) == before
    assert torch.equal(run(model, batch), ref)
    with use_topk(model, attn_k=2):  # the model can be switched again as usual
        assert (run(model, batch) - ref).abs().max() > 1e-3
    assert model_state(model) == before


def test_an_out_of_order_exit_through_exit_stacks_and_a_submodule():
    """Two ExitStacks closed in the order they were opened; the inner context is on the T5 encoder only."""
    from contextlib import ExitStack

    model = tiny_t5()
    batch = inputs("t5")
    ref, before = run(model, batch), model_state(model)
    first, second = ExitStack(), ExitStack()
    first.enter_context(use_topk(model, attn_k=2))
    second.enter_context(_inner_context("submodule", model))
    with pytest.raises(RuntimeError, match="reverse order"):
        first.close()
    second.close()
    assert model_state(model) == before
    assert torch.equal(run(model, batch), ref)


def test_contexts_on_separate_models_exit_in_any_order():
    """Intercepts that change nothing in common are independent: any exit order is fine."""
    a, b = tiny_llama(), tiny_llama()
    batch = inputs("llama")
    ref_a, ref_b = run(a, batch), run(b, batch)
    ca, cb = use_topk(a, attn_k=2), use_topk(b, attn_k=2)
    ca.__enter__()
    cb.__enter__()
    ca.__exit__(None, None, None)
    assert torch.equal(run(a, batch), ref_a)
    assert (run(b, batch) - ref_b).abs().max() > 1e-3  # b's context is still open
    cb.__exit__(None, None, None)
    assert torch.equal(run(b, batch), ref_b)
    assert_restored(a)
    assert_restored(b)


def test_intercept_restores_what_it_set_before_a_failure():
    """A failure while installing (here: a pre-hook on something that is not a module) undoes the changes made."""
    from topk_lib.hf.registry import intercept

    model = tiny_llama()
    before = model_state(model)
    attn = model.model.layers[0].self_attn
    with pytest.raises(AttributeError):
        with intercept(model, name=ATTN_IMPLEMENTATION, attention={attn: None}, forwards={attn: run},
                       pre_hooks={object(): print}):
            pass
    assert model_state(model) == before
    with pytest.raises(ValueError, match="name"):
        with intercept(model, attention={attn: None}):
            pass


# --------------------------------------------------------------------------- what the kernel does not do


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_output_attentions_under_topk_raises_naming_the_capture(name):
    model = ARCHS[name]()
    batch = inputs(name)
    ref = run(model, batch)
    with use_topk(model, attn_k=2):
        with pytest.raises(ValueError, match="output_attentions.*capture_attention_stats"):
            model(**batch, output_attentions=True)
        assert torch.equal(run(model, batch), run(model, batch))  # the context still works
    assert_restored(model)
    assert torch.equal(run(model, batch), ref)


def our_warnings(fn):
    """The messages of the warnings use_topk emits while ``fn`` runs."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if str(w.message).startswith("use_topk")]


@pytest.mark.parametrize("name, part", [("bert", "attn"), ("t5", "attn"), ("t5", "ff")])
def test_dropout_skipped_in_training_mode_warns_once_per_context(name, part):
    model = ARCHS[name]()
    batch = inputs(name)
    kw = {"attn_k": 2} if part == "attn" else {"ff_k": 3}

    def two_passes():
        with use_topk(model, **kw):
            run(model, batch)
            run(model, batch)

    model.train()
    try:
        first, second = our_warnings(two_passes), our_warnings(two_passes)
    finally:
        model.eval()
    assert len(first) == 1 and len(second) == 1, first + second  # once per context, not per call or layer
    words = r"training mode.*dropout.*p=0\.1.*skipped.*eval\(\)" if part == "attn" else r"DenseReluDense is in training mode.*T5DenseActDense.dropout.*skipped"
    assert re.search(words, first[0]), first[0]
    assert our_warnings(two_passes) == []  # eval mode: no dropout, nothing skipped


def test_no_dropout_warning_when_there_is_no_dropout():
    model = tiny_llama()  # attention_dropout = 0, no MLP dropout
    batch = inputs("llama")

    def one_pass():
        with use_topk(model, attn_k=2, ff_k=3):
            run(model, batch)

    model.train()
    try:
        assert our_warnings(one_pass) == []
    finally:
        model.eval()


# --------------------------------------------------------------------------- masks


def test_causal_mask_kept_llama():
    model = tiny_llama()
    batch = inputs("llama", padded=False)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 7) % 98 + 3  # only the future token differs
    for k in (1, 3, 4 * L):
        with use_topk(model, attn_k=k, ff_k=5):
            a, b = run(model, batch), run(model, changed)
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=TOL, rtol=0), f"k={k}: a future token leaked"
        assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_left_padding_llama():
    """A left-padded row gives the same logits as the unpadded sequence, under top-k too."""
    model = tiny_llama()
    ids = inputs("llama", padded=False)["input_ids"][:1]  # [1, L]
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)  # [1, 3 + L]
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, L, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with use_topk(model, attn_k=3):
        a = run(model, {"input_ids": ids})
        b = run(model, {"input_ids": padded, "attention_mask": mask, "position_ids": pos})
    assert torch.allclose(a, b[:, 3:], atol=1e-4, rtol=0)


def test_causal_mask_kept_t5_decoder():
    model = tiny_t5()
    batch = inputs("t5")
    changed = {k: v.clone() for k, v in batch.items()}
    changed["decoder_input_ids"][:, -1] = (changed["decoder_input_ids"][:, -1] + 7) % 98 + 3
    with use_topk(model, attn_k=2, ff_k=5):
        a, b = run(model, batch), run(model, changed)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=TOL, rtol=0)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_bert_padding_mask_kept():
    """Padded keys are never attended: changing them leaves the real rows unchanged."""
    model = tiny_bert()
    batch = inputs("bert")
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, L - 4 :] = 5
    with use_topk(model, attn_k=2):
        a, b = run(model, batch), run(model, changed)
    assert torch.allclose(a[1, : L - 4], b[1, : L - 4], atol=TOL, rtol=0)


# --------------------------------------------------------------------------- per head


def _attn_output_per_head(model, name, batch, layer):
    """The attention output of one layer before its output projection, per head: ``[B, Lq, H, dv]``."""
    if name == "llama":
        proj, heads = model.model.layers[layer].self_attn.o_proj, model.config.num_attention_heads
    elif name == "bert":
        proj, heads = model.encoder.layer[layer].attention.output.dense, model.config.num_attention_heads
    else:
        proj, heads = model.encoder.block[layer].layer[0].SelfAttention.o, model.config.num_heads
    seen = []
    handle = proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        run(model, batch)
    finally:
        handle.remove()
    x = seen[0]  # [B, Lq, H*dv]
    return x.view(*x.shape[:-1], heads, -1)


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_per_head_k_honoured(name):
    model = ARCHS[name]()
    batch = inputs(name, padded=False)
    ref = _attn_output_per_head(model, name, batch, 0)
    h = 1  # with GQA, head 1 shares its KV head with heads 0 and 2
    with use_topk(model, attn_k={(0, h): 1}):
        one = _attn_output_per_head(model, name, batch, 0)
    changed = [(one[:, :, i] - ref[:, :, i]).abs().max().item() > 1e-4 for i in range(ref.shape[2])]
    assert changed[h]
    assert not any(c for i, c in enumerate(changed) if i != h)
    assert torch.allclose(one[:, :, :h], ref[:, :, :h], atol=TOL, rtol=0)
    assert torch.allclose(one[:, :, h + 1 :], ref[:, :, h + 1 :], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_mixed_per_head_ks(name):
    """Heads with different k in one layer each match the whole layer run at their k."""
    model = ARCHS[name]()
    batch = inputs(name, padded=False)
    whole = {}
    for k in (1, 2, None):
        with use_topk(model, attn_k={0: k}):
            whole[k] = _attn_output_per_head(model, name, batch, 0)
    with use_topk(model, attn_k={0: 2, (0, 0): 1, (0, 3): 1, (0, 2): None}):
        mixed = _attn_output_per_head(model, name, batch, 0)
    for head, k in {0: 1, 1: 2, 2: None, 3: 1}.items():
        assert torch.allclose(mixed[:, :, head], whole[k][:, :, head], atol=TOL, rtol=0), (head, k)
    assert (whole[1] - whole[2]).abs().max() > 1e-3  # the comparison can fail


# --------------------------------------------------------------------------- decoding with a KV cache


def test_generate_with_cache_matches_vanilla_at_large_k():
    model = tiny_llama()
    ids = inputs("llama", padded=False)["input_ids"][:1]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with use_topk(model, attn_k=L + 10, ff_k=D_FF):
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()
    assert_restored(model)


def test_generate_with_static_cache():
    """Prefill into a static cache hands the kernel more key slots than queries and no mask."""
    model = tiny_llama()
    ids = inputs("llama", padded=False)["input_ids"][:1]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    ref = model.generate(ids, **kw)
    with use_topk(model, attn_k=L + 6):
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


def test_decode_step_is_topk_over_the_cache():
    """One query row over the KV cache gives the same logits as the full forward's last row."""
    model = tiny_llama()
    ids = inputs("llama", padded=False)["input_ids"]  # [B, L]
    with use_topk(model, attn_k=3, ff_k=7), torch.no_grad():
        full = model(ids).logits[:, -1]  # [B, V]
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    with torch.no_grad():
        vanilla = model(ids).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4, rtol=0)
    assert (full - vanilla).abs().max() > 1e-3


def test_t5_generate_matches_vanilla_at_large_k():
    model = tiny_t5()
    batch = inputs("t5")
    kw = dict(max_new_tokens=8, do_sample=False)
    ref = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    with use_topk(model, attn_k=4 * L, ff_k=D_FF):
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    assert out.tolist() == ref.tolist()


# --------------------------------------------------------------------------- layer numbering, bad input


def test_describe_layers_numbers_encoder_then_decoder():
    layers = describe_layers(tiny_t5())
    assert [x.layer for x in layers] == [0, 1, 2, 3]
    assert layers[0].block == "encoder.block.0" and layers[2].block == "decoder.block.0"
    assert len(layers[2].attention) == 2  # self- and cross-attention share the decoder layer's k
    assert all(x.heads == 4 and x.d_ff == D_FF for x in layers)
    llama = describe_layers(tiny_llama())
    assert [(x.heads, x.mlp) for x in llama] == [(6, "model.layers.0.mlp"), (6, "model.layers.1.mlp")]


@pytest.mark.parametrize(
    "kwargs, arg, error",
    [
        ({"attn_k": 0}, "attn_k", ValueError),
        ({"attn_k": -3}, "attn_k", ValueError),
        ({"attn_k": 2.5}, "attn_k", TypeError),
        ({"attn_k": True}, "attn_k", TypeError),
        ({"attn_k": "8"}, "attn_k", TypeError),
        ({"attn_k": {2: 4}}, "attn_k", ValueError),
        ({"attn_k": {-1: 4}}, "attn_k", ValueError),
        ({"attn_k": {(0, 6): 1}}, "attn_k", ValueError),
        ({"attn_k": {(0, 1, 2): 1}}, "attn_k", ValueError),
        ({"attn_k": {0: 0}}, "attn_k", ValueError),
        ({"ff_k": 0}, "ff_k", ValueError),
        ({"ff_k": {(0, 0): 4}}, "ff_k", ValueError),
        ({"ff_k": {5: 4}}, "ff_k", ValueError),
        ({"ff_k": {0: 1.0}}, "ff_k", TypeError),
        ({"attn_k": 4, "chunk_size": 0}, "chunk_size", ValueError),
    ],
)
def test_bad_k_raises_naming_the_argument(kwargs, arg, error):
    model = tiny_llama()
    batch = inputs("llama")
    ref = run(model, batch)
    with pytest.raises(error, match=arg):
        with use_topk(model, **kwargs):
            pass
    assert_restored(model)
    assert torch.equal(run(model, batch), ref)


def test_registry_names_mask_function():
    """Without a registered mask function transformers builds no mask, and the causal mask silently disappears."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama()
    with use_topk(model, attn_k=2):
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        assert ATTN_IMPLEMENTATION in ALL_ATTENTION_FUNCTIONS
        assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS


# --------------------------------------------------------------------------- GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_cuda_matches_cpu(name):
    """On the GPU: k >= L equals vanilla, and small k gives what it gives on the CPU."""
    model = ARCHS[name]()
    batch = inputs(name)
    with use_topk(model, attn_k=3, ff_k=5):
        cpu_small = run(model, batch)
    model = model.cuda()
    gbatch = {k: v.cuda() for k, v in batch.items()}
    ref = run(model, gbatch)
    with use_topk(model, attn_k=4 * L, ff_k=D_FF):
        full = run(model, gbatch)
    with use_topk(model, attn_k=3, ff_k=5):
        small = run(model, gbatch)
    assert torch.allclose(full, ref, atol=1e-4, rtol=0)
    assert torch.allclose(small.cpu(), cpu_small, atol=1e-4, rtol=0)
    assert_restored(model)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generate_matches_vanilla(dtype):
    model = tiny_llama().to("cuda", dtype)
    ids = inputs("llama", padded=False)["input_ids"][:1].cuda()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with use_topk(model, attn_k=L + 10, ff_k=D_FF):
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()
