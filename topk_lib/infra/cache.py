"""The one cache layer: atomic writes, short keys of parameters, cached frames and records.

A figure is redrawn from its cache without recomputing; a cache is reused only when every
parameter that produced it is the same (a hash of them is in the file name), so a changed
setting never reads a stale result and never overwrites another one. Every file is written
through a temporary file in the same folder and ``os.replace``, so a crash or Ctrl-C never
leaves half a file where a reader expects a whole one.
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

__all__ = ["atomic_write", "digest", "config_key", "file_sha256", "cached_frame", "cached_record"]


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def digest(data: bytes, *, length: int | None = None) -> str:
    """Hex sha256 of ``data``, cut to ``length`` characters when given."""
    return hashlib.sha256(data).hexdigest()[:length]


def config_key(config, *, length: int = 10, ensure_ascii: bool = True) -> str:
    """Short hash of JSON-able parameters (keys sorted, so their order never matters).

    ``ensure_ascii=False`` hashes non-ASCII text as UTF-8 rather than as ``\\u`` escapes;
    both spellings name existing caches, so each caller keeps the one its caches use.
    """
    text = json.dumps(config, sort_keys=True, default=str, ensure_ascii=ensure_ascii)
    return digest(text.encode(), length=length)


def file_sha256(path: Path | str, *, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cached_frame(name: str, *, config: dict, compute, folder: str | None = None) -> pd.DataFrame:
    """``compute()`` -> DataFrame, cached as ``paths.results()/folder/name_<hash>.csv.gz``.

    The parameters are stored beside it (``.json``); a present cache is read instead of
    recomputing. Delete the file to recompute. Values keep 7 significant digits and the
    gzip header carries no timestamp, so the same results give the same bytes.
    """
    root = paths.results() / folder if folder else paths.results()
    stem = f"{name}_{config_key(config)}"
    path = root / f"{stem}.csv.gz"
    if path.exists():
        return pd.read_csv(path)
    frame = compute()
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"compute must return a pandas DataFrame, got {type(frame).__name__}")
    info = json.dumps({"name": name, **config}, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write(root / f"{stem}.json", info)
    atomic_write(path, gzip.compress(frame.to_csv(index=False, float_format="%.7g").encode(), mtime=0))
    return frame


def cached_record(stem: Path | str, *, config, compute, key_length: int = 10) -> dict:
    """``compute()`` -> JSON-able dict, cached as ``f"{stem}_{config_key(config)}.json"``.

    A present file is read instead of recomputing; a new one is written atomically,
    indented, with a final newline.
    """
    stem = Path(stem)
    path = stem.with_name(f"{stem.name}_{config_key(config, length=key_length)}.json")
    if path.exists():
        return json.loads(path.read_text())
    record = compute()
    if not isinstance(record, dict):
        raise TypeError(f"compute must return a dict, got {type(record).__name__}")
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    return record
