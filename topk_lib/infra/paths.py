"""Where the suite reads and writes: one place, so notebooks and tests agree."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
FIGURES = Path(os.environ.get("TOPK_LAB_FIGURES", ROOT / "figures"))
DATA = ROOT / "data"
RAW = Path(os.environ.get("TOPK_LAB_RAW", DATA / "raw"))
RESULTS = Path(os.environ.get("TOPK_LAB_RESULTS", DATA / "results"))
CACHE = Path(os.environ.get("TOPK_LAB_CACHE", Path.home() / ".cache" / "topk-lab"))
