"""The explorer on the real SmolLM2 answers a slider move in under a second (slow)."""

import time

import matplotlib
import pytest

from topk_lib.app.explorer import AttentionExplorer


@pytest.mark.slow
def test_slider_update_on_smollm2_is_under_a_second():
    from topk_lib.data.corpora import pydoc_text
    from topk_lib.hf.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    ex = AttentionExplorer(model, tokenizer, pydoc_text()[:6000], max_tokens=512)
    assert ex.length == 512 and ex.n_layers == 30 and ex.n_heads == 9
    start = time.perf_counter()
    fig = ex.figure(layer=17, head=3, k=32)
    fig.canvas.draw()
    assert time.perf_counter() - start < 1.0
    matplotlib.pyplot.close("all")
