"""The benchmark rows: one CSV per device, merged by key, rewritten atomically.

Results go to ``data/results/bench_<device>.csv`` (:func:`results_path`; ``<device>`` is ``cpu``
or a slug of the CUDA device name). Rows with the same key are the same point (suite, device
name, dtype, threads, method, pass, sizes and quick: :data:`KEY_COLUMNS`; not the budget, the
repeats or the versions, which a rerun may change). A new row replaces the old one of its point
except where that would lose a measurement (:func:`merge_rows`): a row that is not ``ok`` never
replaces an ``ok`` row, and a failure never replaces a ``did not fit`` measured under a larger
budget, unless ``replace=True`` (``--replace``). Other rows are kept. The file is rewritten
atomically after every point under a lock on its folder, so an interrupted suite keeps what it
measured and two suites running at once lose no rows.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import platform
import re
from pathlib import Path

import torch

from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write

__all__ = ["COLUMNS", "KEY_COLUMNS", "Merged", "results_path", "device_slug", "device_name", "merge_rows",
           "read_rows", "measured_suites", "all_results"]

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


def device_slug(device: str) -> str:
    """``cpu`` or the CUDA device name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if not str(device).startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def device_name(device: str) -> str:
    """The CUDA device name, or the CPU model with its core count (``... x2``)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    return f"{model} x{os.cpu_count()}"


def results_path(device: str, *, quick: bool = False) -> Path:
    """``data/results/bench_<device>.csv``; quick runs go to ``data/results/quick/`` (git-ignored).

    ``TOPK_LAB_RESULTS`` (set by the notebook runner, read at call time) overrides the folder.
    """
    root = paths.results()
    if quick and "TOPK_LAB_RESULTS" not in os.environ:
        root = root / "quick"  # where the runner's quick mode puts results
    return root / f"bench_{device_slug(device)}.csv"


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


@dataclasses.dataclass(frozen=True)
class Merged:
    """What a merge did with its rows: ``added`` (new points), ``replaced`` (old rows overwritten),
    ``kept`` (old rows that stayed because the new row would have lost a measurement)."""

    path: Path
    added: int = 0
    replaced: int = 0
    kept: int = 0

    def __add__(self, other: "Merged") -> "Merged":
        return Merged(other.path, self.added + other.added, self.replaced + other.replaced, self.kept + other.kept)


def _budget(row: dict) -> float | None:
    """The row's memory budget in bytes; ``0`` (no budget) is infinite, an empty or missing cell unknown."""
    try:
        value = float(row.get("budget_bytes") or "")
    except ValueError:
        return None
    return math.inf if value == 0 else value


def _keeps(old: dict, new: dict) -> bool:
    """Whether ``old`` stays when ``new`` (both as text) arrives for the same point.

    An ``ok`` row always lands: a rerun updates the numbers. A failure (``error``, ``timeout``,
    ``did not fit``, a skipped point) never replaces an ``ok`` row, whatever the budgets: under a
    smaller or equal budget it says nothing against the measurement, and under a larger one (or
    none) it is as likely a short ``--timeout``, a busy machine or the memory reserve as the
    kernel (confirm with ``--replace``). A failure replaces a failure, the latest attempt, unless
    the old one is a ``did not fit`` under a larger budget: "needs more than 16 GiB" says more
    than any failure under 64 MiB. An unknown old budget (no ``budget_bytes`` cell) is not larger.
    """
    if new.get("status") == "ok":
        return False
    if old.get("status") == "ok":
        return True
    old_budget, new_budget = _budget(old), _budget(new)
    return (old.get("status") == "did not fit" and old_budget is not None
            and new_budget is not None and old_budget > new_budget)


def merge_rows(path, rows, *, replace: bool = False) -> Merged:
    """Merge ``rows`` into the CSV at ``path`` and rewrite it atomically; returns the counts.

    A row replaces the old row of its point (same :data:`KEY_COLUMNS`) unless that would lose a
    measurement (a failure over an ``ok`` row, see the module docstring); ``replace=True`` lets
    every row replace its old one. Rows of other points are kept as they are.
    """
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, got {replace!r} ({type(replace).__name__})")
    path = Path(path)
    added = replaced = kept = 0
    with _locked(path):
        existing, columns = [], list(COLUMNS)
        if path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                columns += [c for c in (reader.fieldnames or []) if c not in columns]
                existing = list(reader)
        merged = {_key(r): r for r in existing}  # dicts keep order: replaced rows stay in place
        for r in rows:
            text = {k: _fmt(v) for k, v in r.items()}
            key = _key(text)
            if key not in merged:
                added += 1
            elif not replace and _keeps(merged[key], text):
                kept += 1
                continue
            else:
                replaced += 1
            merged[key] = text
            columns += [c for c in text if c not in columns]
        if path.exists() and not (added or replaced):
            return Merged(path, added, replaced, kept)  # nothing lands: the file stays byte for byte
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in merged.values():
            writer.writerow({c: r.get(c, "") for c in columns})
        atomic_write(path, out.getvalue().encode())  # bytes: the csv module's \r\n line ends as written
    return Merged(path, added, replaced, kept)


def read_rows(path) -> list[dict]:
    """The rows of a benchmark CSV, every value a string."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def measured_suites(device: str, *, quick: bool = False) -> set[str]:
    """Suites with rows in this device's CSV (a notebook skips them unless asked to re-measure)."""
    path = results_path(device, quick=quick)
    return {row["suite"] for row in read_rows(path)} if path.exists() else set()


def all_results(*, quick: bool = False):
    """Every device's rows (``paths.results()/bench_*.csv``) as one DataFrame, quick runs or full ones."""
    import pandas as pd

    rows = pd.concat([pd.read_csv(path) for path in sorted(paths.results().glob("bench_*.csv"))], ignore_index=True)
    return rows[rows.quick == quick]
