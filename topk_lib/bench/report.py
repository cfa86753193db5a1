"""Reading benchmark rows: plain-text tables, the ``kernels`` suite's targets against chunked attention,
method labels, the longest input each method ran at, ratios between methods, and figure captions.
"""

from __future__ import annotations

import math

import pandas as pd

from topk_lib.bench.harness import PASSES

__all__ = ["format_table", "kernel_ratios", "kernel_targets", "method_label", "longest_fitting", "ratio_at", "attention_caption",
           "ratio_caption"]


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


_X_COLUMN = {"kernels": "L", "attention": "L", "chunk": "C", "ff": "d_ff", "model12": "L", "product": "L"}


def _product_table(rows) -> str:
    """Median ms per product method (rows) and key count Lk (columns), one chunk."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = sorted({int(_num(r["L"])) for r in rows})
    lines = ["median ms (one chunk: H=%s, C=%s queries, d=%s, k=%s)" % tuple(
        rows[0].get(c) for c in ("H", "C", "d", "k")) if rows else "no rows"]
    lines.append(f"{'method':<16}" + "".join(f"{'Lk=' + str(s):>12}" for s in sizes))
    for m in methods:
        cells = []
        for s in sizes:
            r = next((r for r in rows if r["method"] == m and int(_num(r["L"])) == s), None)
            t = _num(r.get("median_s")) if r else None
            cells.append(f"{t * 1e3:12.1f}" if t is not None else f"{(r or {}).get('status', '-'):>12}")
        lines.append(f"{m:<16}" + "".join(cells))
    return "\n".join(lines)


def format_table(rows, suite) -> str:
    """Plain-text table: one line per (size, method), time and peak memory per pass."""
    if suite == "product":
        return _product_table(rows)
    x = _X_COLUMN.get(suite, "L")

    def label(r):
        extra = []
        if _num(r.get("C")) is not None and x != "C":
            extra.append(f"C={int(_num(r['C']))}")
        if _num(r.get("k")) is not None:
            extra.append(f"k={int(_num(r['k']))}")
        if _num(r.get("ff_k")) is not None:
            extra.append(f"ff_k={int(_num(r['ff_k']))}")
        return r["method"] + (f" ({', '.join(extra)})" if extra else "")

    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    groups = {}
    for r in rows:
        groups.setdefault((int(_num(r[x])), label(r)), {})[r["pass"]] = r
    times = [_num(r.get("median_s")) for r in rows if r["status"] == "ok"]
    unit, scale = ("s", 1.0) if any(t and t >= 1.0 for t in times) else ("ms", 1e3)  # GPU tables in ms
    head = f"{x:>7}  {'method':<26}" + "".join(f"{p + ' ' + unit:>12}{p + ' MB':>14}" for p in passes)
    lines = [head, "-" * len(head)]
    for (xv, lab), by_pass in sorted(groups.items(), key=lambda kv: kv[0][0]):
        cells = []
        for p in passes:
            r = by_pass.get(p)
            if r is None:
                cells.append(f"{'':>12}{'':>14}")
            elif r["status"] != "ok":
                cells.append(f"{r['status']:>26}")
            else:
                t, mem = _num(r["median_s"]), _num(r["peak_bytes"])
                cells.append(f"{t * scale:12.3f}{(mem or 0) / 1e6:14.1f}")
        lines.append(f"{xv:>7}  {lab:<26}" + "".join(cells))
    methods_used = sorted({r.get("mem_method") or "" for r in rows} - {""})
    r0 = rows[0] if rows else {}
    lines.append(
        f"median of {r0.get('repeats')} after {r0.get('warmup')} warm-up; MB = 1e6 bytes over the inputs; "
        f"memory method: {', '.join(methods_used)}; device {r0.get('device')} ({r0.get('device_name')}), "
        f"{r0.get('dtype')}, {r0.get('threads')} threads, torch {r0.get('torch_version')}"
    )
    return "\n".join(lines)


def _time(t):
    return f"{t:.2f} s" if t >= 1.0 else f"{t * 1e3:.2f} ms"


def kernel_ratios(rows) -> list[str]:
    """One line per (L, pass): top-k's time over SDPA's and chunked's, beside the times and the row's load note."""
    lines = []
    by_point = {(int(_num(r["L"])), r["pass"], r["method"]): r for r in rows if r.get("status") == "ok"}
    for n, ps in sorted({(n, ps) for n, ps, _ in by_point}):
        t = _num(by_point.get((n, ps, "topk"), {}).get("median_s"))
        if t is None:
            continue
        parts = [f"L={n:<6} {ps:<8} top-k {_time(t)}"]
        for base in ("sdpa", "chunked", "vanilla"):
            b = _num(by_point.get((n, ps, base), {}).get("median_s"))
            if b:
                parts.append(f"{t / b:.2f}x {base} ({_time(b)})")
        note = by_point[(n, ps, "topk")].get("note") or ""
        load = note[note.find("1-min load"):].split(";")[0] if "1-min load" in note else ""
        lines.append(", ".join(parts) + (f"; {load}" if load else ""))
    return lines


def kernel_targets(rows) -> list[tuple[str, str, bool | None]]:
    """The ``kernels`` suite's targets: (target, measured, met), met None when unmeasured.

    Top-k's time within 1.5x (fwd) and 1.0x (fwd+bwd) of SDPA's from L=8192, its fwd time within
    0.6x chunked attention's, and within 1.5x (fwd) and 2x (fwd+bwd) of chunked attention at every
    L; at the largest L its fwd+bwd peak within 1.2x of chunked's and growing at most linearly in L.
    """

    def get(method, ps, n, field):
        for r in rows:
            if r["method"] == method and r["pass"] == ps and int(_num(r["L"])) == n and r["status"] == "ok":
                return _num(r[field])
        return None

    out = []
    lengths = sorted({int(_num(r["L"])) for r in rows})
    for ps, base, limit, from_len in (("fwd", "sdpa", 1.5, 8192), ("fwd+bwd", "sdpa", 1.0, 8192),
                                      ("fwd", "chunked", 0.6, 8192)):
        for n in (n for n in lengths if n >= from_len):
            t, c = get("topk", ps, n, "median_s"), get(base, ps, n, "median_s")
            ratio = t / c if t and c else None
            out.append((f"top-k {ps} time <= {limit}x {base} at L={n}",
                        f"{ratio:.2f}x ({_time(t)} / {_time(c)})" if ratio else "not measured",
                        None if ratio is None else ratio <= limit))
    for ps, limit in (("fwd", 1.5), ("fwd+bwd", 2.0)):
        for n in lengths:
            t, c = get("topk", ps, n, "median_s"), get("chunked", ps, n, "median_s")
            ratio = t / c if t and c else None
            out.append((f"top-k {ps} time <= {limit}x chunked at L={n}",
                        f"{ratio:.2f}x ({_time(t)} / {_time(c)})" if ratio else "not measured",
                        None if ratio is None else ratio <= limit))
    if lengths:
        top, prev = lengths[-1], lengths[-2] if len(lengths) > 1 else None
        t, c = get("topk", "fwd+bwd", top, "peak_bytes"), get("chunked", "fwd+bwd", top, "peak_bytes")
        ratio = t / c if t and c else None
        out.append((f"top-k fwd+bwd peak <= 1.2x chunked at L={top}",
                    f"{ratio:.2f}x ({t / 1e6:.0f} MB / {c / 1e6:.0f} MB)" if ratio else "not measured",
                    None if ratio is None else ratio <= 1.2))
        if prev:
            a, b = get("topk", "fwd+bwd", prev, "peak_bytes"), get("topk", "fwd+bwd", top, "peak_bytes")
            growth = b / a if a and b else None
            lin = top / prev
            out.append((f"top-k fwd+bwd peak grows <= linearly {prev}->{top} (<= {lin:.1f}x)",
                        f"{growth:.2f}x ({a / 1e6:.0f} MB -> {b / 1e6:.0f} MB)" if growth else "not measured",
                        None if growth is None else growth <= lin))
    return out


def method_label(row) -> str:
    """``topk k=64``, ``chunked C=1024``, ``sdpa``: what distinguishes the lines of a panel."""
    label = str(row["method"])
    if label.startswith("topk") and pd.notna(row.get("k")):
        label += f" k={int(row['k'])}"
    if row.get("suite") != "chunk" and label.startswith(("chunked", "topk")) and pd.notna(row.get("C")):
        label += f" C={int(row['C'])}"
    if pd.notna(row.get("ff_k")) and row["method"] != "dense":
        label += f" ff_k={int(row['ff_k'])}"
    return label


def longest_fitting(rows: pd.DataFrame, *, x: str = "L", pass_: str = "fwd+bwd") -> pd.Series:
    """The largest ``x`` at which each method ran (status ok) for one pass."""
    df = rows[(rows["pass"] == pass_) & (rows.status == "ok")].copy()
    df["label"] = df.apply(method_label, axis=1)
    return df.groupby("label")[x].max().astype(int).sort_values()


def ratio_at(rows: pd.DataFrame, *, numerator: str, denominator: str, column: str, pass_: str, x: str = "L") -> pd.Series:
    """``column`` of one method over another at each ``x`` both ran at (labels as :func:`method_label`)."""
    df = rows[(rows["pass"] == pass_) & (rows.status == "ok")].copy()
    df["label"] = df.apply(method_label, axis=1)
    table = df.pivot_table(index=x, columns="label", values=column)
    if numerator not in table or denominator not in table:
        return pd.Series(dtype=float)
    return (table[numerator] / table[denominator]).dropna()


_WHAT = (("peak_bytes", "memory"), ("median_s", "time"))


def attention_caption(rows: pd.DataFrame, *, budget: str) -> str:
    """One device's ``attention`` rows in words: the longest input each method ran at (fwd+bwd), and
    top-k (k=128) over chunked attention and over SDPA, memory then time, per length."""
    lines = [f"Caption ({rows.device_name.iloc[0]}): longest input that ran (fwd+bwd, budget {budget}): "
             + ", ".join(f"{label} {length}" for label, length in longest_fitting(rows).items())]
    for column, what in _WHAT:
        for denominator, name in (("chunked C=1024", "chunked"), ("sdpa", "SDPA")):
            ratio = ratio_at(rows, numerator="topk k=128 C=1024", denominator=denominator, column=column,
                             pass_="fwd+bwd")
            if len(ratio):
                lines.append(f"  top-k (k=128) / {name} {what}, fwd+bwd: "
                             + ", ".join(f"L={int(length)}: {r:.2f}x" for length, r in ratio.items()))
    return "\n".join(lines)


def ratio_caption(rows: pd.DataFrame, *, suite: str, pairs, x: str) -> str:
    """One device's rows of ``suite`` in words: for each ``(numerator, denominator)`` pair of method
    labels, their memory and time ratio (fwd+bwd) at each ``x`` both ran at."""
    lines = [f"Caption ({suite}, {rows.device_name.iloc[0]}), fwd+bwd:"]
    for numerator, denominator in pairs:
        for column, what in _WHAT:
            ratio = ratio_at(rows, numerator=numerator, denominator=denominator, column=column, pass_="fwd+bwd", x=x)
            if len(ratio):  # quick mode uses other k and C: no such lines
                lines.append(f"  {numerator} / {denominator} {what}: "
                             + ", ".join(f"{x}={int(v)}: {r:.2f}x" for v, r in ratio.items()))
    return "\n".join(lines)
