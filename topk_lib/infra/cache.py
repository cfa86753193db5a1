"""The one cache layer: atomic writes, short keys of parameters, cached frames and records.

A figure is redrawn from its cache without recomputing; a cache is reused only when every
parameter that produced it is the same (a hash of them is in the file name), so a changed
setting never reads a stale result and never overwrites another one. Every file is written
through a temporary file in the same folder and ``os.replace``, so a crash or Ctrl-C never
leaves half a file where a reader expects a whole one.

A present cache is checked when it is read: a record must parse as a JSON object (a cut
file never does, since its closing brace is the last thing written) and hold the keys its
reader needs; a frame's gzip trailer carries a CRC and the length, so a cut or altered
``.csv.gz`` fails to decompress, and it must have the columns its reader needs. A cache that
fails is reported (:class:`CorruptCacheWarning`, with its path and why) and recomputed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import warnings
import zlib
from pathlib import Path

import pandas as pd

from topk_lib.infra import paths

__all__ = ["atomic_write", "digest", "config_key", "file_sha256", "cached_frame", "cached_record", "read_frame",
           "read_record", "CorruptCacheError", "CacheWarning", "CorruptCacheWarning", "verify_files", "file_state", "file_lock"]


class CorruptCacheError(ValueError):
    """A cache file exists but cannot be used (cut, not parseable, or missing what its reader needs)."""


class CacheWarning(UserWarning):
    """A present cache file was not used; the message names it and says why."""


class CorruptCacheWarning(CacheWarning):
    """A cache file could not be used and is being recomputed; the message names the file."""


def _new_file_mode(path: Path) -> int:
    """The mode a rewritten file keeps, or for a new one what ``open`` would give under the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    The temporary file gets a unique name, so concurrent writers never collide, and the mode
    the file had (or a plain new file's mode), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(path))
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


def file_state(path: Path | str) -> list[int]:
    """``[size, mtime_ns]`` of a file: what :func:`verify_files` records for a file that hashed right."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def verify_files(folder: Path | str, expected: dict, *, verified: dict | None = None, rehash: bool = False):
    """``(problem, verified)``: whether every file of ``expected`` is in ``folder`` as recorded, hashing only what changed.

    ``expected`` maps a path relative to ``folder`` to ``(sha256, size)`` (``size`` None when
    unknown: then the size it last verified with counts). ``verified`` maps the same paths to
    ``[size, mtime_ns]`` as they were when the file last hashed right (what an earlier call returned): a file that still has them is
    not read again, so checking an unchanged folder costs one ``stat`` per file; any write
    changes the size or the modification time and makes the file hash again. ``rehash``
    ignores ``verified`` and hashes everything. ``problem`` is None when all files are
    right, else a sentence naming the first that is not; the returned ``verified`` is the
    record to keep for the next call (equal to the given one when nothing changed).
    """
    folder, verified = Path(folder), dict(verified or {})
    seen = {}
    for rel, (sha256, size) in sorted(expected.items()):
        p = folder / rel
        try:
            state = file_state(p)
        except FileNotFoundError:
            return f"{rel} is missing", verified
        known = size if size is not None else (verified.get(rel) or [None])[0]
        if known is not None and state[0] != known:
            return f"{rel} has {state[0]} bytes, not the {known} it was written with", verified
        if rehash or verified.get(rel) != state:
            if file_sha256(p) != sha256:
                return f"{rel} was modified (its sha256 differs from the one recorded)", verified
        seen[rel] = state
    return None, seen


@contextlib.contextmanager
def file_lock(path: Path | str):
    """Hold an exclusive ``flock`` on ``path`` (created when missing) for the ``with`` block.

    The kernel drops the lock when its holder exits in any way, SIGKILL included, so a
    temporary file or folder that only a lock holder creates is stale whenever the lock
    can be taken. Not POSIX: no locking (the atomic renames still protect readers).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _names(value, arg: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} must be a list/tuple of names (str), got {value!r}")
    return tuple(value)


def read_frame(path: Path | str, *, columns=()) -> pd.DataFrame:
    """The frame cached at ``path``; :class:`CorruptCacheError` (naming it) when unreadable or lacking ``columns``."""
    path, columns = Path(path), _names(columns, "columns")
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CorruptCacheError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CorruptCacheError(f"{path} lacks the columns {missing} (it has {list(frame.columns)})")
    return frame


def read_record(path: Path | str, *, required=(), validate=None) -> dict:
    """The JSON record at ``path``; :class:`CorruptCacheError` (naming it) when it is not usable.

    Usable: a JSON object holding every key of ``required``, for which ``validate(record)``
    (when given) returns None; any other return value is the reason it is rejected.
    """
    path, required = Path(path), _names(required, "required")
    if validate is not None and not callable(validate):
        raise TypeError(f"validate must be a function record -> None or a reason (str), got {validate!r}")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptCacheError(f"{path} is not a whole JSON file ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict):
        raise CorruptCacheError(f"{path} holds a {type(record).__name__}, not a JSON object")
    missing = [k for k in required if k not in record]
    if missing:
        raise CorruptCacheError(f"{path} lacks the keys {missing}")
    reason = validate(record) if validate is not None else None
    if reason is not None:
        raise CorruptCacheError(f"{path} is rejected: {reason}")
    return record


def _reject(error: CorruptCacheError) -> None:
    warnings.warn(f"cache {error}; recomputing it", CorruptCacheWarning, stacklevel=3)


def cached_frame(name: str, *, config: dict, compute, folder: str | None = None, columns=()) -> pd.DataFrame:
    """``compute()`` -> DataFrame, cached as ``paths.results()/folder/name_<hash>.csv.gz``.

    The parameters are stored beside it (``.json``); a present cache is read instead of
    recomputing, unless it is unreadable or lacks one of ``columns`` (then it is reported
    and recomputed). Delete the file to recompute. Values keep 7 significant digits and the
    gzip header carries no timestamp, so the same results give the same bytes.
    """
    columns = _names(columns, "columns")
    root = paths.results() / folder if folder else paths.results()
    stem = f"{name}_{config_key(config)}"
    path = root / f"{stem}.csv.gz"
    if path.exists():
        try:
            return read_frame(path, columns=columns)
        except CorruptCacheError as e:
            _reject(e)
    frame = compute()
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"compute must return a pandas DataFrame, got {type(frame).__name__}")
    info = json.dumps({"name": name, **config}, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write(root / f"{stem}.json", info)
    atomic_write(path, gzip.compress(frame.to_csv(index=False, float_format="%.7g").encode(), mtime=0))
    return frame


def cached_record(stem: Path | str, *, config, compute, key_length: int = 10, required=(), validate=None) -> dict:
    """``compute()`` -> JSON-able dict, cached as ``f"{stem}_{config_key(config)}.json"``.

    A present file is read instead of recomputing when :func:`read_record` accepts it
    (``required`` keys, ``validate``); else it is reported and recomputed. A new one is
    written atomically, indented, with a final newline.
    """
    required = _names(required, "required")
    if validate is not None and not callable(validate):
        raise TypeError(f"validate must be a function record -> None or a reason (str), got {validate!r}")
    stem = Path(stem)
    path = stem.with_name(f"{stem.name}_{config_key(config, length=key_length)}.json")
    if path.exists():
        try:
            return read_record(path, required=required, validate=validate)
        except CorruptCacheError as e:
            _reject(e)
    record = compute()
    if not isinstance(record, dict):
        raise TypeError(f"compute must return a dict, got {type(record).__name__}")
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    return record
