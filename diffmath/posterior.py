"""The forward-process posterior q(x_{t-1} | x_t, x_0)."""

from __future__ import annotations

import numpy as np

from ._array import broadcast_to_like, check_float, check_like, check_schedule, check_t, gather, restore, upcast
from .schedules import Schedule

__all__ = ["q_posterior_mean_variance", "posterior_mean_from_eps"]


def q_posterior_mean_variance(s: Schedule, x0, x_t, t):
    """Posterior q(x_{t-1} | x_t, x_0) = N(mean, var).

    mean = coef1[t] * x0 + coef2[t] * x_t
      coef1 = beta_t * sqrt(abar_{t-1}) / (1 - abar_t)
      coef2 = (1 - abar_{t-1}) * sqrt(alpha_t) / (1 - abar_t)
    var  = beta_t * (1 - abar_{t-1}) / (1 - abar_t)          (DDPM eq. 6-7)

    x0, x_t: arrays of shape (B, ...); t: int or integer array of shape (B,).
    Returns (mean, var, log_var_clipped), each broadcast to x_t's shape; log_var_clipped
    at t = 0 is log var[1] (Improved DDPM), since var[0] = 0.
    """
    check_schedule(s)
    x_t = check_float(x_t, "x_t")
    x0 = check_like(x0, x_t, "x0", "x_t")
    t = check_t(t, s.num_timesteps, x_t)
    x0c, xtc = upcast(x0), upcast(x_t)
    mean = gather(s.posterior_mean_coef1, t, xtc) * x0c + gather(s.posterior_mean_coef2, t, xtc) * xtc
    var = broadcast_to_like(gather(s.posterior_variance, t, xtc), xtc)
    log_var = broadcast_to_like(gather(s.posterior_log_variance_clipped, t, xtc), xtc)
    return restore(mean, x_t), restore(var, x_t), restore(log_var, x_t)


def posterior_mean_from_eps(s: Schedule, x_t, t, eps):
    """The posterior mean written through the noise (DDPM eq. 11):

    mean = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t),

    equal to ``q_posterior_mean_variance(s, x0, x_t, t)[0]`` with x0 = x0_from_eps(x_t, eps).
    """
    check_schedule(s)
    x_t = check_float(x_t, "x_t")
    eps = check_like(eps, x_t, "eps", "x_t")
    t = check_t(t, s.num_timesteps, x_t)
    xc, ec = upcast(x_t), upcast(eps)
    with np.errstate(divide="ignore"):
        inv_sqrt_alpha = np.exp(-0.5 * np.log1p(-s.betas))
        eps_coef = s.betas / s.sqrt_one_minus_alphas_cumprod
    out = gather(inv_sqrt_alpha, t, xc) * (xc - gather(eps_coef, t, xc) * ec)
    return restore(out, x_t)
