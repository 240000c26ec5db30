"""Compatibility module: the code of ``diffmath.rundir`` lives in ``diffmath.pipeline.rundir``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.io import LOCK_FILE, MARKER, MARKER_FORMAT, TEMP_RE, read_marker, write_marker  # noqa: F401
from .pipeline.rundir import (  # noqa: F401
    KNOWN_FILES,
    FolderLock,
    RunError,
    __all__,  # noqa: F401, E402  (the same list)
    claim_output,
    clean_temp_files,
    clear_run,
    is_empty,
    lock_folder,
    marker,
    new_marker,
    open_run,
)
