"""Model-level experiments built on ``use_topk``: layer sensitivity and per-head budgets.

* :func:`layer_sensitivity` switches one layer at a time to top-k and measures how far
  the final next-token distribution moves from the vanilla model's (KL divergence).
* :func:`per_head_budget` turns measured per-head statistics (e.g. the k that keeps
  99 % of the attention mass) into a ``{(layer, head): k}`` budget for ``use_topk``,
  optionally rescaled to a given average k; :func:`save_budget` / :func:`load_budget`
  store it as JSON under ``data/results``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import hashlib

import pandas as pd
import torch
from tqdm.auto import tqdm

from topk_lib.hf.layers import describe_layers
from topk_lib.hf.patching import use_topk
from topk_lib.infra.cache import cached_frame


def analysis_inputs(decoder_tokenizer, encoder_tokenizer, *, length: int, encoder_length: int, quick: bool = False):
    """The inputs notebooks 01 and 02 analyse (same tokens, so they share cached statistics).

    Decoder: the first ``length`` tokens of Moby Dick; encoder: the last State of the Union speech
    truncated to ``encoder_length`` tokens; ``quick`` uses the offline pydoc text for both.
    Returns ``(text_name, decoder_text, ids [1, length], encoder_text_name, encoder_ids [1, <= encoder_length])``.
    """
    from topk_lib.data.sources import moby_dick_text, pydoc_text, sotu_speeches
    from topk_lib.tasks.lm import token_windows

    if quick:
        text_name, decoder_text, encoder_text_name, encoder_text = "pydoc", pydoc_text(), "pydoc", pydoc_text()
    else:
        text_name, decoder_text = "moby_dick", moby_dick_text()
        encoder_text_name, encoder_text = "sotu_last", sotu_speeches()[-1]["text"]
    ids = token_windows(decoder_tokenizer, decoder_text, window=length, n_windows=1)  # [1, L]
    encoder_ids = encoder_tokenizer(encoder_text, truncation=True, max_length=encoder_length,
                                    return_tensors="pt").input_ids
    return text_name, decoder_text, ids, encoder_text_name, encoder_ids


def cached_attention_stats(model, input_ids, *, model_name: str, text_name: str, ks, **capture_kw) -> pd.DataFrame:
    """:func:`topk_lib.analysis.capture.capture_attention_stats`, cached by model, input tokens and ks.

    Notebooks 01 and 02 read the same statistics: the second one finds them in the cache.
    """
    from topk_lib.analysis.capture import capture_attention_stats

    tokens = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:12]
    config = {"model": model_name, "text": text_name, "length": int(input_ids.shape[-1]), "tokens": tokens,
              "ks": [int(k) for k in ks], **capture_kw}
    return cached_frame(f"{model_name}_{text_name}_{input_ids.shape[-1]}_attention", folder="attention_stats",
                        config=config, compute=lambda: capture_attention_stats(model, input_ids, ks=ks, **capture_kw))


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


def per_head_budget(per_head: pd.DataFrame, *, value: str = "value", average_k: float | None = None,
                    min_k: int = 1, max_k: int | None = None) -> dict[tuple[int, int], int]:
    """``{(layer, head): k}`` from a table with columns ``layer``, ``head`` and ``value``.

    ``value`` is the k each head needs (e.g. k for 99 % of the mass). With ``average_k``
    every head's k is scaled by ``average_k / mean(value)`` so the budget keeps the
    measured proportions at a given mean; rounding makes the mean approximate, within
    0.5. Results are clipped to ``[min_k, max_k]``.
    """
    missing = {"layer", "head", value} - set(per_head.columns)
    if missing:
        raise ValueError(f"per_head needs columns layer, head and {value!r}; missing {sorted(missing)}")
    if per_head.duplicated(["layer", "head"]).any():
        raise ValueError("per_head has several rows for one (layer, head): aggregate first")
    if average_k is not None and average_k <= 0:
        raise ValueError(f"average_k must be positive, got {average_k}")
    need = per_head[value].astype(float)
    if average_k is not None:
        need = need * (average_k / need.mean())
    ks = need.round().clip(lower=min_k, upper=max_k)
    return {(int(l), int(h)): int(k) for l, h, k in zip(per_head["layer"], per_head["head"], ks)}


def save_budget(budget: dict, path, *, overwrite: bool = False, **info) -> Path:
    """Write a budget as JSON (keys ``"layer,head"``) atomically; ``info`` is stored beside it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    ks = list(budget.values())
    doc = {
        **info,
        "average_k": sum(ks) / len(ks) if ks else math.nan,
        "budget": {f"{layer},{head}": int(k) for (layer, head), k in sorted(budget.items())},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_budget(path) -> dict[tuple[int, int], int]:
    """Read a budget written by :func:`save_budget`, ready for ``use_topk(model, attn_k=...)``."""
    doc = json.loads(Path(path).read_text())
    try:
        return {tuple(int(x) for x in key.split(",")): int(k) for key, k in doc["budget"].items()}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a budget written by save_budget: {err}") from None
