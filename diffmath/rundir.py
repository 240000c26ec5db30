"""Compatibility module: the code of ``diffmath.rundir`` lives in ``diffmath.pipeline.rundir``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.io import LOCK_FILE, MARKER, MARKER_FORMAT, TEMP_RE, read_marker, write_marker  # noqa: F401
from .pipeline.rundir import (  # noqa: F401
    KNOWN_FILES, claim_output, clean_temp_files, clear_run, FolderLock, is_empty, lock_folder, marker, new_marker,
    open_run, RunError,
)

__all__ = [
    "RunError",
    "FolderLock",
    "lock_folder",
    "open_run",
    "claim_output",
    "clear_run",
    "clean_temp_files",
    "is_empty",
    "marker",
    "new_marker",
    "KNOWN_FILES",
]
