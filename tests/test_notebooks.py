"""Every notebook under notebooks/ runs end to end in quick mode (figures to a temp dir)."""

import pytest

from topk_lib.infra import runner

SOURCES = runner.notebook_sources()


def test_there_are_notebooks():
    assert SOURCES, "no notebooks found"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_runs_in_quick_mode(source, tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path / "results"))
    for key, value in runner.quick_environment(True).items():
        monkeypatch.setenv(key, value)
    runner.execute(source, quick=True, out_dir=tmp_path / "executed", progress=False)
    stem = source.stem.split("_")[0]
    written = sorted(p.name for p in (tmp_path / "figures").glob(f"{stem}_*"))
    assert any(n.endswith(".png") for n in written) and any(n.endswith(".pdf") for n in written), written


def test_failure_names_notebook_and_cell(tmp_path):
    bad = tmp_path / "99_broken.py"
    bad.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\nx = 1\n\n# %%\nraise ValueError("boom")\n')
    with pytest.raises(runner.NotebookError, match=r"99_broken.py failed in cell \d+.*ValueError: boom"):
        runner.execute(bad, quick=True, out_dir=tmp_path / "executed", progress=False)


def test_missing_parameters_cell_is_reported(tmp_path):
    bad = tmp_path / "98_noparams.py"
    bad.write_text("# %%\nQUICK = False\n")
    with pytest.raises(runner.NotebookError, match="parameters"):
        runner.execute(bad, quick=True, out_dir=tmp_path / "executed", progress=False)


def test_notebooks_define_no_functions():
    for source in SOURCES:
        lines = source.read_text().splitlines()
        assert not [l for l in lines if l.startswith(("def ", "class "))], f"{source.name} defines functions"


def test_quick_flag_is_injected(tmp_path):
    nb = tmp_path / "97_flag.py"
    nb.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\nassert QUICK is True\n')
    runner.execute(nb, quick=True, out_dir=tmp_path / "executed", progress=False)
