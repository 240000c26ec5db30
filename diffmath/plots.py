"""Compatibility module: the code of ``diffmath.plots`` lives in ``diffmath.pipeline.plots``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.io import atomic_write_bytes  # noqa: F401
from .pipeline.plots import (  # noqa: F401
    __all__,  # noqa: F401, E402  (the same list)
    plot_guidance,
    plot_loss,
    plot_schedule,
    save_fig,
)
from .schedules import Schedule  # noqa: F401
