"""The k explorer (topk_lib.app.explorer) and its live figure (plots.explorer): views against eager attention and
metrics.py, the head cache, log-spaced k steps, in-place figure updates, slider latency."""

import dataclasses
import io

import matplotlib
import numpy as np
import pytest
import torch

from topk_lib.analysis.metrics import mass_kept, relative_error, topk_probs
from topk_lib.app import explorer as ex_mod
from topk_lib.app.explorer import AttentionExplorer, log_k_steps, measure_latency
from topk_lib.plots.explorer import ExplorerFigure, plot_explorer_view


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


def test_head_cache_is_bounded_and_exact(llama, tok, text):
    ex = AttentionExplorer(llama, tok, text, max_tokens=16, cache_layers=1)  # 1 layer's worth: 4 heads
    first = ex.head_probs(0, 1)
    assert ex.head_probs(0, 1) is first  # cached
    for head in range(4):
        ex.head_probs(1, head)
    assert list(ex._heads) == [(1, 0), (1, 1), (1, 2), (1, 3)]  # (0, 1) dropped as least recently used
    again = ex.head_probs(0, 1)
    assert again is not first and torch.equal(again, first)  # recomputed, the same bits
    for layer in ex.layers:  # one head alone gives the bits of the whole layer's batched product
        full = ex.probs(layer)  # [H, L, L]
        assert all(torch.equal(full[h], ex.head_probs(layer, h)) for h in range(ex.n_heads))


def test_nbytes_counts_qkv_table_and_a_full_head_cache(llama_ex):
    ex = llama_ex  # 2 layers, 4 query / 2 KV heads of 8 dims, 40 tokens
    qkv = 2 * (4 + 2 + 2) * 40 * 8 * 4
    table = 2 * 4 * 40 * 4
    heads = 4 * 4 * 40 * 40 * 4  # cache_layers (4) x heads (4) maps of [40, 40] float32
    assert ex.nbytes == qkv + table + heads + 40 * 8  # + the int64 token ids


@pytest.mark.parametrize("length, steps", [
    (1, [1]),
    (2, [1, 2]),
    (7, [1, 2, 3, 4, 6, 7]),
    (16, [1, 2, 3, 4, 6, 8, 12, 16]),
    (512, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]),
    (40, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]),
])
def test_log_k_steps(length, steps):
    assert log_k_steps(length) == steps
    with pytest.raises(ValueError, match="length"):
        log_k_steps(0)


def test_bad_arguments_name_themselves(llama, tok, llama_ex, text):
    with pytest.raises(ValueError, match="layer"):
        llama_ex.view(layer=2, head=0, k=1)
    with pytest.raises(ValueError, match="head"):
        llama_ex.view(layer=0, head=4, k=1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        llama_ex.view(layer=0, head=0, k=0)
    with pytest.raises(ValueError, match="text"):
        AttentionExplorer(llama, tok, "   ")
    with pytest.raises(ValueError, match="max_tokens"):
        AttentionExplorer(llama, tok, text, max_tokens=0)


def test_text_is_cut_to_max_tokens(llama, tok, text):
    ex = AttentionExplorer(llama, tok, text, max_tokens=17)
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


def _dense_kept(p, k, causal):
    """Reference: per row, the k largest probabilities among the keys the query may attend."""
    n = p.shape[0]
    kept = np.zeros((n, n), dtype=bool)
    for i in range(n):
        keys = np.arange(i + 1 if causal else n)
        order = keys[np.argsort(-p[i, keys], kind="stable")]
        kept[i, order[:k]] = True
    return kept


def _saved(fig):
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def test_figure_updates_in_place(llama_ex):
    ex = llama_ex
    first = ex.view(layer=0, head=1, k=3)
    live = ExplorerFigure(first, tokens=ex.tokens, title="tiny")
    fig, artists = live.figure, (live.kept, live.dropped, live.mean, live.star, live.suptitle)
    before = live.png()
    for layer, head, k in [(1, 2, 1), (0, 3, 8), (1, 0, 40)]:
        view = ex.view(layer=layer, head=head, k=k)
        live.update(view)
        assert live.figure is fig and (live.kept, live.dropped, live.mean, live.star, live.suptitle) == artists
        p = ex.probs(layer)[head].numpy()  # [L, L]
        want = _dense_kept(p, k, causal=True)
        kept, dropped = live.kept.get_array(), live.dropped.get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(kept), ~want)  # coloured: exactly the top k
        np.testing.assert_array_equal(np.ma.getmaskarray(dropped), want)  # grey: the rest
        np.testing.assert_array_equal(kept.data, p)
        mass = (p * want).sum(-1).mean()
        assert f"head mass kept {mass:.1%}" in live.suptitle.get_text() and f"k = {k}" in live.suptitle.get_text()
        assert live.map_axes.get_title() == f"layer {layer}, head {head}: top-{min(k, ex.length)} per row"
        profile = np.array([(ex.probs(l).numpy() * np.stack([_dense_kept(q, k, True) for q in ex.probs(l).numpy()]))
                            .sum(-1).mean() for l in ex.layers])
        np.testing.assert_allclose(live.mean.get_ydata(), profile, atol=1e-5)
        np.testing.assert_allclose(live.star.get_offsets(), [[layer, mass]], atol=1e-5)
        assert live.png() != before
    live.update(first)
    assert live.png() == before  # back to the first view: the identical bytes
    assert live.draws == 1  # every probability map here has a 1.0 (row 0): one background, reused
    # the same state as a figure built for that view, rendered and saved
    fresh = ExplorerFigure(first, tokens=ex.tokens, title="tiny")
    assert fresh.png() == before
    live.update(ex.view(layer=1, head=2, k=4))
    assert _saved(live.figure) != _saved(fresh.figure)
    live.update(first)
    assert _saved(live.figure) == _saved(fresh.figure)
    with pytest.raises(ValueError, match="view must come from"):
        live.update(dataclasses.replace(first, causal=False))
    matplotlib.pyplot.close("all")


def test_figure_background_follows_the_colour_range(bert_ex):
    # zoomed rows of a bidirectional head: each head has its own largest probability
    live = ExplorerFigure(bert_ex.view(layer=0, head=0, k=2), rows=(5, 9))
    one = live.png()
    live.update(bert_ex.view(layer=1, head=3, k=2))
    assert live.norm.vmax == pytest.approx(float(bert_ex.probs(1)[3, 5:9].max()))
    other = live.png()
    live.update(bert_ex.view(layer=0, head=0, k=2))
    assert live.png() == one and other != one and live.draws == 3
    assert not matplotlib.pyplot.get_fignums()  # the live figure is not a pyplot figure


# --------------------------------------------------------------------------- latency


def test_slider_update_is_fast_at_512_tokens(make_llama, tok, text):
    """SmolLM2's attention geometry (9 query / 3 KV heads, d = 64) at 512 tokens, 3 layers.

    A slider move costs one view (plus one head's probabilities on a layer change) and one
    in-place render; the bounds are generous because the CPU is shared.
    """
    torch.set_num_threads(2)
    model = make_llama(layers=3, hidden=576, heads=9, kv_heads=3, head_dim=64, d_ff=64)
    ex = AttentionExplorer(model, tok, text * 4, max_tokens=512)
    assert ex.length == 512
    times = measure_latency(ex, repeats=4, draw=True)
    assert times["view_cached_s"] < 0.5, times
    assert times["view_new_head_s"] < 0.5, times
    assert times["view_new_head_s"] + times["render_s"] < 1.0, times
    matplotlib.pyplot.close("all")


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


def test_a_sliding_window_layer_shows_only_the_keys_the_model_sees(tok):
    """Qwen2 with layer 1 in an 8-token window: the explorer's maps are the model's own attention weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.vocab_size, max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
        max_window_layers=1, attn_implementation="eager")).eval()
    ex = AttentionExplorer(model, tok, " ".join(["the whale sat on the old mat"] * 8), max_tokens=24)
    assert ex.windows == {1: 8}
    with torch.no_grad():
        weights = model(ex.input_ids, output_attentions=True).attentions  # the model's [1, H, L, L] per layer
    for layer in (0, 1):
        torch.testing.assert_close(ex.probs(layer), weights[layer][0], rtol=1e-5, atol=1e-6)
    view = ex.view(layer=1, head=0, k=16)  # k beyond the window: everything the window holds is kept
    gap = torch.arange(24)[:, None] - torch.arange(24)[None, :]
    assert torch.equal(view.kept, (gap >= 0) & (gap < 8)) and view.relative_error < 1e-5
    assert ex.view(layer=1, head=0, k=2).relative_error > 1e-3
