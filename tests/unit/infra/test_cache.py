import pandas as pd
import pytest

from topk_lib.infra import paths
from topk_lib.infra.cache import cached_frame


def test_cached_frame_computes_once_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    assert paths.results() == tmp_path
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"k": [1, 2], "value": [0.5, 0.25]})

    a = cached_frame("demo", config={"k": 2}, compute=compute, folder="x")
    b = cached_frame("demo", config={"k": 2}, compute=compute, folder="x")
    pd.testing.assert_frame_equal(a, b)
    assert len(calls) == 1
    cached_frame("demo", config={"k": 3}, compute=compute, folder="x")
    assert len(calls) == 2 and len(list((tmp_path / "x").glob("demo_*.csv.gz"))) == 2
    assert not list((tmp_path / "x").glob(".*tmp"))
    with pytest.raises(TypeError, match="DataFrame"):
        cached_frame("bad", config={}, compute=lambda: [1, 2])


def test_cached_frame_bytes_are_reproducible(tmp_path, monkeypatch):
    frame = pd.DataFrame({"k": [1, 2], "value": [1 / 3, 2 / 3]})
    blobs = []
    for run in ("a", "b"):
        monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path / run))
        cached_frame("demo", config={}, compute=lambda: frame)
        blobs.append(next((tmp_path / run).glob("*.csv.gz")).read_bytes())
    assert blobs[0] == blobs[1]
