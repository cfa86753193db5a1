"""Saving a notebook from JupyterLab, without an edit, leaves its tracked .py byte-identical.

JupyterLab saves through jupytext's contents manager (the ``jupyterlab_jupytext`` server
extension), served from ``notebooks/`` as ``make lab`` does; so does this test, on a copy of
that folder, with what a kernel run adds to a notebook (language info, widget state, outputs,
execution counts, cell UI metadata) and without a browser.
"""

import shutil

import nbformat
import pytest

from topk_lib.infra import paths, runner

SOURCES = runner.notebook_sources()


@pytest.fixture
def served(tmp_path):
    """A copy of notebooks/ (with its jupytext.toml) and a jupytext contents manager rooted there."""
    from jupytext import TextFileContentsManager

    folder = tmp_path / "notebooks"
    shutil.copytree(paths.NOTEBOOKS, folder, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
    return folder, TextFileContentsManager(root_dir=str(folder))


def as_if_run(notebook):
    """What a kernel run in the lab adds: none of it belongs in the .py."""
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.2", "file_extension": ".py"}
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    for i, cell in enumerate(notebook.cells):
        cell.metadata.update({"scrolled": True, "collapsed": False, "execution": {"iopub.status.idle": "2026"}})
        if cell.cell_type == "code":
            cell.execution_count = i + 1
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="printed\n")]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
@pytest.mark.parametrize("ran", [False, True], ids=["opened", "ran"])
def test_a_save_without_edits_leaves_the_file_byte_identical(served, source, ran):
    folder, manager = served
    before = (folder / source.name).read_bytes()
    model = manager.get(source.name, content=True, type="notebook")
    assert model["content"].cells, "jupytext read no cells"
    if ran:
        as_if_run(model["content"])
    manager.save(model, source.name)
    after = (folder / source.name).read_bytes()
    assert after == before, f"saving {source.name} rewrote it (is notebooks/jupytext.toml's metadata filter in place?)"
    twins = sorted(p.name for p in folder.iterdir() if p.suffix == ".ipynb")
    assert not twins, f"saving {source.name} wrote {twins}: the .py must be the only file of a notebook"


def test_an_edit_is_saved(served):
    folder, manager = served
    name = SOURCES[0].name
    model = manager.get(name, content=True, type="notebook")
    model["content"].cells[0].source += "\n\nOne more line."
    manager.save(model, name)
    assert "# One more line." in (folder / name).read_text()
