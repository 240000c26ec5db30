"""diffmath: the mathematics of diffusion models, exact, checked and fast.

Modules (one concept each): ``schedules``, ``forward``, ``posterior``, ``parameterization``,
``gaussian``, ``losses``, ``sde``, ``denoiser``, ``samplers``, ``oracle``, ``likelihood``, ``guidance``; see
README.md and docs/design.md for the conventions, docs/equations.md for the equation each function implements.
"""

from . import (
    denoiser,
    forward,
    gaussian,
    guidance,
    likelihood,
    losses,
    oracle,
    parameterization,
    posterior,
    samplers,
    schedules,
    sde,
)
from .schedules import (
    Schedule,
    betas_for_alpha_bar,
    cosine_schedule,
    linear_schedule,
    named_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_schedule,
    sigmoid_schedule,
    timesteps,
)

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "betas_for_alpha_bar",
    "cosine_schedule",
    "denoiser",
    "forward",
    "gaussian",
    "guidance",
    "linear_schedule",
    "likelihood",
    "losses",
    "oracle",
    "samplers",
    "sde",
    "named_schedule",
    "parameterization",
    "posterior",
    "rescale_zero_terminal_snr",
    "scaled_linear_schedule",
    "schedules",
    "sigmoid_schedule",
    "timesteps",
]
