"""Compatibility module: the code of ``diffmath.evaluate`` lives in ``diffmath.pipeline``:
``metrics`` (distances), ``classifier`` (the digit classifier),
``evaluate`` (evaluate_run, the test VLB, per-class scores) and ``report`` (tables, report.md).

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.evaluate import (  # noqa: F401
    cache_dir, class_metrics, class_table, digit_classifier, DigitClassifier, evaluate_guidance, evaluate_run,
    format_metrics, frechet_distance, frechet_distance_features, gaussian_stats, guidance_report_lines,
    guidance_sweep, guidance_table, metric_rows, metrics_table, per_class_metrics, sliced_wasserstein, vlb_bpd,
    wasserstein_1d, write_report,
)
from .pipeline.io import atomic_write_json, atomic_write_npz, atomic_write_text  # noqa: F401

__all__ = [
    "frechet_distance",
    "gaussian_stats",
    "frechet_distance_features",
    "wasserstein_1d",
    "sliced_wasserstein",
    "DigitClassifier",
    "digit_classifier",
    "class_metrics",
    "per_class_metrics",
    "guidance_sweep",
    "evaluate_guidance",
    "guidance_table",
    "class_table",
    "vlb_bpd",
    "evaluate_run",
    "cache_dir",
]
