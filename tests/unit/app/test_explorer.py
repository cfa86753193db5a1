"""The k explorer (topk_lib.app.explorer and .session, plot_explorer): views against eager attention and metrics.py,
slider latency, continuations under decode-time top-k, the widget session."""


import matplotlib
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from topk_lib.app import explorer as ex_mod
from topk_lib.app import session as session_mod
from topk_lib.hf import loading as models
from topk_lib.app.explorer import (
    AttentionExplorer,
    Continuations,
    compare_continuations,
    continuations_html,
    continuations_text,
    first_divergence,
    measure_latency,
)
from topk_lib.app.session import CUSTOM_TEXT, ExplorerSession
from topk_lib.analysis.metrics import mass_kept, relative_error, topk_probs
from topk_lib.hf.patching import use_topk
from topk_lib.plots.explorer import plot_explorer_view

TEXT = " ".join(f"the {w} sat on the {v} mat number {i}." for i, (w, v) in
                enumerate(zip(["cat", "dog", "whale", "ship"] * 40, ["red", "old", "wet", "big", "new"] * 32)))


def _sharpen(model, factor):
    # Random weights give near-uniform attention; trained heads are peaky.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "query.weight")):
                param.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(models._package_file("minilm-l6"))  # a real offline tokenizer


def tiny_llama(tok, *, layers=2, hidden=32, heads=4, kv_heads=2, head_dim=None, d_ff=64):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads, vocab_size=tok.vocab_size,
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=102, bos_token_id=101,
                      attn_implementation="eager")
    return _sharpen(LlamaForCausalLM(cfg).eval(), 6.0)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def bert(tok):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=tok.vocab_size, max_position_embeddings=256, attn_implementation="eager")
    return _sharpen(BertModel(cfg).eval(), 6.0)


@pytest.fixture(scope="module")
def llama_ex(llama, tok):
    return AttentionExplorer(llama, tok, TEXT, max_tokens=40)


@pytest.fixture(scope="module")
def bert_ex(bert, tok):
    return AttentionExplorer(bert, tok, TEXT, max_tokens=30)


# --------------------------------------------------------------------------- views


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_probs_match_eager_attention(which, llama, bert, llama_ex, bert_ex):
    model, ex = (llama, llama_ex) if which == "llama" else (bert, bert_ex)
    with torch.no_grad():
        eager = model(ex.input_ids, output_attentions=True).attentions  # per layer [1, H, L, L]
    assert ex.causal is (which == "llama")
    assert ex.n_layers == 2 and ex.n_heads == 4
    for layer in ex.layers:
        torch.testing.assert_close(ex.probs(layer), eager[layer][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 8, 40, 1000])
@pytest.mark.parametrize("which", ["llama", "bert"])
def test_view_agrees_with_metrics(which, k, llama_ex, bert_ex):
    ex = llama_ex if which == "llama" else bert_ex
    n = ex.length
    for layer in ex.layers:
        for head in range(ex.n_heads):
            view = ex.view(layer=layer, head=head, k=k)
            p = ex.probs(layer)[head]  # [L, L]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if ex.causal:
                allowed = allowed.tril()
            assert not (view.kept & ~allowed).any()  # never a masked (future) key
            assert torch.equal(view.kept.sum(-1), allowed.sum(-1).clamp(max=k))
            torch.testing.assert_close(view.row_mass, mass_kept(p, k), atol=1e-5, rtol=0)
            assert view.mass_kept == pytest.approx(mass_kept(p, k).mean().item(), abs=1e-5)
            # the kernel's o_k equals the renormalised top-k distribution times V
            group = ex.n_heads // ex._k[layer].shape[0]
            v = ex._v[layer][head // group]  # [L, dv]
            expected = relative_error(topk_probs(p, k) @ v, p @ v, dim=(-2, -1)).item()
            assert view.relative_error == pytest.approx(expected, abs=1e-4)
            assert view.effective_k == min(k, n)
        profile = torch.stack([mass_kept(ex.probs(layer), k).mean(-1) for layer in ex.layers])  # [layers, H]
        torch.testing.assert_close(view.head_profile, profile, atol=1e-5, rtol=0)
        torch.testing.assert_close(ex.profile(k=k), profile.mean(-1), atol=1e-5, rtol=0)


def test_k_at_least_length_is_exact(llama_ex):
    view = llama_ex.view(layer=1, head=2, k=llama_ex.length)
    assert view.mass_kept == pytest.approx(1.0, abs=1e-6)
    assert view.relative_error < 1e-5
    assert torch.allclose(view.profile, torch.ones(llama_ex.n_layers))


def test_error_shrinks_with_k(llama_ex):
    errors = [llama_ex.view(layer=0, head=1, k=k).relative_error for k in (1, 4, 16, llama_ex.length)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.01


def test_probs_cache_is_bounded(llama, tok):
    ex = AttentionExplorer(llama, tok, TEXT, max_tokens=16, cache_layers=1)
    first = ex.probs(0)
    assert ex.probs(0) is first  # cached
    ex.probs(1)
    assert list(ex._probs) == [1]
    torch.testing.assert_close(ex.probs(0), first)  # recomputed, same values


def test_bad_arguments_name_themselves(llama, tok, llama_ex):
    with pytest.raises(ValueError, match="layer"):
        llama_ex.view(layer=2, head=0, k=1)
    with pytest.raises(ValueError, match="head"):
        llama_ex.view(layer=0, head=4, k=1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        llama_ex.view(layer=0, head=0, k=0)
    with pytest.raises(ValueError, match="text"):
        AttentionExplorer(llama, tok, "   ")
    with pytest.raises(ValueError, match="max_tokens"):
        AttentionExplorer(llama, tok, TEXT, max_tokens=0)


def test_text_is_cut_to_max_tokens(llama, tok):
    ex = AttentionExplorer(llama, tok, TEXT, max_tokens=17)
    assert ex.length == 17 and len(ex.tokens) == 17 and ex.input_ids.shape == (1, 17)


# --------------------------------------------------------------------------- figure


def test_figure_draws_full_and_zoomed(llama_ex):
    view = llama_ex.view(layer=1, head=0, k=4)
    fig = plot_explorer_view(view, tokens=llama_ex.tokens, title="tiny")
    assert isinstance(fig, matplotlib.figure.Figure)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == llama_ex.tokens  # 40 tokens: labelled
    zoom = plot_explorer_view(view, tokens=llama_ex.tokens, rows=(10, 20))
    assert zoom.axes[0].get_ylim() == (19.5, 9.5)
    assert zoom.axes[0].get_xlim() == (-0.5, 19.5)  # causal: keys up to the last row shown
    with pytest.raises(ValueError, match="rows"):
        plot_explorer_view(view, rows=(5, 5))
    with pytest.raises(ValueError, match="tokens"):
        plot_explorer_view(view, tokens=["a"])
    matplotlib.pyplot.close("all")


# --------------------------------------------------------------------------- latency


def test_slider_update_is_fast_at_512_tokens(tok):
    """SmolLM2's attention geometry (9 query / 3 KV heads, d = 64) at 512 tokens, 3 layers.

    A slider move costs one view (plus one layer's probabilities on a layer change); the
    bound is generous because the CPU is shared. The figure redraw is bounded separately.
    """
    torch.set_num_threads(2)
    model = tiny_llama(tok, layers=3, hidden=576, heads=9, kv_heads=3, head_dim=64, d_ff=64)
    ex = AttentionExplorer(model, tok, TEXT * 4, max_tokens=512)
    assert ex.length == 512
    times = measure_latency(ex, repeats=3, draw=True)
    assert times["view_same_layer_s"] < 0.5, times
    assert times["view_new_layer_s"] < 0.5, times
    assert times["view_new_layer_s"] + times["draw_s"] < 3.0, times
    matplotlib.pyplot.close("all")


# --------------------------------------------------------------------------- continuations


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 5, 3], 1),
    ([4], [5], 0),
    ([1, 2], [1, 2, 3], 2),  # one stopped early
    ([], [], None),
])
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


def test_continuations_large_k_are_identical(llama, tok):
    result = compare_continuations(llama, tok, "the cat sat on the mat", k=1000, max_new_tokens=6)
    assert result.diverge is None and result.vanilla == result.topk and len(result.vanilla) == 6
    assert result.prompt_tokens == len(tok("the cat sat on the mat").input_ids)


def test_continuations_match_generate_under_use_topk(llama, tok):
    prompt = "the whale sat on the old mat number 3. the dog"
    result = compare_continuations(llama, tok, prompt, k=2, max_new_tokens=8)
    ids = tok(prompt, return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        vanilla = llama.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        with use_topk(llama, attn_k=2):
            approx = llama.generate(ids, **kw)[0, ids.shape[1]:].tolist()
    assert result.vanilla == vanilla and result.topk == approx
    assert result.diverge == first_divergence(vanilla, approx)


def test_continuations_reject_encoders_and_bad_k(bert, llama, tok):
    with pytest.raises(ValueError, match="model"):
        compare_continuations(bert, tok, "hello there", k=4)
    with pytest.raises(ValueError, match="k must be"):
        compare_continuations(llama, tok, "hello there", k=0)
    with pytest.raises(ValueError, match="prompt"):
        compare_continuations(llama, tok, "  ", k=4)


def test_continuations_html_marks_divergence(tok):
    same = tok("the cat sat", add_special_tokens=False).input_ids
    result = Continuations(k=4, prompt_tokens=3, vanilla=same + tok(" on <b>", add_special_tokens=False).input_ids,
                           topk=same + tok(" under", add_special_tokens=False).input_ids, diverge=len(same))
    page = continuations_html(result, tok, prompt="a <prompt>")
    assert "top-4" in page and f"token {len(same)}" in page
    assert "<b>" not in page.split("</b>", 1)[1] and "&lt;prompt&gt;" in page  # escaped
    assert page.count("border-left") == 2
    assert "⟦" in continuations_text(result, tok)


# --------------------------------------------------------------------------- session and widgets


def _session(llama, bert, tok, **kw):
    loaded = {"llama": (llama, tok), "bert": (bert, tok)}
    return ExplorerSession(models={"Llama": "llama", "BERT": "bert"}, texts={"cats": TEXT, "short": TEXT[:60]},
                           max_tokens=24, loader=loaded.__getitem__, progress=False, **kw)


def test_session_caches_explorers(llama, bert, tok):
    session = _session(llama, bert, tok, keep=2)
    a = session.explorer("Llama", "cats")
    assert session.explorer("Llama", "cats") is a
    session.explorer("BERT", "cats")
    session.explorer("BERT", "short")
    assert session.explorer("Llama", "cats") is not a  # dropped as least recently used
    assert session.explorer("Llama", CUSTOM_TEXT, "a text of my own").length > 3
    with pytest.raises(ValueError, match="custom_text"):
        session.explorer("Llama", CUSTOM_TEXT, " ")
    with pytest.raises(ValueError, match="model must be one of"):
        session.explorer("GPT", "cats")


def test_session_widgets_follow_the_model(llama, bert, tok, capsys):
    import ipywidgets as widgets

    session = _session(llama, bert, tok)
    model = widgets.Dropdown(options=["Llama", "BERT"], value="Llama")
    text = widgets.Dropdown(options=["cats", "short", CUSTOM_TEXT], value="cats")
    custom = widgets.Textarea(value="")
    layer, head = widgets.IntSlider(value=1, max=1), widgets.IntSlider(value=3, max=3)
    k = widgets.IntSlider(value=8, min=1, max=512)
    rows = widgets.IntRangeSlider(value=(0, 511), max=511)
    session.follow(model=model, text=text, custom_text=custom, layer=layer, head=head, k=k, rows=rows)
    assert (layer.max, head.max, k.max, rows.value) == (1, 3, 24, (0, 23))
    calls = []
    out = widgets.interactive_output(lambda **kw: calls.append(kw), dict(model=model, text=text, custom_text=custom,
                                                                       layer=layer, head=head, k=k, rows=rows))
    assert calls and out is not None  # the default call happens at creation
    text.value = "short"
    short = session.explorer("Llama", "short").length
    assert k.max == short and rows.value == (0, short - 1)
    session.show(model="Llama", text="cats", layer=1, head=3, k=4, rows=(2, 9))
    session.show(model="BERT", text="cats", layer=9, head=9, k=99)  # clamped, no error
    session.show(model="Llama", text=CUSTOM_TEXT, custom_text="", layer=0, head=0, k=1)
    assert "Type a text" in capsys.readouterr().out
    matplotlib.pyplot.close("all")


def test_sample_texts_always_have_pydoc():
    texts = session_mod.sample_texts(chars=500)
    assert any("pydoc" in name for name in texts)
    assert all(0 < len(t) <= 500 for t in texts.values())


def test_kept_mask_keeps_k_allowed_keys_per_row():
    probs = torch.softmax(torch.randn(2, 6, 6), dim=-1).tril()  # [H, L, L], causal rows
    kept = ex_mod.kept_mask(probs, 3, causal=True)
    assert kept.shape == probs.shape and not kept.triu(1).any()  # never a future key
    assert kept.sum(-1).tolist() == [[1, 2, 3, 3, 3, 3]] * 2  # min(k, allowed keys) per row
    top = probs.topk(3, dim=-1).values[..., -1:]  # [H, L, 1] third-largest per row
    assert (probs[kept] > 0).all() and ((probs >= top) & (probs > 0) == kept).all()
    assert ex_mod.kept_mask(probs, 99, causal=False).all()


def test_a_text_that_is_not_a_string_is_a_type_error(llama, tok):
    with pytest.raises(TypeError, match="text must be a non-empty string"):
        AttentionExplorer(llama, tok, 42)
