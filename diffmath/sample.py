"""Compatibility module: the code of ``diffmath.sample`` lives in ``diffmath.pipeline.generate``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.generate import (  # noqa: F401
    DEFAULT_GUIDANCE, DEFAULT_STEPS, LADDERS, NET_DTYPES, SAMPLE_FILES, SAMPLERS, SOLVER_SAMPLERS,
    check_conditioning, check_finite_samples, check_net_dtype, check_sampling, claim_samples_folder, class_labels,
    conditioning_info, default_clip, generate, load_model, LoadedModel, matched_vpsde, parse_classes, request_labels,
    sample_run, sde_score,
    sampling_info, save_class_grid, save_grid, solver_ladder, unconditional_error,
)
from .pipeline.io import atomic_write_bytes, atomic_write_npz  # noqa: F401
from .pipeline.plots import save_fig  # noqa: F401
from .schedules import Schedule, timesteps  # noqa: F401

__all__ = [
    "LoadedModel",
    "load_model",
    "generate",
    "sample_run",
    "save_grid",
    "save_class_grid",
    "parse_classes",
    "class_labels",
    "check_conditioning",
    "request_labels",
    "SAMPLERS",
    "DEFAULT_STEPS",
    "DEFAULT_GUIDANCE",
]
