"""Compatibility module: the code of ``diffmath._io`` lives in ``diffmath.pipeline.io``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.io import (  # noqa: F401
    LOCK_FILE,
    MARKER,
    MARKER_FORMAT,
    TEMP_RE,
    __all__,  # noqa: F401, E402  (the same list)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    forget_file,
    read_json,
    read_marker,
    read_sidecar,
    safetensors_metadata,
    save_safetensors,
    sha256_file,
    weights_and_sidecar,
    write_marker,
)
