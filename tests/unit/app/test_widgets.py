"""The widgets' session (topk_lib.app.session) and panels (topk_lib.app.widgets): explorers kept by bytes, slider
events redraw in place (same bytes when going back), log k steps linked to the exact-k box, a busy line and a stale
figure while scores are computed, friendly messages for bad input, continuations cached, latency per move."""

import base64
import statistics

import matplotlib
import numpy as np
import pytest
import torch

from topk_lib.app import session as session_mod
from topk_lib.app.explorer import AttentionExplorer
from topk_lib.app.session import CUSTOM_TEXT, ExplorerSession, InputError
from topk_lib.app.widgets import STALE_CLASS, ContinuationPanel, ExplorerPanel


class NoSpecials:
    """A decoder-style tokenizer (no [CLS]/[SEP] added): one word can give one token."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, **kw):
        return self.tok(text, add_special_tokens=False, **kw)

    def decode(self, ids):
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def loaded(llama, bert, tok):
    return {"llama": (llama, NoSpecials(tok)), "bert": (bert, tok), "llama-bert-tok": (llama, tok)}


def _session(loaded, text, **kw):
    return ExplorerSession(models={"Llama": "llama", "BERT": "bert", "Llama2": "llama-bert-tok"},
                           texts={"cats": text, "short": text[:60]}, max_tokens=kw.pop("max_tokens", 24),
                           loader=loaded.__getitem__, **kw)


def _png(panel):
    url = bytes(panel.image.value)
    assert url.startswith(b"data:image/png;base64,")
    return base64.b64decode(url.split(b",", 1)[1])


def _no_traceback(panel):
    return "Traceback" not in panel.message.value and "Error" not in panel.message.value


# --------------------------------------------------------------------------- session


def test_session_keeps_explorers_within_a_byte_budget(loaded, text):
    probe = _session(loaded, text)
    one = probe.explorer("Llama", "cats").nbytes
    session = _session(loaded, text, cache_bytes=int(2.5 * one))
    a = session.explorer("Llama", "cats")
    b = session.explorer("Llama2", "cats")
    for _ in range(3):  # back and forth: both fit, nothing is recomputed
        assert session.explorer("Llama", "cats") is a and session.explorer("Llama2", "cats") is b
    assert session.built == 2 and session.cached_bytes == a.nbytes + b.nbytes
    session.explorer("Llama", "short")  # a third one: the least recently used (a) goes
    assert session.built == 3 and session.cached_bytes <= 2.5 * one
    assert session.explorer("Llama2", "cats") is b
    assert session.explorer("Llama", "cats") is not a and session.built == 4
    tiny = _session(loaded, text, cache_bytes=1)  # the most recent one always stays
    assert tiny.explorer("Llama", "cats") is tiny.explorer("Llama", "cats") and tiny.built == 1
    with pytest.raises(ValueError, match="cache_bytes"):
        _session(loaded, text, cache_bytes=0)


def test_default_budget_is_documented():
    assert session_mod.CACHE_BYTES == 400 * 2**20
    assert "cache_bytes" in ExplorerSession.__doc__


@pytest.mark.parametrize("custom, message", [
    ("", "Your own text is empty"),
    ("   \n ", "Your own text is empty"),
    ("whale", "Your text gives 1 token for Llama"),
    ("\x00\x01\x02", "Your text gives 0 tokens for Llama"),
])
def test_session_says_what_is_wrong_with_a_text(loaded, text, custom, message):
    session = _session(loaded, text)
    with pytest.raises(InputError, match=message):
        session.explorer("Llama", CUSTOM_TEXT, custom)
    assert session.is_ready("Llama", CUSTOM_TEXT, "") and not session.is_ready("Llama", "cats")


def test_session_continuations_messages(loaded, text):
    session = _session(loaded, text)
    with pytest.raises(InputError, match="prompt is empty"):
        session.continuations(model="Llama2", prompt=" ", k=2, max_new_tokens=2)
    with pytest.raises(InputError, match="encoder"):
        session.continuations(model="BERT", prompt="the cat", k=2, max_new_tokens=2)


def test_sample_texts_always_have_pydoc():
    texts = session_mod.sample_texts(chars=500)
    assert any("pydoc" in name for name in texts)
    assert all(0 < len(t) <= 500 for t in texts.values())


# --------------------------------------------------------------------------- explorer panel


def test_panel_has_the_stable_css_classes(loaded, text):
    panel = ExplorerPanel(_session(loaded, text), model="Llama", text="cats", layer=1, head=3, k=4)
    for widget, name in [(panel.image, "figure"), (panel.k_w, "k"), (panel.k_text, "k-text"),
                         (panel.layer_w, "layer"), (panel.custom_w, "text"), (panel.message, "message"),
                         (panel.busy, "busy"), (panel.head_w, "head")]:
        assert f"topk-explorer-{name}" in widget._dom_classes
    assert panel.image.format == "url" and _png(panel).startswith(b"\x89PNG")
    assert (panel.layer_w.value, panel.head_w.value, panel.k, panel.k_text.value) == (1, 3, 4, 4)
    assert (panel.layer_w.max, panel.head_w.max, panel.k_text.max) == (1, 3, 24)
    assert list(panel.k_w.options) == [1, 2, 3, 4, 6, 8, 12, 16, 24]


def test_slider_moves_redraw_in_place_and_going_back_gives_the_same_bytes(loaded, text):
    panel = ExplorerPanel(_session(loaded, text), model="Llama", text="cats", layer=0, head=1, k=4)
    figure = next(iter(panel._figures.values()))
    start = _png(panel)
    panel.k_w.value = 8
    assert panel.k_text.value == 8 and panel.k == 8
    at_8 = _png(panel)
    assert at_8 != start and "k = 8 ·" in figure.suptitle.get_text()
    panel.layer_w.value = 1
    at_layer_1 = _png(panel)
    assert at_layer_1 != at_8 and figure.map_axes.get_title() == "layer 1, head 1: top-8 per row"
    panel.layer_w.value = 0
    assert _png(panel) == at_8
    panel._pngs.clear()  # rendered again rather than taken from the kept PNGs: still the same bytes
    panel.k_w.value = 4
    assert _png(panel) == start
    panel.layer_w.value = 1
    panel.k_w.value = 8
    assert _png(panel) == at_layer_1
    assert list(panel._figures.values()) == [figure] and figure.draws == 1  # one figure, one background
    panel.rows_w.value = (2, 9)  # a zoom is another layout: a figure of its own
    assert len(panel._figures) == 2 and _png(panel) != at_layer_1
    matplotlib.pyplot.close("all")


def test_exact_k_box_and_log_slider_agree(loaded, text):
    panel = ExplorerPanel(_session(loaded, text), model="Llama", text="cats", layer=0, head=0, k=16)
    ex = panel.session.explorer("Llama", "cats")
    figure = next(iter(panel._figures.values()))
    panel.k_text.value = 5  # between the steps 4 and 6
    assert panel.k == 5 and panel.k_w.value == 4  # the slider sits on the step below
    assert f"top-5 per row" in figure.map_axes.get_title()
    p = ex.probs(0)[0].numpy()
    top5 = np.sort(np.tril(p), axis=-1)[:, ::-1][:, :5].sum(-1).mean()  # dense: the 5 largest per row
    assert f"head mass kept {top5:.1%}" in figure.suptitle.get_text()
    at_5 = _png(panel)
    panel.k_w.value = 6
    assert panel.k == 6 and panel.k_text.value == 6 and _png(panel) != at_5
    panel.k_text.value = 5
    assert _png(panel) == at_5
    panel.k_text.value = 1000  # the box is bounded by the text's length
    assert panel.k_text.value == 24 and panel.k == 24 and panel.k_w.value == 24
    matplotlib.pyplot.close("all")


def test_busy_line_and_stale_figure_while_scores_are_computed(loaded, text, monkeypatch):
    panel = ExplorerPanel(_session(loaded, text), model="Llama", text="cats", layer=0, head=0, k=4)
    seen = []

    class Recording(AttentionExplorer):
        def __init__(self, *args, **kw):
            seen.append((panel.busy.value, STALE_CLASS in panel.image._dom_classes))
            super().__init__(*args, **kw)

    monkeypatch.setattr(session_mod, "AttentionExplorer", Recording)
    before = _png(panel)
    panel.text_w.value = "short"
    assert len(seen) == 1 and "⏳ Computing the scores of Llama on short" in seen[0][0] and seen[0][1]
    assert panel.busy.value == "" and STALE_CLASS not in panel.image._dom_classes
    assert "computed in" in panel.message.value and _png(panel) != before
    short = panel.session.explorer("Llama", "short").length
    assert panel.k_text.max == short and panel.rows_w.value == (0, short - 1)
    assert panel.k_w.options[-1] == short
    panel.text_w.value = "cats"  # kept: no busy line, no recomputation
    assert len(seen) == 1 and _png(panel) == before
    panel.model_w.value = "BERT"  # 2 layers x 4 heads too; bidirectional
    assert len(seen) == 2 and "Loading BERT, then computing the scores of BERT on cats" in seen[1][0]
    assert panel.layer_w.max == 1 and not panel.session.is_loaded("Llama2")
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize("custom, message", [
    ("", "Your own text is empty"),
    ("whale", "gives 1 token"),
    ("\x00\x01", "gives 0 tokens"),
])
def test_bad_own_text_gives_a_message_not_a_traceback(loaded, text, custom, message):
    panel = ExplorerPanel(_session(loaded, text), model="Llama", text="cats", layer=0, head=0, k=4)
    before = panel.image.value
    panel.custom_w.value = custom
    panel.text_w.value = CUSTOM_TEXT
    assert message in panel.message.value and _no_traceback(panel)
    assert STALE_CLASS in panel.image._dom_classes and panel.image.value == before
    panel.k_w.value = 8  # moving a slider meanwhile repeats the message
    assert message in panel.message.value and panel.image.value == before
    panel.custom_w.value = "🙂 a whale of a text, long enough"  # garbage-ish but explorable
    assert panel.message.value.find("computed in") > 0 and STALE_CLASS not in panel.image._dom_classes
    assert panel.image.value != before
    matplotlib.pyplot.close("all")


def test_latency_per_simulated_slider_move_at_512_tokens(make_llama, tok, text):
    """Moves of k, layer and head on SmolLM2's attention geometry (9 / 3 heads, d = 64) at 512 tokens.

    Each move is timed from the control's new value to the Image's new value (view, in-place
    update, PNG, data URL); only new views count (the kept PNGs would answer in microseconds).
    The bound is generous because the CPU is shared; the measured numbers are in the README.
    """
    torch.set_num_threads(2)
    model = make_llama(layers=3, hidden=576, heads=9, kv_heads=3, head_dim=64, d_ff=64)
    session = ExplorerSession(models={"big": "big"}, texts={"long": text * 4}, max_tokens=512,
                              loader={"big": (model, tok)}.__getitem__)
    panel = ExplorerPanel(session, model="big", text="long", layer=1, head=4, k=16)
    assert session.explorer("big", "long").length == 512
    panel.timings.clear()
    for step in [1, 2, 3, 4, 6, 8, 12]:
        panel.k_w.value = step
    for layer in [0, 2]:
        panel.layer_w.value = layer
    for head in [0, 8]:
        panel.head_w.value = head
    assert len(panel.timings) == 11 and len(set(panel._pngs.values())) == 12
    assert statistics.median(panel.timings) < 1.0, panel.timings
    assert max(panel.timings) < 2.0, panel.timings
    matplotlib.pyplot.close("all")


# --------------------------------------------------------------------------- continuation panel


def test_continuation_panel_generates_once_and_shows_progress(loaded, text):
    session = _session(loaded, text)
    panel = ContinuationPanel(session, model="Llama2", prompt="the whale sat on the old mat", k=2, max_new_tokens=6)
    assert "topk-continuation-progress" in panel.progress._dom_classes
    assert session.generated("Llama2") == 2 and (panel.progress.value, panel.progress.max) == (6, 6)
    assert "top-2" in panel.output.value and panel.message.value == ""
    first = panel.output.value
    panel.k_w.value = 3
    assert session.generated("Llama2") == 3  # only top-3: the exact continuation was kept
    panel.k_w.value = 2
    assert session.generated("Llama2") == 3 and panel.output.value == first
    panel.new_w.value = 4  # shorter: a prefix of what was generated
    assert session.generated("Llama2") == 3
    panel.prompt_w.value = "  "
    assert "prompt is empty" in panel.message.value and STALE_CLASS in panel.output._dom_classes
    assert "Traceback" not in panel.message.value
    encoder = ContinuationPanel(session, model="BERT", prompt="the cat", k=2, max_new_tokens=2)
    assert "cannot generate" in encoder.message.value
