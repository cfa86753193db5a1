"""Every notebook under notebooks/ runs end to end in quick mode (figures to a temp dir)."""

import ast
import re

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


MAX_CELL_LINES = 25
# The parameters cell holds one commented literal per line, so a notebook with many knobs
# needs a few more lines there; it may hold nothing but such assignments.
MAX_PARAMETER_LINES = 32
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def definitions(code: str) -> list[str]:
    """``def``, ``class`` and ``lambda`` in ``code``, as ``"kind at line N"``."""
    return [f"{type(node).__name__} at line {node.lineno}" for node in ast.walk(ast.parse(code))
            if isinstance(node, DEFINITIONS)]


def non_literals(code: str) -> list[str]:
    """Statements of a parameters cell that are not ``NAME = <literal>``."""
    found = []
    for node in ast.parse(code).body:
        ok = isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        try:
            ok and ast.literal_eval(node.value)
        except ValueError:
            ok = False
        if not ok:
            found.append(f"line {node.lineno}")
    return found


def long_cells(source) -> list[str]:
    """The code cells of a jupytext source longer than their limit (parameters: ``MAX_PARAMETER_LINES``)."""
    import jupytext

    found = []
    for i, cell in enumerate(jupytext.read(source).cells):
        if cell.cell_type != "code":
            continue  # prose may run as long as it needs
        limit = MAX_PARAMETER_LINES if "parameters" in cell.metadata.get("tags", []) else MAX_CELL_LINES
        if (n := len(cell.source.splitlines())) > limit:
            found.append(f"cell {i} ({n} lines)")
    return found


def parameters_cell(source) -> str:
    import jupytext

    return next(c.source for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", []))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebooks_define_no_functions_classes_or_lambdas(source):
    found = definitions(source.read_text())
    assert not found, f"{source.name} defines {found}: move that logic into topk_lib"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_cells_are_short(source):
    found = long_cells(source)
    assert not found, (f"{source.name}: {found} are over {MAX_CELL_LINES} lines ({MAX_PARAMETER_LINES} for the "
                       "parameters cell); split them or move logic into topk_lib")


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_parameters_cells_hold_only_literals(source):
    found = non_literals(parameters_cell(source))
    assert not found, f"{source.name}: the parameters cell has statements other than NAME = literal at {found}"


@pytest.mark.parametrize("code", ["def f():\n    pass\n", "class C:\n    pass\n", "f = lambda x: x\n",
                                  "rows = sorted(rows, key=lambda r: r[0])\n"])
def test_definitions_are_caught(code):
    assert definitions(code)


def test_long_cells_are_caught(tmp_path):
    nb = tmp_path / "96_long.py"
    nb.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\n' + "x = 1\n" * (MAX_CELL_LINES + 1))
    assert long_cells(nb) == [f"cell 1 ({MAX_CELL_LINES + 1} lines)"]
    nb.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\n' + "x = 1\n" * MAX_CELL_LINES)
    assert long_cells(nb) == []
    nb.write_text('# %% tags=["parameters"]\n' + "x = 1\n" * (MAX_PARAMETER_LINES + 1))
    assert long_cells(nb) == [f"cell 0 ({MAX_PARAMETER_LINES + 1} lines)"]


@pytest.mark.parametrize("code, bad", [("A = 1  # one\nB = [1, 2]\nC = {1: 'x'}\n", []),
                                       ("A = f(1)\n", ["line 1"]), ("A = 1\nprint(A)\n", ["line 2"])])
def test_non_literal_parameters_are_caught(code, bad):
    assert non_literals(code) == bad


def test_quick_flag_is_injected(tmp_path):
    nb = tmp_path / "97_flag.py"
    nb.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\nassert QUICK is True\n')
    runner.execute(nb, quick=True, out_dir=tmp_path / "executed", progress=False)


KILLER = ('# %% tags=["parameters"]\nQUICK = False\n\n# %%\nx = 1\n\n'
          '# %%\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n\n# %%\nnever = True\n')


def test_a_dead_kernel_is_reported_and_the_next_notebook_runs(tmp_path, monkeypatch, capsys):
    """A kernel killed by the OS (here: by itself) fails its notebook like a failing cell; the run goes on."""
    from topk_lib.infra import paths

    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "95_kill.py").write_text(KILLER)
    marker = tmp_path / "second_ran"
    (folder / "96_after.py").write_text(f'# %% tags=["parameters"]\nQUICK = False\n\n# %%\nopen({str(marker)!r}, "w").close()\n')
    monkeypatch.setattr(paths, "NOTEBOOKS", folder)
    monkeypatch.setattr(runner, "BUILD", tmp_path / "build")
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path / "results"))
    for key, value in runner.quick_environment(True).items():
        monkeypatch.setenv(key, value)
    assert runner.main(["--quick"]) == 1
    out, err = capsys.readouterr()
    assert marker.exists(), "the notebook after the dead kernel did not run"
    assert "95_kill" in out and "FAILED" in out and "96_after" in out and "total" in out  # the table
    assert "95_kill (FAILED)" in out and "figures written (0)" in out  # the outputs summary
    # cell 0: parameters, 1: injected parameters, 2: x = 1, 3: the kill
    # the kernel may die before it numbers the cell (execute_input not yet sent): then there is no count
    assert re.search(r"95_kill.py failed in cell 3( \(execution count 4\))?: `import os, signal`: "
                     "the kernel died — likely out of memory", err), err[-600:]
    executed = runner.run_folder() / "95_kill.ipynb"
    assert f"executed copy up to that cell: {executed}" in err and executed.exists()


def test_the_error_points_to_this_runs_executed_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "BUILD", tmp_path / "build")
    bad = tmp_path / "99_broken.py"
    bad.write_text('# %% tags=["parameters"]\nQUICK = False\n\n# %%\nraise ValueError("boom")\n')
    with pytest.raises(runner.NotebookError) as info:
        runner.execute(bad, quick=True, progress=False)
    executed = runner.run_folder() / "99_broken.ipynb"
    assert executed.parent.parent == tmp_path / "build"
    assert "failed in cell 2 (execution count 3): `raise ValueError(\"boom\")`: ValueError: boom" in str(info.value)
    assert f"executed copy with the traceback: {executed}" in str(info.value) and "boom" in executed.read_text()


def test_a_bad_injected_value_names_the_parameter_before_any_cell_runs(tmp_path):
    nb = tmp_path / "94_params.py"
    marker = tmp_path / "ran"
    nb.write_text(f'# %% tags=["parameters"]\nQUICK = False\nLENGTH = 2048\n\n# %%\nopen({str(marker)!r}, "w").close()\n')
    with pytest.raises(runner.NotebookError, match=r"94_params.py: bad parameter: LENGTH must be an int .*got 'abc'"):
        runner.execute(nb, quick=True, out_dir=tmp_path / "executed", progress=False, parameters={"LENGTH": "abc"})
    assert not marker.exists()
    runner.execute(nb, quick=True, out_dir=tmp_path / "executed", progress=False, parameters={"LENGTH": 16})
    assert marker.exists()


def setup_call(source) -> str | None:
    """The stem named by the notebook_setup call that opens the first code cell after the parameters cell."""
    import jupytext

    cells = jupytext.read(source).cells
    start = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    cell = next((c for c in cells[start + 1:] if c.cell_type == "code"), None)
    body = ast.parse(cell.source).body if cell is not None else []
    if len(body) < 2 or ast.unparse(body[0]) != "from topk_lib.infra.outputs import notebook_setup":
        return None
    call = body[1].value if isinstance(body[1], ast.Expr) else None
    ok = (isinstance(call, ast.Call) and ast.unparse(call.func) == "notebook_setup" and len(call.args) == 2
          and isinstance(call.args[0], ast.Constant) and ast.unparse(call.args[1]) == "globals()")
    return call.args[0].value if ok else None


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_every_notebook_sets_up_its_run_right_after_the_parameters(source):
    """A run in the lab (no runner) checks its values and picks its output folders before anything else runs."""
    assert setup_call(source) == source.stem, (
        f"{source.name}: the first code cell after the parameters cell must start with\n"
        f"from topk_lib.infra.outputs import notebook_setup\nnotebook_setup({source.stem!r}, globals())")


def test_a_run_outside_the_runner_with_quick_writes_to_the_quick_folder(tmp_path, monkeypatch):
    """As in the lab: papermill without the runner's environment, QUICK injected; figures go to figures/quick."""
    import jupytext
    import papermill as pm

    from topk_lib.infra import outputs

    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    source = root / "notebooks" / "93_lab.py"
    source.write_text(  # the first cell stands in for a checkout at `root`
        f"# %%\nfrom pathlib import Path\nfrom topk_lib.infra import paths\npaths.ROOT = Path({str(root)!r})\n"
        "paths.NOTEBOOKS = paths.ROOT / 'notebooks'\n\n"
        '# %% tags=["parameters"]\nQUICK = False\n\n# %%\nfrom topk_lib.infra.outputs import notebook_setup\n\n'
        'notebook_setup("93_lab", globals())\n\n# %%\n'
        'paths.figures().mkdir(parents=True)\n(paths.figures() / "93_lab.png").write_bytes(b"x")\n')
    for variable in (*outputs.FOLDER_ENV, outputs.RUNNER_ENV):
        monkeypatch.delenv(variable, raising=False)
    jupytext.write(jupytext.read(source), tmp_path / "in.ipynb")
    pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), parameters={"QUICK": True},
                        kernel_name="python3", language="python", progress_bar=False, cwd=str(source.parent))
    assert (root / "figures" / "quick" / "93_lab.png").exists() and not (root / "figures" / "93_lab.png").exists()
    assert "QUICK = True: this run writes figures to figures/quick/" in (tmp_path / "out.ipynb").read_text()
