"""Result caches under ``data/results``: small, atomic, keyed by their parameters.

A figure is redrawn from its cache without recomputing; a cache is reused only when
every parameter that produced it is the same (a hash of them is in the file name), so
a changed setting never reads a stale result and never overwrites another one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from topk_lib.infra import paths


def results_dir() -> Path:
    """Where result caches go, read at call time (quick mode sets ``TOPK_LAB_RESULTS``)."""
    return Path(os.environ.get("TOPK_LAB_RESULTS", paths.RESULTS))


def config_key(config: dict) -> str:
    """Short hash of JSON-able parameters."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_frame(name: str, *, config: dict, compute, folder: str | None = None) -> pd.DataFrame:
    """``compute()`` -> DataFrame, cached as ``results_dir()/folder/name_<hash>.csv.gz``.

    The parameters are stored beside it (``.json``); a present cache is read instead of
    recomputing. Delete the file to recompute. Values keep 7 significant digits and the
    gzip header carries no timestamp, so the same results give the same bytes.
    """
    root = results_dir() / folder if folder else results_dir()
    stem = f"{name}_{config_key(config)}"
    path = root / f"{stem}.csv.gz"
    if path.exists():
        return pd.read_csv(path)
    frame = compute()
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"compute must return a pandas DataFrame, got {type(frame).__name__}")
    info = json.dumps({"name": name, **config}, indent=1, sort_keys=True, default=str) + "\n"
    write_atomic(root / f"{stem}.json", info)
    data = gzip.compress(frame.to_csv(index=False, float_format="%.7g").encode(), mtime=0)
    write_atomic(path, data)
    return frame
