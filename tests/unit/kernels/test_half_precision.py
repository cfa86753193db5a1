"""The kernels and the statistics capture in bfloat16 and float16, against float32.

Each test rounds its inputs to the half dtype once, then compares the kernel run in that
dtype with the dense reference of ``tests/reference.py`` run in float32 on the *same*
(rounded) inputs, so the error is only the kernel's own half-precision arithmetic: the
scores are computed in the half dtype from queries scaled first, the softmax and its row
sums run in float32, the weights are rounded back before ``p @ V``.

With a top-k, rounding the scores (or the hidden activations) may legitimately swap the
k-th and the (k+1)-th key (neuron) where they lie closer than the rounding: such rows are
left out of the comparison (``MARGIN``: a gap at the k-th place, in float32, smaller than
that), and each test checks that at least half of its rows are compared.

Tolerances are absolute on outputs of order 1 and set at about 2.5-4x the maximum error
measured on CPU (torch 2.13, seeds as below); each test's docstring gives the measured
numbers. The same tests run on CUDA under the ``gpu`` marker, with the same tolerances.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.reference import dense_topk_attention, dense_topk_feedforward
from topk_lib.kernels.attention import chunked_attention, topk_attention
from topk_lib.kernels.feedforward import ACTIVATIONS, topk_feedforward

HALF = [torch.bfloat16, torch.float16]
#: bfloat16 keeps 8 bits of mantissa, float16 11: the tolerances differ by about 8x.
ATOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
#: Feed-forward outputs sum 64 hidden units: a larger error (measured about twice attention's).
FF_ATOL = {torch.bfloat16: 6e-2, torch.float16: 8e-3}
#: Twice the rounding of a score of magnitude up to 4 in each dtype (half an ulp: bf16 0.0156, fp16 0.002).
MARGIN = {torch.bfloat16: 0.04, torch.float16: 0.005}
#: The same for hidden activations of order 1 (a smaller ulp).
FF_MARGIN = {torch.bfloat16: 0.02, torch.float16: 0.0025}

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])]


def _qkv(dtype, device, lq=40, lk=40, d=32, gain=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, lq, d, generator=g) * gain
    k = torch.randn(2, 2, lk, d, generator=g) * gain  # GQA: 2 query heads per KV head
    v = torch.randn(2, 2, lk, 16, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)]


def _err(out, ref, rows=None):
    """Max |out - ref| over the rows (last dim: features) where ``rows`` is True (all by default)."""
    assert out.dtype != torch.float32 and torch.isfinite(out).all()
    err = (out.float() - ref).abs().amax(-1)
    if rows is not None:
        assert rows.float().mean() >= 0.5, "too few rows with a clear k-th place"
        err = err[rows]
    return err.max().item()


def _clear(score, topk, margin):
    """Rows of ``score [..., n]`` (float32) whose k-th and (k+1)-th largest differ by more than ``margin``."""
    if topk is None or topk >= score.shape[-1]:
        return None
    top = score.topk(topk + 1, dim=-1).values
    return (top[..., topk - 1] - top[..., topk]) > margin


def _scores(q, k, causal):
    s = q.float() @ k.float().repeat_interleave(q.shape[-3] // k.shape[-3], -3).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("topk", [None, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_attention_in_half_precision(device, dtype, topk, causal):
    """topk_attention vs the float32 dense reference. Measured max |error| on CPU over these
    cases (clear rows): bfloat16 1.1e-2, float16 1.6e-3 (tolerances 3e-2 and 4e-3)."""
    q, k, v = _qkv(dtype, device)
    ref = dense_topk_attention(q.float(), k.float(), v.float(), topk or k.shape[-2], is_causal=causal)
    out = topk_attention(q, k, v, topk=topk, is_causal=causal, chunk_size=16)
    rows = None
    if topk is not None:  # causal rows with fewer than k + 1 keys keep them all: always clear
        s = _scores(q, k, causal)
        n_keys = torch.isfinite(s).sum(-1)
        rows = (n_keys <= topk) | _clear(s.nan_to_num(neginf=-1e9), topk, MARGIN[dtype])
    assert _err(out, ref, rows) <= ATOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_attention_in_half_precision(device, dtype, causal):
    """chunked_attention (exact, chunked) vs float32. Measured max |error| on CPU: bfloat16
    1.1e-2, float16 1.3e-3 (tolerances 3e-2 and 4e-3)."""
    q, k, v = _qkv(dtype, device)
    ref = dense_topk_attention(q.float(), k.float(), v.float(), k.shape[-2], is_causal=causal)
    assert _err(chunked_attention(q, k, v, is_causal=causal, chunk_size=16), ref) <= ATOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk", [None, 4])
def test_float16_qk_past_its_range_is_scaled_before_the_product(device, topk):
    """q, k of std 70 in d = 64: the raw q.k passes float16's largest
    value 65504, so multiplying before scaling would give inf (and NaN weights); scaled first,
    the scores fit (|s| <= 1.6e4). The rows are then nearly one-hot: measured max |error| on
    CPU 1.6e-5 (tolerance 4e-3)."""
    q, k, v = _qkv(torch.float16, device, lq=12, lk=12, d=64, gain=70.0)
    raw = (q.float() @ k.float().repeat_interleave(2, -3).transpose(-1, -2)).abs().max().item()
    assert raw > torch.finfo(torch.float16).max  # the test's premise
    ref = dense_topk_attention(q.float(), k.float(), v.float(), topk or 12)
    assert _err(topk_attention(q, k, v, topk=topk, chunk_size=5), ref) <= ATOL[torch.float16]
    if topk is None:
        assert _err(chunked_attention(q, k, v, chunk_size=5), ref) <= ATOL[torch.float16]


FF_CASES = [("relu", False, "value"), ("gelu", True, "magnitude"), ("silu", True, "magnitude")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("activation, gated, select", FF_CASES)
@pytest.mark.parametrize("topk", [64, 12])
def test_topk_feedforward_in_half_precision(device, dtype, activation, gated, select, topk):
    """topk_feedforward (d = 32, d_ff = 64, weights ~ N(0, 1/d)) vs float32. Measured max
    |error| on CPU (clear tokens): bfloat16 2.2e-2, float16 3.1e-3 (tolerances 6e-2 and 8e-3)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=g)
    w_in, w_out = torch.randn(64, 32, generator=g) / 32 ** 0.5, torch.randn(32, 64, generator=g) / 64 ** 0.5
    w_gate = torch.randn(64, 32, generator=g) / 32 ** 0.5 if gated else None
    x, w_in, w_out = (t.to(device, dtype) for t in (x, w_in, w_out))
    w_gate = None if w_gate is None else w_gate.to(device, dtype)
    ref = dense_topk_feedforward(x.float(), w_in.float(), w_out.float(), topk, activation,
                                 None if w_gate is None else w_gate.float(), select)
    out = topk_feedforward(x, w_in, w_out, topk=topk, activation=activation, w_gate=w_gate, select=select,
                           chunk_size=7)
    h = F.linear(x.float(), w_in.float())
    h = ACTIVATIONS[activation](h) if w_gate is None else ACTIVATIONS[activation](F.linear(x.float(), w_gate.float())) * h
    assert _err(out, ref, _clear(h.abs() if select == "magnitude" else h, topk, FF_MARGIN[dtype])) <= FF_ATOL[dtype]
