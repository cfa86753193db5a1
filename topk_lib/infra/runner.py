"""Run the notebooks headless: ``python -m topk_lib.infra.runner [--quick] [NAME ...]``.

Reads the jupytext percent sources in ``notebooks/``, executes each with papermill
(injecting ``QUICK`` into the cell tagged ``parameters``), shows progress, and
prints a table of time per notebook. On failure it names the notebook and the
failing cell. Executed copies go to ``build/notebooks/`` (git-ignored), never next
to the sources.

Quick mode writes figures to ``figures/quick/`` and results to ``data/results/quick/``
so a smoke run never overwrites the published figures and result caches.

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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from topk_lib.infra import paths
from topk_lib.infra.cache import file_sha256

BUILD = paths.ROOT / "build" / "notebooks"


@dataclass
class Outputs:
    """What one notebook did to the figure and result folders."""

    figures: dict = field(default_factory=dict)  # figure stem -> "new" | "changed" | "same bytes"
    written: list = field(default_factory=list)  # result files (relative paths) created or modified
    read: list | None = field(default_factory=list)  # result files read; None = reads not tracked


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
    """The ``NN_topic.py`` sources, sorted; ``names`` picks by stem or prefix (``01``)."""
    folder = folder or paths.NOTEBOOKS
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    picked = []
    for name in names:
        hits = [p for p in found if p.stem == name or p.stem.startswith(name) or p.name == name]
        if not hits:
            raise SystemExit(f"no notebook matches {name!r}; have: {', '.join(p.stem for p in found)}")
        picked += [h for h in hits if h not in picked]
    return picked


def quick_environment(quick: bool) -> dict[str, str]:
    """Environment for the kernels: offline hub, headless plots, quick-mode output folders."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    if quick:
        env["TOPK_LAB_FIGURES"] = os.environ.get("TOPK_LAB_FIGURES", str(paths.figures() / "quick"))
        env["TOPK_LAB_RESULTS"] = os.environ.get("TOPK_LAB_RESULTS", str(paths.results() / "quick"))
    return env


def execute(source: Path, *, quick: bool, out_dir: Path = BUILD, progress: bool = True) -> Path:
    """Execute one jupytext source with papermill; returns the executed .ipynb path."""
    import jupytext
    import papermill as pm

    notebook = jupytext.read(source)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in notebook.cells):
        raise NotebookError(f"{source.name}: no cell tagged 'parameters' (add `# %% tags=[\"parameters\"]`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    unexecuted = out_dir / f"{source.stem}.source.ipynb"
    executed = out_dir / f"{source.stem}.ipynb"
    jupytext.write(notebook, unexecuted)
    try:
        pm.execute_notebook(
            str(unexecuted),
            str(executed),
            parameters={"QUICK": quick},
            kernel_name="python3",
            language="python",
            cwd=str(source.parent),
            progress_bar=progress,
            log_output=False,
        )
    except pm.PapermillExecutionError as err:
        raise NotebookError(
            f"{source.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\n  executed copy with the traceback: {executed}"
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
    return "\n".join(lines)


def output_folders(quick: bool) -> tuple[Path, Path, list[Path]]:
    """Figures folder, results folder and what to skip under it (the quick folder, in full mode)."""
    figures = paths.figures()
    results = paths.results()
    quick_results = paths.results() / "quick"
    exclude = [] if quick or quick_results.resolve() == results.resolve() else [quick_results]
    return figures, results, exclude


def run_all(sources, *, quick: bool, execute_fn=None) -> list[NotebookResult]:
    """Execute ``sources`` in order; each result carries what the notebook wrote and read."""
    from tqdm.auto import tqdm

    execute_fn = execute_fn or execute
    results = []
    os.environ.update(quick_environment(quick))
    figures, results_folder, exclude = output_folders(quick)
    for source in tqdm(sources, desc="notebooks", unit="nb"):
        fig_before = snapshot_figures(figures)
        tracked = arm_read_tracking(results_folder, exclude=exclude)
        res_before = snapshot_results(results_folder, exclude=exclude)
        start = time.perf_counter()
        try:
            execute_fn(source, quick=quick)
            result = NotebookResult(source.stem, time.perf_counter() - start, True)
        except NotebookError as err:
            result = NotebookResult(source.stem, time.perf_counter() - start, False, str(err))
        result.outputs = compare_outputs(fig_before, snapshot_figures(figures), res_before,
                                         snapshot_results(results_folder, exclude=exclude), reads_tracked=tracked)
        results.append(result)
    return results


def format_table(results: list[NotebookResult]) -> str:
    width = max([len(r.name) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  {'seconds':>8}  status", f"{'-' * width}  {'-' * 8}  ------"]
    lines += [f"{r.name:<{width}}  {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}" for r in results]
    lines.append(f"{'total':<{width}}  {sum(r.seconds for r in results):8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topk_lib.infra.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and lengths (CI smoke run)")
    parser.add_argument("names", nargs="*", help="notebooks to run (stem or number prefix); default all")
    args = parser.parse_args(argv)
    sources = notebook_sources(args.names)
    if not sources:
        print(f"no notebooks under {paths.NOTEBOOKS}", file=sys.stderr)
        return 1
    results = run_all(sources, quick=args.quick)
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
