"""Where the suite reads and writes: one place, so notebooks, tests and the runner agree.

The repository's own folders are fixed. The folders a run writes to are functions read at
call time, so the notebook runner (quick mode) and tests can redirect them through the
environment after ``topk_lib`` was imported.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "NOTEBOOKS", "figures", "results", "raw", "cache"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def figures() -> Path:
    """The figure gallery (``TOPK_LAB_FIGURES`` overrides, e.g. quick mode)."""
    return Path(os.environ.get("TOPK_LAB_FIGURES", ROOT / "figures"))


def results() -> Path:
    """Result caches (``TOPK_LAB_RESULTS`` overrides, e.g. quick mode)."""
    return Path(os.environ.get("TOPK_LAB_RESULTS", ROOT / "data" / "results"))


def raw() -> Path:
    """Fetched raw data, git-ignored (``TOPK_LAB_RAW`` overrides)."""
    return Path(os.environ.get("TOPK_LAB_RAW", ROOT / "data" / "raw"))


def cache() -> Path:
    """Per-user caches such as de-quantised model weights (``TOPK_LAB_CACHE`` overrides)."""
    return Path(os.environ.get("TOPK_LAB_CACHE", Path.home() / ".cache" / "topk-lab"))
