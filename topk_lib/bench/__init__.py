"""Memory and time benchmarks, one isolated process per point, results merged into CSVs."""

from topk_lib.bench.harness import (  # noqa: F401
    SUITES,
    COLUMNS,
    KEY_COLUMNS,
    run_point,
    run_suite,
    measured_suites,
    merge_rows,
    results_path,
    device_slug,
    parse_bytes,
    format_table,
    kernel_targets,
    TinyTransformer,
    main,
)

__all__ = [
    "SUITES",
    "COLUMNS",
    "KEY_COLUMNS",
    "run_point",
    "run_suite",
    "measured_suites",
    "merge_rows",
    "results_path",
    "device_slug",
    "parse_bytes",
    "format_table",
    "kernel_targets",
    "TinyTransformer",
    "main",
]
