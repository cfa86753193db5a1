"""Notebook 06's widgets: the k explorer panel and the continuation panel (ipywidgets).

:class:`ExplorerPanel` shows one head's top-k map as an ``ipywidgets.Image`` whose value is a
PNG data URL. A slider move re-thresholds the cached scores, updates the one live
:class:`~topk_lib.plots.explorer.ExplorerFigure` in place and sends the new PNG; PNGs of
recent views are kept, so going back to a view sends the identical bytes again. The k control
is a slider over log-spaced steps (:func:`~topk_lib.app.explorer.log_k_steps`) linked to a box
for the exact value. While a model or text change recomputes the scores, a busy line says so
and the old figure is greyed out (CSS class ``topk-explorer-stale``).
:class:`ContinuationPanel` compares greedy continuations with exact and top-k attention,
with a progress bar per generated token; each continuation is generated once (the session's
cache), so moving k regenerates only the top-k one.

Input the user types wrong (an empty or one-token text, an empty prompt) shows a message in
the panel's message line (:class:`~topk_lib.app.session.InputError`); no traceback reaches
the widget area. Stable CSS classes (for tests driving a browser): ``topk-explorer-figure``
(the ``<img>``), ``topk-explorer-k`` (the k slider), ``topk-explorer-k-text``,
``topk-explorer-layer``, ``topk-explorer-head``, ``topk-explorer-rows``,
``topk-explorer-model``, ``topk-explorer-text-choice``, ``topk-explorer-text`` (the own-text
box), ``topk-explorer-message``, ``topk-explorer-busy``; ``topk-continuation-prompt``,
``-k``, ``-progress``, ``-message``, ``-output``.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import html
import time

import ipywidgets as widgets

from topk_lib._validate import positive_int
from topk_lib.app.continuations import continuations_html
from topk_lib.app.explorer import log_k_steps
from topk_lib.app.session import CUSTOM_TEXT, ExplorerSession, InputError

__all__ = ["ExplorerPanel", "ContinuationPanel", "png_data_url", "STALE_CLASS"]

STALE_CLASS = "topk-explorer-stale"
_CSS = (f"<style>.{STALE_CLASS} {{opacity: 0.35; filter: grayscale(1);}}"
        " .topk-explorer-busy, .topk-continuation-progress-label {color: #b35900; font-weight: 600;}</style>")
_SLIDER = dict(continuous_update=False, style={"description_width": "initial"})


def png_data_url(png: bytes) -> bytes:
    """``data:image/png;base64,...`` for an ``Image(format="url")``: the same PNG gives the same ``src``."""
    return b"data:image/png;base64," + base64.b64encode(png)


def _message(text: str, *, error: bool) -> str:
    color = "#b00020" if error else "#555"
    return f'<span style="color:{color}">{html.escape(text)}</span>' if text else ""


def _set_range(slider, lo, hi):
    """``slider.min, slider.max = lo, hi`` in an order the slider accepts (never min > max)."""
    if lo > slider.max:
        slider.max, slider.min = hi, lo
    else:
        slider.min, slider.max = lo, hi


def _k_slider_value(steps, k):
    """The slider step shown for an exact k: the largest step not above it."""
    return steps[max(0, bisect.bisect_right(steps, k) - 1)]


class ExplorerPanel:
    """The explorer's widgets over an :class:`ExplorerSession`; ``widget`` is what to display.

    ``model`` / ``text``: the first choice; ``layer``, ``head``, ``k``: the first view.
    ``pngs``: how many rendered views to keep (~0.2 MB each). ``timings`` records the
    seconds of every redraw (from a control's change to the image's new value).
    """

    def __init__(self, session: ExplorerSession, *, model, text, layer: int = 0, head: int = 0, k: int = 16,
                 custom_text: str = "", pngs: int = 64):
        self.session = session
        self._pngs: collections.OrderedDict = collections.OrderedDict()  # view key -> PNG data URL
        self._png_entries = positive_int(pngs, "pngs")
        self._figures: collections.OrderedDict = collections.OrderedDict()  # (model, text, rows) -> ExplorerFigure
        self._quiet = 0  # > 0 while the panel itself sets controls: their observers do nothing
        self.timings: list[float] = []
        n = session.max_tokens
        self.model_w = widgets.Dropdown(options=list(session.models), value=model, description="model")
        self.text_w = widgets.Dropdown(options=list(session.texts) + [CUSTOM_TEXT], value=text, description="text",
                                       layout=widgets.Layout(width="420px"))
        self.custom_w = widgets.Textarea(value=custom_text, continuous_update=False,
                                         placeholder="Your own text (used when 'text' is set to your own)",
                                         layout=widgets.Layout(width="640px", height="70px"))
        self.layer_w = widgets.IntSlider(value=layer, min=0, max=max(layer, 0), description="layer", **_SLIDER)
        self.head_w = widgets.IntSlider(value=head, min=0, max=max(head, 0), description="head", **_SLIDER)
        steps = log_k_steps(n)
        self.k = min(positive_int(k, "k"), n)  # the exact k shown
        self.k_w = widgets.SelectionSlider(options=steps, value=_k_slider_value(steps, self.k), description="k",
                                           **_SLIDER)
        self.k_text = widgets.BoundedIntText(value=self.k, min=1, max=n, description="exact k",
                                             layout=widgets.Layout(width="150px"), style={"description_width": "initial"})
        self.rows_w = widgets.IntRangeSlider(value=(0, n - 1), min=0, max=n - 1, description="rows shown",
                                             layout=widgets.Layout(width="500px"), **_SLIDER)
        self.busy = widgets.HTML("")
        self.message = widgets.HTML("")
        self.image = widgets.Image(format="url", value=b"")
        for w, name in [(self.model_w, "model"), (self.text_w, "text-choice"), (self.custom_w, "text"),
                        (self.layer_w, "layer"), (self.head_w, "head"), (self.k_w, "k"), (self.k_text, "k-text"),
                        (self.rows_w, "rows"), (self.busy, "busy"), (self.message, "message"), (self.image, "figure")]:
            w.add_class(f"topk-explorer-{name}")
        self.widget = widgets.VBox([widgets.HTML(_CSS), widgets.HBox([self.model_w, self.text_w]), self.custom_w,
                                    widgets.HBox([self.layer_w, self.head_w, self.k_w, self.k_text]), self.rows_w,
                                    self.busy, self.message, self.image])
        for w in (self.model_w, self.text_w, self.custom_w):
            w.observe(self._source_changed, names="value")
        for w in (self.layer_w, self.head_w, self.rows_w):
            w.observe(self._view_changed, names="value")
        self.k_w.observe(self._k_from_slider, names="value")
        self.k_text.observe(self._k_from_text, names="value")
        self._first = (layer, head)
        self._source_changed()

    # ------------------------------------------------------------------ observers

    def _source_changed(self, change=None):
        if self._quiet:
            return
        start = time.perf_counter()
        model, text, custom = self.model_w.value, self.text_w.value, self.custom_w.value
        ready = self.session.is_ready(model, text, custom)
        if not ready:
            load = "" if self.session.is_loaded(model) else f"Loading {model}, then c"
            self.busy.value = html.escape(f"⏳ {load or 'C'}omputing the scores of {self.session.title(model, text)}: "
                                          f"one forward pass over up to {self.session.max_tokens} tokens, then the "
                                          "sliders only re-threshold…")
            self.image.add_class(STALE_CLASS)
        try:
            ex = self.session.explorer(model, text, custom)
        except InputError as err:
            self._fail(err)
            return
        except Exception as err:  # e.g. a model whose package is missing: the message names the fix
            self._fail(f"Could not compute the scores ({type(err).__name__}: {err}); details in the log console.")
            raise
        finally:
            self.busy.value = ""
        self._sync_ranges(ex)
        if self._draw(start) and not ready:
            self.message.value = _message(f"Scores of {model} on {ex.length} tokens ({ex.n_layers} layers × "
                                          f"{ex.n_heads} heads) computed in {self.session.last_build_s:.1f} s.",
                                          error=False)

    def _view_changed(self, change=None):
        if not self._quiet:
            self._draw(time.perf_counter())

    def _k_from_slider(self, change):
        if self._quiet:
            return
        start = time.perf_counter()
        self.k = change["new"]
        with self._setting():
            self.k_text.value = self.k
        self._draw(start)

    def _k_from_text(self, change):
        if self._quiet:
            return
        start = time.perf_counter()
        self.k = change["new"]
        with self._setting():
            self.k_w.value = _k_slider_value(list(self.k_w.options), self.k)
        self._draw(start)

    # ------------------------------------------------------------------ drawing

    @contextlib.contextmanager
    def _setting(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _sync_ranges(self, ex):
        """Make the sliders' ranges follow the explorer (its layers, heads and length)."""
        with self._setting():
            layer, head = self._first or (self.layer_w.value, self.head_w.value)
            self._first = None
            _set_range(self.layer_w, ex.layers[0], ex.layers[-1])
            self.layer_w.value = min(max(layer, ex.layers[0]), ex.layers[-1])
            self.head_w.max = ex.n_heads - 1
            self.head_w.value = min(head, ex.n_heads - 1)
            steps = log_k_steps(ex.length)
            if list(self.k_w.options) != steps:
                self.k_w.options = steps
            self.k = min(self.k, ex.length)
            self.k_w.value = _k_slider_value(steps, self.k)
            self.k_text.max = ex.length
            self.k_text.value = self.k
            whole = self.rows_w.value[1] >= self.rows_w.max  # showed every row: keep showing every row
            self.rows_w.max = ex.length - 1
            if whole:
                self.rows_w.value = (self.rows_w.value[0], ex.length - 1)

    def _fail(self, err):
        self.message.value = _message(str(err), error=True)
        self.image.add_class(STALE_CLASS)

    def view_key(self):
        """What the shown image depends on: (model, text, layer, head, k, rows)."""
        model, text = self.model_w.value, self.text_w.value
        body = self.session.text(text, self.custom_w.value)
        return (model, text, body, self.layer_w.value, self.head_w.value, self.k, tuple(self.rows_w.value))

    def _draw(self, start) -> bool:
        """Show the view the controls select; False (and a message) when the input cannot be shown."""
        try:
            key = self.view_key()
            ex = self.session.explorer(key[0], key[1], self.custom_w.value)
            self._render(key, ex)
        except InputError as err:
            self._fail(err)
            return False
        except Exception as err:  # a bug, not the user's input: say so here, the traceback goes to the log
            self._fail(f"Could not draw this view ({type(err).__name__}: {err}); details in the log console.")
            raise
        self.image.value = self._pngs[key]
        self.image.remove_class(STALE_CLASS)
        self.message.value = ""
        self.timings.append(time.perf_counter() - start)
        return True

    def _render(self, key, ex):
        from topk_lib.plots.explorer import ExplorerFigure

        model, text, body, layer, head, k, rows = key
        if key in self._pngs:
            self._pngs.move_to_end(key)
        else:
            layer, head = min(max(layer, ex.layers[0]), ex.layers[-1]), min(head, ex.n_heads - 1)
            first = min(rows[0], ex.length - 1)
            shown = (first, max(first + 1, min(rows[1] + 1, ex.length)))
            view = ex.view(layer=layer, head=head, k=k)
            where = (model, body, shown)
            title = self.session.title(model, text)
            if where in self._figures:
                figure = self._figures[where]
                self._figures.move_to_end(where)
                figure.update(view, title=title)
            else:
                figure = self._figures[where] = ExplorerFigure(view, tokens=ex.tokens, rows=shown, title=title)
                while len(self._figures) > 3:
                    self._figures.popitem(last=False)
            self._pngs[key] = png_data_url(figure.png())
            while len(self._pngs) > self._png_entries:
                self._pngs.popitem(last=False)


class ContinuationPanel:
    """Greedy continuation of a prompt with exact and with top-k attention, with progress.

    ``model``: a session model label that can generate; ``prompt``, ``k``, ``max_new_tokens``,
    ``chat``: the first values. Each continuation is generated once per (prompt, length, chat,
    attention) and kept (:class:`~topk_lib.app.continuations.ContinuationCache`).
    """

    def __init__(self, session: ExplorerSession, *, model, prompt: str, k: int = 16, max_new_tokens: int = 40,
                 chat: bool = False, max_k: int = 256):
        self.session, self.model = session, model
        steps = sorted(set(log_k_steps(positive_int(max_k, "max_k")) + [positive_int(k, "k")]))  # k exactly
        self.prompt_w = widgets.Textarea(value=prompt, continuous_update=False,
                                         layout=widgets.Layout(width="640px", height="80px"))
        self.k_w = widgets.SelectionSlider(options=steps, value=_k_slider_value(steps, k), description="k", **_SLIDER)
        self.new_w = widgets.IntSlider(value=max_new_tokens, min=1, max=128, description="new tokens", **_SLIDER)
        self.chat_w = widgets.Checkbox(value=chat, description="chat")
        self.progress = widgets.IntProgress(value=0, min=0, max=max_new_tokens, description="generating",
                                            style={"description_width": "initial"})
        self.progress_label = widgets.HTML("")
        self.message = widgets.HTML("")
        self.output = widgets.HTML("")
        for w, name in [(self.prompt_w, "prompt"), (self.k_w, "k"), (self.progress, "progress"),
                        (self.progress_label, "progress-label"), (self.message, "message"), (self.output, "output")]:
            w.add_class(f"topk-continuation-{name}")
        self.widget = widgets.VBox([self.prompt_w, widgets.HBox([self.k_w, self.new_w, self.chat_w]),
                                    widgets.HBox([self.progress, self.progress_label]), self.message, self.output])
        for w in (self.prompt_w, self.k_w, self.new_w, self.chat_w):
            w.observe(self.run, names="value")
        self.run()

    def _report(self, what, done, total):
        self.progress.max, self.progress.value = total, done
        self.progress_label.value = html.escape(f"{what}: {done} / {total} tokens")

    def run(self, change=None):
        """Generate (or take from the cache) both continuations and show them."""
        self.output.add_class(STALE_CLASS)
        try:
            result = self.session.continuations(model=self.model, prompt=self.prompt_w.value, k=self.k_w.value,
                                                max_new_tokens=self.new_w.value, chat=self.chat_w.value,
                                                progress=self._report)
        except InputError as err:
            self.message.value = _message(str(err), error=True)
            return None
        except Exception as err:  # a bug, not the user's input: say so here, the traceback goes to the log
            self.message.value = _message(f"Could not generate ({type(err).__name__}: {err}); details in the log "
                                          "console.", error=True)
            raise
        self.progress.max = self.progress.value = self.new_w.value  # also when the cache answered
        self.progress_label.value = ""
        self.message.value = ""
        tokenizer = self.session.model(self.model)[1]
        self.output.value = continuations_html(result, tokenizer, prompt=self.prompt_w.value)
        self.output.remove_class(STALE_CLASS)
        return result
