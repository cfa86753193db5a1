"""Layer sensitivity: top-k attention in one layer at a time, and how far the model's output moves.

Each layer in turn gets top-k attention while the others stay vanilla; the distance is
KL(vanilla ‖ top-k) of the final next-token distributions, so layers whose attention can
be cut hardest show up as the smallest KL.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from topk_lib.hf.layers import describe_layers
from topk_lib.hf.patching import use_topk

__all__ = ["layer_sensitivity"]


@torch.no_grad()
def _log_probs(model, input_ids):
    return torch.log_softmax(model(input_ids).logits.float(), dim=-1)  # [B, L, V]


def layer_sensitivity(model, input_ids, *, k: int = 16, layers=None, chunk_size: int = 1024) -> pd.DataFrame:
    """Top-k attention in one layer at a time; KL(vanilla ‖ top-k) of the next-token distributions.

    Returns one row per layer: ``layer``, ``kl`` (nats, mean over positions),
    ``top1_agreement`` (share of positions whose argmax token is unchanged).
    """
    if layers is None:
        layers = [info.layer for info in describe_layers(model) if info.attention]
    base = _log_probs(model, input_ids)  # [B, L, V]
    rows = []
    for layer in tqdm(layers, desc=f"layer sensitivity (k={k})", unit="layer"):
        with use_topk(model, attn_k={layer: k}, chunk_size=chunk_size):
            approx = _log_probs(model, input_ids)
        kl = (base.exp() * (base - approx)).sum(-1)  # [B, L]
        agree = (base.argmax(-1) == approx.argmax(-1)).float()
        rows.append({"layer": layer, "k": k, "kl": kl.mean().item(), "top1_agreement": agree.mean().item()})
    return pd.DataFrame(rows)
