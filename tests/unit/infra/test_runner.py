"""The runner's summary of which figures each notebook (re)wrote and which result caches it read or wrote."""

import os
from pathlib import Path

import pytest

from topk_lib.infra import paths
from topk_lib.infra import runner


@pytest.fixture
def folders(tmp_path, monkeypatch):
    figures, results = tmp_path / "figures", tmp_path / "results"
    figures.mkdir()
    (results / "stats").mkdir(parents=True)
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(figures))
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(results))
    for key, value in runner.quick_environment(True).items():
        monkeypatch.setenv(key, value)  # so run_all's os.environ.update is undone after the test
    (figures / "01_same.png").write_bytes(b"same")
    (figures / "01_same.pdf").write_bytes(b"same pdf")
    (figures / "01_changed.png").write_bytes(b"old")
    (figures / "01_untouched.png").write_bytes(b"old")
    (results / "stats" / "read_me.csv").write_text("a\n1\n")
    (results / "ignored.csv").write_text("a\n1\n")
    (results / "overwritten.csv").write_text("a\n1\n")
    return figures, results


def fake_notebook(figures: Path, results: Path):
    def execute(source, *, quick):
        if source.stem.startswith("02"):
            return  # touches nothing
        (figures / "01_same.png").write_bytes(b"same")  # rewritten, identical
        (figures / "01_same.pdf").write_bytes(b"same pdf")
        (figures / "01_changed.png").write_bytes(b"new bytes")
        (figures / "01_new.pdf").write_bytes(b"pdf")
        (figures / ".01_tmp.png.tmp").write_bytes(b"x")  # save_figure's temporary: not a figure
        assert (results / "stats" / "read_me.csv").read_text() == "a\n1\n"
        (results / "overwritten.csv").write_text("a\n2\n")
        (results / "stats" / "new.csv").write_text("b\n")
    return execute


def test_summary_names_figures_and_caches(folders):
    figures, results = folders
    sources = [Path("01_demo.py"), Path("02_other.py")]
    out = runner.run_all(sources, quick=True, execute_fn=fake_notebook(figures, results))
    first, second = out[0].outputs, out[1].outputs
    assert first.figures == {"01_same": "same bytes", "01_changed": "changed", "01_new": "new"}
    assert sorted(first.written) == ["overwritten.csv", os.path.join("stats", "new.csv")]
    if first.read is not None:  # None only on a noatime filesystem
        assert first.read == [os.path.join("stats", "read_me.csv")]
    assert second.figures == {} and second.written == [] and second.read in ([], None)
    text = runner.format_outputs(out, figures=figures, results_folder=results)
    assert "01_same [same bytes]" in text and "01_changed [changed]" in text and "01_new [new]" in text
    assert "figures written (0): none" in text and "ignored.csv" not in text


def test_failed_notebook_still_reports(folders):
    figures, results = folders

    def failing(source, *, quick):
        (figures / "03_partial.png").write_bytes(b"x")
        raise runner.NotebookError("03_demo.py failed in cell 4")

    out = runner.run_all([Path("03_demo.py")], quick=True, execute_fn=failing)
    assert not out[0].ok and out[0].outputs.figures == {"03_partial": "new"}
    assert "03_demo (FAILED)" in runner.format_outputs(out, figures=figures, results_folder=results)


def test_full_mode_skips_the_quick_results(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "x.csv").write_text("1")
    (tmp_path / "y.csv").write_text("1")
    _, folder, exclude = runner.output_folders(quick=False)
    assert list(runner.snapshot_results(folder, exclude=exclude)) == ["y.csv"]


def test_compare_outputs_without_read_tracking():
    out = runner.compare_outputs({}, {"a.png": (1, "h")}, {"r.csv": (5, 4)}, {"r.csv": (5, 9)}, reads_tracked=False)
    assert out.figures == {"a": "new"} and out.written == [] and out.read is None


@pytest.mark.parametrize("source", sorted(paths.NOTEBOOKS.glob("*.py")), ids=lambda p: p.stem)
def test_parameter_cells_parse(source, caplog):
    """papermill reads `NAME = value  # comment` lines; an '=' inside the comment makes it give up on the line."""
    import jupytext
    from papermill.translators import PythonTranslator

    cell = next(c for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", []))
    names = [p.name for p in PythonTranslator.inspect({"source": cell.source})]
    assert "Unable to parse" not in caplog.text
    assert "QUICK" in names
