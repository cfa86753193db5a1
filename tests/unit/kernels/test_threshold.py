"""Pass 1 of the threshold path (topk_lib.kernels.threshold, threshold_triton): tau and the needed key blocks.

tau is checked against a sort of the dense float64 scores (tests/reference.py): the midpoint of
the k-th and (k+1)-th largest allowed score, -inf where a row has at most k allowed keys. The
block needs are checked to cover every kept score. The Triton kernel runs under Triton's
interpreter (TRITON_INTERPRET=1) on CPU when triton is importable, and on CUDA under ``gpu``.
"""

import math

import pytest
import torch

from reference import causal_mask, dense_scores
from topk_lib.kernels.threshold import BLOCK, midpoint, thresholds, torch_thresholds

NEG = float("-inf")


def qk(b=2, hq=4, hkv=2, lq=40, lk=300, d=16, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=dtype)
    return q.to(device), k.to(device)


def expected_tau(s, topk):
    """The rule, from a sort of the dense scores ``s [..., Lk]``."""
    if topk >= s.shape[-1]:
        return torch.full_like(s[..., 0], NEG)
    top = s.sort(-1, descending=True).values
    kth, nxt = top[..., topk - 1], top[..., topk]
    return torch.where(nxt == NEG, torch.full_like(kth, NEG), (kth + nxt) / 2)


def assert_needs_cover(needs, s, tau):
    """Every allowed score >= tau lies in a needed (query block, key block)."""
    kept = (s >= tau[..., None]) & (s > NEG)  # [B, Hq, Lq, Lk]
    lq, lk = s.shape[-2:]
    nq, nk = math.ceil(lq / BLOCK), math.ceil(lk / BLOCK)
    pad = torch.nn.functional.pad(kept, (0, nk * BLOCK - lk, 0, nq * BLOCK - lq))
    blocks = pad.unflatten(-1, (nk, BLOCK)).unflatten(-3, (nq, BLOCK)).any(-1).any(-2)  # [B, Hq, nq, nk]
    assert needs.shape == blocks.shape
    assert not (blocks & ~needs).any(), "a key block holding a kept score is skipped"
    return blocks


def masks(name, q, k):
    lq, lk = q.shape[-2], k.shape[-2]
    g = torch.Generator().manual_seed(1)
    if name == "none":
        return {}
    if name == "causal":
        return {"is_causal": True}
    if name == "bool":
        return {"bool_mask": (torch.rand(1, 1, lq, lk, generator=g) > 0.3).to(q.device)}
    if name == "float":
        return {"float_mask": torch.randn(q.shape[0], 1, lq, lk, generator=g, dtype=q.dtype).to(q.device)}
    if name == "heavy":  # most keys masked: many rows with fewer than k + 1 allowed keys, some with none
        m = torch.rand(1, q.shape[1], lq, lk, generator=g) > 0.98
        m[..., :5, :] = False
        return {"bool_mask": m.to(q.device)}
    raise KeyError(name)


def dense_of(q, k, kw, scale, softcap=None):
    mask = kw.get("bool_mask", kw.get("float_mask"))
    return dense_scores(q, k, mask, kw.get("is_causal", False), scale, softcap)


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "heavy"])
@pytest.mark.parametrize("topk", [1, 3, 129, 299, 300])
def test_tau_is_the_midpoint_of_the_kth_and_next_score(mask, topk):
    q, k = qk()
    kw = masks(mask, q, k)
    found = torch_thresholds(q, k, topk=topk, scale=0.25, **kw)
    s = dense_of(q, k, kw, 0.25)
    torch.testing.assert_close(found.tau, expected_tau(s, topk))
    blocks = assert_needs_cover(found.needs, s, found.tau)
    assert torch.equal(found.needs, blocks)  # the torch pass is exact per row


def test_heavily_masked_and_empty_rows_keep_all_or_nothing():
    q, k = qk(lq=6, lk=50)
    m = torch.zeros(1, 1, 6, 50, dtype=torch.bool)
    m[..., 1, :2] = True  # fewer than k allowed
    m[..., 2, :4] = True  # exactly k allowed
    m[..., 3, :5] = True  # k + 1 allowed
    found = torch_thresholds(q, k, topk=4, scale=1.0, bool_mask=m)
    tau = found.tau
    assert (tau[..., :3] == NEG).all() and torch.isfinite(tau[..., 3]).all() and (tau[..., 4:] == NEG).all()
    s = dense_of(q, k, {"bool_mask": m}, 1.0)
    assert ((s[..., 3, :] >= tau[..., 3:4]) & (s[..., 3, :] > NEG)).sum(-1).eq(4).all()
    assert found.needs.all()  # one block of keys, with allowed keys in it
    none = torch_thresholds(q, k, topk=4, scale=1.0, bool_mask=torch.zeros(1, 1, 6, 50, dtype=torch.bool))
    assert (none.tau == NEG).all() and not none.needs.any()


def test_ties_give_the_tied_value():
    """Integer scores with many ties: tau is the tied k-th value itself where the (k+1)-th equals it."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (1, 2, 20, 16), generator=g).double()
    k = torch.randint(-1, 2, (1, 2, 70, 16), generator=g).double()
    found = torch_thresholds(q, k, topk=5, scale=1.0)
    s = dense_of(q, k, {}, 1.0)
    top = s.sort(-1, descending=True).values
    tied = top[..., 4] == top[..., 5]
    assert tied.float().mean() > 0.5
    assert torch.equal(found.tau[tied], top[..., 4][tied])
    kept = (s >= found.tau[..., None]).sum(-1)
    assert (kept[tied] > 5).any() and (kept[~tied] == 5).all()


def test_midpoint_handles_infinities():
    kth = torch.tensor([1.0, NEG, 2.0, 3.0])
    nxt = torch.tensor([NEG, NEG, 2.0, 1.0])
    assert midpoint(kth, nxt).tolist() == [NEG, NEG, 2.0, 2.0]


@pytest.mark.parametrize("elements", [1, 10**9])
def test_independent_of_the_chunk_of_rows(elements):
    q, k = qk(lq=300, lk=200)
    ref = torch_thresholds(q, k, topk=7, scale=0.3, is_causal=True)
    found = torch_thresholds(q, k, topk=7, scale=0.3, is_causal=True, chunk_elements=elements)
    assert torch.equal(found.tau, ref.tau) and torch.equal(found.needs, ref.needs)


def test_half_precision_scores_are_not_rounded_to_the_dtype():
    q, k = qk(dtype=torch.bfloat16, lq=8, lk=64)
    found = torch_thresholds(q, k, topk=3, scale=0.25)
    assert found.tau.dtype == torch.float32
    torch.testing.assert_close(found.tau, expected_tau(dense_of(q, k, {}, 0.25), 3).float())


def test_causal_decode_rows_before_every_key():
    q, k = qk(lq=20, lk=8)  # causal with Lq > Lk: the first 12 queries see no key
    found = torch_thresholds(q, k, topk=2, scale=1.0, is_causal=True)
    assert (found.tau[..., :12] == NEG).all() and torch.isfinite(found.tau[..., 14:]).all()
    assert causal_mask(20, 8)[:12].sum() == 0


def test_bad_backend_is_refused():
    q, k = qk(lq=4, lk=8)
    with pytest.raises(ValueError, match="backend"):
        thresholds(q, k, topk=2, scale=1.0, backend="cuda")


# ----------------------------------------------------------------------------- Triton


def _check_triton(q, k, topk, kw, min_bk, softcap=None):
    from topk_lib.kernels.threshold_triton import triton_thresholds

    found = triton_thresholds(q, k, topk=topk, scale=0.25, softcap=softcap, min_bk=min_bk, **kw)
    s = dense_of(q, k, kw, 0.25, softcap)
    ref = torch_thresholds(q, k, topk=topk, scale=0.25, softcap=softcap, **kw)
    torch.testing.assert_close(found.tau, ref.tau, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.tau.double(), expected_tau(s, topk), atol=1e-5, rtol=1e-5)
    assert_needs_cover(found.needs, s, found.tau.double())


def interpreted_case(mask, topk, lq, lk, softcap, end_to_end=False, min_bk=16):
    """One interpreter case (run in a child python with TRITON_INTERPRET=1; see below); ``end_to_end``
    also runs the whole threshold path with this pass 1 against the dense reference."""
    q, k = qk(b=1, hq=2, hkv=1, lq=lq, lk=lk, dtype=torch.float32)
    kw = masks(mask, q, k)
    _check_triton(q, k, topk, kw, min_bk=min_bk, softcap=softcap)
    if end_to_end:
        from reference import dense_threshold_attention
        from topk_lib.kernels.flex import threshold_topk_attention

        v = torch.randn(1, 1, lk, 16)
        mask = kw.get("bool_mask", kw.get("float_mask"))
        out = threshold_topk_attention(q, k, v, topk=topk, attn_mask=mask, is_causal=kw.get("is_causal", False),
                                       scale=0.25, softcap=softcap, pass1="triton")
        ref = dense_threshold_attention(q, k, v, topk, mask, kw.get("is_causal", False), 0.25, softcap)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def run_interpreted(cases):
    """Run ``interpreted_case(*case)`` for each case in a child python under Triton's interpreter.

    TRITON_INTERPRET must be set before triton is first imported (its own library functions are
    decorated then), and torch may import triton on its own: a fresh process is the safe way.
    """
    pytest.importorskip("triton", reason="triton is not installed (make test installs it for the interpreter)")
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here.parents[2])!r}]\n"
            "import test_threshold as t\n" + "".join(f"t.interpreted_case(*{case!r})\n" for case in cases))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_kernel_under_the_interpreter():
    """Tiny shapes: the interpreter runs each of the kernel's sorts op by op (about 1-2 s a case)."""
    run_interpreted([("causal", 3, 32, 64, None, True), ("bool", 3, 32, 64, None)])


@pytest.mark.slow
def test_triton_kernel_under_the_interpreter_more_cases():
    run_interpreted([(mask, topk, 40, 150, 2.0 if topk == 3 else None, True)
                     for mask in ("none", "float", "heavy") for topk in (3, 20)])


@pytest.mark.slow
def test_triton_kernel_under_the_interpreter_at_gpu_step_sizes():
    """128 and 256 keys per step (k = 3 and k = 130), as on a GPU: one and two blocks of the block mask per
    step. About two minutes."""
    run_interpreted([("causal", 3, 40, 300, None, False, 128), ("bool", 130, 40, 300, None, False, 128)])


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "heavy"])
@pytest.mark.parametrize("topk", [3, 64, 128])
def test_triton_kernel_on_cuda(dtype, mask, topk):
    q, k = qk(b=2, hq=4, hkv=2, lq=200, lk=700, d=64, dtype=dtype, device="cuda")
    _check_triton(q, k, topk, masks(mask, q, k), min_bk=BLOCK, softcap=30.0 if topk == 3 else None)
