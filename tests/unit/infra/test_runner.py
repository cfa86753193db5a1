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


# --------------------------------------------------------------------------- choosing notebooks by number or name


@pytest.fixture
def numbered(tmp_path):
    for stem in ("00_intro", "01_error", "10_ten", "11_eleven"):
        (tmp_path / f"{stem}.py").write_text('# %% tags=["parameters"]\nQUICK = False\nLENGTH = 2048\nK = 16\n')
    return tmp_path


@pytest.mark.parametrize("name, stems", [("0", ["00_intro"]), ("00", ["00_intro"]), ("1", ["01_error"]),
                                         ("01", ["01_error"]), ("10", ["10_ten"]), ("error", ["01_error"]),
                                         ("01_error", ["01_error"]), ("11_eleven.py", ["11_eleven"])])
def test_notebooks_are_picked_by_exact_number_stem_or_topic(numbered, name, stems):
    assert [p.stem for p in runner.notebook_sources([name], folder=numbered)] == stems


@pytest.mark.parametrize("name", ["2", "intro_", "0_intro", "eleven.py"])
def test_an_unknown_notebook_lists_the_notebooks(numbered, name):
    with pytest.raises(SystemExit, match=rf"no notebook matches '{name}'.*have: 00_intro, 01_error, 10_ten, 11_eleven"):
        runner.notebook_sources([name], folder=numbered)


def test_main_runs_only_the_numbered_notebook(monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "run_all", lambda sources, **kw: ran.extend(sources) or [])
    monkeypatch.setattr(runner, "format_table", lambda results: "")
    monkeypatch.setattr(runner, "format_outputs", lambda results, **kw: "")
    assert runner.main(["0"]) == 0 and [p.stem for p in ran] == ["00_quickstart"]
    ran.clear()
    assert runner.main(["1"]) == 0 and [p.stem for p in ran] == ["01_approximation_error"]


# --------------------------------------------------------------------------- -p values, checked before any cell runs


def test_a_bad_parameter_value_stops_main_before_running(monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_all", lambda *a, **kw: pytest.fail("a notebook ran despite a bad parameter"))
    assert runner.main(["-p", "LENGTH=abc", "0"]) == 2
    assert "00_quickstart.py: bad parameter: LENGTH must be an int (its default is 2048), got 'abc'" in capsys.readouterr().err
    assert runner.main(["-p", "LENGTH=-5", "0"]) == 2
    assert "LENGTH must be an int >= 0 (its default is 2048), got -5" in capsys.readouterr().err
    assert runner.main(["-p", "LENGHT=512", "0"]) == 2
    assert "no chosen notebook has a parameter LENGHT; they declare: 00_quickstart: QUICK, SEED, LENGTH" in capsys.readouterr().err
    assert runner.main(["-p", "QUICK=True", "0"]) == 2
    assert "QUICK is set by --quick" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("LENGTH=512", ("LENGTH", 512)), ("KS=[1, 2]", ("KS", [1, 2])),
                                            ("DECODER=gemma3-270m", ("DECODER", "gemma3-270m")),
                                            ("FLAG=True", ("FLAG", True)), ("TEXT='a=b'", ("TEXT", "a=b"))])
def test_assignments_parse_as_literals_else_text(text, expected):
    assert runner.parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["LENGTH", "=5", "2X=1"])
def test_a_malformed_assignment_is_rejected(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        runner.parse_assignment(text)


def test_run_all_gives_each_notebook_the_values_it_declares(numbered, folders):
    (numbered / "01_error.py").write_text('# %% tags=["parameters"]\nQUICK = False\nK = 16\n')
    seen = {}

    def record(source, *, quick, parameters=None):
        seen[source.stem] = parameters

    sources = runner.notebook_sources(["0", "1"], folder=numbered)
    out = runner.run_all(sources, quick=True, execute_fn=record, parameters={"LENGTH": 512, "K": 4})
    assert all(r.ok for r in out)
    assert seen == {"00_intro": {"LENGTH": 512, "K": 4}, "01_error": {"K": 4}}


def test_text_for_a_list_of_texts_is_its_one_element(numbered, folders):
    (numbered / "12_models.py").write_text('# %% tags=["parameters"]\nQUICK = False\nDECODERS = ["a", "b"]\nKS = [1]\n')
    sources = runner.notebook_sources(["12"], folder=numbered)
    given = runner.overrides_for(sources, {"DECODERS": "org/My-Model"})
    assert given[sources[0]] == {"DECODERS": ["org/My-Model"]}
    assert runner.overrides_for(sources, {"DECODERS": ["x", "y"]})[sources[0]] == {"DECODERS": ["x", "y"]}
    assert runner.overrides_for(sources, {"KS": "3"})[sources[0]] == {"KS": "3"}  # not a list of texts: checked later


def test_a_bad_value_fails_that_notebook_and_names_the_parameter(numbered, folders):
    out = runner.run_all(runner.notebook_sources(["0"], folder=numbered), quick=True, parameters={"K": "many"})
    assert not out[0].ok and "00_intro.py: bad parameter: K must be an int (its default is 16), got 'many'" in out[0].error


def test_custom_values_write_to_a_custom_folder(monkeypatch):
    for key in ("TOPK_LAB_FIGURES", "TOPK_LAB_RESULTS"):
        monkeypatch.delenv(key, raising=False)
    assert runner.quick_environment(False, {"K": 4})["TOPK_LAB_FIGURES"] == str(paths.ROOT / "figures" / "custom")
    assert runner.quick_environment(True, {"K": 4})["TOPK_LAB_RESULTS"] == str(
        paths.ROOT / "data" / "results" / "quick" / "custom")
    assert runner.quick_environment(False, {"DECODER": "org/My-Model"})["TOPK_LAB_FIGURES"] == str(
        paths.ROOT / "figures" / "My-Model")
    assert runner.quick_environment(True)["TOPK_LAB_FIGURES"] == str(paths.ROOT / "figures" / "quick")
    assert "TOPK_LAB_FIGURES" not in runner.quick_environment(False)


# --------------------------------------------------------------------------- one folder of executed copies per run


def test_each_process_gets_its_own_run_folder(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from topk_lib.infra import runner; "
            f"runner.BUILD = Path({str(tmp_path)!r}); print(runner.run_folder())")
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    folders = [Path(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert folders[0] != folders[1] and all(f.parent == tmp_path and f.is_dir() for f in folders)


def test_old_run_folders_are_pruned_but_live_ones_kept(tmp_path, monkeypatch):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a finished process (pid reuse in between is vanishingly rare)
    monkeypatch.setattr(runner, "BUILD", tmp_path)
    old = [tmp_path / f"2020010{i // 10}-0000{i % 10:02d}-{dead_pid}" for i in range(runner.KEEP_RUNS + 5)]
    live = tmp_path / f"20190101-000000-{os.getpid()}"  # the oldest, but its process (this one) runs
    for folder in old + [live]:
        folder.mkdir()
        (folder / "x.ipynb").write_text("{}")
    (tmp_path / "notes").mkdir()  # not a run folder: never touched
    mine = runner.run_folder()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert mine.name in left and live.name in left and "notes" in left
    assert sorted(set(left) - {mine.name, live.name, "notes"}) == [p.name for p in old[-(runner.KEEP_RUNS - 1):]]


def test_rejected_caches_are_named_in_the_summary(folders, tmp_path):
    import json

    figures, results = folders
    executed = tmp_path / "executed.ipynb"
    stderr = ("/x/topk_lib/experiments/sweep.py:178: CacheWarning: cache /r/attn8_1.json holds the results of "
              "another model (a), not of this one (b); using attn8_1_c.json\n  warnings.warn(\n")
    corrupt = "/x/cache.py:209: CorruptCacheWarning: cache /r/f.csv.gz is cut short; recomputing it\n"
    executed.write_text(json.dumps({"cells": [
        {"outputs": [{"output_type": "stream", "name": "stderr", "text": [stderr]}]},
        {"outputs": [{"output_type": "stream", "name": "stdout", "text": ["CacheWarning: printed, not warned\n"]},
                     {"output_type": "stream", "name": "stderr", "text": corrupt}]},
    ]}))
    out = runner.run_all([Path("01_demo.py"), Path("02_demo.py")], quick=True,
                         execute_fn=lambda source, *, quick: executed if source.stem.startswith("01") else None)
    assert out[0].outputs.rejected == [
        "cache /r/attn8_1.json holds the results of another model (a), not of this one (b); using attn8_1_c.json",
        "cache /r/f.csv.gz is cut short; recomputing it",
    ]
    assert out[1].outputs.rejected == []
    text = runner.format_outputs(out, figures=figures, results_folder=results)
    assert "  caches rejected (2): cache /r/attn8_1.json holds" in text
    assert text.count("caches rejected") == 1
