"""Equivalence, gradient, memory and input-checking tests for topk_lib.kernels.attention."""

import pytest
import torch
import torch.nn.functional as F

from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.product import resolve_product
from topk_lib.kernels.selection import RowSelector
from reference import causal_mask, dense_topk_attention, saved_bytes


@pytest.fixture(params=["csr", "gather"])
def product(request):
    """Each implementation of the sparse products (CSR kernels, gathers): pass it as ``product=``."""
    return request.param


def make_qkv(batch=(2,), hq=4, hkv=2, lq=13, lk=17, d=8, dv=6, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=dtype)
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=dtype)
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[-3] != k.shape[-3], **kw)


MASKS = ["none", "causal", "bool", "float", "bool_heads", "float_batch"]


def mask_case(name, q, k):
    lq, lk = q.shape[-2], k.shape[-2]
    g = torch.Generator().manual_seed(1)
    if name == "none":
        return {}
    if name == "causal":
        return {"is_causal": True}
    if name == "bool":  # broadcast over batch and heads
        m = torch.rand(lq, lk, generator=g) > 0.3
        m[:, 0] = True
        return {"attn_mask": m}
    if name == "float":
        return {"attn_mask": torch.randn(lq, lk, generator=g, dtype=q.dtype)}
    if name == "bool_heads":  # per head, shared over batch and queries (padding style)
        m = torch.rand(q.shape[-3], 1, lk, generator=g) > 0.4
        m[..., 0] = True
        return {"attn_mask": m}
    if name == "float_batch":  # per batch element, shared over heads
        return {"attn_mask": torch.randn(*q.shape[:-3], 1, lq, lk, generator=g, dtype=q.dtype)}
    raise KeyError(name)


def sdpa_kwargs(kw, lq, lk):
    """SDPA does not take is_causal with Lq != Lk the way we define it: pass a bool mask."""
    if kw.get("is_causal"):
        return {"attn_mask": causal_mask(lq, lk)}
    return kw


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", [dict(hq=4, hkv=2, lq=13, lk=17), dict(hq=3, hkv=3, lq=16, lk=16), dict(hq=6, hkv=1, lq=1, lk=9)])
def test_exact_paths_match_sdpa(dtype, mask, shape):
    q, k, v = make_qkv(dtype=dtype, **shape)
    kw = mask_case(mask, q, k)
    ref = sdpa(q, k, v, **sdpa_kwargs(kw, q.shape[-2], k.shape[-2]))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    lk = k.shape[-2]
    for out in (
        topk_attention(q, k, v, topk=None, chunk_size=5, **kw),
        topk_attention(q, k, v, topk=lk, chunk_size=4, **kw),
        topk_attention(q, k, v, topk=10 * lk, chunk_size=64, **kw),
        chunked_attention(q, k, v, chunk_size=3, **kw),
        vanilla_attention(q, k, v, **kw),
    ):
        torch.testing.assert_close(out, ref, **tol)


def test_batch_dims_any_number():
    q, k, v = make_qkv(batch=(2, 3))
    torch.testing.assert_close(topk_attention(q, k, v, topk=None, chunk_size=4), sdpa(q, k, v))
    q, k, v = make_qkv(batch=())
    torch.testing.assert_close(topk_attention(q, k, v, topk=None, chunk_size=4), sdpa(q, k, v))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("topk", [1, 3, 8])
def test_topk_matches_dense_reference(product, mask, topk):
    q, k, v = make_qkv()
    kw = mask_case(mask, q, k)
    torch.testing.assert_close(topk_attention(q, k, v, topk=topk, product=product, chunk_size=4, **kw), dense_topk_attention(q, k, v, topk, **kw))


@pytest.mark.parametrize("topk", [None, 1, 5])
def test_independent_of_chunk_size(topk):
    q, k, v = make_qkv(lq=23, lk=23)
    outs = [topk_attention(q, k, v, topk=topk, chunk_size=c, is_causal=True) for c in (1, 2, 7, 23, 1000)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-12, rtol=1e-12)


def test_topk_changes_output_below_lk():
    """The test above would pass for a kernel that ignores topk: make sure it does not."""
    q, k, v = make_qkv()
    assert (topk_attention(q, k, v, topk=2) - sdpa(q, k, v)).abs().max() > 1e-3


def test_fewer_allowed_keys_than_k_and_fully_masked_rows(product):
    q, k, v = make_qkv(lq=5, lk=7)
    m = torch.zeros(5, 7, dtype=torch.bool)
    m[0, :2] = True  # two allowed keys, k = 4: both used, nothing else
    m[1, :] = True
    # rows 2..4 fully masked: zeros, not an average of arbitrary values
    out = topk_attention(q, k, v, topk=4, product=product, attn_mask=m)
    torch.testing.assert_close(out[..., 0, :], sdpa(q, k, v, attn_mask=m)[..., 0, :])
    assert torch.equal(out[..., 2:, :], torch.zeros_like(out[..., 2:, :]))
    out_exact = chunked_attention(q, k, v, attn_mask=m)
    assert torch.equal(out_exact[..., 2:, :], torch.zeros_like(out_exact[..., 2:, :]))
    # causal with more queries than keys: the first queries see nothing
    q2, k2, v2 = make_qkv(lq=6, lk=4)
    # Lq > Lk means queries before position 0: rows 0,1 have no key
    assert torch.equal(topk_attention(q2, k2, v2, topk=2, product=product, is_causal=True)[..., :2, :], torch.zeros(2, 4, 2, 6, dtype=q2.dtype))


@pytest.mark.parametrize("where", ["query", "key", "value_inf", "mask"])
def test_nan_and_inf_propagate_like_sdpa_and_fully_masked_rows_stay_zero(where):
    """vanilla_attention and the kernels agree with SDPA on non-finite inputs; a row with no key is zeros."""
    q, k, v = make_qkv(lq=5, lk=7)
    m = torch.ones(5, 7, dtype=torch.bool)
    m[3] = False  # a fully masked row
    m[1, 2] = False
    if where == "query":
        q[0, 1, 2, 0] = float("nan")
    elif where == "key":
        k[1, 0, 4, 3] = float("nan")  # every row of the query heads reading KV head 0 that may see key 4
    elif where == "value_inf":
        v[0, 1, 5, 2] = float("inf")
    kw = {"attn_mask": torch.where(m, 0.0, float("-inf")).to(q.dtype)} if where == "mask" else {"attn_mask": m}
    if where == "mask":
        kw["attn_mask"][0, 0] = float("nan")
    ref = sdpa(q, k, v, **kw)
    assert not torch.isfinite(ref).all()
    rows = [0, 1, 2, 4]  # SDPA on CPU lets a NaN score reach the fully masked row; masked keys never count here
    for out in (vanilla_attention(q, k, v, **kw), chunked_attention(q, k, v, chunk_size=2, **kw)):
        assert not torch.isfinite(out).all()
        torch.testing.assert_close(out[..., rows, :], ref[..., rows, :], equal_nan=True)
        if where == "value_inf":  # zero weights times an infinite value are NaN, in SDPA too
            torch.testing.assert_close(out[..., 3, :], ref[..., 3, :], equal_nan=True)
        else:
            assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))


def test_vanilla_fully_masked_rows_have_zero_finite_gradients():
    q, k, v = make_qkv(lq=3, lk=4, grad=True)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    out = vanilla_attention(q, k, v, attn_mask=m)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv)) and gq[..., 1, :].abs().max() == 0
    ref = torch.autograd.grad(sdpa(q, k, v, attn_mask=m).square().sum(), (q, k, v))
    for a, b in zip((gq, gk, gv), ref):
        torch.testing.assert_close(a, b)


def test_decode_step_matches_full_causal_pass():
    """One query over a KV cache equals the last row of the full causal pass."""
    q, k, v = make_qkv(lq=12, lk=12)
    for topk in (None, 3):
        full = topk_attention(q, k, v, topk=topk, is_causal=True)
        step = topk_attention(q[..., -1:, :], k, v, topk=topk, is_causal=True)
        torch.testing.assert_close(step, full[..., -1:, :])


def test_float16_scores_do_not_overflow():
    q, k, v = make_qkv(dtype=torch.float32, d=64, lq=8, lk=8)
    q, k = q * 40, k * 40  # raw q.k reaches ~1e5, past fp16's 65504; scaled first it fits
    ref = topk_attention(q, k, v, topk=3)
    out = topk_attention(q.half(), k.half(), v.half(), topk=3).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


def test_custom_scale():
    q, k, v = make_qkv()
    torch.testing.assert_close(topk_attention(q, k, v, topk=None, scale=0.3), sdpa(q, k, v, scale=0.3))


# ----------------------------------------------------------------------------- backends


def test_auto_product_is_csr_on_cpu_float_and_gather_elsewhere():
    assert resolve_product("auto", "cpu", torch.float64) == "csr"
    assert resolve_product("auto", "cpu", torch.float32) == "csr"
    assert resolve_product("auto", "cpu", torch.bfloat16) == "gather"
    assert resolve_product("auto", "cuda", torch.float32) == "gather"
    assert resolve_product("gather", "cpu", torch.float32) == "gather"
    q, k, v = make_qkv(grad=True)
    auto, csr = (topk_attention(q, k, v, topk=3, chunk_size=4, product=name) for name in ("auto", "csr"))
    assert torch.equal(auto, csr)


def test_row_selector_threads_and_reuse():
    """Many rows take the threaded numpy path: the kept values equal torch.topk's, a reused selector agrees."""
    scores = torch.randn(3, 700, 50, generator=torch.Generator().manual_seed(0))  # 2100 rows: 8 blocks
    ref = scores.topk(7, dim=-1).values
    with RowSelector(threads=2) as selector:
        for _ in range(2):
            vals, idx = selector(scores, 7)
            assert idx.dtype == torch.int64
            torch.testing.assert_close(vals.sort(-1, descending=True).values, ref, rtol=0, atol=0)
            assert torch.equal(scores.gather(-1, idx), vals)
    q, k, v = make_qkv(batch=(4,), hq=8, hkv=2, lq=40, lk=30, dtype=torch.float32)  # 1280 rows per chunk
    with RowSelector() as selector:
        shared = topk_attention(q, k, v, topk=5, chunk_size=40, selector=selector)
        again = topk_attention(q, k, v, topk=5, chunk_size=40, selector=selector)
    assert torch.equal(shared, topk_attention(q, k, v, topk=5, chunk_size=40)) and torch.equal(shared, again)
    with pytest.raises(ValueError, match="threads"):
        RowSelector(threads=0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
def test_gradcheck(product, topk, mask):
    q, k, v = make_qkv(batch=(1,), hq=4, hkv=2, lq=5, lk=7, d=4, dv=3, grad=True)
    kw = mask_case(mask, q, k)
    assert torch.autograd.gradcheck(lambda a, b, c: topk_attention(a, b, c, topk=topk, product=product, chunk_size=2, **kw), (q, k, v))


@pytest.mark.parametrize("topk", [None, 3])
def test_gradcheck_float_mask_gradient(product, topk):
    """A learned bias (T5 relative positions) gets its gradient, summed over broadcast dims."""
    q, k, v = make_qkv(batch=(2,), hq=2, hkv=1, lq=4, lk=6, d=4, dv=3, grad=True)
    bias = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)  # [Hq, 1, Lk]
    assert torch.autograd.gradcheck(
        lambda a, b, c, m: topk_attention(a, b, c, topk=topk, product=product, chunk_size=3, attn_mask=m, is_causal=True), (q, k, v, bias)
    )


@pytest.mark.parametrize("topk", [None, 3])
def test_gradients_match_dense_reference(product, topk):
    q, k, v = make_qkv(grad=True)
    m = mask_case("bool", q, k)["attn_mask"]
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=4, attn_mask=m)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = dense_topk_attention(q, k, v, topk or 10**9, attn_mask=m)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("topk", [None, 3])
def test_backward_is_reentrant(product, topk):
    q, k, v = make_qkv(grad=True)
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=4, is_causal=True)
    g1 = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_fully_masked_rows_have_zero_finite_gradients(product):
    q, k, v = make_qkv(lq=3, lk=4, grad=True)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    for topk in (None, 2):
        (gq,) = torch.autograd.grad(topk_attention(q, k, v, topk=topk, product=product, attn_mask=m).sum(), (q,))
        assert torch.isfinite(gq).all() and gq[..., 1, :].abs().max() == 0


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("shape", [dict(batch=(0,)), dict(batch=(2, 0)), dict(lq=0), dict(dv=0)])
def test_empty_inputs_give_empty_outputs_and_gradients_like_sdpa(product, topk, shape):
    """No rows, no batch or no value features: SDPA's empty output, and zero (or empty) gradients."""
    q, k, v = make_qkv(**{"lq": 5, "lk": 7, **shape}, grad=True)
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.float64, requires_grad=True)  # [Lq, Lk]
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=2, attn_mask=mask)
    ref = sdpa(q, k, v, attn_mask=mask)
    assert out.shape == ref.shape and out.numel() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v, mask))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, mask), allow_unused=True)  # SDPA may skip the mask
    for a, b, t in zip(grads, ref_grads, (q, k, v, mask)):
        assert a.shape == t.shape and not a.any()
        assert b is None or not b.any()


@pytest.mark.parametrize("scale", [None, 0.7])
def test_zero_head_dim_follows_sdpa(product, scale):
    """d = 0: every score is an empty dot product, 0, so each row averages its allowed values, as SDPA does."""
    q, k, v = make_qkv(batch=(1,), lq=4, lk=6, d=0, dv=3, grad=True)
    m = mask_case("bool", q, k)["attn_mask"]
    ref = sdpa(q, k, v, attn_mask=m, scale=scale)
    for fn in (lambda *a, **kw: topk_attention(*a, topk=None, **kw), chunked_attention, vanilla_attention):
        out = fn(q, k, v, attn_mask=m, scale=scale)
        torch.testing.assert_close(out, ref)
    out = topk_attention(q, k, v, topk=2, product=product, attn_mask=m, scale=scale)  # ties: any 2 allowed keys
    assert out.shape == ref.shape and torch.isfinite(out).all()
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape
    torch.testing.assert_close(gv.sum(), torch.tensor(float(q.shape[-3] * 4 * 3), dtype=torch.float64))


@pytest.mark.parametrize("scale", [-0.5, 0.0, 2])
def test_any_finite_scale_follows_sdpa(scale):
    """Zero and negative scales are defined (uniform and reversed preference) and SDPA accepts them."""
    q, k, v = make_qkv()
    ref = sdpa(q, k, v, scale=scale)
    for fn in (chunked_attention, vanilla_attention):
        torch.testing.assert_close(fn(q, k, v, scale=scale), ref)
    dense = dense_topk_attention(q, k, v, 3, scale=scale) if scale != 0.0 else None
    if dense is not None:  # scale 0 ties every score
        torch.testing.assert_close(topk_attention(q, k, v, topk=3, scale=scale), dense)


@pytest.mark.parametrize(
    "scale, exc", [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError), (True, TypeError)]
)
def test_nan_infinite_or_bool_scale_is_refused(scale, exc):
    q, k, v = make_qkv()
    for fn in (lambda *a, **kw: topk_attention(*a, topk=3, **kw), chunked_attention, vanilla_attention):
        with pytest.raises(exc, match="scale"):
            fn(q, k, v, scale=scale)


@pytest.mark.parametrize("topk", [None, 3])
def test_double_backward_says_it_is_not_supported(product, topk):
    """create_graph=True gives first-order gradients; differentiating them again fails with a clear message."""
    q, k, v = make_qkv(batch=(1,), lq=5, lk=7, grad=True)
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=2)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    ref = torch.autograd.grad(topk_attention(q, k, v, topk=topk, product=product).square().sum(), (q, k, v))
    for a, b in zip((gq, gk, gv), ref):
        torch.testing.assert_close(a.detach(), b)
    with pytest.raises(RuntimeError, match="topk_attention.*second-order gradients.*not supported"):
        (gq.square().sum() + gk.sum()).backward()
    (gq2,) = torch.autograd.grad(topk_attention(q, k, v, topk=topk).sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="not supported"):  # also when the incoming gradient is a constant
        gq2.sum().backward()


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("topk", [64, None])
def test_saved_for_backward_is_linear_in_length(topk):
    h, d, c = 2, 32, 512

    def run(length):
        q, k, v = (torch.randn(1, h, length, d, requires_grad=True) for _ in range(3))
        return saved_bytes(lambda: topk_attention(q, k, v, topk=topk, chunk_size=c, is_causal=True))

    b2k, b4k = run(2048), run(4096)
    one_square = 4096 * 4096 * 4  # one L x L float32 matrix
    assert b4k * 10 <= one_square, f"saved {b4k} bytes at L=4096"
    assert b4k <= 2.1 * b2k, f"saved bytes grow superlinearly: {b2k} -> {b4k}"
    # the vanilla reference does save L x L per head: the measurement can tell
    q, k, v = (torch.randn(1, h, 4096, d, requires_grad=True) for _ in range(3))
    assert saved_bytes(lambda: vanilla_attention(q, k, v, is_causal=True)) >= h * one_square


def test_indices_are_saved_as_int32():
    q, k, v = make_qkv(dtype=torch.float32, grad=True)
    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_attention(q, k, v, topk=3)
    assert torch.int32 in dtypes and torch.int64 not in dtypes


# ----------------------------------------------------------------------------- bad input


def bad_cases():
    q, k, v = make_qkv(dtype=torch.float32)
    return [
        (dict(topk=0), ValueError, "topk"),
        (dict(topk=-3), ValueError, "topk"),
        (dict(topk=2.5), TypeError, "topk"),
        (dict(topk=True), TypeError, "topk"),
        (dict(topk=2, chunk_size=0), ValueError, "chunk_size"),
        (dict(topk=2, chunk_size=1.5), TypeError, "chunk_size"),
        (dict(topk=2, key=k.double()), TypeError, "dtype"),
        (dict(topk=2, key=k[..., :5]), ValueError, "head dim"),
        (dict(topk=2, value=v[..., :5, :]), ValueError, "key and value"),
        (dict(topk=2, query=q[:, :3]), ValueError, "multiple of key/value heads"),
        (dict(topk=2, key=k[None]), ValueError, "number of dims"),
        (dict(topk=2, attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "attn_mask"),
        (dict(topk=2, attn_mask=torch.ones(13, 17, dtype=torch.long)), TypeError, "attn_mask"),
        (dict(topk=2, attn_mask=torch.ones(13, 17, dtype=torch.float64)), TypeError, "attn_mask"),
        (dict(topk=2, query=q.int()), TypeError, "query"),
        (dict(topk=2, scale="big"), TypeError, "scale"),
        (dict(topk=2, product="dense"), ValueError, "product"),
        (dict(topk=2, query=q.half(), key=k.half(), value=v.half(), product="csr"), ValueError, "product"),
        (dict(topk=2, selector="threads"), TypeError, "selector"),
    ], (q, k, v)


@pytest.mark.parametrize("case", range(len(bad_cases()[0])))
def test_bad_input_names_the_argument(case):
    cases, (q, k, v) = bad_cases()
    kw, exc, words = cases[case]
    kw = dict(kw)
    args = dict(query=kw.pop("query", q), key=kw.pop("key", k), value=kw.pop("value", v))
    with pytest.raises(exc, match=words):
        topk_attention(**args, **kw)


# ----------------------------------------------------------------------------- CUDA (make test-all on a GPU machine)


def to_cuda(tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("mask", MASKS)
def test_cuda_matches_dense_reference(topk, mask):
    """On CUDA (torch.topk selection, gather products): outputs and gradients equal the CPU reference."""
    q, k, v = make_qkv(grad=True)
    kw = mask_case(mask, q, k)
    ref = dense_topk_attention(q, k, v, topk or 10**9, **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    gq, gk, gv = to_cuda((q, k, v))
    gkw = {name: val.cuda() if torch.is_tensor(val) else val for name, val in kw.items()}
    out = topk_attention(gq, gk, gv, topk=topk, chunk_size=4, **gkw)
    grads = torch.autograd.grad(out.square().sum(), (gq, gk, gv))
    torch.testing.assert_close(out.cpu(), ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("topk", [None, 3])
def test_cuda_gradcheck(topk):
    q, k, v = to_cuda(make_qkv(batch=(1,), hq=4, hkv=2, lq=5, lk=7, d=4, dv=3, grad=True))
    assert torch.autograd.gradcheck(
        lambda a, b, c: topk_attention(a, b, c, topk=topk, chunk_size=2, is_causal=True), (q, k, v))
