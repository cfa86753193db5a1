"""use_topk on tiny random configs of many transformers architectures (the table in tests/architectures.py).

For each architecture, where it applies:

* ``large_k``: ``attn_k >= L``, and ``{0: None}`` (all exact), equal the untouched model, on an
  unpadded and a padded batch;
* ``small_k``: ``attn_k=2`` equals the model's own eager attention with a dense top-2 mask on
  the scores (:func:`architectures.eager_topk`, no topk_lib code);
* ``layer_dict`` / ``head_dict``: ``{layer: k}`` and ``{(layer, head): k}`` equal that reference
  applied to exactly the named layer or head (layers numbered encoder first, the language
  model's blocks only);
* ``ff``: ``ff_k >= d_ff`` equals the model, ``ff_k=3`` (all layers, and ``{1: 3}``) equals a
  dense top-3 MLP reference (:func:`architectures.dense_topk_mlp`, routed experts included);
* ``vision_exact``: with an image, an int ``attn_k`` on multimodal Gemma-3 equals the reference
  on its language layers only (the vision tower stays exact);
* ``generate``: greedy decoding at ``attn_k >=`` context equals plain greedy decoding, and at
  ``attn_k=2`` equals greedy decoding under the reference (KV-cache rows);
* ``restored``: after a block that switched attention and feed-forward and raised, the
  parameters, buffers, every module's ``__dict__`` and every config's attention
  implementation are what they were;
* ``raises``: what is not supported raises ``ValueError`` naming the model or module class.

Padding rows are not compared (their outputs carry no meaning).
"""

import contextlib
import functools
import re

import pytest
import torch
from architectures import (
    ARCHS, B, L, build, dense_topk_mlp, eager_topk, ff_blocks, image_inputs, inputs, layers, real_tokens, run,
)

from topk_lib import use_topk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = 2e-5  # relative to the largest output; float32 differences seen are ~1e-6 of it
BIG = 64  # >= every sequence length and every d_ff here

def cases(kinds=None, attn=None, ff=None):
    """``pytest.param``s of the architectures of ``kinds``, with attention (``attn``) / feed-forward top-k (``ff``)."""
    out = []
    for name, arch in ARCHS.items():
        if (kinds and arch.kind not in kinds) or (attn is not None and arch.attn != attn):
            continue
        if ff is not None and (arch.ff != "raises") != ff:
            continue
        out.append(pytest.param(name, id=name))
    return out


@functools.cache
def model(name):
    return build(name)


@functools.cache
def vanilla(name, padded):
    """The untouched model's output (call it outside any context: it is cached)."""
    return run(model(name), inputs(name, padded=padded))


def assert_close(name, batch, out, ref, what):
    out, ref = real_tokens(batch, out), real_tokens(batch, ref)
    tol = TOL * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{name}: {what}: max |diff| {err:.3g} > {tol:.3g}"


def assert_differs(name, out, ref, what):
    assert (out - ref).abs().max() > 1e-4, f"{name}: {what} changed nothing (the check would be vacuous)"


# ============================================================================ the references themselves


@pytest.mark.parametrize("name", [n for n, a in ARCHS.items() if a.attn or a.ff != "raises"])
def test_references_at_large_k_are_the_model(name):
    """Both references keep everything at k >= L (>= d_ff), so what they change is the top-k alone."""
    m, batch, ref = model(name), inputs(name, padded=True), vanilla(name, True)
    if ARCHS[name].attn:
        with eager_topk(m, BIG):
            assert_close(name, batch, run(m, batch), ref, "eager reference at k >= L")
    if ARCHS[name].ff != "raises":
        with dense_topk_mlp(m, BIG):
            assert_close(name, batch, run(m, batch), ref, "MLP reference at k >= d_ff")


# ============================================================================ attention


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", cases(attn=True))
def test_large_k_equals_model(name, padded):
    m, batch, ref = model(name), inputs(name, padded=padded), vanilla(name, padded)
    with use_topk(m, attn_k=BIG):
        out = run(m, batch)
    assert_close(name, batch, out, ref, f"attn_k={BIG}")
    with use_topk(m, attn_k={0: None}):  # every layer through the exact path for layers without a k
        out = run(m, batch)
    assert_close(name, batch, out, ref, "attn_k={0: None}")


@pytest.mark.parametrize("name", cases(attn=True))
def test_small_k_equals_eager_reference(name):
    m = model(name)
    for padded in (False, True):
        batch = inputs(name, padded=padded)
        with eager_topk(m, 2):
            ref = run(m, batch)
        assert_differs(name, ref, vanilla(name, padded), "the top-2 reference")
        with use_topk(m, attn_k=2):
            out = run(m, batch)
        assert_close(name, batch, out, ref, "attn_k=2 vs eager top-2 reference")


@pytest.mark.parametrize("name", cases(attn=True))
def test_layer_dict_changes_only_that_layer(name):
    m, batch = model(name), inputs(name, padded=True)
    found = layers(m)
    # layer 1, and for encoder-decoders also the first decoder block (self- and cross-attention)
    for layer in sorted({1, len(found) // 2}):
        block, modules = found[layer]
        with eager_topk(m, {mod: 2 for mod in modules}):
            ref = run(m, batch)
        assert_differs(name, ref, vanilla(name, True), f"top-2 in {block}")
        with use_topk(m, attn_k={layer: 2}):
            out = run(m, batch)
        assert_close(name, batch, out, ref, f"attn_k={{{layer}: 2}} vs the reference on {block} only")


@pytest.mark.parametrize("name", cases(attn=True))
def test_head_dict_changes_only_that_head(name):
    m, batch = model(name), inputs(name, padded=True)
    block, modules = layers(m)[0]
    heads = {mod: tuple(2 if h == 1 else None for h in range(_heads(mod))) for mod in modules}
    with eager_topk(m, heads):
        ref = run(m, batch)
    assert_differs(name, ref, vanilla(name, True), f"top-2 in head 1 of {block}")
    with use_topk(m, attn_k={(0, 1): 2, 1: None}):
        out = run(m, batch)
    assert_close(name, batch, out, ref, f"attn_k={{(0, 1): 2}} vs the reference on head 1 of {block}")


def _heads(module):
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return module.config.num_attention_heads


# ============================================================================ feed-forward


@pytest.mark.parametrize("name", cases(ff=True))
def test_ff_equals_dense_topk_mlp(name):
    m, batch = model(name), inputs(name, padded=True)
    with use_topk(m, ff_k=BIG):
        out = run(m, batch)
    assert_close(name, batch, out, vanilla(name, True), f"ff_k={BIG}")
    with dense_topk_mlp(m, 3):
        ref = run(m, batch)
    assert_differs(name, ref, vanilla(name, True), "the top-3 MLP reference")
    with use_topk(m, ff_k=3):
        out = run(m, batch)
    assert_close(name, batch, out, ref, "ff_k=3 vs dense top-3 MLP reference")
    block = ff_blocks(m)[1]
    with dense_topk_mlp(m, 3, layers=[block + "."]):
        ref = run(m, batch)
    with use_topk(m, ff_k={1: 3}):
        out = run(m, batch)
    assert_close(name, batch, out, ref, f"ff_k={{1: 3}} vs the reference on {block} only")


# ============================================================================ multimodal


@pytest.mark.parametrize("name", [p for p in cases() if p.id == "gemma3-multimodal"])
def test_multimodal_vision_tower_left_exact(name):
    """With an image, an int attn_k switches the language layers only; the vision tower stays exact."""
    m, batch = model(name), image_inputs()
    plain = run(m, batch)
    batch_other = dict(batch, pixel_values=batch["pixel_values"].flip(-1))
    assert_differs(name, run(m, batch_other), plain, "the image")
    with eager_topk(m, {mod: 2 for _, mods in layers(m) for mod in mods}):
        ref = run(m, batch)
    with use_topk(m, attn_k=2):
        out = run(m, batch)
    assert_close(name, batch, out, ref, "attn_k=2 vs the reference on the language layers only")


# ============================================================================ generate


def _generate(m, batch):
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if "decoder_input_ids" in batch:
        kw["decoder_input_ids"] = batch["decoder_input_ids"][:, :1]
    with torch.no_grad():
        return m.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)


@pytest.mark.parametrize("name", cases(kinds=("decoder", "encdec"), attn=True))
def test_generate(name):
    m, batch = model(name), inputs(name, padded=False)
    plain = _generate(m, batch)
    with use_topk(m, attn_k=BIG):
        assert torch.equal(_generate(m, batch), plain), f"{name}: greedy generate at attn_k={BIG}"
    with eager_topk(m, 2):
        ref = _generate(m, batch)
    with use_topk(m, attn_k=2):
        assert torch.equal(_generate(m, batch), ref), f"{name}: greedy generate at attn_k=2 vs the reference"


# ============================================================================ restored


def _snapshot(m):
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    dicts = {name: {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in mod.__dict__.items()}
             for name, mod in m.named_modules()}
    configs = {id(c): (c, c._attn_implementation_internal) for mod in m.modules()
               if hasattr(c := getattr(mod, "config", None), "_attn_implementation_internal")}
    return state, dicts, configs


class _Boom(Exception):
    pass


@pytest.mark.parametrize("name", cases())
def test_model_bit_identical_after(name):
    m, batch = model(name), inputs(name, padded=True)
    arch = ARCHS[name]
    before = vanilla(name, True)
    state, dicts, configs = _snapshot(m)
    kw = {"attn_k": {0: 2, (1, 0): 3}} if arch.attn else {}
    if arch.ff != "raises":
        kw["ff_k"] = {0: 3}
    with contextlib.suppress(_Boom, ValueError):  # ValueError: an architecture that refuses
        with use_topk(m, **kw):
            run(m, batch)
            raise _Boom
    now = m.state_dict()
    assert state.keys() == now.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{name}: {key} changed"
    for mod_name, mod in m.named_modules():
        old = dicts[mod_name]
        assert old.keys() == mod.__dict__.keys(), f"{name}: {mod_name}.__dict__ keys changed"
        for k, (value, content) in old.items():
            assert mod.__dict__[k] is value, f"{name}: {mod_name}.{k} replaced"
            if content is not None:
                assert dict(value) == content, f"{name}: {mod_name}.{k} contents changed"
    for config, impl in configs.values():
        assert config._attn_implementation_internal == impl
    assert torch.equal(run(m, batch), before), f"{name}: outputs changed after the block"


# ============================================================================ clear errors


@pytest.mark.parametrize("name", cases(attn=False))
def test_outside_registry_raises(name):
    m = model(name)
    with pytest.raises(ValueError, match=type(m).__name__):
        with use_topk(m, attn_k=2):
            pass


@pytest.mark.parametrize("name", cases(ff=False))
def test_unsupported_ff_raises(name):
    m = model(name)
    with pytest.raises(ValueError) as err:
        with use_topk(m, ff_k=3):
            pass
    classes = {type(mod).__name__ for mod in m.modules()}
    assert any(re.search(rf"\b{c}\b", str(err.value)) for c in classes), f"{name}: {err.value} names no class"


def test_table_covers_enough_architectures():
    assert len(ARCHS) >= 35
    assert B == 2 and L >= 8
