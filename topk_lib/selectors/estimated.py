"""Selectors that rank keys by a cheap estimate of the scores: Quest (page bounds), Loki (low-rank keys),
Double Sparsity (a few channels).

Loki and Double Sparsity are calibrated offline on another text: :meth:`calibrate` takes
recorded activations ``{layer: (q [B, Hq, L, d], k [B, Hkv, L, d], v)}`` (what
:func:`topk_lib.analysis.approximations.record_qkv` returns) and keeps per layer and KV head
what the rule needs. A layer that was not calibrated raises, naming the fix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from topk_lib._validate import positive_int
from topk_lib.selectors.base import Selector, top_positions

__all__ = ["Quest", "Loki", "DoubleSparsity"]


class Quest(Selector):
    """Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

    Rule: keys are cut into pages of ``page_size`` consecutive positions; each page keeps the
    channel-wise minimum and maximum of its keys. A query's upper bound on a page's scores is
    ``sum_c max(q_c * max_c, q_c * min_c)``; it keeps the ``budget // page_size`` pages of
    largest bound among pages holding a key it may attend, and of those pages the keys it may
    attend. Per query head. The budget must be at least one page. The bounds cover the keys of
    the call: in a prefill a page holding the query holds later keys too (decoding has none).
    """

    name = "quest"
    batched_decode = False

    def __init__(self, page_size=16):
        super().__init__()
        self.page_size = positive_int(page_size, "page_size")

    def begin(self, call, budget):
        super().begin(call, budget)
        if budget < self.page_size:
            raise ValueError(f"Quest: budget {budget} is less than one page of {self.page_size} keys; "
                             f"use a budget >= page_size or a smaller page_size")
        n, p = call.n_keys, self.page_size
        pad = -n % p
        key = call.key.float()
        kmax = F.pad(key, (0, 0, 0, pad), value=-math.inf).unflatten(-2, (-1, p)).amax(-2)  # [..., Hkv, P, d]
        kmin = F.pad(key, (0, 0, 0, pad), value=math.inf).unflatten(-2, (-1, p)).amin(-2)  # [..., Hkv, P, d]
        self._bounds = (kmin.unsqueeze(-3), kmax.unsqueeze(-3))  # [..., Hkv, 1, P, d] each

    def select(self, call, chunk, budget):
        p, n = self.page_size, chunk.n_keys
        kmin, kmax = self._bounds
        q = call.query[..., chunk.r0 : chunk.r1, :].float()  # [..., Hkv, G, c, d]
        bound = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)  # [..., c, P]
        pages = -(-n // p)
        allowed = F.pad(chunk.allowed, (0, pages * p - n)).unflatten(-1, (pages, p)).any(-1)  # [..., c, pages]
        chosen = top_positions(bound[..., :pages], allowed, budget // p)  # [..., Hkv, G, c, m]
        keys = chosen[..., None] * p + torch.arange(p, device=chosen.device)  # [..., c, m, p]
        return keys.masked_fill(chosen[..., None] < 0, -1).flatten(-2)  # [..., Hkv, G, c, m * p]

    def __repr__(self):
        return f"Quest(page_size={self.page_size})"


class _Calibrated(Selector):
    """A selector whose rule needs per-layer numbers measured on a calibration text."""

    def __init__(self):
        super().__init__()
        self.calibration = {}

    def calibrate(self, records):
        """Measure what the rule needs from ``{layer: (q, k, v)}`` activations of another text; returns self."""
        if not isinstance(records, dict) or not records:
            raise ValueError("records must be a non-empty {layer: (q, k, v)} dict, as record_qkv returns")
        self.calibration = {layer: self._measure(q.float(), k.float()) for layer, (q, k, _) in records.items()}
        return self

    def _of(self, call):
        if call.layer not in self.calibration:
            raise RuntimeError(
                f"{type(self).__name__}: layer {call.layer!r} is not calibrated (calibrated: "
                f"{sorted(self.calibration)}); call .calibrate(record_qkv(model, other_ids, layers=...)) first"
            )
        return self.calibration[call.layer]

    def _measure(self, q, k):
        raise NotImplementedError

    def select(self, call, chunk, budget):
        qe, ke = self._estimate_parts(call, chunk)  # [..., Hkv, G, c, r], [..., Hkv, 1, n, r]
        return top_positions(qe @ ke.transpose(-1, -2), chunk.allowed, budget)  # [..., Hkv, G, c, w]


class Loki(_Calibrated):
    """Loki (Singhania et al. 2024, "Loki: Low-rank Keys for Efficient Sparse Attention").

    Rule: per layer and KV head, the top ``rank`` principal directions ``P [d, r]`` of the keys
    of a calibration text (right singular vectors of the key matrix, uncentred: the mean
    direction carries score); a query keeps the ``budget`` keys of largest approximate score
    ``(q P) . (k P)``, i.e. the score in the rank-``r`` key subspace. Keys after rotary
    embeddings, as the model uses them.
    """

    name = "loki"

    def __init__(self, rank=16):
        super().__init__()
        self.rank = positive_int(rank, "rank")

    def _measure(self, q, k):
        keys = k.transpose(0, 1).flatten(1, 2)  # [Hkv, B*L, d]
        _, _, vh = torch.linalg.svd(keys, full_matrices=False)  # [Hkv, d, d]
        return vh[:, : self.rank].transpose(-1, -2).contiguous()  # [Hkv, d, r]

    def _estimate_parts(self, call, chunk):
        proj = self._of(call).to(call.key.device)  # [Hkv, d, r]
        q = call.query[..., chunk.r0 : chunk.r1, :].float()  # [..., Hkv, G, c, d]
        qe = q @ proj[:, None]  # [..., Hkv, G, c, r]
        ke = (call.key[..., : chunk.n_keys, :].float() @ proj).unsqueeze(-3)  # [..., Hkv, 1, n, r]
        return qe, ke

    def __repr__(self):
        return f"Loki(rank={self.rank})"


class DoubleSparsity(_Calibrated):
    """Double Sparsity (Yang et al. 2024, "Post-Training Sparse Attention with Double Sparsity").

    Rule: per layer and KV head, the ``channels`` feature channels ``C`` with the largest
    calibrated contribution to the scores, ``sum_t |q_tc| * sum_s |k_sc|`` over a calibration
    text (summed over the query heads of the KV head); a query keeps the ``budget`` keys of
    largest partial score ``q_C . k_C``.
    """

    name = "double_sparsity"

    def __init__(self, channels=16):
        super().__init__()
        self.channels = positive_int(channels, "channels")

    def _measure(self, q, k):
        hkv = k.shape[1]
        q_mag = q.abs().sum((0, 2)).view(hkv, -1, q.shape[-1]).sum(1)  # [Hkv, d]
        k_mag = k.abs().sum((0, 2))  # [Hkv, d]
        return (q_mag * k_mag).topk(min(self.channels, k.shape[-1]), -1).indices.sort(-1).values  # [Hkv, r]

    def _estimate_parts(self, call, chunk):
        chans = self._of(call).to(call.key.device)  # [Hkv, r]
        q = call.query[..., chunk.r0 : chunk.r1, :].float()  # [..., Hkv, G, c, d]
        lead = q.shape[:-4]
        qe = q.gather(-1, chans.view(*(1,) * len(lead), -1, 1, 1, chans.shape[-1]).expand(*q.shape[:-1], -1))
        key = call.key[..., : chunk.n_keys, :].float()  # [..., Hkv, n, d]
        ke = key.gather(-1, chans.view(*(1,) * len(lead), -1, 1, chans.shape[-1]).expand(*key.shape[:-1], -1))
        return qe, ke.unsqueeze(-3)  # [..., Hkv, G, c, r], [..., Hkv, 1, n, r]

    def __repr__(self):
        return f"DoubleSparsity(channels={self.channels})"
