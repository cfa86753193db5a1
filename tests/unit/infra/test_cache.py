import gzip
import json
import warnings

import pandas as pd
import pytest

from topk_lib.infra import paths
from topk_lib.infra.cache import CorruptCacheWarning, cached_frame, cached_record, config_key, read_frame, read_record


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


# --------------------------------------------------------------------------- corrupt caches are recomputed


def _frame():
    return pd.DataFrame({"k": [1, 2, 3], "value": [0.5, 0.25, 0.125]})


def _bad_frames():
    """name -> a function that damages a written .csv.gz in one way."""
    def truncate(p):
        p.write_bytes(p.read_bytes()[:-9])  # cut into the gzip trailer: the CRC check fails

    def garbage(p):
        p.write_bytes(b"not gzip at all")

    def wrong_columns(p):
        p.write_bytes(gzip.compress(b"a,b\n1,2\n", mtime=0))

    return {"truncated": truncate, "not gzip": garbage, "missing columns": wrong_columns}


@pytest.mark.parametrize("damage", list(_bad_frames()))
def test_a_damaged_frame_cache_is_reported_recomputed_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return _frame()

    cached_frame("demo", config={"k": 2}, compute=compute, columns=["k", "value"])
    (path,) = tmp_path.glob("demo_*.csv.gz")
    good = path.read_bytes()
    _bad_frames()[damage](path)
    with pytest.warns(CorruptCacheWarning, match=rf"{path.name}.*recomput"):
        again = cached_frame("demo", config={"k": 2}, compute=compute, columns=["k", "value"])
    pd.testing.assert_frame_equal(again, _frame())
    assert len(calls) == 2 and path.read_bytes() == good  # rewritten whole
    assert not list(tmp_path.glob(".*tmp"))


def test_a_whole_frame_cache_is_read_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    cached_frame("demo", config={}, compute=_frame, columns=["k", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cached_frame("demo", config={}, compute=lambda: 1 / 0, columns=["k", "value"])
    pd.testing.assert_frame_equal(got, _frame())


def _damaged_records():
    return {
        "truncated": lambda text: text[: len(text) // 2],
        "empty": lambda text: "",
        "not an object": lambda text: "[1, 2]\n",
        "missing key": lambda text: json.dumps({"task": "t"}, indent=1) + "\n",
        "invalid utf-8": lambda text: b"\xff\xfe{".decode("latin-1"),
    }


@pytest.mark.parametrize("damage", list(_damaged_records()))
def test_a_damaged_record_is_reported_recomputed_and_rewritten(tmp_path, damage):
    calls = []

    def compute():
        calls.append(1)
        return {"task": "t", "values": [1, 2, 3]}

    first = cached_record(tmp_path / "run", config={"k": 1}, compute=compute, required=("task", "values"))
    (path,) = tmp_path.glob("run_*.json")
    good = path.read_text()
    path.write_text(_damaged_records()[damage](good), encoding="latin-1")
    with pytest.warns(CorruptCacheWarning, match=rf"{path.name}.*recomput"):
        again = cached_record(tmp_path / "run", config={"k": 1}, compute=compute, required=("task", "values"))
    assert again == first and len(calls) == 2 and path.read_text() == good


def test_a_record_validator_can_reject_a_record(tmp_path):
    def validate(rec):
        return None if len(rec["values"]) == 3 else f"values has {len(rec['values'])} entries, expected 3"

    path = tmp_path / f"run_{config_key({})}.json"
    path.write_text(json.dumps({"values": [1]}))
    with pytest.warns(CorruptCacheWarning, match="values has 1 entries, expected 3"):
        rec = cached_record(tmp_path / "run", config={}, compute=lambda: {"values": [1, 2, 3]}, validate=validate)
    assert rec == {"values": [1, 2, 3]} and json.loads(path.read_text()) == rec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached_record(tmp_path / "run", config={}, compute=lambda: 1 / 0, validate=validate) == rec


def test_cache_validation_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match="required"):
        cached_record(tmp_path / "run", config={}, compute=dict, required="task")
    with pytest.raises(TypeError, match="validate"):
        cached_record(tmp_path / "run", config={}, compute=dict, validate="yes")
    with pytest.raises(TypeError, match="columns"):
        cached_frame("demo", config={}, compute=_frame, columns="k")


def test_every_committed_cache_reads_as_valid():
    """The committed caches are accepted as they are (no rewrite needed to be valid)."""
    results = paths.ROOT / "data" / "results"
    frames = sorted(results.rglob("*.csv.gz"))
    records = sorted(p for sub in ("accuracy", "training") for p in (results / sub).rglob("*.json"))
    assert frames and records
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in frames:
            assert read_frame(path) is not None, path
        for path in records:
            assert read_record(path, required=("task", "name", "config")) is not None, path


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    import os
    import stat

    from topk_lib.infra.cache import atomic_write

    umask = os.umask(0o022)
    try:
        new = atomic_write(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # what open() gives under umask 022, not mkstemp's 0600
        old = tmp_path / "shared.csv"
        old.write_text("a\n")
        old.chmod(0o664)
        atomic_write(old, b"b\n")
        assert stat.S_IMODE(old.stat().st_mode) == 0o664 and old.read_bytes() == b"b\n"
    finally:
        os.umask(umask)
