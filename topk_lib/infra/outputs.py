"""Where a notebook run writes: the published folders only for a run with the committed defaults.

The figures in ``figures/`` and the result caches in ``data/results/`` are what the full-mode
publish run (``make figures``) makes from each notebook's committed parameters. Any other run
writes beside them, below each of the two: ``QUICK = True`` to a ``quick/`` folder, another
model (a changed ``MODEL``, ``DECODER(S)`` or ``ENCODER``) to a folder named after it, e.g.
``figures/Llama-3.2-1B/``, and other changed parameters to a ``custom/`` folder, nested in
that order (``figures/quick/Llama-3.2-1B/custom/``); :func:`subfolder` names it.

The runner decides this for the kernels it starts (its ``--quick`` and ``-p`` values) and says
so through ``RUNNER_ENV``. A notebook run in JupyterLab has no runner, so the first code cell
after each notebook's parameters cell calls :func:`notebook_setup`, which

- reads the notebook's committed parameters cell (``git show HEAD:notebooks/<name>.py`` in a
  git checkout, else the file on disk: the defaults one may have edited in the lab are not
  the published ones);
- checks the values now in the notebook's namespace against their defaults' types with
  :func:`~topk_lib.infra.parameters.check_parameters`, so a bad value typed into the
  parameters cell is reported with the parameter's name before anything runs;
- points ``TOPK_LAB_FIGURES`` / ``TOPK_LAB_RESULTS`` at the quick/custom folders when
  ``QUICK`` is set or any value differs from its default, and back at the published folders
  when a later run of the same kernel has the defaults again;
- prints where this run's figures and result caches go.

``TOPK_LAB_FIGURES`` / ``TOPK_LAB_RESULTS`` set before (by the user, a test) are left alone,
as the runner leaves them.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from topk_lib.infra import paths
from topk_lib.infra.parameters import cell_defaults, check_parameters

__all__ = ["RUNNER_ENV", "FOLDER_ENV", "MODEL_PARAMETERS", "model_folder", "subfolder", "committed_source", "committed_defaults", "notebook_setup"]

RUNNER_ENV = "TOPK_LAB_RUNNER"  # set (to "1") by the runner for its kernels: folders and values are decided
FOLDER_ENV = ("TOPK_LAB_FIGURES", "TOPK_LAB_RESULTS")
MODEL_PARAMETERS = ("MODEL", "MODELS", "DECODER", "DECODERS", "ENCODER")  # parameters that name the models analysed

# What notebook_setup set in this process ({variable: value}), so that a later call may change
# or undo its own choice but never one made outside.
_ours: dict[str, str] = {}


def model_folder(models) -> str:
    """Folder name for a run on ``models`` (a name or a list of names): the last path part of
    each, characters other than letters, digits, ``.``, ``_`` and ``-`` as ``_``, joined by ``+``.

    ``"meta-llama/Llama-3.2-1B"`` -> ``"Llama-3.2-1B"``; ``["gemma3-270m", "/tmp/tiny-qwen2"]``
    -> ``"gemma3-270m+tiny-qwen2"``.
    """
    names = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", re.split(r"[\\/]", os.fspath(n).rstrip("/\\"))[-1]) for n in names]
    return "+".join(p for p in parts if p.strip(".")) or "model"


def subfolder(quick: bool, changed: dict) -> Path:
    """The folder below the published ones for a run with the parameters ``changed`` from their defaults.

    ``quick/`` when ``quick``; then the :func:`model_folder` of the changed
    :data:`MODEL_PARAMETERS` values; then ``custom/`` when any other parameter (``QUICK``
    aside) changed. ``Path(".")`` for a publish run.
    """
    models = [changed[key] for key in MODEL_PARAMETERS if key in changed]
    flat = [m for value in models for m in ([value] if isinstance(value, (str, os.PathLike)) else value)]
    others = [key for key in changed if key not in MODEL_PARAMETERS and key != "QUICK"]
    return (Path("quick" if quick else "") / (model_folder(flat) if models else "")
            / ("custom" if others else ""))


def committed_source(name: str, *, root: Path | None = None, notebooks: Path | None = None) -> tuple[str, str]:
    """``(text, where)`` of notebook ``name`` (a stem) as committed, else as on disk.

    ``where`` says which: ``"HEAD"`` or the file's path. The committed text is used whenever
    ``root`` (default ``paths.ROOT``) is a git checkout that has the file at ``HEAD``.
    """
    root = paths.ROOT if root is None else Path(root)
    notebooks = paths.NOTEBOOKS if notebooks is None else Path(notebooks)
    source = notebooks / f"{name}.py"
    if (root / ".git").exists():
        try:
            relative = source.resolve().relative_to(root.resolve()).as_posix()
            done = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{relative}"], capture_output=True,
                                  text=True, timeout=30)
            if done.returncode == 0:
                return done.stdout, "HEAD"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass  # no git, or a notebook outside the repository: the file on disk is all there is
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source.name} in {notebooks}: pass the notebook's stem, e.g. "
                                f"notebook_setup('00_quickstart', globals())")
    return source.read_text(), str(source)


def committed_defaults(name: str, **where) -> dict:
    """The defaults of the committed parameters cell of notebook ``name`` (``where``: see committed_source)."""
    import jupytext

    text, origin = committed_source(name, **where)
    cells = [c for c in jupytext.reads(text, fmt="py:percent").cells
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{name}.py ({origin}) has no cell tagged 'parameters' (add `# %% tags=[\"parameters\"]`)")
    return cell_defaults(cells[0].source)


def _differs(value, default) -> bool:
    try:
        return bool(value != default)
    except Exception:  # a comparison that is not a bool (an array): not the literal default
        return True


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _show(folder: Path) -> str:
    try:
        return f"{folder.resolve().relative_to(paths.ROOT)}/"
    except ValueError:
        return str(folder)


def notebook_setup(name: str, namespace: dict, **where) -> None:
    """Check this run's parameters and choose its output folders (see the module docstring).

    ``name`` is the notebook's stem (``"03_accuracy_vs_k"``), ``namespace`` its ``globals()``.
    Returns nothing (the cell shows only the printed line); ``paths.figures()`` and
    ``paths.results()`` give the folders chosen. Raises ``TypeError`` / ``ValueError``
    naming the parameter when a value does not look like its default.
    """
    if os.environ.get(RUNNER_ENV):
        print(f"outputs (chosen by the runner): figures to {_show(paths.figures())}, "
              f"result caches to {_show(paths.results())}")
        return
    defaults = committed_defaults(name, **where)
    given = {key: namespace[key] for key in defaults if key in namespace}
    try:
        check_parameters(defaults, given)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: bad value in the parameters cell: {err}") from None
    quick = bool(given.get("QUICK", False))
    changed = [key for key in given if key != "QUICK" and _differs(given[key], defaults[key])]
    for variable in FOLDER_ENV:  # undo an earlier call's choice; keep one made outside
        if variable in _ours and os.environ.get(variable) == _ours.pop(variable):
            del os.environ[variable]
    sub = subfolder(quick, {key: given[key] for key in changed})
    if sub != Path("."):
        for variable, base in zip(FOLDER_ENV, (paths.figures, paths.results)):
            if variable not in os.environ:
                os.environ[variable] = _ours[variable] = str(base() / sub)
    places = f"figures to {_show(paths.figures())}, result caches to {_show(paths.results())}"
    if sub == Path("."):
        print(f"default parameters: this run writes {places}, the folders `make figures` publishes")
    else:
        why = ["QUICK = True"] * quick
        why += [f"{key} = {_short(given[key])} (default {_short(defaults[key])})" for key in changed]
        print(f"{', '.join(why)}: this run writes {places}, not the published ones")
