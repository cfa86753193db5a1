"""Memory and time benchmarks, one isolated process per point, results merged into CSVs."""

from topk_lib.bench.harness import (  # noqa: F401
    row_template,
    run_interleaved,
    run_point,
)
from topk_lib.bench.meters import parse_bytes  # noqa: F401
from topk_lib.bench.report import (  # noqa: F401
    attention_caption,
    format_table,
    kernel_ratios,
    kernel_targets,
    longest_fitting,
    method_label,
    ratio_at,
    ratio_caption,
)
from topk_lib.bench.store import (  # noqa: F401
    COLUMNS,
    KEY_COLUMNS,
    Merged,
    all_results,
    device_slug,
    measured_suites,
    merge_rows,
    read_rows,
    results_path,
)
from topk_lib.bench.suites import SUITES, run_suite  # noqa: F401

__all__ = [
    "SUITES",
    "COLUMNS",
    "KEY_COLUMNS",
    "Merged",
    "run_point",
    "run_interleaved",
    "row_template",
    "run_suite",
    "measured_suites",
    "merge_rows",
    "read_rows",
    "results_path",
    "all_results",
    "device_slug",
    "parse_bytes",
    "format_table",
    "kernel_ratios",
    "kernel_targets",
    "method_label",
    "longest_fitting",
    "ratio_at",
    "attention_caption",
    "ratio_caption",
]
