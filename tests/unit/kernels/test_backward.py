"""The fused CPU backward of top-k attention (topk_lib.kernels.backward) against a dense reference and the sparse products."""

import pytest
import torch

from topk_lib.kernels import attention, backward, native
from topk_lib.kernels.attention import topk_attention
from topk_lib.kernels.selection import RowSelector
from reference import dense_topk_attention_empty_rows

needs_native = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the compiled backward is not built")


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that grows by one for each call of the fused backward (so a test can tell it ran)."""
    calls = []
    real = backward.fused_backward
    monkeypatch.setattr(attention, "fused_backward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(backward, "FUSED", True)
    return calls


def make(batch, hq, hkv, lq, lk, d=8, dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=dtype, requires_grad=True)
    go = torch.randn(*batch, hq, lq, dv, generator=g, dtype=dtype)
    return q, k, v, go


def mask_for(name, batch, hq, lq, lk, dtype, seed=1):
    """None, or a mask broadcastable to [..., Hq, Lq, Lk]; "sparse" leaves rows with fewer allowed keys than k
    and fully masked rows."""
    g = torch.Generator().manual_seed(seed)
    if name == "none":
        return None
    allowed = torch.rand(*batch, 1, lq, lk, generator=g) > 0.4  # [..., 1, Lq, Lk], shared over heads
    if name == "sparse":
        allowed = torch.rand(*batch, hq, lq, lk, generator=g) > 0.85  # about 0.15 Lk allowed: fewer than k
        allowed[..., 0, 0, :] = False  # a fully masked row (head 0, query 0)
        allowed[..., -1, -1, :2] = True
        allowed[..., -1, -1, 2:] = False  # a row with two allowed keys
    if name in ("bool", "sparse"):
        return allowed
    values = torch.randn(*allowed.shape, generator=g, dtype=dtype)  # a bias, -inf where not allowed
    return values.masked_fill(~allowed, float("-inf")) if name == "float_inf" else values


CASES = [  # batch, Hq, Hkv, Lq, Lk
    ((1,), 2, 2, 12, 12),
    ((2,), 4, 2, 9, 15),  # GQA, Lq < Lk
    ((2, 3), 3, 1, 7, 7),  # two batch dims, one key/value head
    ((1,), 6, 3, 1, 20),  # decode: one query
    ((2,), 4, 4, 16, 11),  # Lq > Lk
]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "float_inf", "sparse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_the_dense_reference(fused_calls, dtype, mask, causal, case):
    batch, hq, hkv, lq, lk = case
    q, k, v, go = make(batch, hq, hkv, lq, lk, dtype=dtype)
    m = mask_for(mask, batch, hq, lq, lk, dtype)
    topk = 5
    out = topk_attention(q, k, v, topk=topk, chunk_size=4, attn_mask=m, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), go)
    assert fused_calls
    ref = dense_topk_attention_empty_rows(q, k, v, topk, attn_mask=m, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("groups", [(1, 1), (2, 3), (3, 2), (4, 2)])  # (batch, Hkv): 1 to 8 groups
def test_threads_split_groups_or_rows_with_the_same_gradients(fused_calls, threads, groups):
    """Whole groups per thread where they split evenly, else each group's rows over the threads (own dK/dV each)."""
    b, hkv = groups
    q, k, v, go = make((b,), 2 * hkv, hkv, 23, 30)
    with RowSelector(threads=threads) as selector:
        out = topk_attention(q, k, v, topk=6, chunk_size=8, is_causal=True, selector=selector)
        grads = torch.autograd.grad(out, (q, k, v), go)
    assert fused_calls
    ref = torch.autograd.grad(dense_topk_attention_empty_rows(q, k, v, 6, is_causal=True), (q, k, v), go)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r)


@needs_native
@pytest.mark.parametrize("mask", ["none", "float", "sparse"])
def test_gradcheck_through_the_fused_backward(fused_calls, mask):
    q, k, v, _ = make((2,), 4, 2, 5, 7, d=4, dv=3)
    m = mask_for(mask, (2,), 4, 5, 7, torch.float64)
    with RowSelector(threads=2) as selector:
        assert torch.autograd.gradcheck(lambda a, b, c: topk_attention(a, b, c, topk=3, chunk_size=2, attn_mask=m,
                                                                       is_causal=True, selector=selector), (q, k, v))
    assert fused_calls


@needs_native
def test_only_the_gradients_asked_for_and_strided_inputs(fused_calls):
    """Inputs laid out as [B, L, H, d] (transformers' projections, transposed): gradients of that shape."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 10, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)  # [B, H, L, d], not contiguous
    out = topk_attention(q, k, v, topk=4, is_causal=True)
    ref = dense_topk_attention_empty_rows(q, k, v, 4, is_causal=True)
    (gk,) = torch.autograd.grad(out.square().sum(), (k,))  # Q and V get no gradient
    (rk,) = torch.autograd.grad(ref.square().sum(), (k,))
    torch.testing.assert_close(gk, rk)
    assert gk.shape == k.shape and fused_calls


@needs_native
@pytest.mark.parametrize("old", ["flag", "chunked", "gather", "softcap", "sinks", "mask_grad"])
def test_the_sparse_product_backward_runs_where_the_fused_one_does_not(fused_calls, monkeypatch, old):
    q, k, v, go = make((1,), 2, 1, 9, 12)
    kw = dict(topk=4, chunk_size=4, is_causal=True)
    if old == "flag":
        monkeypatch.setattr(backward, "FUSED", False)
    extra = {"chunked": dict(selector=RowSelector(method="chunked")), "gather": dict(product="gather"),
             "softcap": dict(softcap=5.0), "sinks": dict(sinks=torch.zeros(2, dtype=torch.float64)),
             "mask_grad": dict(attn_mask=torch.zeros(9, 12, dtype=torch.float64, requires_grad=True))}.get(old, {})
    out = topk_attention(q, k, v, **kw, **extra)
    grads = torch.autograd.grad(out, (q, k, v), go)
    assert not fused_calls
    if old in ("flag", "chunked", "gather"):  # the same function: compare with the fused backward
        monkeypatch.setattr(backward, "FUSED", True)
        fused = torch.autograd.grad(topk_attention(q, k, v, **kw), (q, k, v), go)
        assert fused_calls
        for a, b in zip(grads, fused):
            torch.testing.assert_close(a, b)


def test_without_the_compiled_library_the_sparse_products_run(fused_calls, monkeypatch):
    monkeypatch.setattr(native, "load", lambda: None)
    q, k, v, go = make((1,), 2, 2, 8, 8, dtype=torch.float32)
    out = topk_attention(q, k, v, topk=3, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = torch.autograd.grad(dense_topk_attention_empty_rows(q, k, v, 3, is_causal=True), (q, k, v), go)
    assert not fused_calls
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
