"""Equivalence, gradient, memory and input-checking tests for topk_lib.kernels.feedforward."""

import pytest
import torch

from topk_lib.kernels.feedforward import topk_feedforward
from reference import dense_topk_feedforward


def make_ff(tokens=(3, 7), d=6, d_ff=16, d_out=5, gated=False, bias=False, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    x = rnd(*tokens, d)
    kw = dict(w_in=rnd(d_ff, d), w_out=rnd(d_out, d_ff))
    if gated:
        kw["w_gate"] = rnd(d_ff, d)
    if bias:
        kw["b_in"], kw["b_out"] = rnd(d_ff), rnd(d_out)
    return x, kw


CASES = [
    dict(activation="relu", select="value"),
    dict(activation="gelu", select="magnitude", bias=True),
    dict(activation="gelu_tanh", select="magnitude"),
    dict(activation="silu", select="magnitude", gated=True),  # SwiGLU
    dict(activation="gelu", select="magnitude", gated=True),  # GeGLU
    dict(activation="relu", select="value", gated=True, bias=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_full_k_equals_dense_layer(case):
    case = dict(case)
    x, w = make_ff(gated=case.pop("gated", False), bias=case.pop("bias", False))
    dense = dense_topk_feedforward(x, **w, topk=10**6, **case)
    for k in (None, 16, 100):
        torch.testing.assert_close(topk_feedforward(x, **w, topk=k, **case), dense)
    # and a small k does change the output (a kernel ignoring topk would pass the above)
    assert not torch.allclose(topk_feedforward(x, **w, topk=2, **case), dense)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("topk", [1, 5])
def test_matches_dense_topk_reference(case, topk):
    case = dict(case)
    x, w = make_ff(gated=case.pop("gated", False), bias=case.pop("bias", False))
    for chunk in (1, 4, 1000):
        out = topk_feedforward(x, **w, topk=topk, chunk_size=chunk, **case)
        torch.testing.assert_close(out, dense_topk_feedforward(x, **w, topk=topk, **case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gradcheck(case):
    case = dict(case)
    x, w = make_ff(tokens=(5,), d=4, d_ff=8, d_out=3, gated=case.pop("gated", False), bias=case.pop("bias", False), grad=True)
    names = list(w)
    assert torch.autograd.gradcheck(
        lambda x_, *ws: topk_feedforward(x_, **dict(zip(names, ws)), topk=3, chunk_size=2, **case), (x, *w.values())
    )


def test_backward_is_reentrant():
    x, w = make_ff(gated=True, grad=True)
    y = topk_feedforward(x, **w, topk=4, activation="silu", select="magnitude", chunk_size=5)
    g1 = torch.autograd.grad(y.sum(), (x, *w.values()), retain_graph=True)
    g2 = torch.autograd.grad(y.sum(), (x, *w.values()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_saves_topk_not_dense_hidden_layer():
    tokens, d, d_ff, k = 2048, 64, 2048, 32
    x, w = make_ff(tokens=(tokens,), d=d, d_ff=d_ff, d_out=d, gated=True, dtype=torch.float32, grad=True)
    seen, dtypes = {}, set()

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        dtypes.add(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_feedforward(x, **w, topk=k, activation="silu", select="magnitude", chunk_size=256)
    inputs = sum(t.numel() * 4 for t in (x, *w.values()))
    extra = sum(seen.values()) - inputs
    dense_hidden = tokens * d_ff * 4
    assert extra <= 3 * tokens * k * 4, extra  # indices + two kept pre-activations
    assert extra * 10 < dense_hidden
    assert torch.int32 in dtypes and torch.int64 not in dtypes


@pytest.mark.parametrize("tokens", [(0,), (3, 0)])
@pytest.mark.parametrize("gated", [False, True])
def test_empty_token_batch_gives_empty_output_and_zero_gradients(tokens, gated):
    x, w = make_ff(tokens=tokens, gated=gated, bias=True, grad=True)
    y = topk_feedforward(x, **w, topk=3, activation="silu", select="magnitude", chunk_size=2)
    assert y.shape == (*tokens, 5)
    grads = torch.autograd.grad(y.sum(), (x, *w.values()))
    for g, t in zip(grads, (x, *w.values())):
        assert g.shape == t.shape and not g.any()


def test_zero_input_features_match_the_dense_layer():
    """d = 0: every pre-activation is the bias alone, as in the dense layer."""
    x, w = make_ff(tokens=(4,), d=0, bias=True, grad=True)
    y = topk_feedforward(x, **w, topk=3, activation="gelu", select="magnitude")
    torch.testing.assert_close(y, dense_topk_feedforward(x, **w, topk=3, activation="gelu", select="magnitude"))


def test_double_backward_says_it_is_not_supported():
    x, w = make_ff(tokens=(5,), grad=True)
    y = topk_feedforward(x, **w, topk=3)
    (gx,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
    (ref,) = torch.autograd.grad(topk_feedforward(x, **w, topk=3).square().sum(), (x,))
    torch.testing.assert_close(gx.detach(), ref)
    with pytest.raises(RuntimeError, match="topk_feedforward.*second-order gradients.*not supported"):
        gx.square().sum().backward()


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (dict(topk=0), ValueError, "topk"),
        (dict(topk=1.5), TypeError, "topk"),
        (dict(topk=2, activation="tanh"), ValueError, "activation"),
        (dict(topk=2, select="largest"), ValueError, "select"),
        (dict(topk=2, chunk_size=0), ValueError, "chunk_size"),
        (dict(topk=2, w_gate=torch.zeros(3, 3, dtype=torch.float64)), ValueError, "w_gate"),
        (dict(topk=2, w_in=torch.zeros(16, 4, dtype=torch.float64)), ValueError, "w_in"),
        (dict(topk=2, w_out=torch.zeros(5, 4, dtype=torch.float64)), ValueError, "w_out"),
        (dict(topk=2, w_out=torch.zeros(5, 16)), TypeError, "dtype"),
        (dict(topk=2, b_in=torch.zeros(3, dtype=torch.float64)), ValueError, "b_in"),
    ],
)
def test_bad_input_names_the_argument(kw, exc, words):
    x, w = make_ff()
    w.update({k: kw.pop(k) for k in list(kw) if k.startswith(("w_", "b_"))})
    with pytest.raises(exc, match=words):
        topk_feedforward(x, **w, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_cuda_matches_cpu(case):
    """Outputs and gradients on CUDA equal those on the CPU (float64)."""
    select, activation = case["select"], case["activation"]
    x, kw = make_ff(gated=case.get("gated", False), bias=case.get("bias", False), grad=True)
    cpu = topk_feedforward(x, **kw, topk=5, activation=activation, select=select, chunk_size=4)
    leaves = [x, *kw.values()]
    cpu_grads = torch.autograd.grad(cpu.square().sum(), leaves)
    gx = x.detach().cuda().requires_grad_()
    gkw = {name: t.detach().cuda().requires_grad_() for name, t in kw.items()}
    out = topk_feedforward(gx, **gkw, topk=5, activation=activation, select=select, chunk_size=4)
    grads = torch.autograd.grad(out.square().sum(), [gx, *gkw.values()])
    torch.testing.assert_close(out.cpu(), cpu)
    for a, b in zip(grads, cpu_grads):
        torch.testing.assert_close(a.cpu(), b)
