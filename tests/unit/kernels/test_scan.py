"""The compiled row selection and the fused top-k forward, against torch.topk and the chunked path."""

import pytest
import torch

from topk_lib.kernels import native, scan
from topk_lib.kernels.attention import topk_attention
from topk_lib.kernels.selection import RowSelector

needs_native = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the compiled selection is not built")


def kept_values_match(vals, idx, scores, k):
    """The kept values are torch.topk's (as multisets) and each index points at its value."""
    ref = scores.topk(k, dim=-1).values.sort(-1).values
    torch.testing.assert_close(vals.sort(-1).values, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(scores.gather(-1, idx), vals, rtol=0, atol=0, equal_nan=True)
    for row in idx:  # no key kept twice
        assert row.unique().numel() == k


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, k", [(7, 3), (100, 5), (1000, 16), (4099, 8), (513, 64)])
def test_random_rows_match_torch_topk(dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(37, n, generator=g, dtype=dtype)
    scores[5] = scores[5].sort().values  # increasing: every survivor sits at the end
    scores[6] = -scores[5]  # decreasing
    kept_values_match(*native.topk_rows(scores, k), scores, k)


@needs_native
def test_tied_rows_keep_k_distinct_entries_of_the_tied_value():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (20, 2000), generator=g).float()  # three values, thousands of ties each
    scores[0] = 1.0  # all equal
    scores[1, 1500:] = 5.0  # exactly k = 16 ... more than k copies of the maximum
    kept_values_match(*native.topk_rows(scores, 16), scores, 16)


@needs_native
def test_heavily_masked_rows_and_row_lengths():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, 3000, generator=g)
    scores[0, 10:] = float("-inf")  # fewer allowed keys than k
    scores[1] = float("-inf")  # none
    scores[2, ::100] = float("inf")
    scores[3, torch.rand(3000, generator=g) < 0.98] = float("-inf")  # about 60 allowed
    vals, idx = native.topk_rows(scores, 32)
    kept_values_match(vals, idx, scores, 32)
    # lens: row r takes part with its first lens[r] entries only; spare slots are -inf at key 0
    lens = [0, 1, 31, 32, 33, 3000, 2999, 500, 260, 257, 3000, 40]
    vals, idx = native.topk_rows(scores, 32, lens)
    for r, n in enumerate(lens):
        row = scores[r, :n]
        m = min(n, 32)
        ref = row.topk(m).values.sort().values if m else row[:0]
        got = vals[r].sort().values
        torch.testing.assert_close(got[32 - m :], ref, rtol=0, atol=0)
        assert torch.all(got[: 32 - m] == float("-inf")) or m == 32
        assert torch.all(idx[r] < max(n, 1))


@needs_native
def test_nan_ranks_above_every_number_as_in_torch_topk():
    scores = torch.randn(3, 4000)
    scores[0, 17] = float("nan")
    scores[1, ::7] = float("nan")  # more NaN than k
    vals, idx = native.topk_rows(scores, 20)
    assert torch.isnan(vals[0]).sum() == 1 and 17 in idx[0]
    assert torch.isnan(vals[1]).all()
    kept_values_match(vals[2:], idx[2:], scores[2:], 20)


@needs_native
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("lq, lk", [(300, 300), (40, 300), (300, 250)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_forward_equals_the_chunked_path(causal, mask, lq, lk, threads, monkeypatch):
    """Small slabs force several heads and row blocks per chunk; the outputs equal the chunked path's.

    One thread: the products run in the caller, the rows of each slab in the selector's threads
    (a single one here); two: each worker thread runs whole slabs.
    """
    monkeypatch.setattr(scan, "SLAB_BYTES", 4096)
    monkeypatch.setattr(scan, "WORKER_SLAB_BYTES", 4096)
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(2, 4, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, lk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, lk, 5, generator=g, dtype=torch.float64)
    m = torch.rand(2, 1, lq, lk, generator=g) > 0.5
    attn_mask = {None: None, "bool": m, "float": torch.where(m, 0.0, -2.0).double()}[mask]
    for topk in (3, 20):
        kw = dict(topk=topk, chunk_size=64, is_causal=causal, attn_mask=attn_mask)
        with RowSelector(threads=threads) as selector:
            fused = topk_attention(q, k, v, **kw, selector=selector)
        chunked = topk_attention(q, k, v, **kw, selector=RowSelector(method="chunked"))
        torch.testing.assert_close(fused, chunked)
        assert torch.get_num_threads() == before  # the workers' single-threaded torch is undone


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_forward_is_used_and_gradients_match(threads, monkeypatch):
    """Inputs that require grad: the worker threads (their own grad mode) must record nothing."""
    calls = []
    real = scan.select_chunk
    monkeypatch.setattr("topk_lib.kernels.attention.select_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(scan, "WORKER_SLAB_BYTES", 4096)  # several slabs: the worker threads run
    q, k, v = (torch.randn(1, 2, 200, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with RowSelector(threads=threads) as selector:
        out = topk_attention(q, k, v, topk=6, chunk_size=50, is_causal=True, selector=selector)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert calls
    ref_out = topk_attention(q, k, v, topk=6, chunk_size=50, is_causal=True, selector=RowSelector(method="chunked"))
    ref = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_without_the_compiled_selection_the_chunked_path_runs(monkeypatch):
    monkeypatch.setattr(native, "load", lambda: None)
    assert not scan.can_scan(torch.zeros(1))
    q, k, v = (torch.randn(1, 2, 60, 4) for _ in range(3))
    out = topk_attention(q, k, v, topk=5, chunk_size=16, is_causal=True)
    torch.testing.assert_close(out, topk_attention(q, k, v, topk=5, chunk_size=16, is_causal=True,
                                                   selector=RowSelector(method="chunked")))
    with pytest.raises(RuntimeError, match="compiler"):
        native.topk_rows(torch.zeros(2, 3), 1)


def test_selector_method_is_checked():
    with pytest.raises(ValueError, match="method"):
        RowSelector(method="fast")
