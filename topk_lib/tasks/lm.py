"""Language-model quality under top-k: perplexity and next-token accuracy (Gupta et al. 2021, section 4).

The paper's drop-in claim is tested by scoring held-out text with a pretrained decoder
while :func:`topk_lib.hf.patching.use_topk` switches its attention and/or feed-forward
layers to top-k, with no corrective training. Text is tokenised once; ``n_windows``
windows of ``window`` tokens, spread evenly over the text and never overlapping, are
scored independently (no context carried across windows), so every setting sees the
same tokens. Within a window each token after the first is predicted from the ones
before it; with ``bos`` the window is prefixed by the BOS token and every token is
scored. Scoring is :func:`topk_lib.tasks.scoring.token_scores`, the scorer every task
shares.

Returned numbers: ``nll`` (mean negative log-likelihood, nats per scored token),
``perplexity = exp(nll)``, ``accuracy`` (top-1 next-token accuracy), ``tokens`` (how
many were scored), ``seconds`` (wall time of the forward passes).
"""

from __future__ import annotations

import math
import time

import torch

from topk_lib._validate import positive_int
from topk_lib.hf.patching import use_topk
from topk_lib.tasks.scoring import bos_prefix, encode, token_scores

__all__ = ["perplexity", "perplexity_of_windows", "token_windows"]


def token_windows(tokenizer, text, *, window=1024, n_windows=4, bos=None):
    """``[n_windows, window (+1 with BOS)]`` token ids, evenly spread over ``text``, not overlapping.

    ``bos``: prefix each window with BOS (default: when the tokenizer adds BOS itself,
    :func:`topk_lib.tasks.scoring.bos_prefix`).
    """
    window = positive_int(window, "window")
    n_windows = positive_int(n_windows, "n_windows")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    bos = bool(bos_prefix(tokenizer)) if bos is None else bool(bos)
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    ids = encode(tokenizer, text)  # the whole text, once
    n = len(ids)
    if n < window * n_windows:
        raise ValueError(
            f"text has {n} tokens, fewer than window * n_windows = {window} * {n_windows}; "
            "use a longer text or a smaller window / n_windows"
        )
    ids = torch.tensor(ids, dtype=torch.long)  # [N]
    step = (n - window) / max(n_windows - 1, 1)
    starts = [round(i * step) for i in range(n_windows)]
    out = torch.stack([ids[s : s + window] for s in starts])  # [n_windows, window]
    if bos:
        out = torch.cat([torch.full((n_windows, 1), tokenizer.bos_token_id, dtype=torch.long), out], 1)
    return out


def perplexity_of_windows(model, windows, *, attn_k=None, ff_k=None, chunk_size=1024):
    """:func:`perplexity` on windows already cut (every setting of a sweep scores the same ones)."""
    t0 = time.perf_counter()
    with torch.no_grad(), use_topk(model, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
        nll, correct = token_scores(model, windows)
    seconds = time.perf_counter() - t0
    mean = float(nll.sum()) / nll.size
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "accuracy": int(correct.sum()) / correct.size,
        "tokens": int(nll.size),
        "windows": len(windows),
        "seconds": seconds,
    }


def perplexity(
    model, tokenizer, text, *, window=1024, n_windows=4, attn_k=None, ff_k=None, chunk_size=1024, bos=None
):
    """Perplexity and next-token accuracy of a causal LM on ``text`` under ``use_topk(attn_k, ff_k)``.

    Arguments:
        model, tokenizer: a causal LM and its tokenizer.
        text: the text scored; :func:`token_windows` cuts ``n_windows`` windows of ``window`` tokens.
        attn_k, ff_k: what :func:`topk_lib.hf.patching.use_topk` takes (None = vanilla).
        chunk_size: query rows per chunk of top-k attention.
        bos: prefix each window with BOS (default: when the tokenizer adds BOS itself).

    Returns:
        a dict with ``perplexity, nll, accuracy, tokens, windows, seconds``.
    """
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows, bos=bos)
    return perplexity_of_windows(model, windows, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size)
