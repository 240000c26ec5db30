"""The forward-process posterior q(x_{t-1} | x_t, x_0)."""

from __future__ import annotations

import numpy as np

from ._array import ArrayT, TimeLike, broadcast_to_like, gather, restore, schedule_table
from .checks import check_pair, check_signal
from .schedules import Schedule

__all__ = ["q_posterior_mean_variance", "q_posterior_mean", "posterior_mean_from_eps"]


def q_posterior_mean_variance(s: Schedule, x0: ArrayT, x_t: ArrayT, t: TimeLike) -> tuple[ArrayT, ArrayT, ArrayT]:
    """Posterior q(x_{t-1} | x_t, x_0) = N(mean, var).

    mean = coef1[t] * x0 + coef2[t] * x_t
      coef1 = beta_t * sqrt(abar_{t-1}) / (1 - abar_t)
      coef2 = (1 - abar_{t-1}) * sqrt(alpha_t) / (1 - abar_t)
    var  = beta_t * (1 - abar_{t-1}) / (1 - abar_t)          (DDPM eq. 6-7)

    x0, x_t: arrays of shape (B, ...); t: int or integer array of shape (B,).
    Returns (mean, var, log_var_clipped), each broadcast to x_t's shape; log_var_clipped
    at t = 0 is log var[1] (Improved DDPM), since var[0] = 0. For the mean alone,
    ``q_posterior_mean`` skips the two full-size variance arrays.
    """
    x_t, x0, t, xtc, x0c = check_pair(s, x_t, "x_t", x0, "x0", t)
    mean = posterior_mean_prepared(s, x0c, xtc, t)
    var = broadcast_to_like(gather(s.posterior_variance, t, xtc), xtc)
    log_var = broadcast_to_like(gather(s.posterior_log_variance_clipped, t, xtc), xtc)
    return restore(mean, x_t), restore(var, x_t), restore(log_var, x_t)


def q_posterior_mean(s: Schedule, x0: ArrayT, x_t: ArrayT, t: TimeLike) -> ArrayT:
    """The posterior mean coef1[t] * x0 + coef2[t] * x_t of q(x_{t-1} | x_t, x_0)
    (DDPM eq. 7), equal to ``q_posterior_mean_variance(s, x0, x_t, t)[0]``. Shapes (B, ...)."""
    x_t, x0, t, xtc, x0c = check_pair(s, x_t, "x_t", x0, "x0", t)
    return restore(posterior_mean_prepared(s, x0c, xtc, t), x_t)


def posterior_mean_prepared(s: Schedule, x0c: ArrayT, xtc: ArrayT, t: TimeLike) -> ArrayT:
    """The posterior mean on inputs already validated and upcast (the samplers' path)."""
    return gather(s.posterior_mean_coef1, t, xtc) * x0c + gather(s.posterior_mean_coef2, t, xtc) * xtc


def posterior_mean_from_eps(s: Schedule, x_t: ArrayT, t: TimeLike, eps: ArrayT) -> ArrayT:
    """The posterior mean written through the noise (DDPM eq. 11):

    mean = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t),

    equal to ``q_posterior_mean_variance(s, x0, x_t, t)[0]`` with x0 = x0_from_eps(x_t, eps).
    """
    x_t, eps, t, xc, ec = check_pair(s, x_t, "x_t", eps, "eps", t)
    check_signal(s, t, "posterior_mean_from_eps")  # abar_t = 0: beta_t / sqrt(1 - abar_t) eps carries no x0
    with np.errstate(divide="ignore"):
        inv_sqrt_alpha = schedule_table(s, "inv_sqrt_alpha", lambda s: np.exp(-0.5 * np.log1p(-s.betas)))
        eps_coef = schedule_table(s, "eps_coef", lambda s: s.betas / s.sqrt_one_minus_alphas_cumprod)
    out = gather(inv_sqrt_alpha, t, xc) * (xc - gather(eps_coef, t, xc) * ec)
    return restore(out, x_t)
