"""Language-model quality under top-k: perplexity and next-token accuracy (Gupta et al. 2021, section 4).

The paper's drop-in claim is tested by scoring held-out text with a pretrained decoder
while :func:`topk_lib.hf.patching.use_topk` switches its attention and/or feed-forward
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

from topk_lib.hf.patching import use_topk

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

    ``attn_k``/``ff_k`` take what :func:`topk_lib.hf.patching.use_topk` takes (None = vanilla).
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


# --------------------------------------------------------------------------- command line

#: The sweep of issue 3's closing note: attention k alone, FF k alone, then both paired by position.
ATTN_KS = (None, 256, 128, 64, 32, 16, 8)
FF_KS = (None, 768, 384, 192, 96, 48)  # None = dense, 1536 on SmolLM2


def closing_note_settings():
    """``(attn_k, ff_k)`` pairs: baseline, attention alone, FF alone, both (256/768 ... 16/48)."""
    return [(k, None) for k in ATTN_KS] + [(None, k) for k in FF_KS[1:]] + list(zip(ATTN_KS[1:6], FF_KS[1:]))


def main(argv=None):
    """``python -m topk_lib.tasks.lm [--quick]``: SmolLM2 on Moby Dick, written to data/results."""
    import argparse
    import platform

    import transformers

    from topk_lib.infra import paths
    from topk_lib.data.corpora import moby_dick_text
    from topk_lib.hf.loading import load_model

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--n-windows", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="one window, baseline and the smallest k only")
    ap.add_argument("--out", default=None, help="CSV path (default data/results/<model>_moby_dick_perplexity.csv)")
    args = ap.parse_args(argv)
    settings = [(None, None), (8, 48)] if args.quick else closing_note_settings()
    n_windows = 1 if args.quick else args.n_windows
    model, tokenizer = load_model(args.model)
    t0 = time.perf_counter()
    df = perplexity_sweep(model, tokenizer, moby_dick_text(), settings=settings, window=args.window, n_windows=n_windows)
    wall = time.perf_counter() - t0
    for col in ("attn_k", "ff_k"):
        df[col] = ["full" if v is None or v != v else str(int(v)) for v in df[col]]
    device = next(model.parameters()).device
    df["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " cpu"
    df["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    df["threads"] = torch.get_num_threads()
    df["torch"] = torch.__version__
    df["transformers"] = transformers.__version__
    print(df.iloc[:, :8].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"sweep wall time {wall:.1f} s")
    if not args.quick:
        from pathlib import Path

        out = Path(args.out) if args.out else paths.results() / f"{args.model}_moby_dick_perplexity.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
