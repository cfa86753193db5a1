"""Soft-capping (Gemma-2) and attention sinks (GPT-OSS) in the attention kernels: equivalence, gradients, memory, checks."""

import pytest
import torch

from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from reference import causal_mask, dense_capped_sink_attention, saved_bytes


@pytest.fixture(params=["csr", "gather"])
def product(request):
    return request.param


def make_qkv(batch=(2,), hq=4, hkv=2, lq=7, lk=9, d=8, dv=6, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=dtype) * 2  # * 2: scores large enough for a cap of 2 to bite
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=dtype) * 2
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def make_sinks(kind, q, grad=False, seed=3):
    """None, one logit per query head ``[Hq]``, or one per batch element, head and query ``[B, Hq, Lq, 1]``."""
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    shape = {"heads": (q.shape[-3],), "rows": (*q.shape[:-1], 1), "batch": (q.shape[0], 1, 1, 1)}[kind]
    return torch.randn(*shape, generator=g, dtype=q.dtype).requires_grad_(grad)


def mask_case(name, q, k):
    lq, lk = q.shape[-2], k.shape[-2]
    g = torch.Generator().manual_seed(1)
    if name == "none":
        return {}
    if name == "causal":
        return {"is_causal": True}
    if name == "bool":
        m = torch.rand(lq, lk, generator=g) > 0.3
        m[:, 0] = True
        return {"attn_mask": m}
    if name == "float":  # a bias as large as the capped scores: the cap changes which keys win
        return {"attn_mask": torch.randn(lq, lk, generator=g, dtype=q.dtype)}
    if name == "float_batch":
        return {"attn_mask": torch.randn(q.shape[0], 1, lq, lk, generator=g, dtype=q.dtype)}
    raise KeyError(name)


BIG = 10**9  # a topk for the reference that keeps everything


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "float_batch"])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("sinks", [None, "heads", "rows"])
def test_matches_dense_reference(product, topk, mask, softcap, sinks):
    """GQA (4 query heads on 2 KV heads), Lq < Lk (causal queries sit at the last Lq positions)."""
    q, k, v = make_qkv()
    kw = mask_case(mask, q, k)
    s = make_sinks(sinks, q)
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=3, softcap=softcap, sinks=s, **kw)
    ref = dense_capped_sink_attention(q, k, v, topk or BIG, softcap=softcap, sinks=s, **kw)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("mask", ["causal", "float"])
def test_exact_and_vanilla_match_dense_reference(mask):
    q, k, v = make_qkv()
    kw = mask_case(mask, q, k)
    s = make_sinks("heads", q)
    ref = dense_capped_sink_attention(q, k, v, BIG, softcap=2.0, sinks=s, **kw)
    torch.testing.assert_close(chunked_attention(q, k, v, chunk_size=2, softcap=2.0, sinks=s, **kw), ref)
    torch.testing.assert_close(vanilla_attention(q, k, v, softcap=2.0, sinks=s, **kw), ref)


def test_cap_applies_before_the_mask_and_the_selection():
    """With a float mask, the top-k of cap(s) + mask differs from that of s + mask: the inputs can tell."""
    q, k, v = make_qkv()
    m = mask_case("float", q, k)["attn_mask"]
    s = q @ k.repeat_interleave(2, -3).transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, Hq, Lq, Lk]
    capped_first = (2.0 * torch.tanh(s / 2.0) + m).topk(3, dim=-1).indices.sort(-1).values
    uncapped = (s + m).topk(3, dim=-1).indices.sort(-1).values
    assert not torch.equal(capped_first, uncapped)
    ref = dense_capped_sink_attention(q, k, v, 3, attn_mask=m, softcap=2.0)
    torch.testing.assert_close(topk_attention(q, k, v, topk=3, attn_mask=m, softcap=2.0), ref)


def test_sinks_take_mass_and_a_large_cap_changes_nothing():
    q, k, v = make_qkv()
    plain = topk_attention(q, k, v, topk=3)
    torch.testing.assert_close(topk_attention(q, k, v, topk=3, softcap=1e7), plain)
    minus_inf = torch.full((4,), float("-inf"), dtype=q.dtype)  # a sink of -inf is no sink
    torch.testing.assert_close(topk_attention(q, k, v, topk=3, sinks=minus_inf), plain)
    huge = torch.full((4,), 50.0, dtype=q.dtype)  # a sink that takes all the mass leaves nothing
    assert topk_attention(q, k, v, topk=3, sinks=huge).abs().max() < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 100])
def test_independent_of_chunk_size(chunk_size):
    q, k, v = make_qkv()
    s = make_sinks("rows", q)
    ref = topk_attention(q, k, v, topk=3, chunk_size=1000, is_causal=True, softcap=2.0, sinks=s)
    out = topk_attention(q, k, v, topk=3, chunk_size=chunk_size, is_causal=True, softcap=2.0, sinks=s)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 3])
def test_half_precision_softmax_in_float32(dtype, topk):
    q, k, v = make_qkv(dtype=torch.float32)
    s = make_sinks("heads", q)
    m = mask_case("float", q, k)["attn_mask"]
    half = [t.to(dtype) for t in (q, k, v, s, m)]
    out = topk_attention(*half[:3], topk=topk, attn_mask=half[4], softcap=2.0, sinks=half[3], chunk_size=4)
    ref = dense_capped_sink_attention(*[t.float() for t in half[:3]], topk or BIG, attn_mask=half[4].float(),
                                      softcap=2.0, sinks=half[3].float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- rows with no key


@pytest.mark.parametrize("topk", [None, 2])
def test_fully_masked_rows_give_zeros_and_zero_gradients(product, topk):
    q, k, v = make_qkv(lq=4, lk=5, grad=True)
    m = torch.ones(4, 5, dtype=torch.bool)
    m[1] = False
    s = make_sinks("heads", q, grad=True)
    out = topk_attention(q, k, v, topk=topk, product=product, attn_mask=m, softcap=2.0, sinks=s)
    assert out[..., 1, :].abs().max() == 0
    gq, gs = torch.autograd.grad(out.square().sum(), (q, s))
    assert torch.isfinite(gq).all() and torch.isfinite(gs).all() and gq[..., 1, :].abs().max() == 0
    # the masked row adds nothing to the sinks' gradient
    keep = torch.tensor([0, 2, 3])
    ref_out = topk_attention(q[..., keep, :], k, v, topk=topk, product=product, attn_mask=m[keep], softcap=2.0, sinks=s)
    (ref_gs,) = torch.autograd.grad(ref_out.square().sum(), (s,))
    torch.testing.assert_close(gs, ref_gs)


@pytest.mark.parametrize("topk", [None, 2])
def test_queries_before_every_key_give_zeros(product, topk):
    """Causal with Lq > Lk: the first queries see no key (whole chunks are skipped)."""
    q, k, v = make_qkv(lq=6, lk=3, grad=True)
    s = make_sinks("rows", q, grad=True)
    out = topk_attention(q, k, v, topk=topk, product=product, is_causal=True, chunk_size=2, sinks=s, softcap=2.0)
    ref = dense_capped_sink_attention(q, k, v, topk or BIG, is_causal=True, sinks=s, softcap=2.0)
    torch.testing.assert_close(out, ref)
    assert out[..., :3, :].abs().max() == 0
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, s))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, s))
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("sinks", ["heads", "batch"])
def test_gradcheck_with_softcap_sinks_and_float_mask(product, topk, sinks):
    q, k, v = make_qkv(batch=(2,), hq=4, hkv=2, lq=5, lk=6, d=4, dv=3, grad=True)
    q, k = (t.detach().div(2).requires_grad_() for t in (q, k))  # scores of order 1: the cap's curvature matters
    bias = torch.randn(4, 1, 6, dtype=torch.float64, requires_grad=True)  # [Hq, 1, Lk]
    s = make_sinks(sinks, q, grad=True)

    def fn(a, b, c, m, sk):
        return topk_attention(a, b, c, topk=topk, product=product, chunk_size=2, attn_mask=m, is_causal=True,
                              softcap=1.5, sinks=sk)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias, s))


def test_gradcheck_vanilla():
    q, k, v = make_qkv(batch=(1,), hq=2, hkv=1, lq=4, lk=5, d=4, dv=3, grad=True)
    s = make_sinks("rows", q, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, sk: vanilla_attention(a, b, c, softcap=1.5, sinks=sk), (q, k, v, s))


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("mask", ["bool", "float_batch"])
def test_gradients_match_dense_reference(product, topk, mask):
    q, k, v = make_qkv(grad=True)
    kw = mask_case(mask, q, k)
    if "attn_mask" in kw and kw["attn_mask"].is_floating_point():
        kw["attn_mask"].requires_grad_()
    s = make_sinks("heads", q, grad=True)
    inputs = (q, k, v, s, *([kw["attn_mask"]] if kw["attn_mask"].requires_grad else []))
    out = topk_attention(q, k, v, topk=topk, product=product, chunk_size=4, softcap=2.0, sinks=s, **kw)
    ref = dense_capped_sink_attention(q, k, v, topk or BIG, softcap=2.0, sinks=s, **kw)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_double_backward_says_it_is_not_supported():
    q, k, v = make_qkv(grad=True)
    s = make_sinks("heads", q, grad=True)
    (gs,) = torch.autograd.grad(topk_attention(q, k, v, topk=3, sinks=s, softcap=2.0).sum(), (s,), create_graph=True)
    with pytest.raises(RuntimeError, match="not supported"):
        gs.sum().backward()


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("topk", [64, None])
def test_saved_for_backward_is_linear_in_length(topk):
    h, d, c = 2, 32, 512

    def run(length):
        q, k, v = (torch.randn(1, h, length, d, requires_grad=True) for _ in range(3))
        s = torch.zeros(h, requires_grad=True)
        kw = dict(topk=topk, chunk_size=c, is_causal=True, softcap=30.0, sinks=s)
        return saved_bytes(lambda: topk_attention(q, k, v, **kw))

    b2k, b4k = run(2048), run(4096)
    one_square = 4096 * 4096 * 4  # one L x L float32 matrix
    assert b4k * 10 <= one_square, f"saved {b4k} bytes at L=4096"
    assert b4k <= 2.1 * b2k, f"saved bytes grow superlinearly: {b2k} -> {b4k}"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softcap=True), TypeError, "softcap"),
        (dict(softcap="50"), TypeError, "softcap"),
        (dict(sinks=[0.0] * 4), TypeError, "sinks"),
        (dict(sinks=torch.zeros(4, dtype=torch.float64)), TypeError, "sinks.*dtype"),
        (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks"),
        (dict(sinks=torch.zeros(3)), ValueError, "sinks.*Hq"),
        (dict(sinks=torch.zeros(2, 4, 7, 2)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(1, 2, 4, 7, 1)), ValueError, "sinks"),
    ],
)
@pytest.mark.parametrize("fn", [topk_attention, chunked_attention, vanilla_attention])
def test_bad_softcap_or_sinks_names_the_argument(kw, exc, words, fn):
    q, k, v = make_qkv(dtype=torch.float32)
    extra = {"topk": 2} if fn is topk_attention else {}
    with pytest.raises(exc, match=words):
        fn(q, k, v, **extra, **kw)


def test_causal_mask_helper_agrees_with_is_causal():
    """The reference's causal rule is the kernels' (queries at the last Lq of Lk positions)."""
    q, k, v = make_qkv(lq=4, lk=6)
    s = make_sinks("heads", q)
    torch.testing.assert_close(
        topk_attention(q, k, v, topk=2, is_causal=True, sinks=s),
        topk_attention(q, k, v, topk=2, attn_mask=causal_mask(4, 6), sinks=s),
    )


# ----------------------------------------------------------------------------- CUDA (make test-all on a GPU machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("topk, dtype", [(None, torch.float32), (3, torch.float32), (None, torch.bfloat16)])
def test_cuda_matches_dense_reference(topk, dtype):
    """On CUDA (torch.topk selection, gather products): outputs and gradients equal the CPU reference.

    bfloat16 only on the exact path: rounded scores may tie where the reference's do not.
    """
    q, k, v = make_qkv()
    inputs = [t.to(dtype).double() for t in (q, k, v, make_sinks("heads", q), mask_case("float", q, k)["attn_mask"])]
    q, k, v, s, m = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]  # the reference sees the rounded inputs
    ref = dense_capped_sink_attention(q, k, v, topk or BIG, attn_mask=m, is_causal=True, softcap=2.0, sinks=s)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, s))
    gq, gk, gv, gs = (t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v, s))
    out = topk_attention(gq, gk, gv, topk=topk, chunk_size=4, attn_mask=m.to("cuda", dtype), is_causal=True,
                         softcap=2.0, sinks=gs)
    grads = torch.autograd.grad(out.float().square().sum(), (gq, gk, gv, gs))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-1, rtol=5e-2)
    torch.testing.assert_close(out.float().cpu(), ref.float(), **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float().cpu(), b.float(), **tol)
