"""Result caches under ``data/results``: small, atomic, keyed by their parameters.

A figure is redrawn from its cache without recomputing; a cache is reused only when
every parameter that produced it is the same (a hash of them is in the file name), so
a changed setting never reads a stale result and never overwrites another one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from topk_lib import paths


def results_dir() -> Path:
    """Where result caches go, read at call time (quick mode sets ``TOPK_LAB_RESULTS``)."""
    return Path(os.environ.get("TOPK_LAB_RESULTS", paths.RESULTS))


def config_key(config: dict) -> str:
    """Short hash of JSON-able parameters."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_frame(name: str, *, config: dict, compute, folder: str | None = None) -> pd.DataFrame:
    """``compute()`` -> DataFrame, cached as ``results_dir()/folder/name_<hash>.csv``.

    The parameters are stored beside it (``.json``); a present cache is read instead of
    recomputing. Delete the file to recompute.
    """
    root = results_dir() / folder if folder else results_dir()
    path = root / f"{name}_{config_key(config)}.csv"
    if path.exists():
        return pd.read_csv(path)
    frame = compute()
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"compute must return a pandas DataFrame, got {type(frame).__name__}")
    write_atomic(path.with_suffix(".json"), json.dumps({"name": name, **config}, indent=1, sort_keys=True, default=str) + "\n")
    write_atomic(path, frame.to_csv(index=False))
    return frame
