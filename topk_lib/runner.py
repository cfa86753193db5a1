"""Run the notebooks headless: ``python -m topk_lib.runner [--quick] [NAME ...]``.

Reads the jupytext percent sources in ``notebooks/``, executes each with papermill
(injecting ``QUICK`` into the cell tagged ``parameters``), shows progress, and
prints a table of time per notebook. On failure it names the notebook and the
failing cell. Executed copies go to ``build/notebooks/`` (git-ignored), never next
to the sources.

Quick mode writes figures to ``figures/quick/`` and results to ``data/results/quick/``
so a smoke run never overwrites the published figures and result caches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from topk_lib import paths

BUILD = paths.ROOT / "build" / "notebooks"


@dataclass
class NotebookResult:
    name: str
    seconds: float
    ok: bool
    error: str = ""


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
        env["TOPK_LAB_FIGURES"] = os.environ.get("TOPK_LAB_FIGURES", str(paths.FIGURES / "quick"))
        env["TOPK_LAB_RESULTS"] = os.environ.get("TOPK_LAB_RESULTS", str(paths.RESULTS / "quick"))
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


def run_all(sources, *, quick: bool) -> list[NotebookResult]:
    from tqdm.auto import tqdm

    results = []
    os.environ.update(quick_environment(quick))
    for source in tqdm(sources, desc="notebooks", unit="nb"):
        start = time.perf_counter()
        try:
            execute(source, quick=quick)
            results.append(NotebookResult(source.stem, time.perf_counter() - start, True))
        except NotebookError as err:
            results.append(NotebookResult(source.stem, time.perf_counter() - start, False, str(err)))
    return results


def format_table(results: list[NotebookResult]) -> str:
    width = max([len(r.name) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  {'seconds':>8}  status", f"{'-' * width}  {'-' * 8}  ------"]
    lines += [f"{r.name:<{width}}  {r.seconds:8.1f}  {'ok' if r.ok else 'FAILED'}" for r in results]
    lines.append(f"{'total':<{width}}  {sum(r.seconds for r in results):8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topk_lib.runner", description=__doc__.split("\n")[0])
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
    figures = Path(os.environ.get("TOPK_LAB_FIGURES", paths.FIGURES))
    print(f"\nfigures in {figures}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
