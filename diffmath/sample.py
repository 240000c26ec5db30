"""Compatibility module: the code of ``diffmath.sample`` lives in ``diffmath.pipeline.generate``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.generate import (  # noqa: F401
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    LADDERS,
    NET_DTYPES,
    SAMPLE_FILES,
    SAMPLERS,
    SOLVER_SAMPLERS,
    LoadedModel,
    __all__,  # noqa: F401, E402  (the same list)
    check_conditioning,
    check_finite_samples,
    check_net_dtype,
    check_sampling,
    claim_samples_folder,
    class_labels,
    conditioning_info,
    default_clip,
    generate,
    load_model,
    matched_vpsde,
    parse_classes,
    request_labels,
    sample_run,
    sampling_info,
    save_class_grid,
    save_grid,
    sde_score,
    solver_ladder,
    unconditional_error,
)
from .pipeline.io import atomic_write_bytes, atomic_write_npz  # noqa: F401
from .pipeline.plots import save_fig  # noqa: F401
from .schedules import Schedule, timesteps  # noqa: F401
