"""Readers of the fetched corpora, each returning clean text or labelled rows.

Every reader takes ``raw`` (default ``paths.raw()``) and ``fetch``: without ``fetch=True`` it never
touches the network, and a missing source raises :class:`FileNotFoundError` naming
``python -m topk_lib.data <name>`` (see :mod:`topk_lib.data.download`). :func:`pydoc_text` is
built in and needs no fetch.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import html
import json
import re
from pathlib import Path

from topk_lib.data.download import MANIFEST, require
from topk_lib.data.sources import FORTUNE_LANGS, POLARITY_MEMBER, TRIVIA_MEMBER

__all__ = [
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


def moby_dick_chapters(*, raw: Path | str | None = None, fetch: bool = False) -> list[dict]:
    """All 139 parts of Moby Dick in book order, each ``{"chapter", "title", "text"}``.

    ``chapter`` is "Contents", "Etymology", "Extracts", "1" ... "135" or "Epilogue"; ``text``
    is the body without the chapter heading.
    """
    d = require("moby-dick", raw, fetch)
    order = json.loads((d / "file_list.json").read_text())
    return [json.loads((d / Path(f).with_suffix(".json")).read_text()) for f in order]


def moby_dick_text(*, front_matter: bool = False, raw: Path | str | None = None,
                   fetch: bool = False) -> str:
    """The novel as one string: chapters 1-135 and the epilogue, each with its heading.

    ``front_matter=True`` also prepends the Etymology and Extracts (quotations, mostly
    archaic spelling). The table of contents is never included. About 1.2 M characters.
    """
    d = require("moby-dick", raw, fetch)
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
    d = require("sotu", raw, fetch)
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

    d = require("spam", raw, fetch)
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
    d = require("fortunes", raw, fetch)
    out: dict[str, list[str]] = {}
    for lang, _ in FORTUNE_LANGS.values():
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
    d = require("polarity", raw, fetch)
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
    d = require("trivia", raw, fetch)
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

