"""One benchmark point, measured in a process of its own (Gupta et al. 2021, section 4 and Figure 1).

A point is one method at one size and one pass. Each point runs in a process of its own, so
one point's allocator state, thread pool or out-of-memory failure cannot leak into the next:
by default a child forked from a ``multiprocessing`` forkserver that has imported torch once
(no op ever runs in the server, so no thread pool or CUDA context is forked; ~0.1 s per point),
or with ``isolation="subprocess"`` a fresh ``python -m topk_lib.bench _point '<json>'`` (~2.5 s).
The child builds its inputs (:mod:`.workloads`), switches the memory budget on (:mod:`.meters`),
runs ``warmup`` untimed and ``repeats`` timed calls (``torch.cuda.synchronize`` around each on
GPU; median and minimum are recorded), then one more untimed call that measures peak memory.

Statuses: ``ok``; ``did not fit`` (an allocation failed inside the budget, the kernel's OOM
killer took the child, or the machine ran low on memory and the parent stopped it); ``timeout``
(the child ran past ``timeout_s`` seconds, inputs and all, and was killed); ``error`` (anything
else, message in ``note``). None of them raises: a failed point is a row. As a second guard
beside the budget, the parent kills a child when the machine's available memory falls below
``reserve_bytes`` (default 1 GiB): the machine is shared.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

from topk_lib.bench import meters, workloads
from topk_lib.bench.store import COLUMNS, device_name
from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write

__all__ = ["PASSES", "DEFAULT_TIMEOUT_S", "DEFAULT_RESERVE", "run_point", "run_interleaved", "row_template",
           "point_main",
           "forkserver_context", "available_devices", "check_device"]

GiB = 1024**3
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_RESERVE = 1 * GiB

PASSES = ("fwd", "fwd+bwd")
ISOLATIONS = ("forkserver", "subprocess")

_OOM_PATTERNS = (
    "can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory",
    "std::bad_alloc", "bad_alloc", "memoryerror",
)


def _is_oom(text: str) -> bool:
    low = text.lower()
    return any(p in low for p in _OOM_PATTERNS)


def _classify(exc) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _is_oom(str(exc))):
        return "did not fit", msg  # torch.OutOfMemoryError is a RuntimeError
    return "error", msg


def available_devices() -> list[str]:
    """The devices a point can run on here: ``cpu``, and ``cuda``, ``cuda:0`` .. when torch sees GPUs."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])


def check_device(device, arg: str = "device") -> str:
    """``device`` as a string when a point can run there; else an error naming ``arg`` and what is available.

    Checked before any point runs: a point on an unusable device would only fail in its child, and
    a whole suite of such error rows would reach the CSV.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"{arg} must be a device string such as 'cpu' or 'cuda:0', got {device!r} "
                        f"({type(device).__name__})")
    available = available_devices()
    if device in available:
        return device
    why = " (points run and measure memory on the CPU or a CUDA GPU only)"
    if device.startswith("cuda"):
        why = (f" (this torch {torch.__version__} is built without CUDA)" if torch.version.cuda is None
               else " (torch sees no CUDA device)" if len(available) == 1
               else f" (torch sees {len(available) - 2} CUDA device(s))")
    raise ValueError(f"{arg} must be one of {', '.join(map(repr, available))}{why}, got {device!r}")


# --------------------------------------------------------------------------- the child


def _interleaved_child(spec: dict) -> dict:
    """Runs inside one process: every method of ``spec["points"]`` built, warmed up, then timed in turn.

    Repeat ``r`` runs the methods in order, repeat ``r + 1`` in reverse, so no method always
    follows the same one; the 1-minute load average is read before and after each round.
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        runs = [workloads.build(p, device, dtype) for p in spec["points"]]
        for run in runs:
            for _ in range(int(spec["warmup"])):
                run()
        times, loads = [[] for _ in runs], [os.getloadavg()[0]]
        for r in range(int(spec["repeats"])):
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                sync()
                t0 = time.perf_counter()
                runs[i]()
                sync()
                times[i].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    except Exception as exc:  # one method failing fails the round: its times would be incomparable
        status, note = _classify(exc)
        return {"status": status, "note": note}
    return {"status": "ok", "times": times, "load": [min(loads), max(loads)], "threads": torch.get_num_threads()}


def _point_child(spec: dict) -> dict:
    """Runs inside the point's process: build inputs, set the budget, time the pass, read the peak."""
    if spec.get("kind") == "interleaved":
        return _interleaved_child(spec)
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
        "device_name": device_name(spec["device"]),
        "mem_method": "cuda-max-allocated" if device.type == "cuda" else "cpu-rss-hwm",
        "median_s": None, "min_s": None, "peak_bytes": None,
    }
    try:
        run = workloads.build(spec, device, dtype)
        a = torch.randn(256, 256, device=device)  # spin up the thread pool / CUDA context before the baseline
        (a @ a).sum().item()
        del a
    except Exception as exc:  # inputs alone did not fit (no budget is set yet) or a bad spec
        status, note = _classify(exc)
        return {**row, "status": status, "note": "building inputs: " + note}
    meter = meters.meter_for(device, spec.get("budget_bytes") or 0)  # budget on from here
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


def point_main(spec_json: str) -> int:
    """``python -m topk_lib.bench _point '<json>'``: one point; the row goes to ``result_file`` or stdout."""
    spec = json.loads(spec_json)
    row = _point_child(spec)
    if spec.get("result_file"):
        atomic_write(spec["result_file"], json.dumps(row))  # the parent never reads half a row
    else:
        print(json.dumps(row))
    return 0


def _forked_point(spec: dict, result_file: str, log_file: str):
    """Target of the forkserver child: output to ``log_file``, the row to ``result_file``."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    atomic_write(result_file, json.dumps(_point_child(spec)))


# --------------------------------------------------------------------------- the parent


def forkserver_context():
    """``multiprocessing``'s forkserver context, its server preloading the benchmark modules.

    ``multiprocessing`` keeps one forkserver per process and starts it on the first
    ``Process.start()``; the preload list is read only then, so setting it on every call keeps
    this module free of state. The server only imports (no op runs there), so no thread pool or
    CUDA context is forked, and each point starts in about 0.1 s.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["topk_lib.bench.harness"])  # and with it torch, the kernels, the workloads
    return ctx


class _Child:
    """The point's process, started either way, with one interface for polling and killing."""

    def __init__(self, isolation, spec, result_file, log_file):
        self.log_file = log_file
        if isolation == "forkserver":
            import importlib

            # By its module name even when this file runs as __main__ (python -m topk_lib.bench).
            target = importlib.import_module("topk_lib.bench.harness")._forked_point
            self.proc = forkserver_context().Process(target=target, args=(spec, result_file, log_file), daemon=True)
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


def run_interleaved(specs: list[dict], *, warmup: int, repeats: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                    reserve_bytes: int = DEFAULT_RESERVE, isolation: str = "forkserver") -> dict:
    """Time several points' methods in one process, alternating them over ``repeats`` rounds.

    ``specs`` are point specs of one device, dtype and thread count (each's own inputs are built
    in the one process, so together they must fit). Returns ``{"status": "ok", "times": [[s, ..]
    per spec], "load": [min, max] 1-minute load average}``, or a status and ``note`` when the
    process failed, timed out (after ``timeout_s`` per spec) or ran out of memory. Time only:
    peak memory needs a process per point (:func:`run_point`).
    """
    if not specs:
        raise ValueError("run_interleaved needs at least one point spec")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for spec in specs:
        _check_point({**spec, "warmup": warmup, "repeats": repeats}, timeout_s, isolation)
    first = specs[0]
    spec = {"kind": "interleaved", "points": specs, "device": first["device"], "dtype": first["dtype"],
            "threads": first.get("threads"), "warmup": warmup, "repeats": repeats}
    return _in_child(spec, timeout_s * len(specs), reserve_bytes, isolation)


def _in_child(spec: dict, timeout_s: float, reserve_bytes: int, isolation: str) -> dict:
    """Run ``spec`` in a child process: what it wrote, or a ``status`` and ``note`` saying how it failed."""
    with tempfile.TemporaryDirectory(prefix="topk-bench-") as tmp:
        result_file, log_file = os.path.join(tmp, "row.json"), os.path.join(tmp, "out.log")
        t0 = time.monotonic()
        child = _Child(isolation, spec, result_file, log_file)
        killed = _watch(child, t0, timeout_s, reserve_bytes)
        rc = child.returncode()
        if killed == "timeout":
            return {"status": "timeout", "note": f"killed after {timeout_s:g} s"}
        if killed == "memory":
            return {"status": "did not fit",
                    "note": f"killed: the machine had under {reserve_bytes / GiB:.1f} GiB available"}
        if os.path.exists(result_file):
            with open(result_file) as fh:
                return json.load(fh)
        tail = child.log_tail()
        if rc == -signal.SIGKILL or _is_oom(tail):
            return {"status": "did not fit", "note": f"child died (rc={rc}), likely out of memory: {tail}"}
        return {"status": "error", "note": f"child failed (rc={rc}): {tail}"}


def row_template(spec: dict) -> dict:
    """A row with the spec's fields and what the parent knows; the child overwrites what it measures."""
    row = {c: spec.get(c) for c in COLUMNS}
    row.update(
        device=spec["device"], device_name=device_name(spec["device"]),
        threads=spec.get("threads") or torch.get_num_threads(),  # the child's default too: keeps keys stable
        torch_version=torch.__version__, host=platform.node(),
        timestamp=_dt.datetime.now().isoformat(timespec="seconds"),
        mem_method="cuda-max-allocated" if str(spec["device"]).startswith("cuda") else "cpu-rss-hwm",
    )
    return row


def _check_point(spec, timeout_s, isolation):
    missing = [f for f in ("kind", "method", "pass", "device", "dtype", "warmup", "repeats") if f not in spec]
    if missing:
        raise ValueError(f"point spec lacks {missing}; got {sorted(spec)}")
    if int(spec["warmup"]) < 0 or int(spec["repeats"]) < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={spec['warmup']}, repeats={spec['repeats']}")
    if spec["kind"] not in workloads.KINDS:
        raise ValueError(f"kind must be one of {sorted(workloads.KINDS)}, got {spec['kind']!r}")
    if spec["pass"] not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {spec['pass']!r}")
    check_device(spec["device"], "spec['device']")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be 'forkserver' or 'subprocess', got {isolation!r}")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


def _watch(child, t0, timeout_s, reserve_bytes):
    """Wait for the child; kill it ``timeout_s`` after ``t0`` or when the machine runs low. Returns why it was killed."""
    import psutil

    while child.running():
        killed = None
        if time.monotonic() - t0 > timeout_s:
            killed = "timeout"
        elif psutil.virtual_memory().available < reserve_bytes:
            killed = "memory"  # the machine is shared: stop before its OOM killer picks anyone
        if killed:
            child.kill()
            return killed
        time.sleep(0.05)
    return None


def run_point(spec: dict, *, timeout_s: float = DEFAULT_TIMEOUT_S, reserve_bytes: int = DEFAULT_RESERVE,
              isolation: str = "forkserver") -> dict:
    """Measure one point in a fresh process and return its full row; never raises for OOM or timeout.

    ``spec`` needs ``kind`` (attention, ff, model12, product, calibrate), ``method``, ``pass``,
    ``device``, ``dtype``, ``warmup``, ``repeats``, ``budget_bytes`` (0 = none) and the sizes of its
    kind. ``isolation="forkserver"`` forks each point from a server that imported torch once;
    ``"subprocess"`` starts ``python -m topk_lib.bench _point`` (slower to start, nothing shared).
    """
    _check_point(spec, timeout_s, isolation)
    return {**row_template(spec), **_in_child(spec, timeout_s, reserve_bytes, isolation)}
