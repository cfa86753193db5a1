"""Run the notebooks headless: ``python -m topk_lib.infra.runner [--quick] [-p NAME=VALUE ...] [NAME ...]``.

Reads the jupytext percent sources in ``notebooks/``, executes each with papermill
(injecting ``QUICK`` and the ``-p`` values after the cell tagged ``parameters``), shows
progress, and prints a table of time per notebook. A notebook is named by its number
(``0``, ``00``), its stem (``00_quickstart``) or its topic (``quickstart``).

Every injected value is checked against the type of the notebook's default literal before
any cell runs (:mod:`topk_lib.infra.parameters`), so a bad value names the parameter; a
``-p`` name that none of the chosen notebooks declares is an error, and each notebook gets
the ``-p`` values it declares.

On failure it names the notebook and the failing cell (index, execution count, first line);
a kernel that dies (out of memory, a crash in native code) is reported the same way and the
remaining notebooks still run. Each run writes its executed copies to its own folder
``build/notebooks/<YYYYmmdd-HHMMSS>-<pid>/`` (git-ignored), so an error points to this run's
copy even while another run is going; the newest ``KEEP_RUNS`` run folders are kept (and any
of a process still running), older ones are deleted when a run starts.

Quick mode writes figures to ``figures/quick/`` and results to ``data/results/quick/``
so a smoke run never overwrites the published figures and result caches; a run with ``-p``
values writes below those too, to a folder named after the model when ``-p`` names one
(``-p DECODER=meta-llama/Llama-3.2-1B``: ``figures/Llama-3.2-1B/``) and to ``custom/`` for
other values (:func:`topk_lib.infra.outputs.subfolder`; ``TOPK_LAB_FIGURES`` /
``TOPK_LAB_RESULTS`` set before win), since only default parameters make published figures.
The runner prints the folders before the first notebook starts.
Its kernels get ``TOPK_LAB_RUNNER=1``, so each notebook's ``notebook_setup`` cell
(:mod:`topk_lib.infra.outputs`, which makes the same choice for a run in JupyterLab) leaves the
folders as the runner chose them.

After the table it prints, per notebook, which figures it (re)wrote — new, changed, or
rewritten with the same bytes (SHA-256 before and after) — and which result caches under
the results folder it wrote (mtime changed or new) or read. Reads are seen through access
times: before each notebook every result file's atime is set just below its mtime, so the
kernel's default ``relatime`` rule records the next read; on a filesystem mounted
``noatime`` the summary says reads are not tracked. Files changed by other processes during
a run would be attributed to the notebook running at the time.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from topk_lib.infra import paths
from topk_lib.infra.cache import file_sha256
from topk_lib.infra.outputs import RUNNER_ENV, subfolder
from topk_lib.infra.parameters import cell_defaults, check_parameters

BUILD = paths.ROOT / "build" / "notebooks"
KEEP_RUNS = 10  # run folders kept under BUILD (the newest, plus any whose process still runs)


@dataclass
class Outputs:
    """What one notebook did to the figure and result folders."""

    figures: dict = field(default_factory=dict)  # figure stem -> "new" | "changed" | "same bytes"
    written: list = field(default_factory=list)  # result files (relative paths) created or modified
    read: list | None = field(default_factory=list)  # result files read; None = reads not tracked
    rejected: list = field(default_factory=list)  # caches present but not used, as the notebook warned


@dataclass
class NotebookResult:
    name: str
    seconds: float
    ok: bool
    error: str = ""
    outputs: Outputs | None = None


class NotebookError(RuntimeError):
    """A notebook failed; the message names it and the failing cell."""


def notebook_sources(names=None, folder: Path | None = None) -> list[Path]:
    """The ``NN_topic.py`` sources, sorted; ``names`` picks by number, stem or topic.

    A number matches the ``NN`` prefix as a number (``0`` and ``00`` both pick ``00_*``);
    otherwise a name matches the stem, the file name, or the topic after the number.
    """
    folder = folder or paths.NOTEBOOKS
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    picked = []
    for name in names:
        name = str(name)
        if name.isdigit():
            hits = [p for p in found if int(p.stem[:2]) == int(name)]
        else:
            hits = [p for p in found if name in (p.stem, p.name, p.stem.split("_", 1)[1])]
        if not hits:
            raise SystemExit(f"no notebook matches {name!r}: give a number (0 or 00), a stem (00_quickstart) "
                             f"or a topic (quickstart); have: {', '.join(p.stem for p in found) or 'none'}")
        picked += [h for h in hits if h not in picked]
    return picked


def quick_environment(quick: bool, parameters: dict | None = None) -> dict[str, str]:
    """Environment for the kernels: offline hub, headless plots, the output folders for ``quick`` and ``-p`` values."""
    # RUNNER_ENV tells each notebook's notebook_setup that the values are checked and the folders chosen here
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", RUNNER_ENV: "1"}
    sub = subfolder(quick, parameters or {})
    if sub != Path("."):
        env["TOPK_LAB_FIGURES"] = os.environ.get("TOPK_LAB_FIGURES", str(paths.figures() / sub))
        env["TOPK_LAB_RESULTS"] = os.environ.get("TOPK_LAB_RESULTS", str(paths.results() / sub))
    return env


@functools.cache
def _run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def run_folder() -> Path:
    """This process's folder for executed copies, ``BUILD/<YYYYmmdd-HHMMSS>-<pid>``.

    Made on first use, which also deletes all but the newest ``KEEP_RUNS`` run folders
    (never one whose process is still running).
    """
    folder = BUILD / _run_id()
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    runs = sorted(p for p in BUILD.iterdir() if p.is_dir() and p.name[:8].isdigit() and "-" in p.name)
    for old in runs[:-KEEP_RUNS]:
        pid = old.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def notebook_parameters(source: Path, notebook=None) -> dict:
    """The defaults of ``source``'s ``parameters`` cell (``notebook``: it, already read by jupytext)."""
    import jupytext

    notebook = notebook if notebook is not None else jupytext.read(source)
    cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise NotebookError(f"{source.name}: no cell tagged 'parameters' (add `# %% tags=[\"parameters\"]`)")
    return cell_defaults(cells[0].source)


def checked_parameters(source: Path, *, quick: bool, parameters=None, notebook=None) -> dict:
    """``QUICK`` and ``parameters`` for ``source``, checked against its defaults (NotebookError if bad)."""
    try:
        return check_parameters(notebook_parameters(source, notebook), {"QUICK": quick, **(parameters or {})})
    except (TypeError, ValueError) as err:
        raise NotebookError(f"{source.name}: bad parameter: {err}") from None


def cell_label(executed: Path, index: int | None = None) -> str:
    """``cell I (execution count N): `first line``` of the executed copy.

    ``index=None`` picks the last cell that started, i.e. the one a dead kernel was running.
    """
    import nbformat

    try:
        cells = [c for c in nbformat.read(executed, as_version=4).cells  # without papermill's error banners
                 if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    except (OSError, ValueError):
        return f"cell {index if index is not None else '?'} (the executed copy could not be read)"
    if index is None:
        started = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
        if not started:
            return "its start (before the first cell)"
        index = started[-1]
    if not 0 <= index < len(cells):
        return f"cell {index}"
    cell = cells[index]
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    count = cell.get("execution_count")  # None when the kernel died before numbering the cell
    return f"cell {index}{'' if count is None else f' (execution count {count})'}: `{first.strip()[:80]}`"


def execute(source: Path, *, quick: bool, out_dir: Path | None = None, progress: bool = True,
            parameters: dict | None = None) -> Path:
    """Execute one jupytext source with papermill; returns the executed .ipynb path.

    ``out_dir`` defaults to this run's :func:`run_folder`; ``parameters`` are injected
    beside ``QUICK`` after being checked against the notebook's defaults.
    """
    import jupytext
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    notebook = jupytext.read(source)
    values = checked_parameters(source, quick=quick, parameters=parameters, notebook=notebook)
    out_dir = out_dir if out_dir is not None else run_folder()
    out_dir.mkdir(parents=True, exist_ok=True)
    unexecuted = out_dir / f"{source.stem}.source.ipynb"
    executed = out_dir / f"{source.stem}.ipynb"
    jupytext.write(notebook, unexecuted)
    try:
        pm.execute_notebook(
            str(unexecuted),
            str(executed),
            parameters=values,
            kernel_name="python3",
            language="python",
            cwd=str(source.parent),
            progress_bar=progress,
            log_output=False,
        )
    except pm.PapermillExecutionError as err:
        raise NotebookError(
            f"{source.name} failed in {cell_label(executed, err.cell_index)}: "
            f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {executed}"
        ) from None
    except DeadKernelError:
        raise NotebookError(
            f"{source.name} failed in {cell_label(executed)}: the kernel died — likely out of memory "
            f"(or a crash in native code)\n  executed copy up to that cell: {executed}"
        ) from None
    finally:
        unexecuted.unlink(missing_ok=True)
    return executed


# --------------------------------------------------------------------------- what each notebook wrote and read


def snapshot_figures(folder: Path) -> dict[str, tuple[int, str]]:
    """``{file name: (mtime_ns, sha256)}`` of the PNG/PDF figures directly in ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, file_sha256(p)) for p in sorted(folder.iterdir())
            if p.suffix in (".png", ".pdf") and not p.name.startswith(".") and p.is_file()}


def _result_files(folder: Path, exclude=()) -> list[Path]:
    if not folder.is_dir():
        return []
    skip = [Path(e).resolve() for e in exclude]
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
            and not any(s == p.resolve() or s in p.resolve().parents for s in skip)]


def snapshot_results(folder: Path, *, exclude=()) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime_ns, atime_ns)}`` of the result files under ``folder``."""
    out = {}
    for p in _result_files(folder, exclude):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_atime_ns)
    return out


def arm_read_tracking(folder: Path, *, exclude=()) -> bool:
    """Set each result file's atime 1 s below its mtime, so that a read moves it (``relatime``).

    Returns whether this filesystem records reads at all (probed on a scratch file);
    mtimes are left untouched.
    """
    if not folder.is_dir():
        return True  # nothing to read yet; what a notebook creates counts as written
    probe = folder / ".topk_lab_atime_probe"
    try:
        probe.write_bytes(b"x")
        st = probe.stat()
        os.utime(probe, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns))
        probe.read_bytes()
        if probe.stat().st_atime_ns <= st.st_mtime_ns - 10**9:
            return False  # noatime: reads leave no trace
        for p in _result_files(folder, exclude):
            st = p.stat()
            os.utime(p, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns))
    except OSError:
        return False  # a read-only results folder: reads cannot be tracked, nothing was written either
    finally:
        probe.unlink(missing_ok=True)
    return True


def compare_outputs(fig_before, fig_after, res_before, res_after, *, reads_tracked: bool) -> Outputs:
    """What changed between two snapshots (``res_before`` taken after :func:`arm_read_tracking`)."""
    figures = {}
    for name, (mtime, digest) in fig_after.items():
        old = fig_before.get(name)
        if old is not None and old[0] == mtime:
            continue  # not rewritten
        status = "new" if old is None else ("same bytes" if old[1] == digest else "changed")
        stem = Path(name).stem
        rank = ("same bytes", "changed", "new")  # a stem reports its most notable file
        figures[stem] = max(figures.get(stem, status), status, key=rank.index)
    written = [name for name, (mtime, _) in res_after.items()
               if name not in res_before or res_before[name][0] != mtime]
    read = None
    if reads_tracked:
        read = [name for name, (mtime, atime) in res_after.items()
                if name in res_before and res_before[name][0] == mtime and atime > res_before[name][1]]
    return Outputs(figures=dict(sorted(figures.items())), written=written, read=read)


# How warnings.warn prints a CacheWarning (or its CorruptCacheWarning subclass) to stderr.
_CACHE_WARNING = re.compile(r"\b(?:Corrupt)?CacheWarning: (.+)")


def rejected_caches(executed) -> list[str]:
    """The cache warnings an executed notebook printed: caches that were present but not used."""
    if not isinstance(executed, Path) or not executed.exists():
        return []
    found = []
    for cell in json.loads(executed.read_text()).get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found += _CACHE_WARNING.findall("".join(out.get("text", "")))
    return found


def format_outputs(results: list[NotebookResult], *, figures: Path, results_folder: Path) -> str:
    """The per-notebook summary of figures (re)written and result caches read or written."""
    lines = [f"figures (in {figures}) and result caches (in {results_folder}), per notebook:"]
    for r in results:
        out = r.outputs
        if out is None:
            continue
        lines.append(f"{r.name}{'' if r.ok else ' (FAILED)'}")
        figs = ", ".join(f"{stem} [{status}]" for stem, status in out.figures.items()) or "none"
        lines.append(f"  figures written ({len(out.figures)}): {figs}")
        if out.read is None:
            lines.append("  results read: not tracked (this filesystem records no access times)")
        else:
            lines.append(f"  results read ({len(out.read)}): {', '.join(out.read) or 'none'}")
        lines.append(f"  results written ({len(out.written)}): {', '.join(out.written) or 'none'}")
        if out.rejected:
            lines.append(f"  caches rejected ({len(out.rejected)}): " + "; ".join(out.rejected))
    return "\n".join(lines)


def output_folders(quick: bool) -> tuple[Path, Path, list[Path]]:
    """Figures folder, results folder and what to skip under it (the quick folder, in full mode)."""
    figures = paths.figures()
    results = paths.results()
    quick_results = paths.results() / "quick"
    exclude = [] if quick or quick_results.resolve() == results.resolve() else [quick_results]
    return figures, results, exclude


def overrides_for(sources, parameters: dict) -> dict[Path, dict]:
    """Per source, the ``parameters`` its parameters cell declares; a name none declares is a ValueError.

    A text value for a parameter whose default is a list of texts becomes a one-element list,
    so ``-p DECODERS=meta-llama/Llama-3.2-1B`` needs no Python list syntax on the command line.
    """
    if not parameters:
        return {source: {} for source in sources}
    if "QUICK" in parameters:
        raise ValueError("QUICK is set by --quick (which also picks the quick output folders), not by -p")
    declared = {source: notebook_parameters(source) for source in sources}
    unknown = [name for name in parameters if not any(name in d for d in declared.values())]
    if unknown:
        listing = "; ".join(f"{s.stem}: {', '.join(d)}" for s, d in declared.items())
        raise ValueError(f"no chosen notebook has a parameter {', '.join(unknown)}; they declare: {listing}")
    return {s: {k: _as_declared(v, d[k]) for k, v in parameters.items() if k in d} for s, d in declared.items()}


def _as_declared(value, default):
    """Text given for a list-of-text parameter is its one element: ``-p DECODERS=org/model`` means ``["org/model"]``."""
    if isinstance(value, str) and isinstance(default, list) and default and all(isinstance(v, str) for v in default):
        return [value]
    return value


def run_all(sources, *, quick: bool, execute_fn=None, parameters: dict | None = None) -> list[NotebookResult]:
    """Execute ``sources`` in order; each result carries what the notebook wrote and read.

    A failing notebook (a failing cell, a dead kernel, a bad parameter) is recorded and the
    next one runs. ``parameters`` (``-p`` values) go to the notebooks that declare them.
    """
    from tqdm.auto import tqdm

    execute_fn = execute_fn or execute
    results = []
    per_source = overrides_for(sources, parameters or {})
    os.environ.update(quick_environment(quick, parameters))
    figures, results_folder, exclude = output_folders(quick)
    print(f"outputs: figures to {paths.figures()}, result caches to {paths.results()}", flush=True)
    for source in tqdm(sources, desc="notebooks", unit="nb"):
        fig_before = snapshot_figures(figures)
        tracked = arm_read_tracking(results_folder, exclude=exclude)
        res_before = snapshot_results(results_folder, exclude=exclude)
        start = time.perf_counter()
        given = {"parameters": per_source[source]} if per_source[source] else {}
        executed = None
        try:
            executed = execute_fn(source, quick=quick, **given)
            result = NotebookResult(source.stem, time.perf_counter() - start, True)
        except NotebookError as err:
            result = NotebookResult(source.stem, time.perf_counter() - start, False, str(err))
        result.outputs = compare_outputs(fig_before, snapshot_figures(figures), res_before,
                                         snapshot_results(results_folder, exclude=exclude), reads_tracked=tracked)
        result.outputs.rejected = rejected_caches(executed)
        results.append(result)
    return results


def format_table(results: list[NotebookResult]) -> str:
    width = max([len(r.name) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  {'seconds':>8}  status", f"{'-' * width}  {'-' * 8}  ------"]
    lines += [f"{r.name:<{width}}  {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}" for r in results]
    lines.append(f"{'total':<{width}}  {sum(r.seconds for r in results):8.1f}")
    return "\n".join(lines)


def parse_assignment(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> ``(NAME, value)``: a Python literal, else the text itself (``-p DECODER=gemma3-270m``)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"-p takes NAME=VALUE (e.g. -p LENGTH=512), got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topk_lib.infra.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and lengths (CI smoke run)")
    parser.add_argument("-p", "--param", action="append", default=[], type=parse_assignment, metavar="NAME=VALUE",
                        help="set a parameter (a Python literal, else text) in the notebooks that declare it; "
                             "checked against its default's type; outputs go to a folder named after the "
                             "model (-p DECODER=...) or to custom/")
    parser.add_argument("names", nargs="*", help="notebooks to run (number, stem or topic); default all")
    args = parser.parse_args(argv)
    sources = notebook_sources(args.names)
    if not sources:
        print(f"no notebooks under {paths.NOTEBOOKS}", file=sys.stderr)
        return 1
    parameters = dict(args.param)
    try:  # check every notebook's values before running any, so a typo costs no hour-long run
        for source, given in overrides_for(sources, parameters).items():
            checked_parameters(source, quick=args.quick, parameters=given)
    except (NotebookError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_all(sources, quick=args.quick, parameters=parameters)
    print()
    print(format_table(results))
    for r in results:
        if not r.ok:
            print(f"\n{r.error}", file=sys.stderr)
    figures, results_folder, _ = output_folders(args.quick)
    print()
    print(format_outputs(results, figures=figures, results_folder=results_folder))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
