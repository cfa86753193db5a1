"""The state behind notebook 06's widgets: models loaded lazily, the explorers of recent texts.

:class:`ExplorerSession` has the callables handed to ``ipywidgets.interactive_output`` and to
``observe`` (the notebook defines no functions): :meth:`~ExplorerSession.show` draws one view of
an :class:`~topk_lib.app.explorer.AttentionExplorer`, :meth:`~ExplorerSession.show_continuations`
compares greedy continuations with exact and top-k attention. :func:`sample_texts` offers the
built-in texts whose data is present.
"""

from __future__ import annotations

import collections
import time

from topk_lib._validate import positive_int
from topk_lib.app.explorer import AttentionExplorer, Continuations, compare_continuations, continuations_html
from topk_lib.data import is_fetched, moby_dick_chapters, pydoc_text, sotu_speeches

__all__ = ["ExplorerSession", "sample_texts", "CUSTOM_TEXT"]

#: The label of the text choice that reads the notebook's Textarea instead of a sample.
CUSTOM_TEXT = "your own text (box below)"


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
    to a text. ``keep`` explorers stay in memory (least recently used dropped first).
    """

    def __init__(self, *, models: dict, texts: dict, max_tokens: int = 512, keep: int = 2, loader=None,
                 progress: bool = True):
        if not models:
            raise ValueError("models must map at least one label to a model name")
        if not texts:
            raise ValueError("texts must map at least one label to a text")
        self.models = dict(models)
        self.texts = dict(texts)
        self.max_tokens = positive_int(max_tokens, "max_tokens")
        self.keep = positive_int(keep, "keep")
        self.progress = progress
        if loader is None:
            from topk_lib.hf.loading import load_model as loader
        self._loader = loader
        self._loaded = {}
        self._explorers: collections.OrderedDict = collections.OrderedDict()
        self.last_continuations: Continuations | None = None  # what show_continuations displayed last

    def model(self, label):
        """``(model, tokenizer)`` for a model label, loaded on first use."""
        if label not in self.models:
            raise ValueError(f"model must be one of {list(self.models)}, got {label!r}")
        if label not in self._loaded:
            self._loaded[label] = self._loader(self.models[label])
        return self._loaded[label]

    def text(self, choice, custom_text=""):
        """The text for a dropdown choice (:data:`CUSTOM_TEXT` reads ``custom_text``)."""
        if choice == CUSTOM_TEXT:
            if not custom_text or not custom_text.strip():
                raise ValueError("custom_text is empty: type a text in the box, or pick a sample")
            return custom_text
        if choice not in self.texts:
            raise ValueError(f"text must be one of {list(self.texts) + [CUSTOM_TEXT]}, got {choice!r}")
        return self.texts[choice]

    def explorer(self, model, text, custom_text="") -> AttentionExplorer:
        """The explorer of (model label, text choice), built once and kept while recent."""
        body = self.text(text, custom_text)
        key = (model, body)
        if key in self._explorers:
            self._explorers.move_to_end(key)
            return self._explorers[key]
        net, tokenizer = self.model(model)
        start = time.perf_counter()
        built = AttentionExplorer(net, tokenizer, body, max_tokens=self.max_tokens)
        if self.progress:
            print(f"scores of {model} on {built.length} tokens computed in {time.perf_counter() - start:.1f} s "
                  f"({built.n_layers} layers × {built.n_heads} heads); sliders now only re-threshold")
        self._explorers[key] = built
        while len(self._explorers) > self.keep:
            self._explorers.popitem(last=False)
        return built

    def show(self, *, model, text, custom_text="", layer, head, k, rows=None):
        """Draw and display the explorer figure (the callable for ``interactive_output``).

        ``rows``: inclusive ``(first, last)`` query positions to show (an ``IntRangeSlider``'s
        value), default all. Out-of-range values (while the sliders' ranges follow a model or
        text change) are clamped.
        """
        import matplotlib.pyplot as plt
        from IPython.display import display

        if text == CUSTOM_TEXT and not (custom_text or "").strip():
            print("Type a text in the box (then click outside it), or pick a sample text.")
            return
        ex = self.explorer(model, text, custom_text)
        layer, head = min(max(layer, ex.layers[0]), ex.layers[-1]), min(head, ex.n_heads - 1)
        shown = None
        if rows is not None:
            first = min(rows[0], ex.length - 1)
            shown = (first, max(first + 1, min(rows[1] + 1, ex.length)))
        fig = self.figure(model=model, text=text, custom_text=custom_text, layer=layer, head=head, k=k, rows=shown)
        display(fig)
        plt.close(fig)  # displayed once; an open figure would be shown again at the cell's end

    def figure(self, *, model, text, custom_text="", layer, head, k, rows=None):
        """The explorer figure of a (model, text) choice, titled with both (for saving)."""
        ex = self.explorer(model, text, custom_text)
        name = "your own text" if text == CUSTOM_TEXT else text
        return ex.figure(layer=layer, head=head, k=k, rows=rows, title=f"{model} on {name}")

    def follow(self, *, model, text, custom_text, layer, head, k, rows=None):
        """Make the layer/head/k sliders' ranges follow the chosen model and text.

        Registers observers on the model/text widgets; call before ``interactive_output`` so
        ranges change before the figure is redrawn.
        """
        self._controls = dict(model=model, text=text, custom_text=custom_text, layer=layer, head=head, k=k, rows=rows)
        for widget in (model, text, custom_text):
            widget.observe(self._sync_ranges, names="value")
        self._sync_ranges()

    def _sync_ranges(self, change=None):
        c = self._controls
        try:
            ex = self.explorer(c["model"].value, c["text"].value, c["custom_text"].value)
        except ValueError:
            return  # an empty custom text: keep the ranges until there is a text
        c["layer"].min, c["layer"].max = ex.layers[0], ex.layers[-1]
        c["head"].max = ex.n_heads - 1
        c["k"].max = ex.length
        if c["rows"] is not None:
            whole = c["rows"].value[1] >= c["rows"].max  # showed every row: keep showing every row
            c["rows"].max = ex.length - 1
            if whole:
                c["rows"].value = (c["rows"].value[0], ex.length - 1)

    def show_continuations(self, *, model, prompt, k, max_new_tokens, chat=False):
        """Generate and display both continuations (the callable for ``interactive_output``)."""
        from IPython.display import HTML, display

        if not (prompt or "").strip():
            print("Type a prompt in the box.")
            return None
        net, tokenizer = self.model(model)
        result = compare_continuations(net, tokenizer, prompt, k=k, max_new_tokens=max_new_tokens, chat=chat)
        display(HTML(continuations_html(result, tokenizer, prompt=prompt)))
        self.last_continuations = result
        return result
