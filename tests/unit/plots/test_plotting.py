"""Figures are byte-identical when redrawn from the same cached results (PNG and PDF)."""

import os
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd


from topk_lib.infra import paths
from topk_lib.plots.analysis import plot_error_vs_k
from topk_lib.plots.style import save_figure
from topk_lib.infra.cache import cached_frame

CONFIG = {"what": "reproducibility test", "seed": 0}
DRAW = """
import sys
from topk_lib.plots.analysis import plot_error_vs_k
from topk_lib.plots.style import save_figure
from topk_lib.infra.cache import cached_frame
frame = cached_frame("repro", config={config!r}, compute=lambda: sys.exit("the cache should have been read"))
save_figure(plot_error_vs_k(frame, hue="sharpness", title="Top-k error ‖o_k − o‖/‖o‖ (cached)"), "repro")
"""


def _errors():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"k": [1, 2, 4, 8, 16] * 3, "sharpness": np.repeat([1.0, 4.0, 16.0], 5),
                         "head": 0, "relative_error": rng.uniform(0.01, 1.0, 15)})


def _png_chunks(data: bytes):
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8].decode()
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def test_same_cached_data_gives_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path / "results"))
    cached_frame("repro", config=CONFIG, compute=_errors)  # the cache both drawings read
    written = {}
    for run in ("first", "second"):
        monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / run))
        frame = cached_frame("repro", config=CONFIG, compute=lambda: 1 / 0)
        written[run] = save_figure(plot_error_vs_k(frame, hue="sharpness", title="Top-k error ‖o_k − o‖/‖o‖ (cached)"),
                                   "repro")
    # A fresh interpreter with another hash seed: what `make figures` does on a later day.
    env = {**os.environ, "TOPK_LAB_FIGURES": str(tmp_path / "fresh"), "PYTHONHASHSEED": "12345",
           "SOURCE_DATE_EPOCH": "1700000000"}
    subprocess.run([sys.executable, "-c", DRAW.format(config=CONFIG)], env=env, check=True, cwd=paths.ROOT)
    for first in written["first"]:
        reference = first.read_bytes()
        assert (tmp_path / "second" / first.name).read_bytes() == reference, first.name
        assert (tmp_path / "fresh" / first.name).read_bytes() == reference, first.name

    pdf = (tmp_path / "first" / "repro.pdf").read_bytes()
    assert b"/CreationDate" not in pdf and b"/Producer" not in pdf and b"/ModDate" not in pdf
    png = (tmp_path / "first" / "repro.png").read_bytes()
    kinds = [kind for kind, _ in _png_chunks(png)]
    assert "tIME" not in kinds
    texts = [body for kind, body in _png_chunks(png) if kind in ("tEXt", "iTXt", "zTXt")]
    assert not any(b"Software" in t or b"Creation" in t for t in texts), texts
    assert zlib.decompress(b"".join(body for kind, body in _png_chunks(png) if kind == "IDAT"))  # a valid image


def test_bars_with_several_rows_per_bar_are_reproducible(tmp_path, monkeypatch):
    from topk_lib.plots.analysis import plot_bars

    df = pd.DataFrame({"method": ["topk", "window"] * 20, "budget": [16] * 20 + [64] * 20,
                       "relative_error": np.random.default_rng(0).random(40)})
    for run in ("first", "second"):
        monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / run))
        save_figure(plot_bars(df, x="method", y="relative_error", hue="budget", xlabel="m", ylabel="e", title="t"), "bars")
    assert (tmp_path / "first" / "bars.png").read_bytes() == (tmp_path / "second" / "bars.png").read_bytes()


IMPORT_ONLY = """
import matplotlib
defaults = dict(matplotlib.rcParams)
import topk_lib.plots.accuracy, topk_lib.plots.analysis, topk_lib.plots.bench, topk_lib.plots.explorer
assert dict(matplotlib.rcParams) == defaults, "importing a plots module changed the matplotlib settings"
"""


def test_importing_plots_changes_no_settings_and_plotting_applies_the_style(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, check=True, cwd=paths.ROOT)

    import matplotlib

    from topk_lib.plots.analysis import plot_bars
    from topk_lib.plots.style import STYLE

    matplotlib.rcParams["savefig.dpi"] = 72
    fig = plot_bars(pd.DataFrame({"x": ["a", "b"], "y": [1.0, 2.0]}), x="x", y="y", xlabel="x", ylabel="y", title="t")
    assert matplotlib.rcParams["savefig.dpi"] == STYLE["savefig.dpi"]
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path))
    save_figure(fig, "styled")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styled.pdf", "styled.png"]  # no temporary left behind


def test_every_plot_function_applies_the_style():
    """A plot function that skipped ``use_style`` would draw with matplotlib's defaults and change the figures."""
    import importlib
    import inspect

    from topk_lib import plots

    for module_name in plots.__all__:
        module = importlib.import_module(f"topk_lib.plots.{module_name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("plot_") and fn.__module__ == module.__name__:
                assert hasattr(fn, "__wrapped__"), f"{module.__name__}.{name} is not decorated with @styled"
