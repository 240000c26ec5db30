"""Compatibility module: the code of ``diffmath.plots`` lives in ``diffmath.pipeline.plots``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.io import atomic_write_bytes  # noqa: F401
from .pipeline.plots import plot_guidance, plot_loss, plot_schedule, save_fig  # noqa: F401
from .schedules import Schedule  # noqa: F401

__all__ = [
    "plot_loss",
    "plot_schedule",
    "plot_guidance",
]
