"""How much top-k keeps: pure metrics on attention rows and feed-forward activations.

The paper (Gupta et al. 2021) argues that top-k attention works as a drop-in because
attention rows are concentrated (section 4, "analysis": a few keys carry most of the
mass) and likewise feed-forward activations (section 3.2). These functions quantify that
per query row, for one head ``[Lq, Lk]`` or batched ``[..., Lq, Lk]``; every reduction runs
over the last dimension (keys, or hidden units for activations) and the leading dimensions
are kept. They are pure: no hooks, no models, no in-place changes to the input.

Conventions
-----------
* **Rows are distributions.** ``p`` holds non-negative attention weights; each row is
  divided by its own sum before measuring, so rows that sum to 1 give exactly the textbook
  values, float rounding cannot push a mass above 1, and unnormalised non-negative weights
  (e.g. a slice of keys) are measured as the distribution they induce. Negative entries are
  not checked for (that would cost a pass over the tensor) and give meaningless results.
* **Masked keys** carry probability 0 (as after a softmax over ``-inf`` scores) and are never
  kept ahead of a positive entry. Use :func:`probs_from_scores` to turn scores with ``-inf``
  into such rows.
* **Masked rows**: a row whose weights are all 0 (a query that may attend to nothing) is not
  a distribution. Float metrics return NaN for it (so a mean over rows shows the problem
  instead of silently averaging a made-up value; use ``nanmean`` or :func:`masked_rows`),
  :func:`k_for_mass` returns 0 and :func:`topk_probs` a row of zeros.
* **Ties** at the k-th largest value do not change any mass-based metric (the multiset of
  kept values is the same whichever tied key is chosen). Only :func:`topk_probs` depends on
  which key is kept; ``torch.topk`` decides, and that can differ across devices.
* **k** is an int >= 1 or a sequence of them; ``k >= Lk`` keeps every key. With a sequence,
  the result gains a trailing dimension of size ``len(k)`` (one ``torch.topk`` for all).
  **frac** is a float in (0, 1] or a sequence of them, likewise.
* Half-precision inputs are accumulated and returned in float32.

KL divergence and the top-k distribution
----------------------------------------
Let ``S`` be the top-k keys of a row, ``M = sum_{i in S} p_i`` the mass kept, and
``p_k = p / M`` on ``S`` (0 elsewhere) the renormalised top-k distribution that top-k
attention actually uses. Then

* the forward ``KL(p || p_k) = sum_i p_i log(p_i / p_k,i)`` is **+inf** whenever ``M < 1``:
  a softmax gives every allowed key positive mass, and ``p_k`` gives 0 to the dropped ones;
* restricting that sum to the kept support does not rescue it:
  ``sum_{i in S} p_i log(p_i / (p_i / M)) = M log M``, which is <= 0 and not a divergence;
* the reverse divergence is finite and is the one computed "over the kept support" (the
  support of ``p_k``)::

      KL(p_k || p) = sum_{i in S} (p_i / M) log((p_i / M) / p_i) = -log M.

  It is >= 0, zero iff ``M = 1``, close to ``1 - M`` when little mass is dropped, and it is
  the smallest ``KL(q || p)`` over all distributions ``q`` supported on ``S`` (``p_k`` is
  the information projection of ``p`` onto ``S``).

So the suite's "KL(p||p_k) over kept support" is defined as ``KL(p_k || p) = -log M`` in
nats: :func:`kl_to_topk`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

__all__ = [
    "probs_from_scores",
    "masked_rows",
    "mass_kept",
    "k_for_mass",
    "entropy",
    "kl_to_topk",
    "relative_error",
    "sink_mass",
    "topk_probs",
    "k_for_abs_mass",
]


# --------------------------------------------------------------------------- checks


def _check_rows(p, name: str = "p") -> None:
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point torch.Tensor [..., Lq, Lk], got "
            f"{type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}"
        )
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(
            f"{name} needs a non-empty last dimension (keys), got shape {tuple(p.shape)}"
        )


def _check_ks(k) -> tuple[list[int], bool]:
    """Return (list of ks, whether a sequence was given)."""
    is_seq = isinstance(k, (list, tuple))
    ks = list(k) if is_seq else [k]
    if not ks or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in ks
    ):
        raise ValueError(f"k must be an int >= 1 or a non-empty sequence of them, got {k!r}")
    return [int(v) for v in ks], is_seq


def _check_fracs(frac) -> tuple[list[float], bool]:
    is_seq = isinstance(frac, (list, tuple))
    fs = list(frac) if is_seq else [frac]
    if not fs or any(
        isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f <= 1 for f in fs
    ):
        raise ValueError(
            f"frac must be a float in (0, 1] or a non-empty sequence of them, got {frac!r}"
        )
    return [float(f) for f in fs], is_seq


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # Sums of thousands of half-precision probabilities lose digits: accumulate in float32.
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _nan_where_masked(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    masked = total == 0  # [...]
    if x.dim() > total.dim():  # a trailing k/frac dimension
        masked = masked.unsqueeze(-1)
    return x.masked_fill(masked, float("nan"))


# --------------------------------------------------------------------------- scores -> rows


def probs_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension where a row of all ``-inf`` gives zeros, not NaN.

    ``scores`` ``[..., Lq, Lk]`` already scaled and masked (``-inf`` = may not attend).
    Returns probabilities of the same shape and dtype.
    """
    _check_rows(scores, "scores")
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # [..., Lq, 1]
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)  # [..., Lq, Lk]
    return probs.masked_fill(dead, 0.0)


def masked_rows(p: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., Lq]``: True where a row has no mass (a query that attends nothing)."""
    _check_rows(p)
    return p.sum(dim=-1, dtype=_acc_dtype(p)) == 0


# --------------------------------------------------------------------------- attention rows


def _topk_cummass(p: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Fraction of each row's mass in its top-k entries, for every k in ``ks``: [..., Lq, n_k]."""
    lk = p.shape[-1]
    acc = _acc_dtype(p)
    total = p.sum(dim=-1, dtype=acc)  # [..., Lq]
    kmax = min(max(ks), lk)
    top = torch.topk(p, kmax, dim=-1, sorted=True).values  # [..., Lq, kmax]
    cum = torch.cumsum(top, dim=-1, dtype=acc)  # [..., Lq, kmax]
    idx = torch.tensor([min(k, lk) - 1 for k in ks], device=p.device)
    kept = cum.index_select(-1, idx)  # [..., Lq, n_k]
    frac = (kept / total.unsqueeze(-1)).clamp(max=1.0)  # [..., Lq, n_k]
    # k >= Lk keeps everything: exactly 1, not 1 - rounding.
    full = torch.tensor([k >= lk for k in ks], device=p.device)
    frac = torch.where(full, torch.ones_like(frac), frac)
    return _nan_where_masked(frac, total)


def mass_kept(p: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor:
    """Attention mass in the k largest entries of each row.

    ``p`` ``[..., Lq, Lk]`` -> ``[..., Lq]`` (or ``[..., Lq, len(k)]`` for a sequence of k),
    in [0, 1]; NaN for masked rows. Example: ``p = [0.5, 0.3, 0.2]``, ``k=1`` -> 0.5.
    """
    _check_rows(p)
    ks, is_seq = _check_ks(k)
    out = _topk_cummass(p, ks)  # [..., Lq, n_k]
    return out if is_seq else out.squeeze(-1)


def k_for_mass(p: torch.Tensor, frac: float | Sequence[float]) -> torch.Tensor:
    """Smallest k whose top-k entries hold at least ``frac`` of each row's mass.

    ``p`` ``[..., Lq, Lk]`` -> int64 ``[..., Lq]`` (or ``[..., Lq, len(frac)]``), in 1..Lk;
    0 for masked rows. Example: ``p = [0.5, 0.3, 0.2]``, ``frac=0.75`` -> 2 (0.5 < 0.75 <=
    0.8). The comparison is ``cumulative mass >= frac * row total`` in the input's precision
    (float32 at least), so a frac sitting exactly on a cumulative sum may go either way by
    one rounding step. Sorts each row fully: chunk very long inputs over rows.
    """
    _check_rows(p)
    fs, is_seq = _check_fracs(frac)
    acc = _acc_dtype(p)
    srt = torch.sort(p, dim=-1, descending=True).values  # [..., Lq, Lk]
    cum = torch.cumsum(srt, dim=-1, dtype=acc)  # [..., Lq, Lk], nondecreasing
    total = cum[..., -1:]  # [..., Lq, 1]
    target = total * torch.tensor(fs, dtype=acc, device=p.device)  # [..., Lq, n_f]
    k = torch.searchsorted(cum.contiguous(), target.contiguous(), side="left") + 1  # [..., Lq, n_f]
    k = k.clamp(max=p.shape[-1]).masked_fill(total == 0, 0)
    return k if is_seq else k.squeeze(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row in nats, with 0 log 0 = 0.

    ``p`` ``[..., Lq, Lk]`` -> ``[..., Lq]``, in [0, log(number of nonzero entries)]; NaN for
    masked rows. For a row normalised by its total T: ``H = sum(-p log p) / T + log T``.
    """
    _check_rows(p)
    acc = _acc_dtype(p)
    total = p.sum(dim=-1, dtype=acc)  # [..., Lq]
    plogp = torch.special.entr(p.to(acc)).sum(dim=-1)  # [..., Lq], entr(0) = 0
    h = plogp / total + torch.log(total)  # [..., Lq]
    return _nan_where_masked(h.clamp(min=0.0), total)


def kl_to_topk(p: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor:
    """``KL(p_k || p) = -log(mass_kept(p, k))`` in nats: the divergence over the kept support.

    ``p_k`` is the renormalised top-k distribution (:func:`topk_probs`). See the module
    docstring for why this, not the infinite forward ``KL(p || p_k)``, is the finite "KL over
    the kept support". ``p`` ``[..., Lq, Lk]`` -> ``[..., Lq]`` (or ``[..., Lq, len(k)]``), >= 0,
    exactly 0 when ``k >= Lk`` or the dropped keys have no mass; NaN for masked rows.
    """
    _check_rows(p)
    ks, is_seq = _check_ks(k)
    kl = -torch.log(_topk_cummass(p, ks))  # [..., Lq, n_k]; -log 1 = -0.0
    kl = kl + 0.0  # turns -0.0 into 0.0 so printed results are not "-0."
    return kl if is_seq else kl.squeeze(-1)


def sink_mass(p: torch.Tensor, n_first: int = 1) -> torch.Tensor:
    """Share of each row's mass on the first ``n_first`` keys (the "attention sink").

    ``p`` ``[..., Lq, Lk]`` -> ``[..., Lq]``, in [0, 1]; NaN for masked rows. ``n_first``
    larger than Lk counts every key.
    """
    _check_rows(p)
    if isinstance(n_first, bool) or not isinstance(n_first, numbers.Integral) or n_first < 1:
        raise ValueError(f"n_first must be an int >= 1 (number of leading keys), got {n_first!r}")
    acc = _acc_dtype(p)
    total = p.sum(dim=-1, dtype=acc)  # [..., Lq]
    head = p[..., :n_first].sum(dim=-1, dtype=acc)  # [..., Lq]
    return _nan_where_masked((head / total).clamp(max=1.0), total)


def topk_probs(p: torch.Tensor, k: int) -> torch.Tensor:
    """The renormalised top-k distribution ``p_k``: kept entries divided by their sum.

    ``p`` ``[..., Lq, Lk]`` -> same shape and dtype, zeros outside the k kept keys; masked
    rows stay all zero. Ties at the k-th value are broken by ``torch.topk`` (device
    dependent), so exactly k entries (or all positive ones, if fewer) are nonzero.
    """
    _check_rows(p)
    ks, is_seq = _check_ks(k)
    if is_seq:
        raise ValueError(f"k must be a single int for topk_probs, got {k!r}")
    kk = min(ks[0], p.shape[-1])
    vals, idx = torch.topk(p, kk, dim=-1)  # [..., Lq, k]
    denom = vals.sum(dim=-1, keepdim=True, dtype=_acc_dtype(p))  # [..., Lq, 1]
    kept = torch.where(denom > 0, vals / denom, torch.zeros_like(denom)).to(p.dtype)  # [..., Lq, k]
    return torch.zeros_like(p).scatter(-1, idx, kept)  # [..., Lq, Lk]


# --------------------------------------------------------------------------- outputs


def relative_error(o_k: torch.Tensor, o: torch.Tensor, *, dim: int | tuple[int, ...] = -1
                   ) -> torch.Tensor:
    """``||o_k - o|| / ||o||`` (Euclidean norms over ``dim``) between approximate and exact outputs.

    ``o_k``, ``o`` of equal shape, e.g. one head's outputs ``[..., Lq, d]``: the default
    ``dim=-1`` gives one value per query row ``[..., Lq]``; ``dim=(-2, -1)`` one per head
    (norms over all rows and features together). A zero reference ``||o|| = 0`` (a masked row)
    gives NaN when ``o_k`` is also zero there and +inf otherwise.
    """
    for name, t in (("o_k", o_k), ("o", o)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if o_k.shape != o.shape:
        raise ValueError(
            f"o_k and o must have the same shape, got {tuple(o_k.shape)} and {tuple(o.shape)}; "
            "compare outputs of the same head and rows"
        )
    acc = torch.promote_types(_acc_dtype(o_k), _acc_dtype(o))
    num = torch.linalg.vector_norm((o_k.to(acc) - o.to(acc)), dim=dim)  # [...]
    den = torch.linalg.vector_norm(o.to(acc), dim=dim)  # [...]
    return num / den


# --------------------------------------------------------------------------- activations


def k_for_abs_mass(h: torch.Tensor, frac: float | Sequence[float]) -> torch.Tensor:
    """Smallest k whose k largest ``|h|`` hold at least ``frac`` of each token's ``sum |h|``.

    For feed-forward hidden activations ``h`` ``[..., tokens, d_ff]`` (after the
    nonlinearity, or the gated product for SwiGLU/GeGLU): the budget the top-k feed-forward
    layer needs per token, selecting by magnitude (for ReLU, magnitude = value). Returns
    int64 ``[..., tokens]`` (or ``[..., tokens, len(frac)]``) in 1..d_ff; 0 for an all-zero
    token. Same comparison rule as :func:`k_for_mass`.
    """
    _check_rows(h, "h")
    return k_for_mass(h.abs(), frac)
