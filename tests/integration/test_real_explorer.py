"""The explorer on the real SmolLM2 answers a widget slider move in well under a second (slow)."""

import matplotlib
import pytest
import torch

from topk_lib.app.explorer import simulate_slider_moves


@pytest.mark.slow
def test_slider_moves_on_smollm2_are_under_a_second():
    from topk_lib.app.session import ExplorerSession
    from topk_lib.app.widgets import ExplorerPanel
    from topk_lib.data.corpora import pydoc_text

    torch.set_num_threads(2)
    session = ExplorerSession(models={"SmolLM2": "smollm2-135m"}, texts={"pydoc": pydoc_text()[:6000]}, max_tokens=512)
    panel = ExplorerPanel(session, model="SmolLM2", text="pydoc", layer=17, head=3, k=32)
    ex = session.explorer("SmolLM2", "pydoc")
    assert ex.length == 512 and ex.n_layers == 30 and ex.n_heads == 9
    times = simulate_slider_moves(panel, repeats=4)
    assert all(seconds < 1.0 for seconds in times.values()), times
    matplotlib.pyplot.close("all")
