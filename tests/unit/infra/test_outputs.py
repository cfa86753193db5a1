"""notebook_setup: a lab run checks its parameters and writes beside the published folders unless it has the defaults."""

import os
import subprocess
from pathlib import Path

import pytest

from topk_lib.infra import outputs, paths

NOTEBOOK = '''# %% [markdown]
# A title

# %% tags=["parameters"]
QUICK = False  # smoke run
LENGTH = 2048  # tokens
KS = [1, 4]  # ks
NAME = "moby"  # text

# %%
x = 1
'''
DEFAULTS = {"QUICK": False, "LENGTH": 2048, "KS": [1, 4], "NAME": "moby"}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git checkout with one committed notebook; the folder variables and the runner's flag unset."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "07_demo.py").write_text(NOTEBOOK)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    monkeypatch.setattr(paths, "ROOT", root)
    monkeypatch.setattr(paths, "NOTEBOOKS", root / "notebooks")
    for variable in (*outputs.FOLDER_ENV, outputs.RUNNER_ENV):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(outputs, "_ours", {})
    return root


def folders():
    return paths.figures(), paths.results()


def test_defaults_come_from_the_committed_file_not_the_edited_one(repo):
    assert outputs.committed_defaults("07_demo") == DEFAULTS
    source = repo / "notebooks" / "07_demo.py"
    source.write_text(NOTEBOOK.replace("LENGTH = 2048", "LENGTH = 64"))  # edited (and saved) in the lab
    assert outputs.committed_source("07_demo")[1] == "HEAD"
    assert outputs.committed_defaults("07_demo")["LENGTH"] == 2048


def test_without_git_the_file_on_disk_gives_the_defaults(repo):
    subprocess.run(["rm", "-rf", str(repo / ".git")], check=True)
    (repo / "notebooks" / "07_demo.py").write_text(NOTEBOOK.replace("LENGTH = 2048", "LENGTH = 64"))
    text, where = outputs.committed_source("07_demo")
    assert where == str(repo / "notebooks" / "07_demo.py") and "LENGTH = 64" in text
    with pytest.raises(FileNotFoundError, match="no notebook 08_none.py"):
        outputs.committed_source("08_none")


def test_the_defaults_write_the_published_folders(repo, capsys):
    outputs.notebook_setup("07_demo", dict(DEFAULTS, unrelated=3))
    assert folders() == (repo / "figures", repo / "data" / "results")
    assert "default parameters: this run writes figures to figures/, result caches to data/results/" in capsys.readouterr().out


@pytest.mark.parametrize("change, sub, said", [
    ({"QUICK": True}, "quick", "QUICK = True: "),
    ({"LENGTH": 64}, "custom", "LENGTH = 64 (default 2048): "),
    ({"QUICK": True, "KS": [2]}, "quick/custom", "QUICK = True, KS = [2] (default [1, 4]): "),
    ({"KS": [1, 4]}, "", "default parameters"),  # an equal value is the default
])
def test_quick_or_changed_values_write_beside_the_published_folders(repo, capsys, change, sub, said):
    outputs.notebook_setup("07_demo", {**DEFAULTS, **change})
    assert folders() == (repo / "figures" / sub, repo / "data" / "results" / sub)
    out = capsys.readouterr().out
    assert out.startswith(said) and (not sub or f"figures to figures/{sub}/, result caches to data/results/{sub}/" in out)


def test_a_later_run_with_the_defaults_goes_back_to_the_published_folders(repo):
    outputs.notebook_setup("07_demo", {**DEFAULTS, "QUICK": True})
    outputs.notebook_setup("07_demo", {**DEFAULTS, "QUICK": True, "LENGTH": 64})
    assert folders() == (repo / "figures" / "quick" / "custom", repo / "data" / "results" / "quick" / "custom")
    outputs.notebook_setup("07_demo", DEFAULTS)
    assert folders() == (repo / "figures", repo / "data" / "results")
    assert not any(v in os.environ for v in outputs.FOLDER_ENV)


def test_folders_set_outside_are_kept(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(tmp_path / "mine"))
    outputs.notebook_setup("07_demo", {**DEFAULTS, "QUICK": True})
    outputs.notebook_setup("07_demo", DEFAULTS)
    assert folders() == (tmp_path / "mine", repo / "data" / "results")


@pytest.mark.parametrize("bad, message", [
    ({"LENGTH": "abc"}, r"07_demo: bad value in the parameters cell: LENGTH must be an int \(its default is 2048\), got 'abc'"),
    ({"QUICK": 1}, "QUICK must be a bool"),
    ({"KS": []}, "KS must be a non-empty list"),
    ({"LENGTH": -1}, "LENGTH must be an int >= 0"),
])
def test_a_bad_value_names_the_parameter_and_changes_nothing(repo, bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        outputs.notebook_setup("07_demo", {**DEFAULTS, **bad})
    assert not any(v in os.environ for v in outputs.FOLDER_ENV)


def test_under_the_runner_it_only_reports(repo, monkeypatch, capsys):
    monkeypatch.setenv(outputs.RUNNER_ENV, "1")
    monkeypatch.setenv("TOPK_LAB_FIGURES", str(repo / "figures" / "quick"))
    outputs.notebook_setup("07_demo", {**DEFAULTS, "LENGTH": "not checked twice"})
    assert folders()[0] == repo / "figures" / "quick"
    assert "outputs (chosen by the runner): figures to figures/quick/" in capsys.readouterr().out


def test_a_notebook_without_a_parameters_cell_is_reported(repo):
    (repo / "notebooks" / "08_plain.py").write_text("# %%\nx = 1\n")
    with pytest.raises(ValueError, match="08_plain.py .* has no cell tagged 'parameters'"):
        outputs.notebook_setup("08_plain", {})


def test_subfolders():
    cases = [(0, {}), (1, {}), (0, {"K": 16}), (1, {"K": 16}), (1, {"QUICK": True})]
    assert [outputs.subfolder(q, c) for q, c in cases] == [
        Path("."), Path("quick"), Path("custom"), Path("quick/custom"), Path("quick")]


def test_a_changed_model_names_the_folder():
    assert outputs.subfolder(False, {"DECODER": "meta-llama/Llama-3.2-1B"}) == Path("Llama-3.2-1B")
    assert outputs.subfolder(True, {"DECODERS": ["gemma3-270m", "/tmp/tiny qwen2/"], "K": 4}) == Path(
        "quick/gemma3-270m+tiny_qwen2/custom")
    assert outputs.subfolder(False, {"ENCODER": "C:\\models\\bert", "MODEL": "x"}) == Path("x+bert")
    assert outputs.model_folder("..") == "model"  # never a folder that climbs out
