"""Compatibility module: the code of ``diffmath.distributed`` lives in ``diffmath.pipeline.distributed``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.distributed import Dist, resolve_device  # noqa: F401
from .pipeline.rundir import RunError  # noqa: F401

__all__ = [
    "resolve_device",
]
