"""Compatibility module: the code of ``diffmath.checkpoint`` lives in ``diffmath.pipeline.checkpoint``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    OUR_FILES,
    RESUMABLE_FIELDS,
    RESUME_KEYS,
    RUN_FORMAT,
    SAMPLE_KEYS,
    __all__,  # noqa: F401, E402  (the same list)
    check_checkpoint_meta,
    check_class_count,
    check_compatible,
    checkpoint_name,
    latest_checkpoint,
    legacy_run_files,
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    prepare_out,
    read_run_config,
    rng_state_b64,
    rng_state_from_b64,
    save_checkpoint,
    weights_digest,
    write_run_config,
)
from .pipeline.data import Data  # noqa: F401
from .pipeline.io import (  # noqa: F401
    atomic_write_json,
    read_json,
    safetensors_metadata,
    save_safetensors,
    sha256_file,
    weights_and_sidecar,
)
from .pipeline.rundir import RunError, is_empty, open_run  # noqa: F401
