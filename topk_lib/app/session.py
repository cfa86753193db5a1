"""The state behind notebook 06's widgets: models loaded lazily, the explorers of recent texts.

:class:`ExplorerSession` resolves the widgets' choices (model label, sample or own text) to
an :class:`~topk_lib.app.explorer.AttentionExplorer`, keeps recent explorers within a memory
budget (least recently used dropped first, by bytes) and the continuations generated per
model. Everything a user can type wrong raises :class:`InputError`, whose message is meant
for the widget area as it stands. :func:`sample_texts` offers the built-in texts whose data is
present. The widgets themselves are in :mod:`topk_lib.app.widgets`.
"""

from __future__ import annotations

import collections
import time

from topk_lib._validate import positive_int
from topk_lib.app.continuations import ContinuationCache, Continuations, compare_continuations
from topk_lib.app.explorer import AttentionExplorer
from topk_lib.data import is_fetched, moby_dick_chapters, pydoc_text, sotu_speeches

__all__ = ["ExplorerSession", "InputError", "sample_texts", "CUSTOM_TEXT", "CACHE_BYTES"]

#: The label of the text choice that reads the notebook's Textarea instead of a sample.
CUSTOM_TEXT = "your own text (box below)"

#: Default memory budget of the explorers a session keeps: SmolLM2 at 512 tokens holds ~100 MB
#: (Q/K/V 59 MB and a full head cache 38 MB), so about four (model, text) pairs stay ready.
CACHE_BYTES = 400 * 2**20


class InputError(ValueError):
    """A choice or text typed in the widgets that cannot be explored; the message says what to do."""


def sample_texts(*, chars: int = 4000) -> dict[str, str]:
    """Built-in sample texts (first ``chars`` characters each): those whose data is present.

    CPython's pydoc topics are always there; Moby Dick and the last State of the Union
    address appear once ``python -m topk_lib.data moby-dick sotu`` has fetched them.
    """
    texts = {"Python docs (pydoc: for, while, if)": pydoc_text(topics=["for", "while", "if"])}
    if is_fetched("moby-dick"):
        chapter = next(c for c in moby_dick_chapters() if c["chapter"] == "1")
        texts["Moby Dick, chapter 1"] = chapter["title"] + "\n\n" + chapter["text"]
    if is_fetched("sotu"):
        last = sotu_speeches()[-1]
        texts[f"State of the Union {last['year']} ({last['president']})"] = last["text"]
    return {name: text[:chars] for name, text in texts.items()}


class ExplorerSession:
    """State behind the notebook's widgets: lazily loaded models and recent explorers.

    ``models`` maps a display label to a :func:`~topk_lib.load_model` name; ``texts`` a label
    to a text. Explorers are kept while their :attr:`~AttentionExplorer.nbytes` sum stays within
    ``cache_bytes`` (the most recent one always stays). ``loader``: ``name -> (model,
    tokenizer)``, default :func:`~topk_lib.hf.loading.load_model`.
    """

    def __init__(self, *, models: dict, texts: dict, max_tokens: int = 512, cache_bytes: int = CACHE_BYTES,
                 loader=None):
        if not models:
            raise ValueError("models must map at least one label to a model name")
        if not texts:
            raise ValueError("texts must map at least one label to a text")
        self.models = dict(models)
        self.texts = dict(texts)
        self.max_tokens = positive_int(max_tokens, "max_tokens")
        self.cache_bytes = positive_int(cache_bytes, "cache_bytes")
        if loader is None:
            from topk_lib.hf.loading import load_model as loader
        self._loader = loader
        self._loaded = {}
        self._explorers: collections.OrderedDict = collections.OrderedDict()  # (model, text) -> explorer, LRU
        self._continuations = collections.defaultdict(ContinuationCache)  # model label -> its cache
        self.built = 0  # explorers computed (a cache hit computes none)
        self.last_build_s = None  # seconds the last explorer took
        self.last_continuations: Continuations | None = None  # what continuations() returned last

    def model(self, label):
        """``(model, tokenizer)`` for a model label, loaded on first use."""
        if label not in self.models:
            raise InputError(f"model must be one of {list(self.models)}, got {label!r}")
        if label not in self._loaded:
            self._loaded[label] = self._loader(self.models[label])
        return self._loaded[label]

    def is_loaded(self, label) -> bool:
        """Whether the model of a label is in memory."""
        return label in self._loaded

    def text(self, choice, custom_text=""):
        """The text for a dropdown choice (:data:`CUSTOM_TEXT` reads ``custom_text``)."""
        if choice == CUSTOM_TEXT:
            if not isinstance(custom_text, str) or not custom_text.strip():
                raise InputError("Your own text is empty: type a text in the box (then click outside it), "
                                 "or pick a sample text.")
            return custom_text
        if choice not in self.texts:
            raise InputError(f"text must be one of {list(self.texts) + [CUSTOM_TEXT]}, got {choice!r}")
        return self.texts[choice]

    def is_ready(self, model, text, custom_text="") -> bool:
        """Whether the explorer of this choice is in memory (no forward pass needed)."""
        try:
            return (model, self.text(text, custom_text)) in self._explorers
        except InputError:
            return True  # nothing to compute: the choice only gives a message

    def explorer(self, model, text, custom_text="") -> AttentionExplorer:
        """The explorer of (model label, text choice), built once and kept while recent."""
        body = self.text(text, custom_text)
        key = (model, body)
        if key in self._explorers:
            self._explorers.move_to_end(key)
            return self._explorers[key]
        net, tokenizer = self.model(model)
        tokens = len(tokenizer(body, truncation=True, max_length=self.max_tokens).input_ids)
        if tokens < 2:
            raise InputError(f"Your text gives {tokens} token{'s' if tokens != 1 else ''} for {model}; attention "
                             "needs at least 2 to show anything: type a few words.")
        start = time.perf_counter()
        built = AttentionExplorer(net, tokenizer, body, max_tokens=self.max_tokens)
        self.last_build_s = time.perf_counter() - start
        self.built += 1
        self._explorers[key] = built
        while len(self._explorers) > 1 and sum(e.nbytes for e in self._explorers.values()) > self.cache_bytes:
            self._explorers.popitem(last=False)
        return built

    @property
    def cached_bytes(self) -> int:
        """Bytes the kept explorers may hold (:attr:`~AttentionExplorer.nbytes` summed)."""
        return sum(e.nbytes for e in self._explorers.values())

    def title(self, model, text) -> str:
        """The figure title of a (model, text choice)."""
        return f"{model} on {'your own text' if text == CUSTOM_TEXT else text}"

    def figure(self, *, model, text, custom_text="", layer, head, k, rows=None):
        """The explorer figure of a (model, text) choice, titled with both (for saving)."""
        ex = self.explorer(model, text, custom_text)
        return ex.figure(layer=layer, head=head, k=k, rows=rows, title=self.title(model, text))

    def continuations(self, *, model, prompt, k, max_new_tokens, chat=False, progress=None) -> Continuations:
        """Greedy continuations of ``prompt``, exact and top-``k``, each generated once per model.

        ``progress(what, done, total)`` is called per generated token (see
        :func:`~topk_lib.app.continuations.compare_continuations`).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("The prompt is empty: type a prompt in the box.")
        net, tokenizer = self.model(model)
        if not (hasattr(net, "generate") and net.can_generate()):
            raise InputError(f"{model} is an encoder and cannot generate; pick a decoder such as SmolLM2.")
        if chat and getattr(tokenizer, "chat_template", None) is None:
            raise InputError(f"{model}'s tokenizer has no chat template: untick 'chat'.")
        result = compare_continuations(net, tokenizer, prompt, k=k, max_new_tokens=max_new_tokens, chat=chat,
                                       cache=self._continuations[model], progress=progress)
        self.last_continuations = result
        return result

    def generated(self, model) -> int:
        """How many continuations were generated (not taken from the cache) for a model label."""
        return self._continuations[model].generated
