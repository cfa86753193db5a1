import pandas as pd
import pytest

from topk_lib.results import cached_frame, results_dir


def test_cached_frame_computes_once_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"k": [1, 2], "value": [0.5, 0.25]})

    a = cached_frame("demo", config={"k": 2}, compute=compute, folder="x")
    b = cached_frame("demo", config={"k": 2}, compute=compute, folder="x")
    pd.testing.assert_frame_equal(a, b)
    assert len(calls) == 1
    cached_frame("demo", config={"k": 3}, compute=compute, folder="x")
    assert len(calls) == 2 and len(list((tmp_path / "x").glob("demo_*.csv"))) == 2
    assert not list((tmp_path / "x").glob(".*tmp"))
    with pytest.raises(TypeError, match="DataFrame"):
        cached_frame("bad", config={}, compute=lambda: [1, 2])
