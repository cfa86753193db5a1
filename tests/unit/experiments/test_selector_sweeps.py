"""Selector sweeps: points by name, per-point caches that resume, downstream runs on a tiny model."""

import pandas as pd
import pytest
import torch

from tiny_models import TEXT
from topk_lib.analysis.approximations import record_qkv
from topk_lib.experiments import selectors as exp
from topk_lib.experiments import selector_summaries as summaries
from topk_lib.analysis.selection import frontier
from topk_lib.tasks.lm import token_windows
from topk_lib.tasks.scoring import token_scores


@pytest.fixture(scope="module")
def records(llama, tok):
    ids = token_windows(tok, TEXT, window=64, n_windows=2)
    return record_qkv(llama, ids[:1], layers=[0, 1]), record_qkv(llama, ids[1:], layers=[0, 1])


def test_points_by_name(records):
    _, calib = records
    points = exp.selector_points(list(exp.SELECTOR_NAMES), [8, 16], calibration=calib, top_p=(0.5, 0.9))
    labels = [label for label, _, _ in points]
    assert labels.count("top_p") == 2 and labels.count("quest") == 1 and labels.count("oracle") == 2
    assert {b for label, _, b in points if label == "top_p"} == {64}
    with pytest.raises(ValueError, match="calibration"):
        exp.selector_points(["loki"], [8])
    with pytest.raises(ValueError, match="unknown"):
        exp.selector_points(["magic"], [8])


def test_depth_layers(llama):
    assert exp.depth_layers(llama) == [0, 1] and exp.depth_layers(llama, [0, 0.4, 1]) == [0, 1]
    assert exp.depth_layers(llama, [0.0]) == [0]


def test_metrics_are_cached_per_point_and_resume(records, monkeypatch, tmp_path):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    measured, calib = records
    points = exp.selector_points(["oracle", "sink_window", "loki"], [8, 16], calibration=calib)
    first = exp.cached_selector_metrics(measured, points, steps=8, model_name="tiny", text="t", progress=False)
    files = sorted(p.name for p in (tmp_path / "selectors" / "tiny" / "metrics").glob("*.csv.gz"))
    assert len(files) == 6
    monkeypatch.setattr(exp, "selector_metrics", None)  # a rerun only reads
    again = exp.cached_selector_metrics(measured, points, steps=8, model_name="tiny", text="t", progress=False)
    pd.testing.assert_frame_equal(again[first.columns], first, check_dtype=False, rtol=1e-5)
    caption = summaries.frontier_caption(frontier(first), model="tiny")
    assert "B=8: oracle error" in caption and "closest" in caption


@torch.no_grad()
def test_downstream_on_a_tiny_model(llama, tok, monkeypatch, tmp_path):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    windows = token_windows(tok, TEXT, window=48, n_windows=2)
    exact = exp.selector_perplexity(llama, windows, exp.selector_points(["oracle"], [10 ** 6]), model_name="tiny",
                                    progress=False)
    nll, _ = token_scores(llama, windows)
    assert exact.perplexity.iloc[0] == pytest.approx(float(torch.tensor(nll).mean().exp()), rel=1e-5)
    points = exp.selector_points(["oracle", "h2o", "snapkv"], [4], calibration=None)
    ppl = exp.selector_perplexity(llama, windows, points, model_name="tiny", progress=False)
    assert (ppl.kept <= 48).all() and ppl.perplexity.notna().all()
    assert ppl[ppl.selector == "snapkv"].perplexity.iloc[0] == pytest.approx(exact.perplexity.iloc[0], rel=1e-5)
    keys = exp.selector_passkey(llama, tok, points, model_name="tiny", lengths=[96], depths=[0.5], progress=False)
    assert set(keys.columns) >= {"selector", "budget", "accuracy", "lo", "hi", "n", "kept"} and (keys.n == 1).all()
