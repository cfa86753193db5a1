"""Pinned offline sources: fetch, verify and read the corpora and labelled sets; synthetic ListOps."""

from topk_lib.data.corpora import (
    fortunes_by_language,
    moby_dick_chapters,
    moby_dick_text,
    parse_fortunes,
    polarity_sentences,
    pydoc_text,
    sotu_speeches,
    spam_assassin,
    trivia_qa,
)
from topk_lib.data.download import FetchError, fetch, fetch_all, is_fetched
from topk_lib.data.sources import SOURCES

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
