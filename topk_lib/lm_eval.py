"""Language-model quality under top-k: perplexity and next-token accuracy (Gupta et al. 2021, section 4).

The paper's drop-in claim is tested by scoring held-out text with a pretrained decoder
while :func:`topk_lib.patching.use_topk` switches its attention and/or feed-forward
layers to top-k, with no corrective training. Text is tokenised once; ``n_windows``
windows of ``window`` tokens, spread evenly over the text and never overlapping, are
scored independently (no context carried across windows), so every setting sees the
same tokens. Within a window each token after the first is predicted from the ones
before it; with ``bos`` the window is prefixed by the BOS token and every token is
scored.

Returned numbers: ``nll`` (mean negative log-likelihood, nats per scored token),
``perplexity = exp(nll)``, ``accuracy`` (top-1 next-token accuracy), ``tokens`` (how
many were scored), ``seconds`` (wall time of the forward passes).
"""

from __future__ import annotations

import math
import numbers
import time

import torch
import torch.nn.functional as F

from topk_lib.patching import use_topk

__all__ = ["perplexity", "perplexity_sweep", "token_windows"]


def _positive_int(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


def _uses_bos(tokenizer):
    """Whether the tokenizer itself starts every text with BOS (then each window should too)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def token_windows(tokenizer, text, *, window=1024, n_windows=4, bos=None):
    """``[n_windows, window (+1 with BOS)]`` token ids, evenly spread over ``text``, not overlapping."""
    window = _positive_int(window, "window")
    n_windows = _positive_int(n_windows, "n_windows")
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    bos = _uses_bos(tokenizer) if bos is None else bool(bos)
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # the whole text, once
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


def _score(model, windows):
    """Sum of NLL, correct top-1 predictions and scored tokens over the windows."""
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    for row in windows:
        ids = row.unsqueeze(0).to(device)  # [1, W]
        logits = model(ids).logits[0, :-1].float()  # [W-1, V]: position t predicts token t+1
        target = ids[0, 1:]  # [W-1]
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
        del logits
    return nll, correct, count


def _result(nll, correct, count, seconds, windows):
    mean = nll / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "accuracy": correct / count,
        "tokens": count,
        "windows": windows,
        "seconds": seconds,
    }


def perplexity(
    model, tokenizer, text, *, window=1024, n_windows=4, attn_k=None, ff_k=None, chunk_size=1024, bos=None
):
    """Perplexity and next-token accuracy of a causal LM on ``text`` under ``use_topk(attn_k, ff_k)``.

    ``attn_k``/``ff_k`` take what :func:`topk_lib.patching.use_topk` takes (None = vanilla).
    ``bos``: prefix each window with BOS (default: when the tokenizer adds BOS itself).
    Returns a dict with ``perplexity, nll, accuracy, tokens, windows, seconds``.
    """
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows, bos=bos)
    t0 = time.perf_counter()
    with torch.no_grad(), use_topk(model, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
        nll, correct, count = _score(model, windows)
    return _result(nll, correct, count, time.perf_counter() - t0, len(windows))


def perplexity_sweep(
    model,
    tokenizer,
    text,
    *,
    settings,
    window=1024,
    n_windows=4,
    chunk_size=1024,
    bos=None,
    progress=True,
):
    """One :func:`perplexity` row per ``(attn_k, ff_k)`` in ``settings``, as a pandas DataFrame.

    The text is tokenised once and every setting scores the same windows. Columns:
    ``attn_k, ff_k, perplexity, nll, accuracy, tokens, windows, seconds``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    settings = list(settings)
    if not settings or not all(isinstance(s, tuple) and len(s) == 2 for s in settings):
        raise ValueError("settings must be a non-empty list of (attn_k, ff_k) pairs (None = vanilla)")
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows, bos=bos)
    rows = []
    for attn_k, ff_k in tqdm(settings, desc="perplexity sweep", disable=not progress):
        t0 = time.perf_counter()
        with torch.no_grad(), use_topk(model, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
            nll, correct, count = _score(model, windows)
        row = _result(nll, correct, count, time.perf_counter() - t0, len(windows))
        rows.append({"attn_k": attn_k, "ff_k": ff_k, **row})
    return pd.DataFrame(rows)
