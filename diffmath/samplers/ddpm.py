"""Ancestral sampling of DDPM (Ho et al. 2020, Alg. 2) with eps-prediction."""

from __future__ import annotations

import numpy as np

from .._array import backend, gather, restore, schedule_table, upcast, widen_for_tables
from ..checks import check_clip, check_like, check_pair, check_schedule, check_signal, check_steps, check_variance
from ..parameterization import X0_TABLES, x0_from_eps_prepared
from ..posterior import posterior_mean_prepared
from ..schedules import Schedule, timesteps
from ._common import LoopModel, check_out_dtype, finish, model_t, progress_bar, randn_like, start

__all__ = ["ddpm_step", "sample_ddpm", "ddpm_std"]


def ddpm_std(s: Schedule, variance: str = "small") -> np.ndarray:
    """The per-step noise std table of the DDPM sampler (float64, shape (T,)):
    exp(posterior_log_variance_clipped / 2) ("small", beta_tilde) or sqrt(beta) ("large"),
    with entry 0 set to 0 (DDPM adds no noise at t = 0; Ho et al. 2020, Alg. 2).
    Returns a fresh (writable) copy of the table ``ddpm_step`` uses."""
    check_schedule(s)
    check_variance(variance)
    return _std_table(s, variance).copy()


def _std_table(s: Schedule, variance: str) -> np.ndarray:
    """``ddpm_std``'s table, built once per (immutable) schedule and variance, read-only."""
    return schedule_table(s, ("ddpm_std", variance), lambda s: _build_std(s, variance))


def _build_std(s: Schedule, variance: str) -> np.ndarray:
    std = np.exp(0.5 * s.posterior_log_variance_clipped) if variance == "small" else np.sqrt(s.betas)
    std[0] = 0.0
    return std


def ddpm_step(s: Schedule, x_t, t, eps, noise=None, variance: str = "small", clip_x0=None):
    """One ancestral step x_t -> x_{t-1} ~ N(mean, std^2 I)   (DDPM Alg. 2, eq. 6-7, 11, 15):

    x0   = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps,  clipped to [-c, c] if clip_x0 = c
    mean = posterior_mean_coef1[t] x0 + posterior_mean_coef2[t] x_t
    std  = exp(posterior_log_variance_clipped[t] / 2)  ("small", beta_tilde_t)
           sqrt(beta_t)                                ("large")
    x_{t-1} = mean + std * noise, and std = 0 at t = 0 (no noise on the last step).

    x_t, eps, noise: shape (B, ...); t: int or integer array (B,). ``noise`` ~ N(0, I) is
    required where t > 0. Returns x_{t-1} with x_t's shape and dtype. A float32 step where
    1/sqrt(abar_t) exceeds float32's range (abar_t < ~1e-77) is computed in float64 and rounded
    once (x0 * coef1 is finite there; inf - inf was NaN).
    """
    check_variance(variance)
    c = check_clip(clip_x0)
    x_t, eps, t, _, _ = check_pair(s, x_t, "x_t", eps, "eps", t)
    check_signal(s, t, "x0_from_eps")  # abar_t = 0: eps says nothing about x0
    any_noise = (t > 0) if isinstance(t, int) else bool((t > 0).any())
    if any_noise:
        if noise is None:
            raise ValueError("noise is required for a DDPM step with t > 0 (noise ~ N(0, I) of x_t's shape)")
        noise = check_like(noise, x_t, "noise", "x_t")
    return _ddpm_update(s, x_t, t, eps, _std_table(s, variance), c, noise if any_noise else None)


def _ddpm_update(s: Schedule, x_t, t, eps, sigma, clip, z=None):
    """One DDPM step (Alg. 2, line 4) on checked arguments: x_t, eps of one kind and shape,
    abar_t > 0, ``sigma`` = ``_std_table(s, variance)`` (sigma_0 = 0), ``clip`` None or c > 0,
    z like x_t or None (no noise: every t is 0). Returns x_{t-1} in x_t's dtype.

    The mean is computed through x0 (eq. 7 with eq. 15), which equals eq. 11's
    mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) without clipping and
    lets the clipped x0 in."""
    xc, ec = widen_for_tables(s, t, X0_TABLES, upcast(x_t), upcast(eps))  # float64 where 1/sqrt(abar_t) overflows
    # (1) the predicted x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps   (eq. 4 solved for x0; eq. 15)
    x0 = x0_from_eps_prepared(s, xc, t, ec)
    # (2) clipped to the data range [-c, c] (the DDPM code's clip_denoised)
    if clip is not None:
        x0 = backend(x0).clip(x0, -clip, clip)
    # (3) mu_theta = mu_tilde_t(x_t, x0) = coef1_t x0 + coef2_t x_t   (eq. 7; = eq. 11 unclipped)
    mu = posterior_mean_prepared(s, x0, xc, t)
    # (4) x_{t-1} = mu_theta + sigma_t z, sigma_t^2 = beta_tilde_t ("small") or beta_t ("large")   (Alg. 2, line 4)
    if z is not None:
        mu = mu + gather(sigma, t, xc) * upcast(z)
    return restore(mu, x_t)


def sample_ddpm(
    eps_model,
    s: Schedule,
    shape=None,
    *,
    variance: str = "small",
    clip_x0=None,
    steps=None,
    spacing: str = "leading",
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    out_dtype=None,
):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): x_T ~ N(0, I), then ``ddpm_step``
    for t = T-1, ..., 0 (no noise at t = 0).

    With ``steps`` < T, DDPM on the respaced schedule ``s.respace(timesteps(T, steps,
    spacing))`` (Improved DDPM, Sec. 4): betas 1 - abar_t/abar_prev, "large" is that beta.
    ``eps_model(x, t)`` gets t as an integer array of shape (B,) of x's kind holding the
    ORIGINAL index (``timestep_map``). ``generator``: numpy.random.Generator (numpy loop) or
    torch.Generator (torch loop); ``x_T`` optionally gives the start (it is not modified).
    ``callback(t=, x=, eps=)`` runs after each step with the new x. Returns x_0 of ``shape``.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and t (docs/samplers.md).
    """
    check_schedule(s)
    check_variance(variance)
    clip_x0 = check_clip(clip_x0)
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable eps_model(x, t); got {type(eps_model).__name__}")
    if steps is not None:
        check_steps(steps, s.num_timesteps)
        s = s.respace(timesteps(s.num_timesteps, steps, spacing))
    x, generator = start(shape, generator, x_T)
    out_dtype = check_out_dtype(out_dtype, x)
    T = s.num_timesteps
    check_signal(s, np.arange(T - 1, -1, -1), "x0_from_eps")  # every step's abar_t > 0, checked once
    sigma = _std_table(s, variance)
    model = LoopModel(eps_model, "eps_model", "sample_ddpm", T)  # checks each model output (new every step)
    for t in progress_bar(range(T - 1, -1, -1), T, progress, "DDPM"):
        model.step = T - 1 - t
        eps = model(x, model_t(s.timestep_map[t], x))
        z = randn_like(x, generator) if t > 0 else None
        x = _ddpm_update(s, x, t, eps, sigma, clip_x0, z)
        if callback is not None:
            callback(t=t, x=x, eps=eps)
    return finish(x, out_dtype)
