"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising diffusion implicit models")."""

from __future__ import annotations

import numpy as np
import torch

from .._array import backend, broadcast_coef, gather_t, is_tensor, restore, schedule_table, upcast, widen_for_tables
from ..checks import check_eta, check_like, check_pair, check_schedule, check_signal, check_steps, check_t
from ..parameterization import X0_TABLES, x0_from_eps_prepared
from ..schedules import Schedule, timesteps
from ._common import LoopModel, check_out_dtype, finish, model_t, progress_bar, randn_like, start

__all__ = ["ddim_step", "ddim_coefs", "ddim_pairs", "sample_ddim"]


def _ext(s: Schedule, name: str, first: float) -> np.ndarray:
    """The table ``s.<name>`` with the value at t_prev = -1 prepended, so index t_prev + 1 is
    valid for t_prev in [-1, T); built once per schedule."""
    return schedule_table(s, ("ddim_ext", name), lambda s: np.concatenate([[first], getattr(s, name)]))


def ddim_coefs(s: Schedule, t, t_prev, eta: float = 0.0):
    """The three DDIM coefficients (sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma),
    float64 of t's shape (numpy, or tensors on t's device), with   (DDIM eq. 12, 16)

        sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev),
        abar_prev = alphas_cumprod[t_prev], or 1 for t_prev = -1.

    Without cancellation: 1 - abar_t/abar_prev = -expm1(log abar_t - log abar_prev), and with
    r = (1 - abar_t/abar_prev)/(1 - abar_t),  1 - abar_prev - sigma^2 = (1 - abar_prev)
    ((1 - r) + (1 - eta^2) r), where 1 - r = abar_t (1 - abar_prev) / (abar_prev (1 - abar_t))
    is a ratio of table entries; both terms are >= 0 for eta <= 1. For eta > 1 the
    coefficient must stay real, else ValueError.
    """
    check_schedule(s)
    eta = check_eta(eta)
    T = s.num_timesteps
    t = check_t(t, T)
    t_prev = check_t(t_prev, T, name="t_prev", lo=-1)
    bad = t_prev >= t
    if bad if isinstance(bad, bool) else bool(bad.any()):
        tt, tp = (v if isinstance(v, int) else int(v[bad].reshape(-1)[0]) for v in (t, t_prev))
        raise ValueError(f"t_prev must be < t (a DDIM step goes backward in time); got t = {tt}, t_prev = {tp}")
    return _ddim_coefs(s, t, t_prev, eta)


def _ddim_coefs(s: Schedule, t, t_prev, eta: float):
    """``ddim_coefs`` on checked arguments. In DDIM's notation alpha_t is DDPM's abar_t."""
    like = t if is_tensor(t) else (t_prev if is_tensor(t_prev) else None)
    log_alpha_t = gather_t(s.log_alphas_cumprod, t, like)
    log_1m_alpha_t = gather_t(s.log_one_minus_alphas_cumprod, t, like)
    log_alpha_prev = gather_t(_ext(s, "log_alphas_cumprod", 0.0), t_prev + 1, like)  # alpha_{-1} = 1
    log_1m_alpha_prev = gather_t(_ext(s, "log_one_minus_alphas_cumprod", -np.inf), t_prev + 1, like)
    ops = backend(log_alpha_t)
    # (1) 1 - alpha_t / alpha_prev, without cancellation
    one_m_ratio = -ops.expm1(log_alpha_t - log_alpha_prev)
    # (2) rho = (1 - alpha_t/alpha_prev) / (1 - alpha_t), so sigma_t^2 = eta^2 (1 - alpha_prev) rho   (eq. 16)
    rho = one_m_ratio * ops.exp(-log_1m_alpha_t)
    one_m_alpha_prev = ops.exp(log_1m_alpha_prev)
    # (3) 1 - rho = alpha_t (1 - alpha_prev) / (alpha_prev (1 - alpha_t)), a ratio of table entries
    one_m_rho = ops.exp(log_alpha_t - log_alpha_prev + log_1m_alpha_prev - log_1m_alpha_t)
    # (4) the squared coefficient of the "direction pointing to x_t" (eq. 12): 1 - alpha_prev - sigma_t^2
    dir_coef_sq = one_m_alpha_prev * (one_m_rho + (1.0 - eta**2) * rho)
    if bool((dir_coef_sq < 0).any()):
        raise ValueError(
            f"eta = {eta} makes sigma^2 exceed 1 - abar_prev at some step (sqrt(1 - abar_prev - sigma^2) "
            "is not real); use eta in [0, 1]"
        )
    sigma_t = eta * ops.sqrt(one_m_alpha_prev * rho)
    return ops.exp(0.5 * log_alpha_prev), ops.sqrt(dir_coef_sq), sigma_t


def _ddim_update(s: Schedule, x_t, t, eps, coefs, noise=None):
    """One DDIM update (eq. 12) on checked arguments: x_t, eps of one kind and shape, abar_t > 0,
    noise like x_t or None, ``coefs`` = ``_ddim_coefs(s, t, t_prev, eta)``. Returns x_{t_prev} in
    x_t's dtype."""
    sqrt_alpha_prev, sqrt_dir, sigma_t = coefs
    xc, ec = widen_for_tables(s, t, X0_TABLES, upcast(x_t), upcast(eps))  # float64 where 1/sqrt(abar_t) overflows
    # (1) "predicted x0" = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    x0 = x0_from_eps_prepared(s, xc, t, ec)
    # (2) sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev - sigma_t^2) eps   ("direction pointing to x_t")
    x_prev = broadcast_coef(sqrt_alpha_prev, xc) * x0 + broadcast_coef(sqrt_dir, xc) * ec
    # (3) + sigma_t z   ("random noise")
    if noise is not None:
        x_prev = x_prev + broadcast_coef(sigma_t, xc) * upcast(noise)
    return restore(x_prev, x_t)


def ddim_step(s: Schedule, x_t, t, t_prev, eps, noise=None, eta: float = 0.0):
    """One DDIM step x_t -> x_{t_prev}   (DDIM eq. 12 with sigma from eq. 16):

    x0     = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise
    sigma  = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)

    eta = 0 is deterministic DDIM; eta = 1 gives sigma^2 = the posterior variance of the
    (respaced) chain t -> t_prev, i.e. DDPM with variance "small". ``t_prev = -1`` is the
    final step to x0 (abar_prev = 1, sigma = 0). x_t, eps, noise: (B, ...); t, t_prev: ints
    or integer arrays (B,), t_prev < t. ``noise`` ~ N(0, I) is required iff eta > 0 and some
    t_prev >= 0. Returns x_{t_prev} with x_t's shape and dtype. A float32 step where
    1/sqrt(abar_t) exceeds float32's range (abar_t < ~1e-77) is computed in float64 and rounded
    once, never NaN.
    """
    eta = check_eta(eta)
    x_t, eps, t, xc, _ = check_pair(s, x_t, "x_t", eps, "eps", t)
    t_prev = check_t(t_prev, s.num_timesteps, x_t, name="t_prev", lo=-1)
    if is_tensor(xc):  # batched indices as tensors on x's device, so the coefficients are too
        t, t_prev = (v if isinstance(v, int) else torch.as_tensor(v, device=xc.device) for v in (t, t_prev))
    coefs = ddim_coefs(s, t, t_prev, eta)
    needs_noise = eta > 0 and (t_prev >= 0 if isinstance(t_prev, int) else bool((t_prev >= 0).any()))
    if needs_noise:
        if noise is None:
            raise ValueError(f"noise is required for DDIM with eta = {eta} > 0 on a step with t_prev >= 0")
        noise = check_like(noise, x_t, "noise", "x_t")
    check_signal(s, t, "x0_from_eps")  # abar_t = 0: eps says nothing about x0
    return _ddim_update(s, x_t, t, eps, coefs, noise if needs_noise else None)


def ddim_pairs(T: int, steps: int, spacing: str = "leading"):
    """The (t, t_prev) pairs of a DDIM loop: ``timesteps(T, steps, spacing)`` stepped from each
    element to the next and from the last to -1 (docs/design.md, "Timesteps")."""
    ts = timesteps(T, steps, spacing).tolist()
    return list(zip(ts, ts[1:] + [-1]))


def sample_ddim(
    eps_model,
    s: Schedule,
    shape=None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    out_dtype=None,
):
    """DDIM sampling (Song et al. 2021, Sec. 4.2 / eq. 12): x_T ~ N(0, I), then ``ddim_step``
    over ``timesteps(T, steps, spacing)`` (leading | trailing | linspace) and a final noiseless
    step to t_prev = -1.

    ``eps_model(x, t)`` gets t as an integer array of shape (B,) of x's kind (the original
    index via ``s.timestep_map`` if ``s`` is itself respaced). ``generator``:
    numpy.random.Generator or torch.Generator; ``x_T`` optionally the start (not modified).
    ``callback(t=, x=, eps=)`` after each step. Returns x_0 of ``shape``.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and t (docs/samplers.md).
    """
    check_schedule(s)
    eta = check_eta(eta)
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable eps_model(x, t); got {type(eps_model).__name__}")
    steps = check_steps(steps, s.num_timesteps)
    pairs = ddim_pairs(s.num_timesteps, steps, spacing)
    x, generator = start(shape, generator, x_T)
    out_dtype = check_out_dtype(out_dtype, x)
    model = LoopModel(eps_model, "eps_model", "sample_ddim", len(pairs))
    coefs = [_ddim_coefs(s, t, t_prev, eta) for t, t_prev in pairs]  # every step checked here, once
    check_signal(s, np.array([t for t, _ in pairs]), "x0_from_eps")  # every step's abar_t > 0, once
    for k, (t, t_prev) in enumerate(progress_bar(pairs, len(pairs), progress, "DDIM")):
        model.step = k
        eps = model(x, model_t(s.timestep_map[t], x))
        noise = randn_like(x, generator) if (eta > 0 and t_prev >= 0) else None
        x = _ddim_update(s, x, t, eps, coefs[k], noise)
        if callback is not None:
            callback(t=t, x=x, eps=eps)
    return finish(x, out_dtype)
