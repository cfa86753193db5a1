"""What the notebooks analyse: the token windows of notebooks 01 and 02, their cached statistics,
and the per-head attention budget that notebook 03 compares with a uniform k.

These need both the tasks layer (:func:`topk_lib.tasks.lm.token_windows`, the BOS rule)
and the analysis layer (statistics capture), so they live here, above both.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from topk_lib.analysis.budget import load_budget, save_budget
from topk_lib.analysis.capture import capture_attention_stats
from topk_lib.data import moby_dick_text, pydoc_text, sotu_speeches
from topk_lib.infra import paths
from topk_lib.infra.cache import cached_frame, digest
from topk_lib.infra.outputs import model_folder
from topk_lib.tasks.lm import token_windows

__all__ = ["analysis_inputs", "cached_attention_stats", "measure_head_budget", "head_budget"]


def analysis_inputs(decoder_tokenizer, encoder_tokenizer, *, length: int, encoder_length: int, quick: bool = False):
    """The inputs notebooks 01 and 02 analyse (same tokens, so they share cached statistics).

    Decoder: the first ``length`` tokens of Moby Dick; encoder: the last State of the Union speech
    truncated to ``encoder_length`` tokens; ``quick`` uses the offline pydoc text for both.
    Returns ``(text_name, decoder_text, ids [1, length], encoder_text_name, encoder_ids [1, <= encoder_length])``.
    """
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
    tokens = digest(input_ids.numpy().tobytes(), length=12)
    config = {"model": model_name, "text": text_name, "length": int(input_ids.shape[-1]), "tokens": tokens,
              "ks": [int(k) for k in ks], **capture_kw}
    return cached_frame(f"{model_name}_{text_name}_{input_ids.shape[-1]}_attention", folder="attention_stats",
                        config=config, compute=lambda: capture_attention_stats(model, input_ids, ks=ks, **capture_kw),
                        columns=("layer", "head", "bucket", "k", "metric", "value"))


def measure_head_budget(model, tokenizer, text, *, n_tokens=1024, frac=0.99, statistic="median", progress=True):
    """``{(layer, head): k}``: the k each head needs to keep ``frac`` of its attention mass.

    One window of ``n_tokens`` tokens from the start of ``text`` runs through
    :func:`topk_lib.analysis.capture.capture_attention_stats`; per head, the ``statistic``
    (``"median"`` or ``"mean"``) over its query rows of the smallest k with mass >= ``frac``,
    rounded up. Use a text the budget is not evaluated on.
    """
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    ids = token_windows(tokenizer, text, window=n_tokens, n_windows=1)  # [1, n_tokens]
    stats = capture_attention_stats(model, ids, ks=(1,), fracs=(frac,), progress=progress)
    name = f"k{100 * frac:g}_{statistic}"
    table = stats[(stats.metric == name) & (stats.bucket == "all")]
    if table.empty:
        raise ValueError(f"capture_attention_stats returned no {name!r} rows for bucket 'all'")
    return {(int(l), int(h)): max(1, math.ceil(v)) for l, h, v in zip(table["layer"], table["head"], table["value"])}


def head_budget(model, tokenizer, *, model_name, budget_file, tokens, progress=True):
    """``(budget, source)``: the per-head budget for ``use_topk`` and a sentence saying where it came from.

    In order: ``paths.results() / budget_file`` (notebook 02's budget, measured on one of
    its texts); a budget measured earlier by this function
    (``accuracy/<model folder>_head_budget_k99_pydoc<tokens>.json``, the
    :func:`~topk_lib.infra.outputs.model_folder` of ``model_name``); else one measured now by
    :func:`measure_head_budget` on ``tokens`` tokens of pydoc text, which no task
    evaluates, and saved under that name.
    """
    given = paths.results() / budget_file
    own = paths.results() / "accuracy" / f"{model_folder(model_name)}_head_budget_k99_pydoc{tokens}.json"
    if given.exists():
        info = json.loads(given.read_text())
        return load_budget(given), (
            f"notebook 02 ({given.name}: {info.get('tokens', '?')} tokens of "
            f"{info.get('text', 'an unnamed text')}, {info.get('statistic', 'k99')})")
    if own.exists():
        return load_budget(own), f"measured earlier here ({own.name})"
    budget = measure_head_budget(model, tokenizer, pydoc_text(), n_tokens=tokens, progress=progress)
    save_budget(budget, own, overwrite=True, source="pydoc", tokens=tokens, statistic="k99 median")
    return budget, f"measured now on {tokens} pydoc tokens"
