"""Pinned offline sources: fetch, verify and read the corpora and labelled sets; synthetic ListOps."""

from topk_lib.data.sources import (  # noqa: F401
    FetchError,
    SOURCES,
    fetch,
    fetch_all,
    is_fetched,
    parse_fortunes,
    moby_dick_chapters,
    moby_dick_text,
    sotu_speeches,
    spam_assassin,
    fortunes_by_language,
    polarity_sentences,
    trivia_qa,
    pydoc_text,
)

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
