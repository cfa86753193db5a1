"""The threshold top-k attention (topk_lib.kernels.flex) against the dense references of tests/reference.py.

On CPU FlexAttention runs unfused, forward only: torch refuses a CPU backward in its argument
check (``_validate_device``), though its unfused implementation has one. The gradient tests
lift that check (fixture ``cpu_backward``) to differentiate through FlexAttention's own autograd
on CPU; the ``gpu`` tests run the compiled kernels and their generated backward on CUDA.
"""

import pytest
import torch

from reference import dense_threshold_attention, dense_topk_attention, saved_bytes
from topk_lib.kernels.attention import topk_attention
from topk_lib.kernels.flex import fast_path_applies, threshold_topk_attention

MASKS = ["none", "causal", "bool", "float", "bool_heads", "float_batch", "causal_bool"]
SHAPES = [dict(hq=4, hkv=2, lq=13, lk=150), dict(hq=2, hkv=2, lq=140, lk=140), dict(hq=4, hkv=1, lq=1, lk=40)]


def make_qkv(batch=(2,), hq=4, hkv=2, lq=13, lk=150, d=16, dv=16, dtype=torch.float64, seed=0, grad=False,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, hq, lq, d, generator=g, dtype=dtype)
    k = torch.randn(*batch, hkv, lk, d, generator=g, dtype=dtype)
    v = torch.randn(*batch, hkv, lk, dv, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_(grad) for t in (q, k, v)]


def mask_case(name, q, k):
    lq, lk = q.shape[-2], k.shape[-2]
    g = torch.Generator().manual_seed(1)
    dev = q.device
    if name == "none":
        return {}
    if name == "causal":
        return {"is_causal": True}
    if name == "bool":
        m = torch.rand(lq, lk, generator=g) > 0.3
        m[:, 0] = True
        return {"attn_mask": m.to(dev)}
    if name == "float":
        return {"attn_mask": torch.randn(lq, lk, generator=g, dtype=q.dtype).to(dev)}
    if name == "bool_heads":  # per head, shared over batch and queries (padding style)
        m = torch.rand(q.shape[-3], 1, lk, generator=g) > 0.4
        m[..., 0] = True
        return {"attn_mask": m.to(dev)}
    if name == "float_batch":
        return {"attn_mask": torch.randn(*q.shape[:-3], 1, lq, lk, generator=g, dtype=q.dtype).to(dev)}
    if name == "causal_bool":
        return {"is_causal": True, "attn_mask": (torch.rand(lq, lk, generator=g) > 0.5).to(dev)}
    raise KeyError(name)


@pytest.fixture(autouse=True)
def fresh_traces():
    """FlexAttention traces each call: a fresh cache per test keeps the many shapes here under dynamo's limit."""
    torch._dynamo.reset()
    yield


@pytest.fixture
def cpu_backward(monkeypatch):
    """Let FlexAttention's unfused CPU implementation run its backward (torch refuses it up front)."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("topk", [1, 5, 100])
def test_matches_dense_reference(mask, shape, topk):
    q, k, v = make_qkv(**SHAPES[shape])
    kw = mask_case(mask, q, k)
    out = threshold_topk_attention(q, k, v, topk=topk, **kw)
    torch.testing.assert_close(out, dense_threshold_attention(q, k, v, topk, **kw))
    torch.testing.assert_close(out, dense_topk_attention(q, k, v, topk, **kw))  # no ties in random rows


@pytest.mark.parametrize("softcap", [0.5, 3.0])
def test_softcap_applies_before_the_mask_and_the_threshold(softcap):
    q, k, v = make_qkv()
    kw = {"is_causal": True, "attn_mask": torch.randn(13, 150, dtype=torch.float64)}
    out = threshold_topk_attention(q, k, v, topk=4, softcap=softcap, **kw)
    torch.testing.assert_close(out, dense_threshold_attention(q, k, v, 4, softcap=softcap, **kw))


def test_agrees_with_the_cpu_kernels_on_untied_rows():
    q, k, v = make_qkv(lq=40)
    for kw in ({}, {"is_causal": True}):
        out = threshold_topk_attention(q, k, v, topk=7, **kw)
        torch.testing.assert_close(out, topk_attention(q, k, v, topk=7, **kw))


def test_ties_keep_every_key_tied_with_the_kth():
    """Integer scores tie often: all tied keys are kept (the CPU kernels keep exactly k of them)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (1, 2, 16, 16), generator=g).double()
    k = torch.randint(-1, 2, (1, 2, 60, 16), generator=g).double()
    v = torch.randn(1, 2, 60, 16, generator=g, dtype=torch.float64)
    out = threshold_topk_attention(q, k, v, topk=3, scale=1.0)
    torch.testing.assert_close(out, dense_threshold_attention(q, k, v, 3, scale=1.0))
    assert not torch.allclose(out, dense_topk_attention(q, k, v, 3, scale=1.0))  # exactly-k differs on ties


def test_fully_masked_rows_and_queries_before_every_key_give_zeros():
    q, k, v = make_qkv(lq=20, lk=150)
    m = torch.ones(20, 150, dtype=torch.bool)
    m[3:6] = False
    out = threshold_topk_attention(q, k, v, topk=5, attn_mask=m)
    assert torch.isfinite(out).all() and (out[..., 3:6, :] == 0).all()
    q, k, v = make_qkv(lq=20, lk=8)  # causal with Lq > Lk: the first 12 queries see no key
    out = threshold_topk_attention(q, k, v, topk=3, is_causal=True)
    assert (out[..., :12, :] == 0).all()
    torch.testing.assert_close(out, dense_threshold_attention(q, k, v, 3, is_causal=True))


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_batch_dims_any_number(batch):
    q, k, v = make_qkv(batch=batch, lq=6, lk=40)
    kw = {"attn_mask": torch.rand(*batch, 1, 6, 40) > 0.3}
    out = threshold_topk_attention(q, k, v, topk=4, **kw)
    torch.testing.assert_close(out, dense_threshold_attention(q, k, v, 4, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """Half inputs: pass 1 scores in float32, the unfused CPU FlexAttention in the dtype; rows whose k-th and
    (k+1)-th scores lie closer than that rounding are left out. Tolerances as tests/unit/kernels/test_half_precision."""
    q, k, v = (t.to(dtype) for t in make_qkv(lq=40, lk=150, dtype=torch.float32))
    out = threshold_topk_attention(q, k, v, topk=4, is_causal=True)
    assert out.dtype == dtype
    ref = dense_threshold_attention(q, k, v, 4, is_causal=True)
    from reference import dense_scores

    top = dense_scores(q, k, is_causal=True).sort(-1, descending=True).values
    clear = (top[..., 3] - top[..., 4]) > {torch.bfloat16: 0.04, torch.float16: 0.005}[dtype]
    assert clear.float().mean() > 0.5
    err = (out.double() - ref).abs().amax(-1)[clear].max().item()
    assert err < {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


def test_dispatch_keeps_the_cpu_kernels_on_cpu():
    q, k, v = make_qkv()
    assert not fast_path_applies(q, k, v, 4, None, None)


def test_float_mask_that_requires_grad_is_refused():
    q, k, v = make_qkv()
    m = torch.randn(13, 150, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask"):
        threshold_topk_attention(q, k, v, topk=4, attn_mask=m)


@pytest.mark.slow  # each case compiles FlexAttention's CPU kernels (10-20 s)
@pytest.mark.parametrize("mask, shape", [("causal", 0), ("causal_bool", 1), ("float_batch", 0), ("causal", 2)])
def test_compiled_forward_matches_dense_reference_and_compiles_once(mask, shape):
    """FlexAttention compiled (inductor's CPU kernels, forward only): the closures of score_mod and mask_mod
    trace, and a second call of the same shape reuses the compiled graph."""
    from torch._dynamo.utils import counters

    kw_shape = {**SHAPES[shape], "d": 64, "dv": 64}
    q, k, v = make_qkv(dtype=torch.float32, **kw_shape)
    kw = mask_case(mask, q, k)
    out = threshold_topk_attention(q, k, v, topk=5, compile=True, **kw)
    torch.testing.assert_close(out.double(), dense_threshold_attention(q, k, v, 5, **kw), atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    q2, k2, v2 = make_qkv(dtype=torch.float32, seed=5, **kw_shape)
    out = threshold_topk_attention(q2, k2, v2, topk=5, compile=True, **kw)
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(out.double(), dense_threshold_attention(q2, k2, v2, 5, **kw), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
def test_gradients_match_dense_reference(cpu_backward, mask):
    q, k, v = make_qkv(batch=(1,), lq=10, lk=40, grad=True)
    kw = mask_case(mask, q, k)
    grads = torch.autograd.grad(threshold_topk_attention(q, k, v, topk=5, **kw).square().sum(), (q, k, v))
    ref = torch.autograd.grad(dense_threshold_attention(q, k, v, 5, **kw).square().sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.slow  # about a minute on 2 cores: each perturbed input retraces FlexAttention's unfused backward
def test_gradcheck(cpu_backward):
    q, k, v = make_qkv(batch=(1,), hq=2, hkv=1, lq=5, lk=7, grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: threshold_topk_attention(a, b, c, topk=3, is_causal=True, softcap=2.0), (q, k, v))


def test_saved_for_backward_is_linear_in_length(cpu_backward):
    h, d = 2, 16

    def run(length):
        q, k, v = (torch.randn(1, h, length, d, requires_grad=True) for _ in range(3))
        return saved_bytes(lambda: threshold_topk_attention(q, k, v, topk=8, is_causal=True))

    b1k, b2k = run(1024), run(2048)
    assert b2k * 10 <= 2048 * 2048 * 4, f"saved {b2k} bytes at L=2048"
    assert b2k <= 2.1 * b1k, f"saved bytes grow superlinearly: {b1k} -> {b2k}"


# ----------------------------------------------------------------------------- CUDA (make test-all on a GPU machine)

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda(tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


#: (mask, shape, dtype): every mask kind on the GQA decode-style shape, the other shapes causal, half
#: precision on two; each case compiles its own kernels (tens of seconds), so the matrix is not full.
CUDA_CASES = ([(m, 0, torch.float32) for m in MASKS] + [("causal", i, torch.float32) for i in (1, 2)]
              + [(m, 0, dt) for dt in (torch.bfloat16, torch.float16) for m in ("causal", "float_batch")]
              + [("causal", 2, torch.bfloat16)])


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("mask, shape, dtype", CUDA_CASES)
def test_cuda_matches_float64_reference(mask, shape, dtype):
    """topk_attention on CUDA (it dispatches to this path), outputs and gradients against float64 on CPU."""
    q, k, v = make_qkv(**SHAPES[shape], grad=True)
    q, k, v = (t.detach().to(dtype).double().requires_grad_() for t in (q, k, v))  # the values the dtype holds
    kw = {n: x.to(dtype).double() if torch.is_tensor(x) and x.is_floating_point() else x  # the mask rounded too
          for n, x in mask_case(mask, q, k).items()}
    ref = dense_threshold_attention(q, k, v, 5, **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    gq, gk, gv = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    gkw = {n: (x.cuda().to(dtype) if x.is_floating_point() else x.cuda()) if torch.is_tensor(x) else x
           for n, x in kw.items()}
    assert fast_path_applies(gq, gk, gv, 5, gkw.get("attn_mask"), None)
    out = topk_attention(gq, gk, gv, topk=5, **gkw)
    grads = torch.autograd.grad(out.float().square().sum(), (gq, gk, gv))
    tol = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
           torch.float16: dict(atol=8e-3, rtol=5e-3)}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, **{n: 4 * t for n, t in tol.items()})


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_gradcheck(compile):
    q, k, v = _cuda(make_qkv(batch=(1,), hq=2, hkv=1, lq=5, lk=7, grad=True))
    assert torch.autograd.gradcheck(
        lambda a, b, c: threshold_topk_attention(a, b, c, topk=3, is_causal=True, softcap=2.0, compile=compile),
        (q, k, v))


@pytest.mark.gpu
@_CUDA
def test_cuda_saved_for_backward_is_linear_in_length():
    h, d = 12, 64

    def run(length):
        q, k, v = (torch.randn(1, h, length, d, device="cuda", requires_grad=True) for _ in range(3))
        return saved_bytes(lambda: topk_attention(q, k, v, topk=64, is_causal=True))

    b4k, b8k = run(4096), run(8192)
    assert b8k * 10 <= h * 8192 * 8192 * 4, f"saved {b8k} bytes at L=8192"
    assert b8k <= 2.1 * b4k, f"saved bytes grow superlinearly: {b4k} -> {b8k}"


@pytest.mark.gpu
@_CUDA
def test_cuda_calls_of_one_shape_compile_once():
    """A new score_mod closure per call must not recompile (dynamo guards on its code and captured tensors):
    otherwise every timed call would include a compile."""
    from torch._dynamo.utils import counters

    q, k, v = _cuda(make_qkv(batch=(1,), hq=4, hkv=2, lq=256, lk=256, d=64, dv=64, dtype=torch.float32))
    topk_attention(q, k, v, topk=16, is_causal=True)
    before = dict(counters["stats"])
    for seed in range(3):
        q, k, v = _cuda(make_qkv(batch=(1,), hq=4, hkv=2, lq=256, lk=256, d=64, dv=64, dtype=torch.float32,
                                 seed=seed + 1))
        topk_attention(q, k, v, topk=16, is_causal=True)
    assert dict(counters["stats"]).get("unique_graphs", 0) == before.get("unique_graphs", 0)
