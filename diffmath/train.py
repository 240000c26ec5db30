"""Compatibility module: the code of ``diffmath.train`` lives in ``diffmath.pipeline``:
``config`` (TrainConfig, the demo recipe, field checks), ``model``
(the model factory), ``objective`` (the loss), ``optim`` (learning rate, EMA, stop flag) and ``loop``.

This module only re-exports its old public names; new code imports them from their homes.
"""

from .parameterization import eps_from_prediction, x0_from_prediction  # noqa: F401
from .pipeline.checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    RESUMABLE_FIELDS,
    RESUME_KEYS,
    RUN_FORMAT,
    check_class_count,
    checkpoint_name,
    latest_checkpoint,
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
from .pipeline.config import (  # noqa: F401
    CLASS_FIELDS_DEFAULTS,
    DEMO_CLASSES,
    DEMO_CONFIG,
    MAX_SEED,
    PREDICTIONS,
    TrainConfig,
    check_bool_fields,
    check_int_fields,
    config_from_dict,
    derive_seed,
    int_tuple_field,
)
from .pipeline.data import Data, load_data  # noqa: F401
from .pipeline.distributed import Dist, resolve_device  # noqa: F401
from .pipeline.loop import TrainResult, train  # noqa: F401
from .pipeline.model import (  # noqa: F401
    build_model,
    check_model_config,
    make_schedule,
    resolve_classes,
    unet_resolutions,
)
from .pipeline.objective import (  # noqa: F401
    kernels_module,
    model_outputs,
    philox_path,
    training_loss,
    uses_fused_noise,
)
from .pipeline.optim import learning_rate, lr_schedule  # noqa: F401
from .pipeline.plots import plot_loss, plot_schedule  # noqa: F401
from .pipeline.rundir import RunError  # noqa: F401
from .schedules import SCHEDULE_NAMES, Schedule, named_schedule  # noqa: F401

__all__ = [
    "TrainConfig",
    "TrainResult",
    "RunError",
    "train",
    "build_model",
    "make_schedule",
    "training_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "read_run_config",
    "DEMO_CONFIG",
    "DEMO_CLASSES",
    "resolve_classes",
    "RUN_FORMAT",
    "CHECKPOINT_FORMAT",
]
