"""The benchmark suites: which points each one measures, run one after another, each row saved as it lands.

``kernels``: one causal attention layer at four lengths, the four exact and top-k kernels. Its
times are interleaved: per length and pass each method first runs once in a process of its own
(peak memory, and whether it fits), then the methods that fit run in one process, alternating
over the repeats (:func:`~topk_lib.bench.harness.run_interleaved`), so a busy moment of a shared
machine slows all of them alike and the ratios hold; each row's note gives the load average.
``attention``: one layer from L=1024 doubling until only top-k fits, with SDPA and Performer.
``chunk``: the chunk-size trade-off at a fixed length. ``ff``: one feed-forward layer against its
width. ``model12``: a 12-layer model, forward+backward. ``product``: the sparse-weights-times-V
variants and ``torch.topk`` on one chunk. On CPU the ``ff`` suite uses 8192 tokens instead of
512x512 and ``model12`` stops at L=8192 (each row records its sizes). ``quick=True`` shrinks
every suite to a smoke run.
"""

from __future__ import annotations

import math
import numbers
import statistics
import sys
from pathlib import Path

from topk_lib.bench.harness import (DEFAULT_RESERVE, DEFAULT_TIMEOUT_S, PASSES, check_device, row_template,
                                    run_interleaved, run_point)
from topk_lib.bench.store import Merged, merge_rows, results_path

__all__ = ["SUITES", "DEFAULT_BUDGET", "MIN_BUDGET", "MIN_TIMEOUT_S", "SuiteRows", "check_budget", "check_timeout",
           "run_suite"]

MiB = 1024**2
DEFAULT_BUDGET = 16 * 1024**3
# A point's process holds tens of MB of address space of its own (thread stacks, allocator arenas, the
# BLAS and OpenMP pools) that the CPU budget counts (see meters): under 64 MiB points fail on that, not on
# the kernel (a quick attention or product point fits in 64 MiB).
MIN_BUDGET = 64 * MiB
# A point's timeout covers its child's start-up (about 1 s forked, 1-3 s as a fresh python importing
# torch, more with a CUDA context) and building its inputs: under 10 s it times out the start, not the kernel.
MIN_TIMEOUT_S = 10.0


class SuiteRows(list):
    """The rows of a suite run, in order, and ``merged``: what merging them into the CSV did."""

    merged: Merged


def check_budget(budget, arg: str = "budget") -> int:
    """A memory budget in bytes: ``0`` (unlimited) or at least :data:`MIN_BUDGET`."""
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool):
        raise TypeError(f"{arg} must be an int number of bytes (0 = unlimited; parse_bytes('16GiB') reads a size), "
                        f"got {budget!r} ({type(budget).__name__})")
    if budget != 0 and budget < MIN_BUDGET:
        raise ValueError(f"{arg} must be 0 (unlimited) or at least 64 MiB ({MIN_BUDGET} bytes): a point's process "
                         f"holds tens of MB of its own, so every point would fail before its kernel; got {budget}")
    return int(budget)


def check_timeout(timeout_s, arg: str = "timeout_s") -> float:
    """Seconds per point: at least :data:`MIN_TIMEOUT_S` (start-up and inputs count)."""
    if not isinstance(timeout_s, numbers.Real) or isinstance(timeout_s, bool):
        raise TypeError(f"{arg} must be a number of seconds, got {timeout_s!r} ({type(timeout_s).__name__})")
    if math.isnan(timeout_s) or timeout_s < MIN_TIMEOUT_S:
        raise ValueError(f"{arg} must be at least {MIN_TIMEOUT_S:g} s: it covers the point's start-up and inputs, "
                         f"so a shorter one times out every point before its kernel; got {timeout_s!r}")
    return float(timeout_s)


def _kernels_specs(common, quick, cuda):
    lengths = (256, 512) if quick else (2048, 4096, 8192, 16384)
    c, k = (128, 16) if quick else (1024, 128)
    for n in lengths:
        for method in ("vanilla", "sdpa", "chunked", "topk"):
            for ps in PASSES:
                yield {**common, "kind": "attention", "method": method, "pass": ps, "B": 1, "H": 12, "d": 64, "L": n,
                       "C": c if method in ("chunked", "topk") else None, "k": k if method == "topk" else None}


def _attention_methods(quick):
    c = 128 if quick else 1024
    ks = (16, 32) if quick else (64, 128)
    yield "vanilla", {}
    yield "sdpa", {}
    yield "performer", {"nb_features": 64 if quick else 256}
    yield "chunked", {"C": c}
    for k in ks:
        yield "topk", {"C": c, "k": k}


def _chunk_specs(common, quick, cuda):
    n = 512 if quick else 8192
    chunks = (64, 128, 256) if quick else (128, 256, 512, 1024, 2048, 4096)
    k = 16 if quick else 128
    for c in chunks:
        for method in ("chunked", "topk"):
            for ps in PASSES:
                yield {**common, "kind": "attention", "method": method, "pass": ps, "B": 1, "H": 12, "d": 64, "L": n,
                       "C": c, "k": k if method == "topk" else None}


def _ff_specs(common, quick, cuda):
    if quick:
        tokens, d, widths, c, k = 256, 64, (256, 512), 64, 32
    elif cuda:
        tokens, d, widths, c, k = 512 * 512, 768, (3072, 6144, 12288, 24576, 49152, 98304), 4096, 512
    else:  # 512x512 tokens would take hours on 2 cores: scaled down, the row says so
        tokens, d, widths, c, k = 8192, 768, (3072, 6144, 12288, 24576, 49152), 1024, 512
    for d_ff in widths:
        for method in ("dense", "chunked", "topk"):
            for ps in PASSES:
                yield {**common, "kind": "ff", "method": method, "pass": ps, "B": 1, "L": tokens, "d": d,
                       "d_ff": d_ff, "C": c if method != "dense" else None, "k": k if method == "topk" else None}


def _model12_specs(common, quick, cuda):
    if quick:
        lengths, shape, c, k, ff_k = (64, 128), dict(n_layers=2, d=64, H=4, d_ff=256), 32, 8, 32
    else:
        lengths = (512, 1024, 2048, 4096, 8192, 16384) if cuda else (512, 1024, 2048, 4096, 8192)
        shape, c, k, ff_k = dict(n_layers=12, d=768, H=12, d_ff=3072), 1024, 64, 512
    for n in lengths:
        for method in ("vanilla", "sdpa", "chunked", "topk"):
            yield {**common, "kind": "model12", "method": method, "pass": "fwd+bwd", "B": 1, "L": n, **shape,
                   "C": c if method in ("chunked", "topk") else None, "k": k if method == "topk" else None,
                   "ff_k": ff_k if method == "topk" else None}


def _product_specs(common, quick, cuda):
    lengths = (512, 1024) if quick else (2048, 8192, 16384)
    c, k = (128, 16) if quick else (1024, 128)
    methods = ("scatter_mm", "gather_bmm", "gather_mulsum", "csr", "qk_matmul", "topk_sorted", "topk_unsorted")
    for n in lengths:
        for method in methods:
            yield {**common, "kind": "product", "method": method, "pass": "fwd", "H": 12, "d": 64, "L": n,
                   "C": c, "k": k}


SUITES = {
    "kernels": "one causal layer (B=1, H=12, d=64, C=1024, k=128), L in {2048..16384}: "
               "vanilla, chunked, top-k, SDPA; fwd and fwd+bwd",
    "attention": "one causal layer, L from 1024 doubling until only top-k fits (or --max-L): "
                 "vanilla, SDPA, Performer, chunked C=1024, top-k k in {64,128}",
    "chunk": "chunked vs top-k (k=128) at L=8192, C in {128..4096}",
    "ff": "one feed-forward layer d=768 vs d_ff: dense, token-chunked, top-k k=512",
    "model12": "12-layer pre-LN model (d=768, H=12, d_ff=3072) vs L, fwd+bwd",
    "product": "micro: sparse weights x V on one chunk (12 x 1024 queries, d=64, k=128) and torch.topk vs Q.K^T",
}

_FIXED_SPECS = {
    "kernels": _kernels_specs,
    "chunk": _chunk_specs,
    "ff": _ff_specs,
    "model12": _model12_specs,
    "product": _product_specs,
}


def _interleaved_suite(common, quick, cuda, measure, timeout_s, reserve_bytes, isolation, passes=PASSES,
                       min_len=None, max_len=None):
    """Per (L, pass): each method alone once (memory), then the ones that fit timed together, alternating.

    ``passes``, ``min_len`` and ``max_len`` keep only some of the points (e.g. to remeasure one pass).
    """
    min_len, max_len = min_len or 0, max_len or math.inf
    groups = {}
    for spec in _kernels_specs(common, quick, cuda):
        if spec["pass"] not in passes or not min_len <= spec["L"] <= max_len:
            continue
        groups.setdefault((spec["L"], spec["pass"]), []).append(spec)
    for specs in groups.values():
        alone = [run_point({**spec, "warmup": 0, "repeats": 1}, timeout_s=timeout_s, reserve_bytes=reserve_bytes,
                           isolation=isolation) for spec in specs]
        fits = [i for i, row in enumerate(alone) if row["status"] == "ok"]
        timed = run_interleaved([specs[i] for i in fits], warmup=specs[0]["warmup"], repeats=specs[0]["repeats"],
                                timeout_s=timeout_s, reserve_bytes=reserve_bytes,
                                isolation=isolation) if fits else None
        names = ", ".join(specs[i]["method"] for i in fits)
        for i, (spec, row) in enumerate(zip(specs, alone)):
            row.update(warmup=spec["warmup"], repeats=spec["repeats"])
            if i in fits and timed["status"] == "ok":
                times = timed["times"][fits.index(i)]
                lo, hi = timed["load"]
                row.update(median_s=statistics.median(times), min_s=min(times),
                           note=f"time interleaved with {names} in one process (median of {len(times)} after "
                                f"{spec['warmup']} warm-up); 1-min load {lo:.1f}-{hi:.1f}; memory from one call alone")
            elif i in fits:  # the lone call's time stands, said so
                row.update(note=f"interleaved timing failed ({timed['status']}: {timed.get('note', '')}); time of "
                                "one call alone")
            measure(spec, skipped=row)


def _attention_suite(common, quick, cuda, max_len, measure, min_len=None, methods=None):
    """L doubles from 1024 (or ``min_len``) until top-k is the only method that fits (or fails itself,
    or L > max_len). ``methods`` (names, or None for all) keeps only some methods.

    A method that did not fit (or timed out) at some L and pass is not run at larger L: its rows
    there say so in ``note`` without spending the timeout again.
    """
    n = min_len or (128 if quick else 1024)
    max_len = max_len or (512 if quick else 65536)
    failed = {}  # (method, k, pass) -> (status, L)
    rows = []
    while n <= max_len:
        level = []
        for method, extra in _attention_methods(quick):
            if methods is not None and method not in methods:
                continue
            for ps in PASSES:
                spec = {**common, "kind": "attention", "method": method, "pass": ps, "B": 1, "H": 12, "d": 64,
                        "L": n, "C": extra.get("C"), "k": extra.get("k")}
                if "nb_features" in extra:
                    spec["nb_features"] = extra["nb_features"]
                tag = (method, extra.get("k"), ps)
                if tag in failed:
                    status, at = failed[tag]
                    row = {**row_template(spec), "status": status, "note": f"not run: {status} at L={at}"}
                    row = measure(spec, skipped=row)
                else:
                    row = measure(spec)
                    if row["status"] in ("did not fit", "timeout"):
                        failed[tag] = (row["status"], n)
                level.append(row)
        rows += level
        ok = {(r["method"], r["pass"]) for r in level if r["status"] == "ok"}
        if not any(m == "topk" for m, _ in ok):
            break  # top-k itself no longer fits: nothing left to show
        if all(m == "topk" for m, _ in ok):
            break  # only top-k fits: the figure's point is made
        n *= 2
    return rows


def run_suite(suite: str, *, quick=False, device="cpu", dtype="float32", budget=DEFAULT_BUDGET,
              timeout_s=DEFAULT_TIMEOUT_S, warmup=1, repeats=None, threads=None, out=None, save=True,
              max_len=None, min_len=None, reserve_bytes=DEFAULT_RESERVE, isolation="forkserver",
              progress=True, replace=False, passes=PASSES, methods=None) -> SuiteRows:
    """Run every point of ``suite``, merging each row into ``out`` as it lands; returns the rows.

    ``budget`` is bytes per point over its inputs (0 = unlimited, else at least 64 MiB); ``timeout_s``
    at least 10 s. A failed point's row never replaces an ``ok`` row of the same point in ``out``
    unless ``replace=True`` (:func:`topk_lib.bench.store.merge_rows`); the returned rows' ``merged``
    counts what was added, replaced and kept. ``passes`` (kernels suite) keeps only those passes, and
    ``min_len``/``max_len`` bound its lengths there too; ``methods`` (attention suite) keeps only those
    methods (it must include ``"topk"``). Arguments are checked before any point runs.
    """
    from tqdm.auto import tqdm

    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    device = check_device(device)
    budget = check_budget(budget)
    timeout_s = check_timeout(timeout_s)
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {replace!r} ({type(replace).__name__})")
    if repeats is None:  # quick mode is a smoke run: one timed call
        repeats = 1 if quick else 5 if suite == "product" else 3
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive length, got {value}")
    if min_len and max_len and min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    known = {m for m, _ in _attention_methods(quick)}
    if methods is not None and (suite != "attention" or "topk" not in methods or not set(methods) <= known):
        raise ValueError(f"methods is for the attention suite: a subset of {sorted(known)} that includes 'topk', "
                         f"got {methods!r} for suite {suite!r}")
    passes = tuple(passes)
    if not passes or any(p not in PASSES for p in passes):
        raise ValueError(f"passes must be a non-empty subset of {PASSES}, got {passes!r}")
    cuda = device.startswith("cuda")
    out = Path(out) if out else results_path(device, quick=quick)
    common = dict(suite=suite, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                  budget_bytes=int(budget), threads=threads, quick=bool(quick))
    rows = SuiteRows()
    rows.merged = Merged(out)
    total = None if suite in ("attention", "kernels") else len(list(_FIXED_SPECS[suite](common, quick, cuda)))
    bar = tqdm(total=total, desc=suite, unit="point", disable=not progress, file=sys.stderr)

    def measure(spec, skipped=None):
        bar.set_postfix_str(f"{spec['method']} {spec['pass']} L={spec.get('L')} C={spec.get('C')} "
                            f"k={spec.get('k')}" + (f" d_ff={spec['d_ff']}" if spec.get("d_ff") else ""))
        row = skipped if skipped is not None else run_point(spec, timeout_s=timeout_s, reserve_bytes=reserve_bytes,
                                                                    isolation=isolation)
        rows.append(row)
        if save:
            rows.merged += merge_rows(out, [row], replace=replace)
        bar.update(1)
        return row

    try:
        if suite == "attention":
            _attention_suite(common, quick, cuda, max_len, measure, min_len, methods)
        elif suite == "kernels":
            _interleaved_suite(common, quick, cuda, measure, timeout_s, reserve_bytes, isolation, passes,
                               min_len, max_len)
        else:
            for spec in _FIXED_SPECS[suite](common, quick, cuda):
                measure(spec)
    finally:
        bar.close()
    return rows
