"""The forward (noising) process q(x_t | x_0) and its single step q(x_t | x_{t-1})."""

from __future__ import annotations

import numpy as np

from ._array import ArrayT, TimeLike, broadcast_to_like, gather, restore, upcast
from .checks import check_float, check_pair, check_schedule, check_t
from .schedules import Schedule

__all__ = ["q_mean_variance", "q_sample", "q_step_sample"]


def q_mean_variance(s: Schedule, x0: ArrayT, t: TimeLike) -> tuple[ArrayT, ArrayT, ArrayT]:
    """Marginal q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)      (DDPM eq. 4).

    x0: array of shape (B, ...); t: int or integer array of shape (B,).
    Returns (mean, var, log_var), each of x0's shape and dtype.
    """
    check_schedule(s)
    x0 = check_float(x0, "x0")
    t = check_t(t, s.num_timesteps, x0)
    xc = upcast(x0)
    mean = gather(s.sqrt_alphas_cumprod, t, xc) * xc
    var = broadcast_to_like(gather(_one_minus_abar(s), t, xc), xc)
    log_var = broadcast_to_like(gather(s.log_one_minus_alphas_cumprod, t, xc), xc)
    return restore(mean, x0), restore(var, x0), restore(log_var, x0)


def _one_minus_abar(s: Schedule) -> np.ndarray:
    return -np.expm1(s.log_alphas_cumprod)


def q_sample(s: Schedule, x0: ArrayT, t: TimeLike, noise: ArrayT) -> ArrayT:
    """Sample x_t ~ q(x_t | x_0):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (DDPM eq. 4).

    x0, noise (eps ~ N(0, I)): arrays of the same shape (B, ...); t: int or integer (B,).
    Returns x_t of x0's shape and dtype.
    """
    x0, noise, t, xc, nc = check_pair(s, x0, "x0", noise, "noise", t)
    out = gather(s.sqrt_alphas_cumprod, t, xc) * xc + gather(s.sqrt_one_minus_alphas_cumprod, t, xc) * nc
    return restore(out, x0)


def q_step_sample(s: Schedule, x_prev: ArrayT, t: TimeLike, noise: ArrayT) -> ArrayT:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)   (DDPM eq. 2).

    ``x_prev`` is x_{t-1} (x_0 when t = 0); ``noise`` ~ N(0, I) of the same shape.
    """
    x_prev, noise, t, xc, nc = check_pair(s, x_prev, "x_prev", noise, "noise", t)
    out = gather(np.sqrt(s.alphas), t, xc) * xc + gather(np.sqrt(s.betas), t, xc) * nc
    return restore(out, x_prev)
