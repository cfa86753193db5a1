"""Time and peak-memory benchmarks of the top-k kernels (Gupta et al. 2021, section 4 and Figure 1).

Command line::

    python -m topk_lib.bench kernels      # issue 2: one causal layer, L in {2048 .. 16384}, 4 kernels
    python -m topk_lib.bench attention    # issue 8.1: L from 1024 doubling until only top-k fits
    python -m topk_lib.bench chunk        # issue 8.2: chunk size C at fixed L
    python -m topk_lib.bench ff           # issue 8.3: one feed-forward layer vs d_ff
    python -m topk_lib.bench model12      # issue 8.4: 12-layer model vs L, forward+backward
    python -m topk_lib.bench product      # sparse weights x V and torch.topk micro-benchmark
    options: --quick --budget 16GiB --timeout 900 --warmup 1 --repeats 3 --device cpu|cuda
             --dtype float32 --threads N --min-L N --max-L N --out PATH --no-save --isolation forkserver|subprocess

How one point is measured
-------------------------
A point is one method at one size and one pass (``fwd`` under ``torch.no_grad``, or ``fwd+bwd``:
forward, then ``backward`` with a fixed random output gradient). Each point runs in a process of
its own, so one point's allocator state, thread pool or out-of-memory failure cannot leak into
the next: by default a child forked from a ``multiprocessing`` forkserver that has imported torch
once (no op ever runs in the server, so no thread pool or CUDA context is forked; ~0.1 s per point),
or with ``--isolation subprocess`` a fresh ``python -m topk_lib.bench _point '<json>'`` (~2.5 s).
The child builds its inputs, runs ``warmup`` untimed and ``repeats`` timed calls
(``torch.cuda.synchronize`` around each on GPU; median and minimum are recorded), then one more
untimed call that measures peak memory. Statuses: ``ok``; ``did not fit`` (an allocation failed
inside the budget, the kernel's OOM killer took the child, or the machine ran low on memory and
the parent stopped it); ``timeout`` (the child ran past ``--timeout`` seconds, inputs and all,
and was killed); ``error`` (anything else, message in ``note``). None of them stops a suite.

Memory budget. CPU: the child sets ``resource.setrlimit(RLIMIT_AS)`` to its address-space size
once inputs are built, plus ``--budget``, so an allocation past the budget fails inside PyTorch
(``RuntimeError: ... can't allocate memory``) instead of reaching the machine's OOM killer. Address
space also counts reserved, untouched pages (thread stacks, malloc arenas: tens of MB), so the
limit is slightly conservative. As a second guard the parent kills a child when the machine's
available memory falls below ``--reserve`` (default 1 GiB): the machine is shared. CUDA:
``torch.cuda.set_per_process_memory_fraction`` with the budget over what is already allocated.

Peak memory (``peak_bytes`` and ``mem_method`` in every row) is what one call allocates on top of
its inputs. CUDA (``cuda-max-allocated``): ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus ``memory_allocated()`` before the call. CPU (``cpu-rss-hwm``):
the resident-set high-water mark of the point's process over its baseline. Before the memory
call glibc is told to mmap every block >= 256 KiB and to hand freed heap pages back
(``mallopt`` + ``malloc_trim``; otherwise RSS carries garbage of earlier calls), the baseline is
``VmRSS``, and ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs`` (checked on this
machine: ``VmHWM`` and ``ru_maxrss`` both drop to the current RSS). Then peak = ``VmHWM`` -
baseline - growth of ``RssFile`` (library code paged in is not the op's). Where ``clear_refs``
is not writable the method is ``cpu-ru-maxrss``: lifetime ``ru_maxrss``, an upper bound. The
peak covers everything the pass creates: output, autograd buffers, input gradients (for
``model12`` the parameter gradients too). RSS also counts memory outside PyTorch's allocator
(BLAS and OpenMP workspaces, heap fragmentation) that allocator statistics miss: fwd+bwd at
L=2048, H=12 reads 213 MB for top-k, 307 MB for chunked and 891 MB for vanilla where PyTorch's
allocator trace peaks at 172, 280 and 885 MB. For Performer (thousands of small blocks per call)
RSS reads 1.3-2.7x its allocator peak and varies from run to run.

Check against an analytic count (AMD EPYC, 2 cores, torch 2.13.0, float32):
``vanilla_attention`` forward at L=4096, H=12 holds the masked scores, the softmax output and its
``nan_to_num`` copy at once (3 x L*L*H*4 B = 3 x 805.3 MB) plus K and V copied by
``repeat_interleave`` (2 x 12.6 MB): 2441.1 MB. ``cpu-rss-hwm`` reads 2441.2 MB (PyTorch's own
allocator trace, ``torch.profiler(profile_memory=True)``, also peaks at 2441.1 MB). At L=2048:
616.6 MB analytic, 620.8 MB read. A 200 MB ``torch.ones`` inside the op reads 199.9 MB.
``tests/test_bench.py`` checks the 200 MB case and vanilla at L=1024 within 10 %.

Baselines, honestly: SDPA is PyTorch's fused exact attention (on CPU a flash-style kernel, linear
memory). Performer is ``performer_pytorch.FastAttention(causal=True, nb_features=256)``; without
the ``fast_transformers`` CUDA extension it falls back to the package's reference causal code,
whose autograd keeps an [L, m, d] context per head (O(L*m*d) memory, 128 sequential chunks); the
rows measure that implementation, not linear attention at its best. On CPU the ``ff`` suite uses
8192 tokens instead of 512x512 and ``model12`` stops at L=8192 (each row records its sizes).

Results are merged into ``data/results/bench_<device>.csv`` (``paths.results()``; ``<device>`` is
``cpu`` or a slug of the CUDA device name): a rerun replaces rows with the same key (suite,
device, dtype, threads, method, pass and sizes), the file is rewritten atomically after every
point under a lock, so an interrupted suite keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from topk_lib.infra import paths
from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.baselines import PRODUCT_METHODS, chunked_dense_feedforward, sparse_weights_times_v
from topk_lib.kernels.feedforward import topk_feedforward

__all__ = [
    "SUITES",
    "COLUMNS",
    "KEY_COLUMNS",
    "run_point",
    "run_suite",
    "measured_suites",
    "merge_rows",
    "results_path",
    "device_slug",
    "parse_bytes",
    "format_table",
    "kernel_targets",
    "TinyTransformer",
    "main",
]

GiB = 1024**3
DEFAULT_BUDGET = 16 * GiB
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_RESERVE = 1 * GiB

PASSES = ("fwd", "fwd+bwd")

# Every row has these columns, in this order; the key decides which rows a rerun replaces.
KEY_COLUMNS = (
    "suite", "device_name", "dtype", "threads", "method", "pass",
    "B", "L", "H", "d", "C", "k", "ff_k", "d_ff", "n_layers", "quick",
)
COLUMNS = (
    "suite", "method", "pass", "B", "L", "H", "d", "C", "k", "ff_k", "d_ff", "n_layers",
    "status", "median_s", "min_s", "peak_bytes", "mem_method", "budget_bytes",
    "warmup", "repeats", "device", "device_name", "dtype", "threads", "torch_version",
    "quick", "note", "host", "timestamp",
)

_OOM_PATTERNS = (
    "can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory",
    "std::bad_alloc", "bad_alloc", "memoryerror",
)


# --------------------------------------------------------------------------- small helpers


def parse_bytes(text) -> int:
    """Bytes from ``16GiB``, ``500MB``, ``2G`` or a plain number.

    ``KiB/MiB/GiB`` and bare ``K/M/G`` are powers of 1024 (as ``ulimit``); ``kB/MB/GB`` powers of 1000.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)(b?))?\s*(?:b|bytes)?\s*", str(text), flags=re.I)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 16GiB, 500MB or 1073741824")
    value, prefix, binary, b = float(m.group(1)), (m.group(2) or "").lower(), m.group(3), m.group(4)
    if not prefix:
        return int(value)
    base = 1000 if (b and not binary) else 1024
    return int(value * base ** (" kmgt".index(prefix)))


def device_slug(device: str) -> str:
    """``cpu`` or the CUDA device name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def results_path(device: str, *, quick: bool = False) -> Path:
    """``data/results/bench_<device>.csv``; quick runs go to ``data/results/quick/`` (git-ignored).

    ``TOPK_LAB_RESULTS`` (set by the notebook runner, read at call time) overrides the folder.
    """

    root = paths.results()
    if quick and "TOPK_LAB_RESULTS" not in os.environ:
        root = root / "quick"  # where the runner's quick mode puts results
    return root / f"bench_{device_slug(device)}.csv"


def _device_name(device: str) -> str:
    """The CUDA device name, or the CPU model with its core count (``... x2``)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    return f"{model} x{os.cpu_count()}"


def _is_oom(text: str) -> bool:
    low = text.lower()
    return any(p in low for p in _OOM_PATTERNS)


# --------------------------------------------------------------------------- memory meters (child)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_for_rss():
    """Make glibc's RSS follow live memory: return freed heap pages, mmap every block >= 256 KiB.

    By default glibc raises its mmap threshold up to 32 MiB as blocks are freed, and serves later
    blocks from a heap it does not shrink, so RSS would carry earlier calls' garbage. Called only
    before the (untimed) memory call: the timed calls run with the default allocator.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixed from now on)
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may include freed heap memory; peaks then read high, never low


class _CpuMeter:
    """Peak RSS of this process over a baseline; enforces the budget with RLIMIT_AS."""

    def __init__(self, budget_bytes):
        vmsize_kb = _proc_status_kb("VmSize")
        if budget_bytes and vmsize_kb is not None:
            # Address space already mapped plus the budget: allocations past it fail in PyTorch.
            limit = vmsize_kb * 1024 + int(budget_bytes)
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        self.method = "cpu-rss-hwm"

    def start(self):
        _malloc_for_rss()
        self.baseline = _proc_status_kb("VmRSS")
        self.file_base = _proc_status_kb("RssFile") or 0
        if self.baseline is None:  # no /proc: fall back to psutil and the lifetime maximum
            import psutil

            self.baseline, self.method = psutil.Process().memory_info().rss // 1024, "cpu-ru-maxrss"
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        except OSError:
            self.method = "cpu-ru-maxrss"  # lifetime maximum: an upper bound

    def peak(self):
        hwm = _proc_status_kb("VmHWM") if self.method == "cpu-rss-hwm" else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        # Library code paged in during the call is not the op's memory.
        file_growth = max(0, (_proc_status_kb("RssFile") or 0) - self.file_base)
        return max(0, (hwm - self.baseline - file_growth) * 1024)

    def sync(self):
        pass


class _CudaMeter:
    """``torch.cuda.max_memory_allocated`` over the allocation before the op."""

    method = "cuda-max-allocated"

    def __init__(self, budget_bytes, device):
        self.device = device
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        if budget_bytes:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (base + budget_bytes) / total), device)

    def start(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)

    def sync(self):
        torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------- what a point runs (child)


def _runner(op, grad_out, leaves):
    """One call of the pass: ``fwd`` under no_grad, or forward then backward with ``grad_out``."""
    if grad_out is None:

        def run():
            with torch.no_grad():
                out = op()
            del out

    else:

        def run():
            out = op()
            out.backward(grad_out)
            del out
            for t in leaves:
                t.grad = None  # gradients count in this call's peak, then go

    return run


def _build_attention(spec, device, dtype):
    b, h, n, d = spec["B"], spec["H"], spec["L"], spec["d"]
    grad = spec["pass"] == "fwd+bwd"
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    go = torch.randn(b, h, n, d, device=device, dtype=dtype) if grad else None  # [B, H, L, d]
    method, c, kk = spec["method"], spec.get("C"), spec.get("k")
    if method == "vanilla":
        op = lambda: vanilla_attention(q, k, v, is_causal=True)  # noqa: E731
    elif method == "sdpa":
        op = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif method == "chunked":
        op = lambda: chunked_attention(q, k, v, chunk_size=c, is_causal=True)  # noqa: E731
    elif method == "topk":
        op = lambda: topk_attention(q, k, v, topk=kk, chunk_size=c, is_causal=True)  # noqa: E731
    elif method == "performer":
        import io

        from performer_pytorch import FastAttention

        with contextlib.redirect_stdout(io.StringIO()):  # it prints that the CUDA causal kernel is missing
            fast = FastAttention(dim_heads=d, nb_features=spec.get("nb_features", 256), causal=True)
        fast = fast.to(device=device, dtype=dtype)
        op = lambda: fast(q, k, v)  # noqa: E731
    else:
        raise ValueError(f"unknown attention method {method!r}")
    return _runner(op, go, [q, k, v])


def _build_ff(spec, device, dtype):
    n, d, d_ff = spec["L"], spec["d"], spec["d_ff"]  # L = number of tokens
    grad = spec["pass"] == "fwd+bwd"
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=grad)  # [T, d]
    w_in = (torch.randn(d_ff, d, device=device, dtype=dtype) * d**-0.5).requires_grad_(grad)
    w_out = (torch.randn(d, d_ff, device=device, dtype=dtype) * d_ff**-0.5).requires_grad_(grad)
    go = torch.randn(n, d, device=device, dtype=dtype) if grad else None
    method, c = spec["method"], spec.get("C")
    if method == "dense":
        op = lambda: topk_feedforward(x, w_in, w_out, topk=None)  # noqa: E731
    elif method == "chunked":
        op = lambda: chunked_dense_feedforward(x, w_in, w_out, chunk_size=c)  # noqa: E731
    elif method == "topk":
        op = lambda: topk_feedforward(x, w_in, w_out, topk=spec["k"], chunk_size=c)  # noqa: E731
    else:
        raise ValueError(f"unknown feed-forward method {method!r}")
    return _runner(op, go, [x, w_in, w_out])


class TinyTransformer(torch.nn.Module):
    """Pre-LN decoder stack for the ``model12`` suite: causal attention + ReLU feed-forward.

    ``attention`` is ``vanilla``, ``sdpa``, ``chunked`` or ``topk`` (``topk`` keys, ``chunk_size``
    query rows); ``ff_k`` switches every feed-forward layer to :func:`topk_feedforward`.
    """

    def __init__(self, *, n_layers=12, d=768, heads=12, d_ff=3072, attention="topk", topk=64,
                 ff_k=None, chunk_size=1024):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be a multiple of heads={heads}")
        if attention not in ("vanilla", "sdpa", "chunked", "topk"):
            raise ValueError(f"attention must be vanilla, sdpa, chunked or topk, got {attention!r}")
        self.heads, self.attention, self.topk, self.ff_k, self.chunk_size = heads, attention, topk, ff_k, chunk_size
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "ln1": torch.nn.LayerNorm(d),
                    "qkv": torch.nn.Linear(d, 3 * d),
                    "proj": torch.nn.Linear(d, d),
                    "ln2": torch.nn.LayerNorm(d),
                    "w_in": torch.nn.Linear(d, d_ff),
                    "w_out": torch.nn.Linear(d_ff, d),
                }
            )
            for _ in range(n_layers)
        )

    def _attend(self, q, k, v):
        if self.attention == "vanilla":
            return vanilla_attention(q, k, v, is_causal=True)
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.attention == "chunked":
            return chunked_attention(q, k, v, chunk_size=self.chunk_size, is_causal=True)
        return topk_attention(q, k, v, topk=self.topk, chunk_size=self.chunk_size, is_causal=True)

    def forward(self, x):  # x [B, L, d]
        b, n, d = x.shape
        for blk in self.blocks:
            qkv = blk["qkv"](blk["ln1"](x)).view(b, n, 3, self.heads, d // self.heads)  # [B, L, 3, H, dh]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, dh]
            a = self._attend(q, k, v).transpose(1, 2).reshape(b, n, d)  # [B, L, d]
            x = x + blk["proj"](a)
            hdn = blk["ln2"](x)
            if self.ff_k:
                y = topk_feedforward(hdn, blk["w_in"].weight, blk["w_out"].weight, topk=self.ff_k,
                                     b_in=blk["w_in"].bias, b_out=blk["w_out"].bias, chunk_size=self.chunk_size)
            else:
                y = blk["w_out"](F.relu(blk["w_in"](hdn)))  # [B, L, d]
            x = x + y
        return x


def _build_model(spec, device, dtype):
    model = TinyTransformer(
        n_layers=spec["n_layers"], d=spec["d"], heads=spec["H"], d_ff=spec["d_ff"],
        attention=spec["method"], topk=spec.get("k") or 64, ff_k=spec.get("ff_k") or None,
        chunk_size=spec.get("C") or 1024,
    ).to(device=device, dtype=dtype)
    grad = spec["pass"] == "fwd+bwd"
    model.requires_grad_(grad)
    x = torch.randn(spec["B"], spec["L"], spec["d"], device=device, dtype=dtype)  # [B, L, d] embeddings
    go = torch.randn_like(x) if grad else None
    return _runner(lambda: model(x), go, list(model.parameters()))


def _build_product(spec, device, dtype):
    """One chunk of 12 heads x C queries against Lk keys (``L``), k kept per query, d=64."""
    h, c, lk, d, kk = spec["H"], spec["C"], spec["L"], spec["d"], spec["k"]
    method = spec["method"]
    kw = dict(device=device, dtype=dtype)
    if method in ("qk_matmul", "topk_sorted", "topk_unsorted"):
        q = torch.randn(h, c, d, **kw)
        key = torch.randn(h, lk, d, **kw)
        if method == "qk_matmul":
            op = lambda: torch.matmul(q, key.transpose(-1, -2))  # noqa: E731  [H, C, Lk]
        else:
            s = torch.matmul(q, key.transpose(-1, -2))  # [H, C, Lk], built before the baseline
            srt = method == "topk_sorted"
            op = lambda: s.topk(kk, dim=-1, sorted=srt)  # noqa: E731
        return _runner(op, None, [])
    v = torch.randn(h, lk, d, **kw)  # [H, Lk, d]
    idx = torch.stack([torch.rand(c, lk, device=device).topk(kk, dim=-1).indices for _ in range(h)])  # [H, C, k]
    p = torch.softmax(torch.randn(h, c, kk, **kw), -1)  # [H, C, k] kept probabilities
    if method not in PRODUCT_METHODS:
        raise ValueError(f"unknown product method {method!r}")
    return _runner(lambda: sparse_weights_times_v(p, idx, v, method=method), None, [])


def _build_calibrate(spec, device, dtype):
    """Known workloads for checking the harness: allocate ``alloc_bytes`` or sleep ``sleep_s``."""
    method = spec["method"]
    if method == "alloc":
        n = int(spec["alloc_bytes"]) // torch.tensor([], dtype=dtype).element_size()
        return _runner(lambda: torch.ones(n, device=device, dtype=dtype), None, [])
    if method == "sleep":
        return _runner(lambda: time.sleep(float(spec["sleep_s"])), None, [])
    raise ValueError(f"unknown calibrate method {method!r}")


_BUILDERS = {
    "attention": _build_attention,
    "ff": _build_ff,
    "model12": _build_model,
    "product": _build_product,
    "calibrate": _build_calibrate,
}


def _classify(exc) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _is_oom(str(exc))):
        return "did not fit", msg  # torch.OutOfMemoryError is a RuntimeError
    return "error", msg


def _point_child(spec: dict) -> dict:
    """Runs inside the subprocess: build inputs, set the budget, time the pass, read the peak."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # memory-fraction calls need an index
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    row = {
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device_name": _device_name(spec["device"]),
        "mem_method": "cuda-max-allocated" if device.type == "cuda" else "cpu-rss-hwm",
        "median_s": None, "min_s": None, "peak_bytes": None,
    }
    try:
        run = _BUILDERS[spec["kind"]](spec, device, dtype)
        a = torch.randn(256, 256, device=device)  # spin up the thread pool / CUDA context before the baseline
        (a @ a).sum().item()
        del a
    except Exception as exc:  # inputs alone did not fit (no budget is set yet) or a bad spec
        status, note = _classify(exc)
        return {**row, "status": status, "note": "building inputs: " + note}
    budget = spec.get("budget_bytes") or 0
    meter = _CudaMeter(budget, device) if device.type == "cuda" else _CpuMeter(budget)  # budget on from here
    times, status, note, peak = [], "ok", "", None
    try:
        for _ in range(int(spec["warmup"])):
            run()
        for _ in range(int(spec["repeats"])):
            meter.sync()
            t0 = time.perf_counter()
            run()
            meter.sync()
            times.append(time.perf_counter() - t0)
        # One more, untimed call measures memory: its allocator settings would bias a timed one.
        meter.start()
        run()
        peak = meter.peak()
    except Exception as exc:  # a failed point is a row, never a crashed suite
        status, note = _classify(exc)
    if status == "ok":
        row.update(median_s=statistics.median(times), min_s=min(times), peak_bytes=peak)
    return {**row, "status": status, "note": note, "mem_method": meter.method}


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj))
    os.replace(tmp, path)  # the parent never reads half a row


def _point_main(spec_json: str) -> int:
    """``python -m topk_lib.bench _point '<json>'``: one point; the row goes to ``result_file`` or stdout."""
    spec = json.loads(spec_json)
    row = _point_child(spec)
    if spec.get("result_file"):
        _write_json(spec["result_file"], row)
    else:
        print(json.dumps(row))
    return 0


def _forked_point(spec: dict, result_file: str, log_file: str):
    """Target of the forkserver child: output to ``log_file``, the row to ``result_file``."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _write_json(result_file, _point_child(spec))


_FORKSERVER = None


def _forkserver():
    """A multiprocessing context whose server has imported torch once: a fresh process per point in ~0.1 s."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        # The server only imports (no op runs there), so no thread pool or CUDA context is forked.
        ctx.set_forkserver_preload(["topk_lib.bench.harness"])
        _FORKSERVER = ctx
    return _FORKSERVER


# --------------------------------------------------------------------------- one point (parent)


class _Child:
    """The point's process, started either way, with one interface for polling and killing."""

    def __init__(self, isolation, spec, result_file, log_file):
        self.log_file = log_file
        if isolation == "forkserver":
            import importlib

            # By its module name even when this file runs as __main__ (python -m topk_lib.bench).
            target = importlib.import_module("topk_lib.bench.harness")._forked_point
            self.proc = _forkserver().Process(target=target, args=(spec, result_file, log_file), daemon=True)
            self.popen = None
            # Children need nothing from the caller's script: hide __main__ so multiprocessing does not
            # re-run it in the server or the child (a heredoc, an unguarded script, a notebook).
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")
            try:
                self.proc.start()
            finally:
                sys.modules["__main__"] = main
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(paths.ROOT), env.get("PYTHONPATH")) if p)
            cmd = [sys.executable, "-m", "topk_lib.bench", "_point", json.dumps({**spec, "result_file": result_file})]
            with open(log_file, "w") as log:
                # Own session: a kill takes the whole process group.
                self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(paths.ROOT),
                                              env=env, start_new_session=True)

    def running(self):
        return self.popen.poll() is None if self.popen else self.proc.is_alive()

    def kill(self):
        if self.popen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        else:
            self.proc.kill()
            self.proc.join()

    def returncode(self):
        if self.popen:
            return self.popen.wait()
        self.proc.join()
        return self.proc.exitcode

    def log_tail(self, lines=3):
        try:
            with open(self.log_file, errors="replace") as fh:
                text = fh.read()
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])[-400:]


def _row_template(spec: dict) -> dict:
    """A row with the spec's fields and what the parent knows; the child overwrites what it measures."""
    row = {c: spec.get(c) for c in COLUMNS}
    row.update(
        device=spec["device"], device_name=_device_name(spec["device"]),
        threads=spec.get("threads") or torch.get_num_threads(),  # the child's default too: keeps keys stable
        torch_version=torch.__version__, host=platform.node(),
        timestamp=_dt.datetime.now().isoformat(timespec="seconds"),
        mem_method="cuda-max-allocated" if str(spec["device"]).startswith("cuda") else "cpu-rss-hwm",
    )
    return row


def run_point(spec: dict, *, timeout_s: float = DEFAULT_TIMEOUT_S, reserve_bytes: int = DEFAULT_RESERVE,
              isolation: str = "forkserver") -> dict:
    """Measure one point in a fresh process and return its full row; never raises for OOM or timeout.

    ``spec`` needs ``kind`` (attention, ff, model12, product, calibrate), ``method``, ``pass``,
    ``device``, ``dtype``, ``warmup``, ``repeats``, ``budget_bytes`` (0 = none) and the sizes of its
    kind. ``isolation="forkserver"`` forks each point from a server that imported torch once;
    ``"subprocess"`` starts ``python -m topk_lib.bench _point`` (slower to start, nothing shared).
    """
    import psutil

    missing = [f for f in ("kind", "method", "pass", "device", "dtype", "warmup", "repeats") if f not in spec]
    if missing:
        raise ValueError(f"point spec lacks {missing}; got {sorted(spec)}")
    if int(spec["warmup"]) < 0 or int(spec["repeats"]) < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={spec['warmup']}, repeats={spec['repeats']}")
    if spec["kind"] not in _BUILDERS:
        raise ValueError(f"kind must be one of {sorted(_BUILDERS)}, got {spec['kind']!r}")
    if spec["pass"] not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {spec['pass']!r}")
    if isolation not in ("forkserver", "subprocess"):
        raise ValueError(f"isolation must be 'forkserver' or 'subprocess', got {isolation!r}")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    row = _row_template(spec)
    with tempfile.TemporaryDirectory(prefix="topk-bench-") as tmp:
        result_file, log_file = os.path.join(tmp, "row.json"), os.path.join(tmp, "out.log")
        t0 = time.monotonic()
        child = _Child(isolation, spec, result_file, log_file)
        killed = None
        while child.running():
            if time.monotonic() - t0 > timeout_s:
                killed = "timeout"
            elif psutil.virtual_memory().available < reserve_bytes:
                killed = "memory"  # the machine is shared: stop before its OOM killer picks anyone
            if killed:
                child.kill()
                break
            time.sleep(0.05)
        rc = child.returncode()
        if killed == "timeout":
            row.update(status="timeout", note=f"killed after {timeout_s:g} s")
        elif killed == "memory":
            row.update(status="did not fit",
                       note=f"killed: the machine had under {reserve_bytes / GiB:.1f} GiB available")
        elif os.path.exists(result_file):
            with open(result_file) as fh:
                row.update(json.load(fh))
        else:
            tail = child.log_tail()
            if rc == -signal.SIGKILL or _is_oom(tail):
                row.update(status="did not fit", note=f"child died (rc={rc}), likely out of memory: {tail}")
            else:
                row.update(status="error", note=f"child failed (rc={rc}): {tail}")
    return row


# --------------------------------------------------------------------------- CSV merge


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _key(row: dict) -> tuple:
    return tuple(_fmt(row.get(c)) for c in KEY_COLUMNS)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock on the CSV's folder (no lock file left behind): two suites lose no rows."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def merge_rows(path, rows) -> Path:
    """Merge ``rows`` into the CSV at ``path``: same key replaces, others are kept; atomic rewrite."""
    path = Path(path)
    with _locked(path):
        existing, columns = [], list(COLUMNS)
        if path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                columns += [c for c in (reader.fieldnames or []) if c not in columns]
                existing = list(reader)
        merged = {_key(r): r for r in existing}  # dicts keep order: replaced rows stay in place
        for r in rows:
            columns += [c for c in r if c not in columns]
            text = {k: _fmt(v) for k, v in r.items()}
            merged[_key(text)] = text
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a results file is meant to be shared
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                for r in merged.values():
                    writer.writerow({c: r.get(c, "") for c in columns})
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def measured_suites(device: str, *, quick: bool = False) -> set[str]:
    """Suites with rows in this device's CSV (a notebook skips them unless asked to re-measure)."""
    path = results_path(device, quick=quick)
    return {row["suite"] for row in read_rows(path)} if path.exists() else set()


# --------------------------------------------------------------------------- suites


def _base(suite, *, device, dtype, warmup, repeats, budget, threads, quick, kind, **sizes):
    return {"suite": suite, "kind": kind, "device": device, "dtype": dtype, "warmup": warmup,
            "repeats": repeats, "budget_bytes": budget, "threads": threads, "quick": quick, **sizes}


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
    "kernels": "issue 2: one causal layer (B=1, H=12, d=64, C=1024, k=128), L in {2048..16384}: "
               "vanilla, chunked, top-k, SDPA; fwd and fwd+bwd",
    "attention": "issue 8.1: one causal layer, L from 1024 doubling until only top-k fits (or --max-L): "
                 "vanilla, SDPA, Performer, chunked C=1024, top-k k in {64,128}",
    "chunk": "issue 8.2: chunked vs top-k (k=128) at L=8192, C in {128..4096}",
    "ff": "issue 8.3: one feed-forward layer d=768 vs d_ff: dense, token-chunked, top-k k=512",
    "model12": "issue 8.4: 12-layer pre-LN model (d=768, H=12, d_ff=3072) vs L, fwd+bwd",
    "product": "micro: sparse weights x V on one chunk (12 x 1024 queries, d=64, k=128) and torch.topk vs Q.K^T",
}

_FIXED_SPECS = {
    "kernels": _kernels_specs,
    "chunk": _chunk_specs,
    "ff": _ff_specs,
    "model12": _model12_specs,
    "product": _product_specs,
}


def _attention_suite(common, quick, cuda, max_len, measure, min_len=None):
    """L doubles from 1024 (or ``min_len``) until top-k is the only method that fits (or fails itself,
    or L > max_len).

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
            for ps in PASSES:
                spec = {**common, "kind": "attention", "method": method, "pass": ps, "B": 1, "H": 12, "d": 64,
                        "L": n, "C": extra.get("C"), "k": extra.get("k")}
                if "nb_features" in extra:
                    spec["nb_features"] = extra["nb_features"]
                tag = (method, extra.get("k"), ps)
                if tag in failed:
                    status, at = failed[tag]
                    row = {**_row_template(spec), "status": status, "note": f"not run: {status} at L={at}"}
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
              progress=True) -> list[dict]:
    """Run every point of ``suite``, merging each row into ``out`` as it lands; returns the rows."""
    from tqdm.auto import tqdm

    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda asked for but torch.cuda.is_available() is False; use --device cpu")
    if repeats is None:  # quick mode is a smoke run: one timed call
        repeats = 1 if quick else 5 if suite == "product" else 3
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive length, got {value}")
    if min_len and max_len and min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    cuda = device.startswith("cuda")
    out = Path(out) if out else results_path(device, quick=quick)
    common = dict(suite=suite, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                  budget_bytes=int(budget), threads=threads, quick=bool(quick))
    rows = []
    total = None if suite == "attention" else len(list(_FIXED_SPECS[suite](common, quick, cuda)))
    bar = tqdm(total=total, desc=suite, unit="point", disable=not progress, file=sys.stderr)

    def measure(spec, skipped=None):
        bar.set_postfix_str(f"{spec['method']} {spec['pass']} L={spec.get('L')} C={spec.get('C')} "
                            f"k={spec.get('k')}" + (f" d_ff={spec['d_ff']}" if spec.get("d_ff") else ""))
        row = skipped if skipped is not None else run_point(spec, timeout_s=timeout_s, reserve_bytes=reserve_bytes,
                                                                    isolation=isolation)
        rows.append(row)
        if save:
            merge_rows(out, [row])
        bar.update(1)
        return row

    try:
        if suite == "attention":
            _attention_suite(common, quick, cuda, max_len, measure, min_len)
        else:
            for spec in _FIXED_SPECS[suite](common, quick, cuda):
                measure(spec)
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------- tables and targets


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


_X_COLUMN = {"kernels": "L", "attention": "L", "chunk": "C", "ff": "d_ff", "model12": "L", "product": "L"}


def format_table(rows, suite) -> str:
    """Plain-text table: one line per (size, method), time and peak memory per pass."""
    x = _X_COLUMN.get(suite, "L")
    if suite == "product":
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


def kernel_targets(rows) -> list[tuple[str, str, bool | None]]:
    """Issue 2's targets on ``kernels`` rows: (target, measured, met) with met None when unmeasured."""

    def get(method, ps, n, field):
        for r in rows:
            if r["method"] == method and r["pass"] == ps and int(_num(r["L"])) == n and r["status"] == "ok":
                return _num(r[field])
        return None

    out = []
    lengths = sorted({int(_num(r["L"])) for r in rows})
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


# --------------------------------------------------------------------------- command line


def _parser():
    p = argparse.ArgumentParser(prog="python -m topk_lib.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="suites:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SUITES.items()))
    p.add_argument("suite", choices=sorted(SUITES), help="what to measure")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run, under a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--budget", default="16GiB", help="memory budget per point over its inputs (default 16GiB)")
    p.add_argument("--reserve", default="1GiB", help="kill a point when the machine has less available")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per point (default 900)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per point (default 3; product 5; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each point")
    p.add_argument("--max-L", dest="max_len", type=int, default=None, help="attention suite: largest L")
    p.add_argument("--min-L", dest="min_len", type=int, default=None,
                   help="attention suite: first L (default 1024), e.g. to measure long inputs with fewer repeats")
    p.add_argument("--out", default=None, help="CSV to merge into (default data/results/bench_<device>.csv; "
                   "--quick: data/results/quick/)")
    p.add_argument("--isolation", choices=("forkserver", "subprocess"), default="forkserver",
                   help="fork points from a server that imported torch once (fast) or start a fresh python")
    p.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_point"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m topk_lib.bench _point '<json spec>'")
        return _point_main(argv[1])
    args = _parser().parse_args(argv)
    out = Path(args.out) if args.out else results_path(args.device, quick=args.quick)
    t0 = time.monotonic()
    rows = run_suite(args.suite, quick=args.quick, device=args.device, dtype=args.dtype,
                     budget=parse_bytes(args.budget), timeout_s=args.timeout, warmup=args.warmup,
                     repeats=args.repeats, threads=args.threads, out=out, save=not args.no_save,
                     max_len=args.max_len, min_len=args.min_len, reserve_bytes=parse_bytes(args.reserve),
                     isolation=args.isolation)
    print(f"\n{args.suite}{' (--quick: tiny sizes)' if args.quick else ''}: {SUITES[args.suite]}")
    print(format_table(rows, args.suite))
    if args.suite == "kernels":
        print("\nissue 2 targets:")
        for name, measured, met in kernel_targets(rows):
            verdict = {True: "MET", False: "MISSED", None: "n/a"}[met]
            print(f"  {verdict:<7} {name}: {measured}")
    print(f"\n{len(rows)} points in {time.monotonic() - t0:.0f} s"
          + ("" if args.no_save else f"; rows merged into {out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
