"""Compatibility module: the code of ``diffmath.sample`` lives in ``diffmath.pipeline``: ``loaded``
(the network of a run), ``sampler_loops`` (the sampler loops), ``generate`` (sampling, its
argument checks) and ``sample_run`` (``diffmath sample``: the samples written to a folder).

This module only re-exports its old public names; new code imports them from their homes.
"""

from .pipeline.generate import (  # noqa: F401
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    LADDERS,
    SAMPLERS,
    check_conditioning,
    check_finite_samples,
    check_net_dtype,
    check_sampling,
    class_labels,
    default_clip,
    generate,
    parse_classes,
    request_labels,
    unconditional_error,
)
from .pipeline.io import atomic_write_bytes, atomic_write_npz  # noqa: F401
from .pipeline.loaded import NET_DTYPES, LoadedModel, load_model  # noqa: F401
from .pipeline.plots import save_fig  # noqa: F401
from .pipeline.sample_run import (  # noqa: F401
    SAMPLE_FILES,
    claim_samples_folder,
    conditioning_info,
    sample_run,
    sampling_info,
    save_class_grid,
    save_grid,
)
from .pipeline.sampler_loops import SOLVER_SAMPLERS, matched_vpsde, sde_score, solver_ladder  # noqa: F401
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
