"""Tests for topk_lib.analysis.metrics against hand-computed values on small literal tensors."""

from __future__ import annotations

import math

import pytest
import torch

from topk_lib.analysis import metrics as M

P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
# -sum p ln p for P, term by term: 0.5 ln 2 + 0.3 ln(10/3) + 0.2 ln 5
H_P = 0.5 * math.log(2) + 0.3 * math.log(10 / 3) + 0.2 * math.log(5)  # 1.0296530140...
NAN = float("nan")


def close(a, b, **kw):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), equal_nan=True, **kw)


# --------------------------------------------------------------------------- hand values


def test_mass_kept_hand_values():
    close(M.mass_kept(P, 1), 0.5)
    close(M.mass_kept(P, 2), 0.8)
    close(M.mass_kept(P, 3), 1.0)
    close(M.mass_kept(P, [1, 2, 3, 10]), [0.5, 0.8, 1.0, 1.0])
    # Order of keys does not matter.
    close(M.mass_kept(torch.tensor([0.2, 0.5, 0.3]), 2), 0.8)


def test_k_for_mass_hand_values():
    assert M.k_for_mass(P, 0.75).item() == 2  # 0.5 < 0.75 <= 0.8
    assert M.k_for_mass(P, 0.5).item() == 1  # reaching the target exactly counts
    assert M.k_for_mass(P, 0.9).item() == 3
    assert M.k_for_mass(P, 1.0).item() == 3
    assert M.k_for_mass(P, [0.3, 0.75, 0.99]).tolist() == [1, 2, 3]
    assert M.k_for_mass(torch.tensor([0.2, 0.3, 0.5]), 0.75).item() == 2
    assert M.k_for_mass(P, 0.9).dtype == torch.int64


def test_entropy_hand_values():
    close(M.entropy(P), H_P)
    close(M.entropy(P), 1.0296530140645737)
    close(M.entropy(torch.full((4,), 0.25)), math.log(4))
    close(M.entropy(torch.tensor([0.0, 1.0, 0.0])), 0.0)  # 0 log 0 = 0
    close(M.entropy(torch.tensor([0.5, 0.0, 0.5, 0.0])), math.log(2))


def test_kl_to_topk_is_minus_log_mass_and_matches_the_explicit_sum():
    close(M.kl_to_topk(P, 1), math.log(2))  # -ln 0.5
    close(M.kl_to_topk(P, 2), -math.log(0.8))
    # By hand: p_2 = [0.625, 0.375, 0];  KL(p_2 || p) = 0.625 ln(0.625/0.5) + 0.375 ln(0.375/0.3)
    close(M.kl_to_topk(P, 2), 0.625 * math.log(1.25) + 0.375 * math.log(1.25))
    close(M.kl_to_topk(P, [1, 2, 3]), [math.log(2), -math.log(0.8), 0.0])
    assert M.kl_to_topk(P, 3).item() == 0.0 and not math.copysign(1, M.kl_to_topk(P, 3)) < 0


def test_kl_identity_on_random_rows():
    torch.manual_seed(0)
    p = torch.softmax(3 * torch.randn(4, 6, 20, dtype=torch.float64), dim=-1)
    for k in (1, 3, 7, 20):
        pk = M.topk_probs(p, k)
        kept = pk > 0
        explicit = torch.where(kept, pk * torch.log(pk / p), torch.zeros_like(p)).sum(-1)
        close(M.kl_to_topk(p, k), explicit)
        # The truncated forward sum is M log M <= 0: not a divergence (see the module docstring).
        mass = M.mass_kept(p, k)
        forward_truncated = torch.where(kept, p * torch.log(p / pk), torch.zeros_like(p)).sum(-1)
        close(forward_truncated, mass * torch.log(mass))


def test_sink_mass_hand_values():
    close(M.sink_mass(P), 0.5)
    close(M.sink_mass(P, n_first=2), 0.8)
    close(M.sink_mass(P, n_first=10), 1.0)
    close(M.sink_mass(torch.tensor([0.1, 0.6, 0.3])), 0.1)


def test_topk_probs_hand_values():
    close(M.topk_probs(P, 2), [0.625, 0.375, 0.0])
    close(M.topk_probs(P, 1), [1.0, 0.0, 0.0])
    close(M.topk_probs(P, 5), P)
    assert M.topk_probs(P.float(), 2).dtype == torch.float32


def test_relative_error_hand_values():
    o = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    o_k = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    close(M.relative_error(o_k, o), [0.8, 0.0])  # |(0,4)| / |(3,4)| = 4/5
    close(M.relative_error(o_k, o, dim=(-2, -1)), 4.0 / math.sqrt(26.0))  # per head
    close(M.relative_error(o, o), [0.0, 0.0])


def test_k_for_abs_mass_hand_values():
    h = torch.tensor([-3.0, 1.0, 0.0, 2.0])  # |h| = 3, 1, 0, 2; total 6
    assert M.k_for_abs_mass(h, 0.5).item() == 1  # 3/6
    assert M.k_for_abs_mass(h, 0.8).item() == 2  # 3/6 < 0.8 <= 5/6
    assert M.k_for_abs_mass(h, [0.5, 0.9, 1.0]).tolist() == [1, 3, 3]
    relu = torch.relu(torch.tensor([[-1.0, 4.0, 1.0], [0.0, 0.0, 0.0]]))
    assert M.k_for_abs_mass(relu, 0.8).tolist() == [1, 0]  # 4/5 = 0.8; all-zero token -> 0


def test_rows_are_normalised_by_their_total():
    w = torch.tensor([2.0, 1.0, 1.0])  # induces [0.5, 0.25, 0.25]
    close(M.mass_kept(w, 1), 0.5)
    close(M.sink_mass(w), 0.5)
    close(M.entropy(w), 0.5 * math.log(2) + 2 * 0.25 * math.log(4))
    assert M.k_for_mass(w, 0.75).item() == 2


# --------------------------------------------------------------------------- masks


def test_masked_rows_from_scores():
    scores = torch.tensor([
        [math.log(0.5), math.log(0.3), math.log(0.2)],
        [-math.inf, -math.inf, -math.inf],  # query that may attend nothing
        [0.0, 0.0, -math.inf],  # one key masked
    ], dtype=torch.float64)
    p = M.probs_from_scores(scores)
    close(p, [[0.5, 0.3, 0.2], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert not torch.isnan(p).any()
    assert M.masked_rows(p).tolist() == [False, True, False]
    close(M.mass_kept(p, 1), [0.5, NAN, 0.5])
    close(M.mass_kept(p, 2), [0.8, NAN, 1.0])  # the masked key never counts
    close(M.mass_kept(p, [1, 2]), [[0.5, 0.8], [NAN, NAN], [0.5, 1.0]])
    assert M.k_for_mass(p, 0.75).tolist() == [2, 0, 2]
    assert M.k_for_mass(p, [0.5, 1.0]).tolist() == [[1, 3], [0, 0], [1, 2]]
    close(M.entropy(p), [H_P, NAN, math.log(2)])
    close(M.kl_to_topk(p, 2), [-math.log(0.8), NAN, 0.0])
    close(M.sink_mass(p), [0.5, NAN, 0.5])
    close(M.topk_probs(p, 2), [[0.625, 0.375, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])


def test_relative_error_with_masked_reference_row():
    o = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    out = M.relative_error(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), o)
    assert math.isnan(out[0].item()) and math.isinf(out[1].item())


# --------------------------------------------------------------------------- ties


def test_ties_do_not_change_mass_metrics():
    u = torch.full((4,), 0.25)
    close(M.mass_kept(u, 2), 0.5)
    assert M.k_for_mass(u, 0.5).item() == 2 and M.k_for_mass(u, 0.6).item() == 3
    close(M.kl_to_topk(u, 2), math.log(2))
    pk = M.topk_probs(u, 2)
    assert (pk > 0).sum().item() == 2 and sorted(pk.tolist()) == [0.0, 0.0, 0.5, 0.5]
    tie_at_k = torch.tensor([0.4, 0.2, 0.2, 0.2])  # three keys tie for the 2nd slot
    close(M.mass_kept(tie_at_k, 2), 0.6)
    close(M.topk_probs(tie_at_k, 2).sum(), 1.0)
    assert M.topk_probs(tie_at_k, 2)[0].item() == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- batching


@pytest.fixture
def batch():
    torch.manual_seed(1)
    scores = 2 * torch.randn(2, 3, 5, 9, dtype=torch.float64)  # [B, H, Lq, Lk]
    scores[0, 1, 2, 4:] = -math.inf  # a partly masked row
    scores[1, 2, 3] = -math.inf  # a fully masked row
    return M.probs_from_scores(scores)


@pytest.mark.parametrize("fn, arg", [
    (M.mass_kept, 3), (M.mass_kept, [1, 4, 9]), (M.k_for_mass, 0.9), (M.k_for_mass, [0.5, 0.99]),
    (M.entropy, None), (M.kl_to_topk, 2), (M.kl_to_topk, [1, 20]), (M.sink_mass, 2),
    (M.topk_probs, 4), (M.k_for_abs_mass, 0.9),
])
def test_batched_equals_row_by_row(batch, fn, arg):
    call = (lambda x: fn(x)) if arg is None else (lambda x: fn(x, arg))
    out = call(batch)
    rows = batch.reshape(-1, batch.shape[-1])
    expect = torch.stack([call(r) for r in rows])
    assert out.shape[:3] == batch.shape[:3]
    torch.testing.assert_close(out.reshape(expect.shape), expect, equal_nan=True)
    # The fully masked row gives NaN / 0 / zeros; no other row does.
    masked = M.masked_rows(batch)
    assert masked.sum().item() == 1 and masked[1, 2, 3]
    if out.is_floating_point() and fn is not M.topk_probs:
        assert torch.isnan(out[masked]).all() and not torch.isnan(out[~masked]).any()


def test_batched_relative_error_per_row_and_head():
    torch.manual_seed(2)
    o = torch.randn(2, 3, 5, 4)  # [B, H, Lq, d]
    o_k = o + 0.1 * torch.randn_like(o)
    per_row = M.relative_error(o_k, o)
    assert per_row.shape == (2, 3, 5)
    close(per_row[1, 2, 3], ((o_k[1, 2, 3] - o[1, 2, 3]).norm() / o[1, 2, 3].norm()).item())
    per_head = M.relative_error(o_k, o, dim=(-2, -1))
    assert per_head.shape == (2, 3)
    close(per_head[0, 1], ((o_k[0, 1] - o[0, 1]).norm() / o[0, 1].norm()).item())


def test_k_for_mass_agrees_with_mass_kept(batch):
    for frac in (0.5, 0.9, 0.99):
        k = M.k_for_mass(batch, frac)
        ok = ~M.masked_rows(batch)
        for row, kk in zip(batch[ok], k[ok].tolist()):
            assert M.mass_kept(row, kk) >= frac - 1e-12
            if kk > 1:
                assert M.mass_kept(row, kk - 1) < frac


def test_full_k_is_exact(batch):
    ok = ~M.masked_rows(batch)
    assert (M.mass_kept(batch, 9)[ok] == 1.0).all()
    assert (M.kl_to_topk(batch, 100)[ok] == 0.0).all()
    torch.testing.assert_close(M.topk_probs(batch, 9), batch)


def test_half_precision_accumulates_in_float32(batch):
    half = batch.to(torch.bfloat16)
    out = M.entropy(half)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, M.entropy(batch).float(), atol=2e-2, rtol=2e-2, equal_nan=True)
    assert M.mass_kept(half, 3).dtype == torch.float32


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: M.mass_kept(P, 0), "k must be an int >= 1"),
    (lambda: M.mass_kept(P, 1.5), "k must be an int >= 1"),
    (lambda: M.mass_kept(P, True), "k must be an int >= 1"),
    (lambda: M.kl_to_topk(P, []), "k must be an int >= 1"),
    (lambda: M.topk_probs(P, [1, 2]), "single int"),
    (lambda: M.k_for_mass(P, 0.0), r"frac must be a float in \(0, 1\]"),
    (lambda: M.k_for_mass(P, 1.2), r"frac must be a float in \(0, 1\]"),
    (lambda: M.k_for_abs_mass(P, [0.9, 2]), r"frac must be a float in \(0, 1\]"),
    (lambda: M.sink_mass(P, n_first=0), "n_first must be an int >= 1"),
    (lambda: M.entropy(torch.tensor(0.5)), "non-empty last dimension"),
    (lambda: M.relative_error(torch.zeros(2, 3), torch.zeros(3, 2)), "same shape"),
])
def test_bad_values_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="p must be a floating-point"):
        M.entropy(torch.tensor([1, 0, 0]))
    with pytest.raises(TypeError, match="p must be a floating-point"):
        M.mass_kept([0.5, 0.5], 1)
    with pytest.raises(TypeError, match="o_k must be a floating-point"):
        M.relative_error(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
