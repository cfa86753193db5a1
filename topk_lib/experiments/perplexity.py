"""Perplexity of a pretrained decoder over a sweep of settings, and its command line.

``python -m topk_lib.experiments.perplexity [--quick]`` scores SmolLM2 on Moby Dick under
attention top-k alone, feed-forward top-k alone and both together (Gupta et al. 2021,
section 4) and writes one CSV row per setting, with the device, dtype, threads and library
versions beside every number.
"""

from __future__ import annotations

import time

from topk_lib.experiments.settings import Setting
from topk_lib.tasks.lm import perplexity_of_windows, token_windows

__all__ = ["perplexity_sweep", "ATTN_KS", "FF_KS", "sweep_settings", "cli_settings", "main"]

#: Attention k swept on their own (None = vanilla).
ATTN_KS = (None, 256, 128, 64, 32, 16, 8)
#: Feed-forward k swept on their own; None = dense, 1536 on SmolLM2.
FF_KS = (None, 768, 384, 192, 96, 48)


def sweep_settings():
    """Vanilla, attention k alone, FF k alone, then both paired by position (256/768 ... 16/48)."""
    pairs = [(k, None) for k in ATTN_KS] + [(None, k) for k in FF_KS[1:]] + list(zip(ATTN_KS[1:6], FF_KS[1:]))
    return [Setting.of(attn_k, ff_k) for attn_k, ff_k in pairs]


def cli_settings(attn_ks=None, ff_ks=None, *, quick=False):
    """The command line's settings: vanilla and each k of ``"128,64"``-style lists alone, else the default sweep."""
    if attn_ks or ff_ks:
        try:
            ks = [[int(k) for k in (arg or "").split(",") if k.strip()] for arg in (attn_ks, ff_ks)]
        except ValueError as err:
            raise ValueError(f"--attn-ks/--ff-ks take comma-separated ints such as 128,64,32: {err}") from err
        return [Setting.of()] + [Setting.of(k, None) for k in ks[0]] + [Setting.of(None, k) for k in ks[1]]
    return [Setting.of(), Setting.of(8, 48)] if quick else sweep_settings()


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
    """One :func:`topk_lib.tasks.lm.perplexity` row per :class:`Setting`, as a pandas DataFrame.

    The text is tokenised once and every setting scores the same windows. Columns:
    ``attn_k, ff_k, perplexity, nll, accuracy, tokens, windows, seconds``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    settings = list(settings)
    if not settings or not all(isinstance(s, Setting) and s.kind != "budget" for s in settings):
        raise ValueError("settings must be a non-empty list of Setting with one k each (e.g. Setting.of(8, 96))")
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows, bos=bos)
    rows = []
    for setting in tqdm(settings, desc="perplexity sweep", disable=not progress):
        row = perplexity_of_windows(model, windows, **setting.topk(), chunk_size=chunk_size)
        rows.append({"attn_k": setting.attn_k, "ff_k": setting.ff_k, **row})
    return pd.DataFrame(rows)


def main(argv=None):
    """``python -m topk_lib.experiments.perplexity [--quick]``: SmolLM2 on Moby Dick, written to data/results."""
    import argparse
    import platform
    from pathlib import Path

    import torch
    import transformers

    from topk_lib.data import moby_dick_text
    from topk_lib.hf.loading import load_model
    from topk_lib.infra import paths

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--n-windows", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="one window, baseline and the smallest k only")
    ap.add_argument("--out", default=None, help="CSV path (default data/results/<model>_moby_dick_perplexity.csv)")
    ap.add_argument("--attn-ks", default=None, help="comma-separated attention k, each alone beside the vanilla "
                    "row (with --ff-ks: instead of the default sweep, e.g. for a model of another d_ff)")
    ap.add_argument("--ff-ks", default=None, help="comma-separated feed-forward k, each alone")
    args = ap.parse_args(argv)
    settings = cli_settings(args.attn_ks, args.ff_ks, quick=args.quick)
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
        out = Path(args.out) if args.out else paths.results() / f"{args.model}_moby_dick_perplexity.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
