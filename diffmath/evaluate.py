"""Compatibility module: the code of ``diffmath.evaluate`` lives in ``diffmath.pipeline``:
``metrics`` (distances), ``classifier`` (the digit classifier),
``evaluate`` (evaluate_run, the test VLB, per-class scores) and ``report`` (tables, report.md).

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.classifier import DigitClassifier, cache_dir, digit_classifier  # noqa: F401
from .pipeline.evaluate import evaluate_guidance, evaluate_run, guidance_sweep, per_class_metrics, vlb_bpd  # noqa: F401
from .pipeline.io import atomic_write_json, atomic_write_npz, atomic_write_text  # noqa: F401
from .pipeline.metrics import (  # noqa: F401
    class_metrics,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    sliced_wasserstein,
    wasserstein_1d,
)
from .pipeline.report import (  # noqa: F401
    class_table,
    format_metrics,
    guidance_report_lines,
    guidance_table,
    metric_rows,
    metrics_table,
    write_report,
)

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
