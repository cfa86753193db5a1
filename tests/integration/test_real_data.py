"""The loaders on the data a real fetch wrote (skipped where a source is not fetched) and one real fetch from PyPI (slow)."""

from __future__ import annotations

import dataclasses

import pytest

from topk_lib.data import corpora, download, sources


def _need(name: str) -> None:
    if not download.is_fetched(name):
        pytest.skip(f"{name} not fetched: run `python -m topk_lib.data {name}`")


def test_moby_dick_real():
    _need("moby-dick")
    text = corpora.moby_dick_text()
    assert text.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert text.rstrip().endswith("only found another orphan.")
    assert 1_100_000 < len(text) < 1_300_000
    assert "ETYMOLOGY" not in text[:1000] and corpora.moby_dick_text(front_matter=True).startswith(
        "ETYMOLOGY")
    chapters = corpora.moby_dick_chapters()
    assert len(chapters) == 139 and chapters[3]["title"] == "Loomings."


def test_sotu_real():
    _need("sotu")
    speeches = corpora.sotu_speeches()
    assert len(speeches) == 233
    assert speeches[0]["year"] == 1790 and speeches[0]["president"] == "George Washington"
    assert all(len(s["text"]) > 1000 for s in speeches)
    assert [s["year"] for s in speeches] == sorted(s["year"] for s in speeches)


def test_spam_assassin_real():
    _need("spam")
    df = corpora.spam_assassin()
    assert list(df.columns) == ["id", "group", "label", "subject", "text"]
    assert len(df) == 6046 and df.label.value_counts().to_dict() == {"ham": 4150, "spam": 1896}
    assert (df.text.str.len() > 0).mean() > 0.99  # a few spams are image-only
    # Headers are gone (only a handful of bodies quote a forwarded message's headers).
    assert df.text.str.contains("Return-Path:").sum() < 20
    assert df.subject.iloc[0] == "Re: New Sequences Window"


def test_fortunes_real():
    _need("fortunes")
    f = corpora.fortunes_by_language()
    assert sorted(f) == ["cs", "de", "en", "es", "it", "pl", "pt"]
    assert all(len(v) > 2000 for v in f.values())
    assert all("\x08" not in c and "\x1b" not in c for v in f.values() for c in v)
    short = corpora.fortunes_by_language(min_chars=20, max_chars=200)
    assert all(20 <= len(c) <= 200 for v in short.values() for c in v)


def test_polarity_real():
    _need("polarity")
    s = corpora.polarity_sentences()
    assert len(s) == 200 and sum(label == "pos" for _, label in s) == 100
    assert s[0] == ("simplistic , silly and tedious .", "neg")
    assert any("—" in t for t, _ in s)  # Windows-1252 decoded, not mangled


def test_trivia_real():
    _need("trivia")
    qa = corpora.trivia_qa()
    assert len(qa) == 261 and qa[0] == ("Who was the 37th President of the United States?",
                                        "Richard Nixon")
    assert all(q and a for q, a in qa)


@pytest.mark.slow
def test_real_fetch_from_pypi_checks_the_pin(tmp_path, monkeypatch):
    """Needs PyPI: fetches the 346 kB chatterbot-corpus wheel twice."""
    download.fetch("trivia", raw=tmp_path / "ok")
    assert len(corpora.trivia_qa(raw=tmp_path / "ok")) == 261
    src = sources.SOURCES["trivia"]
    bad = dataclasses.replace(src.archives[0], sha256="0" * 64)
    monkeypatch.setitem(sources.SOURCES, "trivia", dataclasses.replace(src, archives=(bad,)))
    with pytest.raises(download.FetchError, match="checksum mismatch"):
        download.fetch("trivia", raw=tmp_path / "bad")
