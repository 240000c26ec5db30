"""Compatibility module: the code of ``diffmath.distributed`` lives in ``diffmath.pipeline.distributed``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.distributed import (  # noqa: F401
    Dist,
    __all__,  # noqa: F401, E402  (the same list)
    resolve_device,
)
from .pipeline.rundir import RunError  # noqa: F401
