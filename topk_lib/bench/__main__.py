"""Time and peak-memory benchmarks of the top-k kernels (Gupta et al. 2021, section 4 and Figure 1).

Command line::

    python -m topk_lib.bench kernels      # one causal layer, L in {2048 .. 16384}, 4 kernels timed
                                          # interleaved in one process per length, ratios and targets
    python -m topk_lib.bench attention    # one causal layer, L from 1024 doubling until only top-k fits
    python -m topk_lib.bench chunk        # chunk size C at fixed L
    python -m topk_lib.bench ff           # one feed-forward layer vs d_ff
    python -m topk_lib.bench model12      # 12-layer model vs L, forward+backward
    python -m topk_lib.bench product      # sparse weights x V and torch.topk micro-benchmark
    options: --quick --budget 16GiB --timeout 900 --warmup 1 --repeats 3 --device cpu|cuda
             --dtype float32 --threads N --min-L N --max-L N --pass fwd|fwd+bwd --methods sdpa,topk
             --out PATH --no-save --replace
             --isolation forkserver|subprocess

Each point runs in a process of its own under a memory budget (:mod:`topk_lib.bench.harness`);
peak memory is measured as :mod:`topk_lib.bench.meters` describes; rows are merged into
``data/results/bench_<device>.csv`` (:mod:`topk_lib.bench.store`), where a failed point never
replaces an ``ok`` row of the same point unless ``--replace``. ``--device``, ``--budget`` and
``--timeout`` are checked before any point runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from topk_lib.bench.harness import DEFAULT_TIMEOUT_S, check_device, point_main
from topk_lib.bench.meters import parse_bytes
from topk_lib.bench.report import format_table, kernel_ratios, kernel_targets
from topk_lib.bench.store import results_path
from topk_lib.bench.suites import MIN_TIMEOUT_S, SUITES, check_budget, check_timeout, run_suite

__all__ = ["main"]


def _parser():
    p = argparse.ArgumentParser(prog="python -m topk_lib.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="suites:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SUITES.items()))
    p.add_argument("suite", choices=sorted(SUITES), help="what to measure")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run, under a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--budget", default="16GiB", help="memory budget per point over its inputs (default 16GiB; "
                   "0 = unlimited; else at least 64MiB, what a point's process holds of its own)")
    p.add_argument("--reserve", default="1GiB", help="kill a point when the machine has less available")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds per point, start-up included (default 900, at least {MIN_TIMEOUT_S:g})")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per point (default 3; product 5; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each point")
    p.add_argument("--max-L", dest="max_len", type=int, default=None, help="attention and kernels suites: largest L")
    p.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd"), default=None,
                   help="kernels suite: measure this pass only (default both)")
    p.add_argument("--min-L", dest="min_len", type=int, default=None,
                   help="attention suite: first L (default 1024), e.g. to measure long inputs with fewer repeats; "
                   "kernels suite: smallest L")
    p.add_argument("--methods", default=None, help="attention suite: comma-separated methods to run (default all), "
                   "e.g. sdpa,chunked,topk; topk must be among them")
    p.add_argument("--out", default=None, help="CSV to merge into (default data/results/bench_<device>.csv; "
                   "--quick: data/results/quick/)")
    p.add_argument("--isolation", choices=("forkserver", "subprocess"), default="forkserver",
                   help="fork points from a server that imported torch once (fast) or start a fresh python")
    p.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    p.add_argument("--replace", action="store_true", help="let failed points (error, timeout, did not fit) replace "
                   "ok rows of the same point; by default an ok row is kept and counted as kept")
    return p


def _checked(parser, args):
    """The suite's arguments, each checked before any point runs; a bad one exits naming its option."""

    def check(option, read):
        try:
            return read()
        except ValueError as exc:
            parser.error(str(exc) if option in str(exc) else f"{option}: {exc}")

    return (check("--device", lambda: check_device(args.device, "--device")),
            check("--budget", lambda: check_budget(parse_bytes(args.budget), "--budget")),
            check("--timeout", lambda: check_timeout(args.timeout, "--timeout")),
            check("--reserve", lambda: parse_bytes(args.reserve)))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_point"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m topk_lib.bench _point '<json spec>'")
        return point_main(argv[1])
    parser = _parser()
    args = parser.parse_args(argv)
    device, budget, timeout_s, reserve = _checked(parser, args)
    out = Path(args.out) if args.out else results_path(device, quick=args.quick)
    t0 = time.monotonic()
    rows = run_suite(args.suite, quick=args.quick, device=device, dtype=args.dtype,
                     budget=budget, timeout_s=timeout_s, warmup=args.warmup,
                     repeats=args.repeats, threads=args.threads, out=out, save=not args.no_save,
                     max_len=args.max_len, min_len=args.min_len, reserve_bytes=reserve,
                     isolation=args.isolation, replace=args.replace,
                     passes=(args.passes,) if args.passes else ("fwd", "fwd+bwd"),
                     methods=None if args.methods is None else tuple(args.methods.split(",")))
    print(f"\n{args.suite}{' (--quick: tiny sizes)' if args.quick else ''}: {SUITES[args.suite]}")
    print(format_table(rows, args.suite))
    if args.suite == "kernels":
        print("\nratios (times interleaved in one process per length and pass):")
        for line in kernel_ratios(rows):
            print("  " + line)
        print("\ntargets, top-k against SDPA and chunked attention:")
        for name, measured, met in kernel_targets(rows):
            verdict = {True: "MET", False: "MISSED", None: "n/a"}[met]
            print(f"  {verdict:<7} {name}: {measured}")
    merged = rows.merged
    print(f"\n{len(rows)} points in {time.monotonic() - t0:.0f} s"
          + ("" if args.no_save else f"; rows merged into {out}: {merged.added} added, {merged.replaced} replaced, "
             f"{merged.kept} kept"))
    if merged.kept:
        print(f"  {merged.kept} row(s) kept: a failed point replaces no ok row, nor a 'did not fit' under a larger "
              "budget (--replace to overwrite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
